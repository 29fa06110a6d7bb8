"""`bench.imported`: the distributions a task's and a method's code imports, found from their source (function
level imports included) and imported in a fresh interpreter, so bench's own process, which has everything
imported, does not count."""

from __future__ import annotations

import ast

import pytest

from bench import imported as I


def test_imports_are_read_from_the_source_inside_functions_but_not_type_checking_blocks():
    src = '''
from __future__ import annotations
import json
from typing import TYPE_CHECKING
from . import sibling
from ..kit import helper
if TYPE_CHECKING:
    import pandas
else:
    import yaml

def f():
    import torch.nn
    from sklearn.datasets import load_digits
'''
    found = I._imports_of(ast.parse(src), "tasks.sub")
    assert {"torch.nn", "sklearn.datasets", "sklearn.datasets.load_digits", "yaml", "tasks.sub.sibling",
            "tasks.kit.helper"} <= set(found)
    assert "pandas" not in found


def test_scan_follows_the_projects_modules_and_names_the_rest():
    sources, external = I.scan(["tasks.digits", "baselines.reference"])
    assert {"tasks.digits", "baselines.reference", "tasks._kit.classification"} <= set(sources)
    assert "torch" in external and "sklearn.datasets" in external
    assert not any(e.split(".")[0] in I.INTERNAL for e in external)


def test_digits_and_none_import_torch_and_scikit_learn_but_not_transformers(monkeypatch):
    """What the digits task and the `none` method import, in a fresh interpreter; then from the cache."""
    I._memo.clear()
    names = I.imported_distributions(["tasks.digits", "baselines.reference"])
    assert names is not None and {"torch", "numpy", "scikit-learn"} <= set(names)
    assert "transformers" not in names and "bench" not in names
    monkeypatch.setattr(I, "_run_child", lambda *a, **k: pytest.fail("ran the interpreter again"))
    assert I.imported_distributions(["tasks.digits", "baselines.reference"]) == names
    I._memo.clear()  # the file cache answers too
    assert I.imported_distributions(["tasks.digits", "baselines.reference"]) == names


def test_a_module_a_fresh_interpreter_cannot_import_gives_no_answer():
    assert I.imported_distributions(["tasks.no_such_task"]) is None
