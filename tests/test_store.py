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


# ---- readers are total: a record or a named rejection (issue 18, cases 3 and 4) --------------------------------

import json  # noqa: E402
import threading  # noqa: E402
import sys  # noqa: E402
from contextlib import contextmanager  # noqa: E402
from pathlib import Path  # noqa: E402

from bench.store import InvalidResult, iter_result_files, load_result, validate_tree  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))  # for hostile_trees, under --import-mode=importlib too

from hostile_trees import FOLDER, HOSTILE, RECORD, corruptions, write_tree  # noqa: E402


@contextmanager
def deadline(seconds: int, root: Path):
    """Fail instead of hanging: a fifo opened for reading blocks until a writer comes, so after `seconds` a
    watchdog thread keeps opening every fifo under `root` for writing (which lets a blocked reader go on) and
    the test fails saying the reader hung. (A SIGALRM cannot do it: the signal may land on another thread.)"""
    done, hung = threading.Event(), threading.Event()

    def watch():
        if done.wait(seconds):
            return
        hung.set()
        while not done.is_set():
            for p in list(root.rglob("*")):
                if p.is_fifo():
                    try:
                        os.close(os.open(p, os.O_WRONLY | os.O_NONBLOCK))
                    except OSError:
                        pass
            done.wait(0.2)

    watchdog = threading.Thread(target=watch, daemon=True)
    watchdog.start()
    try:
        yield
    finally:
        done.set()
        watchdog.join()
        if hung.is_set():
            pytest.fail(f"still reading after {seconds} s: the reader hangs (a fifo waits for a writer)")


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_each_hostile_entry_is_rejected_by_name_with_its_reason(tmp_path, name):
    root = tmp_path / "results"
    paths = write_tree(root, [name])
    with deadline(20, root):
        with pytest.raises(InvalidResult) as e:
            load_result(paths[name], root)
        ok, bad = validate_tree(root)
    assert e.value.path == paths[name]
    text = "; ".join(e.value.problems)
    for words in HOSTILE[name][1]:
        assert words in text, text
    assert len(text) < 2000, "a rejection is a reason, not the file's content"
    assert [r.run_id for r in ok] == [RECORD.stem] and [b.path for b in bad] == [paths[name]]


def test_the_tree_lists_every_json_entry_whatever_it_is(tmp_path):
    root = tmp_path / "results"
    paths = write_tree(root)
    folder = root.joinpath(*FOLDER)
    (folder / ".r.json.tmp.json").write_text("{")  # a write's temporary file
    (folder / f"{RECORD.stem}.verified.json").write_text("{}")  # a verification record: not a result
    (folder / "linked").symlink_to(tmp_path / "results-outside", target_is_directory=True)  # not followed
    (tmp_path / "results-outside" / "elsewhere.json").write_text("{}")
    listed = iter_result_files(root)
    assert listed == sorted(paths.values())
    assert iter_result_files(paths["x.json"]) == [paths["x.json"]]  # a fifo given alone is read (and refused)


def test_a_deep_folder_tree_costs_no_stack(tmp_path):
    """The walk is iterative: it lists a tree 300 folders deep under a recursion limit of 60 frames more than
    the test itself uses. (A tree deeper than Python's own limit would break pytest's recursive clean-up of its
    temporary folders, so the limit is lowered instead of the tree made deeper.)"""
    import traceback

    d = tmp_path / "r"
    d.mkdir()
    for _ in range(300):
        d = d / "a"
        os.mkdir(d)
    (d / "z.json").write_text("{}")
    previous = sys.getrecursionlimit()
    sys.setrecursionlimit(len(traceback.extract_stack()) + 60)
    try:
        listed = iter_result_files(tmp_path / "r")
    finally:
        sys.setrecursionlimit(previous)
    assert listed == [d / "z.json"]


def test_links_are_followed_only_within_their_tree(tmp_path):
    from bench.store import read_json

    root = tmp_path / "results"
    paths = write_tree(root, [])
    inside = root.joinpath(*FOLDER) / "alias.json"
    inside.symlink_to(paths["good"])
    assert read_json(inside, root)["run_id"] == RECORD.stem
    with pytest.raises(InvalidResult, match="read without the results tree"):
        read_json(inside)  # no tree to stay within: not followed
    out = write_tree(root, ["outside.json"])["outside.json"]
    with pytest.raises(InvalidResult, match="a symbolic link to a file outside the results tree"):
        read_json(out, root)
    broken = root / "broken.json"
    broken.symlink_to(tmp_path / "nothing.json")
    with pytest.raises(InvalidResult, match="broken symbolic link"):
        read_json(broken, root)


def test_a_file_at_the_size_limit_is_read_and_one_byte_more_is_not(tmp_path):
    from bench.store import read_json

    p = tmp_path / "a.json"
    p.write_text('"' + "x" * 98 + '"')
    assert read_json(p, limit=100) == "x" * 98
    p.write_text('"' + "x" * 99 + '"')
    with pytest.raises(InvalidResult, match="101 bytes, over the 100-byte limit"):
        read_json(p, limit=100)


def test_random_corruptions_end_in_a_record_or_a_rejection(tmp_path):
    """A seeded fuzz of the committed record: every variant is a valid record or an InvalidResult, never
    another exception; non-finite numbers never get through."""
    root = tmp_path / "results"
    folder = root.joinpath(*FOLDER)
    folder.mkdir(parents=True)
    outcomes = {"valid": 0, "rejected": 0}
    with deadline(120, root):
        for what, data in corruptions(seed=18, n=300):
            p = folder / RECORD.name
            p.write_bytes(data)
            try:
                r = load_result(p, root)
            except InvalidResult as e:
                assert e.problems and all(isinstance(x, str) and x for x in e.problems), what
                outcomes["rejected"] += 1
                continue
            outcomes["valid"] += 1
            json.loads(r.to_json(), parse_constant=lambda token: pytest.fail(f"{what}: {token} got through"))
    assert outcomes["rejected"] > 200, outcomes


def test_the_committed_records_stay_valid():
    ok, bad = validate_tree(Path(__file__).resolve().parents[1] / "results")
    assert ok and not bad, [str(b) for b in bad]
