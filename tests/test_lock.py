"""`bench.lock`: a lock is the exact closure of the project's requirements in an install (markers and extras
honoured; bench and unrelated packages left out), deterministic, readable back, and `check` names every way an
install differs from it. Made from fake sets of distributions: nothing is installed or downloaded, and nothing
here depends on the versions installed on this machine."""

from __future__ import annotations

import random

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from typer.testing import CliRunner

from bench import lock as L
from bench.cli import app
from bench.lock import Installed

cli = CliRunner()

REQUIREMENTS = (["alpha>=1", "beta[fast]", "gone; sys_platform == 'no-such-platform'"],
                {"dev": ["pytest-ish"], "ray": ["rayish>=2"]})


def env(**changes) -> dict[str, Installed]:
    """A fake install: the project's closure, an unrelated package and bench itself."""
    base = {
        "alpha": Installed("1.2.0", ("gamma<3", "delta; python_version < '3'")),  # delta: never on Python 3
        "beta": Installed("0.9", ("gamma", "turbo; extra == 'fast'", "slowpoke; extra == 'slow'")),
        "gamma": Installed("2.0.1"),
        "turbo": Installed("5.5", ("gamma>=2",)),
        "pytest-ish": Installed("8.0", ("pluggy-ish",)),
        "pluggy-ish": Installed("1.5"),
        "rayish": Installed("2.60.0", ("msgpack-ish", "alpha")),
        "msgpack-ish": Installed("1.2"),
        "unrelated": Installed("0.1", ("gamma",)),  # installed, but nothing requires it
        "bench": Installed("0.1.0", ("alpha>=1",)),
        "slowpoke": Installed("1.0"),  # only behind an extra nobody asks for
        "delta": Installed("1.0"),
    }
    for k, v in changes.items():
        if v is None:
            base.pop(k.replace("_", "-"), None)
        else:
            base[k.replace("_", "-")] = v
    return base


def make(e=None, name="test-lock") -> L.Lock:
    return L.generate(name, e if e is not None else env(), requirements=REQUIREMENTS, tag="linux-x86_64-cp311")


def test_the_lock_is_the_closure_and_only_the_closure():
    lock = make()
    assert lock.versions() == {"alpha": "1.2.0", "beta": "0.9", "gamma": "2.0.1", "turbo": "5.5",
                               "pytest-ish": "8.0", "pluggy-ish": "1.5", "rayish": "2.60.0", "msgpack-ish": "1.2"}
    # not: unrelated (nothing requires it), bench (the checkout), slowpoke (an extra nobody asks for), delta and
    # gone (markers false here)
    extras = {p.name: p.extras for p in lock.pins}
    assert extras["alpha"] == extras["turbo"] == () and extras["pytest-ish"] == ("dev",)
    assert extras["rayish"] == extras["msgpack-ish"] == ("ray",)
    assert [p.name for p in lock.pins] == sorted(p.name for p in lock.pins)


def test_generation_is_deterministic_whatever_the_order_of_the_install():
    items = list(env().items())
    random.Random(1).shuffle(items)
    assert make(dict(items)).text() == make().text()
    assert make().sha256 == make().sha256


def test_the_file_reads_back_and_is_a_constraints_file():
    lock = make()
    text = lock.text()
    assert "alpha==1.2.0\n" in text and "rayish==2.60.0  # extra: ray\n" in text
    assert f"# pins sha256: {lock.sha256}\n" in text and "bench lock refresh test-lock" in text
    assert "pip install -c locks/test-lock.txt" in text
    assert L.parse(text, "test-lock") == lock
    # the hash covers the pins, not the comments
    assert L.parse(text.replace("Do not edit by hand", "Please do not edit"), "test-lock").sha256 == lock.sha256
    assert make(env(gamma=Installed("2.0.2"))).sha256 != lock.sha256


def test_a_hand_edited_lock_is_refused():
    text = make().text().replace("gamma==2.0.1", "gamma==2.0.2")
    with pytest.raises(L.LockError, match="edited by hand.*bench lock refresh"):
        L.parse(text, "test-lock")
    with pytest.raises(L.LockError, match="line 11.*not a `name==version` pin"):
        L.parse("# pins\n" * 10 + "gamma>=2\n", "test-lock")


def test_an_install_missing_a_requirement_makes_no_lock():
    with pytest.raises(L.LockError, match=r"turbo \(required by beta: turbo; extra == 'fast'\) is not installed"):
        make(env(turbo=None))
    with pytest.raises(L.LockError, match="gamma 3.1 is installed, but alpha requires gamma<3"):
        make(env(gamma=Installed("3.1")))


def test_check_is_empty_for_the_install_it_was_made_from():
    assert L.check(make(), env(), requirements=REQUIREMENTS) == []


