from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import pytest

from bench.config import ConfigError, apply_overrides, check_range, parse_sets


@dataclass(frozen=True)
class Cfg:
    rate: float = 0.5
    steps: int = 10
    flag: bool = False
    mode: Literal["a", "b"] = "a"
    dims: tuple[int, ...] = (1, 2)
    label: str | None = None

    def validate(self) -> None:
        check_range("rate", self.rate, lo=0, hi=1)


def test_parse_sets_pairs():
    assert parse_sets(["a=1", "b = x=y "]) == {"a": "1", "b": "x=y"}


@pytest.mark.parametrize("bad, words", [(["novalue"], "key=value"), (["=3"], "key=value"),
                                        (["a=1", "a=2"], "twice")])
def test_parse_sets_rejects(bad, words):
    with pytest.raises(ConfigError, match=words):
        parse_sets(bad)


def test_overrides_convert_each_type():
    c = apply_overrides(Cfg(), {"rate": "0.25", "steps": "7", "flag": "true", "mode": "b", "dims": "3,4",
                                "label": "none"})
    assert c == Cfg(0.25, 7, True, "b", (3, 4), None)
    assert apply_overrides(Cfg(), {"label": "x"}).label == "x"


@pytest.mark.parametrize("key, value, words", [
    ("steps", "2.5", "not an integer"), ("rate", "fast", "not a number"), ("rate", "nan", "finite"),
    ("flag", "maybe", "not a boolean"), ("mode", "c", "not one of"), ("rate", "1.5", "must be <= 1"),
])
def test_overrides_reject_bad_values(key, value, words):
    with pytest.raises(ConfigError, match=words):
        apply_overrides(Cfg(), {key: value}, owner="method 'x'")


def test_unknown_key_lists_valid_keys():
    with pytest.raises(ConfigError) as e:
        apply_overrides(Cfg(), {"rat": "1"}, owner="method 'x'")
    msg = str(e.value)
    assert "'rat'" in msg and "rate (float)" in msg and "steps (int)" in msg


def test_overrides_do_not_mutate_defaults():
    base = Cfg()
    apply_overrides(base, {"steps": "3"})
    assert base.steps == 10
