"""Fixtures for the task tests: small data files written in the real formats, never downloaded."""

from __future__ import annotations

import io
import pickle
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

CIFAR10_LABEL_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


class Py2Pickler(pickle._Pickler):
    """Pickles as Python 2's cPickle did (protocol 2, `str` as 8-bit strings), the format CIFAR ships in.

    Python 3 pickles `bytes` through `_codecs.encode`, which would load back as bytes whatever the
    `encoding` argument; a Python 2 `str` is a SHORT_BINSTRING/BINSTRING that `pickle.load(f,
    encoding="latin1")` (torchvision) turns into `str` and `encoding="bytes"` into `bytes` (b"data", ...).
    """

    dispatch = dict(pickle._Pickler.dispatch)

    def save_py2_str(self, obj: bytes) -> None:
        n = len(obj)
        head = pickle.SHORT_BINSTRING + bytes([n]) if n < 256 else pickle.BINSTRING + struct.pack("<i", n)
        self.write(head + obj)
        self.memoize(obj)

    dispatch[bytes] = save_py2_str
    dispatch[str] = lambda self, obj: self.save_py2_str(obj.encode("latin1"))


def py2_pickle(obj: object) -> bytes:
    buf = io.BytesIO()
    Py2Pickler(buf, protocol=2).dump(obj)
    # numpy 2 names its reconstructor numpy._core.multiarray; the real files (numpy 1, Python 2) say
    # numpy.core.multiarray, which numpy 2 still loads.
    return buf.getvalue().replace(b"cnumpy._core.multiarray\n", b"cnumpy.core.multiarray\n")


@dataclass
class CifarFixture:
    root: Path  # what BENCH_DATA points at; the files are in root / "cifar-10-batches-py"
    train_data: np.ndarray  # uint8 N x 3072, rows as in the files (1024 red, 1024 green, 1024 blue)
    train_labels: np.ndarray
    test_data: np.ndarray
    test_labels: np.ndarray
    label_names: list[str]

    @property
    def folder(self) -> Path:
        return self.root / "cifar-10-batches-py"


def write_cifar10(root: Path, per_batch: int = 4, n_test: int = 10, seed: int = 0) -> CifarFixture:
    """A tiny CIFAR-10 in the real python-pickle layout: data_batch_1..5, test_batch, batches.meta."""
    rng = np.random.default_rng(seed)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    train_x, train_y = [], []
    for b in range(1, 6):
        data = rng.integers(0, 256, size=(per_batch, 3072), dtype=np.uint8)
        labels = [int(v) for v in rng.integers(0, 10, size=per_batch)]
        (folder / f"data_batch_{b}").write_bytes(py2_pickle({
            "batch_label": f"training batch {b} of 5", "labels": labels, "data": data,
            "filenames": [f"fixture_{b}_{i}.png" for i in range(per_batch)]}))
        train_x.append(data)
        train_y += labels
    test_x = rng.integers(0, 256, size=(n_test, 3072), dtype=np.uint8)
    test_y = [i % 10 for i in range(n_test)]
    (folder / "test_batch").write_bytes(py2_pickle({
        "batch_label": "testing batch 1 of 1", "labels": test_y, "data": test_x,
        "filenames": [f"fixture_test_{i}.png" for i in range(n_test)]}))
    (folder / "batches.meta").write_bytes(py2_pickle({
        "num_cases_per_batch": per_batch, "label_names": CIFAR10_LABEL_NAMES, "num_vis": 3072}))
    return CifarFixture(root, np.concatenate(train_x), np.asarray(train_y, dtype=np.int64), test_x,
                        np.asarray(test_y, dtype=np.int64), list(CIFAR10_LABEL_NAMES))


@pytest.fixture
def cifar10_fixture(tmp_path: Path) -> CifarFixture:
    return write_cifar10(tmp_path / "data")


@pytest.fixture
def cifar10_env(cifar10_fixture: CifarFixture, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> CifarFixture:
    """The fixture as the task's data (md5 check off), with a private bench cache and no user reference."""
    monkeypatch.setenv("BENCH_DATA", str(cifar10_fixture.root))
    monkeypatch.setenv("BENCH_CIFAR10_VERIFY", "0")
    monkeypatch.setenv("BENCH_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("BENCH_CIFAR10_REFERENCE", raising=False)
    return cifar10_fixture