def test_check_names_every_difference():
    lock = make()
    drifted = env(gamma=Installed("2.0.2"), pluggy_ish=None, turbo=Installed("5.5", ("gamma", "newdep")),
                  newdep=Installed("0.3"))
    diffs = {d.name: str(d) for d in L.check(lock, drifted, requirements=REQUIREMENTS)}
    assert diffs == {"gamma": "gamma: locked 2.0.1, installed 2.0.2",
                     "pluggy-ish": "pluggy-ish: locked 1.5, not installed",
                     "newdep": "newdep: installed 0.3, required by turbo but not in the lock (refresh it)"}


def test_pins_of_an_extra_that_is_not_installed_are_not_missing():
    lock = make()
    no_ray = env(rayish=None, msgpack_ish=None)
    assert L.check(lock, no_ray, requirements=REQUIREMENTS) == []  # `pip install -e ".[dev]"`, no ray
    half = env(msgpack_ish=None)  # ray installed, one of its dependencies gone
    assert [str(d) for d in L.check(lock, half, requirements=REQUIREMENTS)] == ["msgpack-ish: locked 1.2, not "
                                                                                "installed"]
    wrong = env(rayish=None, msgpack_ish=Installed("9.9"))  # not required, but installed at another version
    assert [d.name for d in L.check(lock, wrong, requirements=REQUIREMENTS)] == ["msgpack-ish"]


def test_a_lock_made_on_another_platform_says_so():
    lock = L.Lock("x", make().pins, "plan9-mips-cp27")
    (d,) = L.check(lock, env(), requirements=REQUIREMENTS)
    assert str(d) == f"platform: the lock was made on plan9-mips-cp27, this is {L.platform_tag()}"


def test_names_are_checked_and_an_unknown_lock_lists_the_valid_ones(tmp_path):
    with pytest.raises(L.LockError, match="not a lock name"):
        L.lock_path("../etc/passwd", tmp_path)
    (tmp_path / "a.txt").write_text(make(name="a").text())
    with pytest.raises(L.LockError, match=r"no lock 'b' .*valid locks: a\)"):
        L.load_lock("b", tmp_path)
    assert L.load_lock("a", tmp_path) == make(name="a")


@pytest.fixture
def fake_install(monkeypatch, tmp_path):
    """`bench lock` against a fake install and a temporary locks folder."""
    state = {"env": env()}
    monkeypatch.setattr(L, "LOCK_DIR", tmp_path / "locks")
    monkeypatch.setattr(L, "installed_environment", lambda: state["env"])
    monkeypatch.setattr(L, "project_requirements", lambda root=None: REQUIREMENTS)
    return state


def test_refresh_and_check_commands(fake_install, tmp_path):
    r = cli.invoke(app, ["lock", "refresh", "mine"])
    assert r.exit_code == 0, r.output
    path = tmp_path / "locks" / "mine.txt"
    assert f"wrote {path}: 8 pins" in r.output and not list(path.parent.glob(".*.tmp"))
    r = cli.invoke(app, ["lock", "check", "mine"])
    assert r.exit_code == 0 and "matches lock mine: 8 pins" in r.output, r.output
    fake_install["env"] = env(gamma=Installed("2.0.2"), pluggy_ish=None)
    r = cli.invoke(app, ["lock", "check", "mine"])
    out = " ".join(r.output.split())
    assert r.exit_code == 1, r.output
    assert "differs from lock mine in 2 package(s)" in out and "gamma: locked 2.0.1, installed 2.0.2" in out
    assert "pluggy-ish: locked 1.5, not installed" in out and "bench lock refresh mine" in out
    r = cli.invoke(app, ["lock", "check", "yours"])
    assert r.exit_code == 2 and "valid locks: mine" in " ".join(r.output.split())


def test_refresh_refuses_an_incomplete_install_and_keeps_the_old_lock(fake_install, tmp_path):
    assert cli.invoke(app, ["lock", "refresh", "mine"]).exit_code == 0
    before = (tmp_path / "locks" / "mine.txt").read_text()
    fake_install["env"] = env(turbo=None)
    r = cli.invoke(app, ["lock", "refresh", "mine"])
    assert r.exit_code == 2 and "turbo" in r.output and "is not installed" in r.output
    assert (tmp_path / "locks" / "mine.txt").read_text() == before


def test_the_committed_lock_is_sound_and_every_profile_names_one():
    """The repository's own lock: readable, header hash consistent (a hand edit fails here), sorted, bench
    left out, the project's own requirements pinned; every profile names a lock that exists."""
    from bench.profiles import load_profile, profile_names

    names = L.lock_names()
    assert L.DEFAULT_LOCK in names
    for n in names:
        lock = L.load_lock(n)
        pinned = lock.versions()
        assert "bench" not in pinned and [p.name for p in lock.pins] == sorted(pinned)
        core, extras = L.project_requirements()
        wanted = {canonicalize_name(Requirement(r).name) for r in core + extras["dev"] + extras["ray"]}
        assert {w for w in wanted if w not in pinned} == set(), n
    assert {load_profile(p).lock for p in profile_names()} <= set(names)
