from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import textwrap

import pytest

from bench.registry import (FAMILIES, METHODS, MODALITIES, TASKS, RegistryError, check_supports, create_method,
                            get_method_spec, get_task_spec)
from baselines.base import Method


def test_unknown_method_names_near_matches_and_how_to_list():
    with pytest.raises(RegistryError) as e:
        get_method_spec("magnitud")
    assert "'magnitude'" in str(e.value) and "bench list methods" in str(e.value)


def test_unknown_task_with_no_near_match_still_says_how_to_list():
    with pytest.raises(RegistryError, match="bench list tasks"):
        get_task_spec("zzzz-nothing")


def test_modality_mismatch_names_supported_modalities(monkeypatch):
    spec = dataclasses.replace(get_method_spec("kd"), modalities=("causal-lm",))
    with pytest.raises(RegistryError) as e:
        check_supports(spec, get_task_spec("digits"))
    assert "image-classification" in str(e.value) and "causal-lm" in str(e.value)


def test_registering_a_bad_family_is_refused():
    from bench.registry import register_method

    with pytest.raises(RegistryError, match="family"):
        register_method("x", family="quantum", paper="", year=None, modalities=("causal-lm",), summary="")


@pytest.mark.parametrize("name", METHODS.names())
def test_method_contract(name):
    """Every registered method: a known family, modalities, a frozen Config whose every field has a default,
    a summary and a paper, and it can be created by the factory with no overrides."""
    spec = get_method_spec(name)
    assert spec.family in FAMILIES and spec.modalities and set(spec.modalities) <= set(MODALITIES)
    assert spec.summary and spec.paper
    assert issubclass(spec.cls, Method)
    cfg_cls = spec.cls.Config
    assert dataclasses.is_dataclass(cfg_cls) and cfg_cls.__dataclass_params__.frozen
    method = create_method(name)
    assert json.dumps(dataclasses.asdict(method.config))  # hyper-parameters are JSON values


@pytest.mark.parametrize("name", TASKS.names())
def test_task_contract(name):
    spec = get_task_spec(name)
    assert spec.modality in MODALITIES and spec.tier in ("embedded", "full") and spec.metric


def test_discovery_is_import_light():
    """`bench list` must not import torch, torchvision, sklearn or any dataset (target: under 2 s)."""
    code = textwrap.dedent("""
        import sys, time
        t = time.perf_counter()
        from bench.registry import METHODS, TASKS
        METHODS.names(); TASKS.names()
        heavy = sorted(m for m in ("torch", "torchvision", "sklearn", "numpy", "transformers", "diffusers")
                       if m in sys.modules)
        print(heavy, time.perf_counter() - t)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    heavy, _ = out.rsplit(" ", 1)
    assert heavy == "[]", f"discovery imported {heavy}"
