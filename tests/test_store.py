from __future__ import annotations

import os

import pytest

from bench.store import atomic_write_text


def test_atomic_write_replaces_whole_file(tmp_path):
    p = tmp_path / "a" / "r.json"
    atomic_write_text(p, "old")
    atomic_write_text(p, "new")
    assert p.read_text() == "new" and os.listdir(p.parent) == ["r.json"]
    assert oct(p.stat().st_mode & 0o777) != oct(0o600)


@pytest.mark.parametrize("exc", [KeyboardInterrupt, MemoryError, OSError])
def test_interrupted_write_keeps_old_file_and_leaves_no_temp(tmp_path, monkeypatch, exc):
    p = tmp_path / "r.json"
    atomic_write_text(p, "old")

    def boom(*a, **k):
        raise exc("interrupted")

    monkeypatch.setattr(os, "fsync", boom)
    with pytest.raises(exc):
        atomic_write_text(p, "new" * 1000)
    assert p.read_text() == "old"
    assert os.listdir(tmp_path) == ["r.json"]
