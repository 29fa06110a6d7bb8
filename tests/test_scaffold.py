"""`bench new method` and the submission path end to end: generate, test, be refused, edit into a real method,
run, commit, check. Everything is generated into temporary folders, never into this checkout."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from bench.provenance import REPO_ROOT
from bench.scaffold import ScaffoldError, class_name, is_template, module_name, new_method


def files_under(root: Path) -> set[Path]:
    return {p for p in root.rglob("*") if p.is_file()}


@pytest.fixture
def project(tmp_path) -> Path:
    (tmp_path / "baselines" / "pruning").mkdir(parents=True)
    return tmp_path


def test_generates_the_method_its_test_and_a_docs_stub(project):
    g = new_method("my-prune", "pruning", ("image-classification",), root=project)
    assert [p.relative_to(project).as_posix() for p in g.files] == [
        "baselines/pruning/my_prune.py", "tests/baselines/test_my_prune.py", "docs/methods/my-prune.md"]
    src = g.files[0].read_text()
    assert "BENCH_TEMPLATE = True" in src and 'register_method("my-prune", family="pruning"' in src
    assert "class MyPruneConfig" in src and '("image-classification",)' in src
    compile(src, "m.py", "exec")
    compile(g.files[1].read_text(), "t.py", "exec")
    assert "bench run --method my-prune" in g.files[2].read_text()


def test_a_new_family_folder_gets_its_package_file(project):
    g = new_method("my-cache", "caching", ("image-generation", "causal-lm"), root=project)
    assert (project / "baselines" / "caching" / "__init__.py").is_file()
    assert '("image-generation", "causal-lm")' in g.files[0].read_text()


@pytest.mark.parametrize("name", ["My-Method", "../evil", "a/b", "a--b", "-a", "a-", "x" * 41, "a_b", "a.b", ""])
def test_bad_names_are_refused_and_nothing_is_written(project, name):
    with pytest.raises(ScaffoldError, match="lower-case"):
        new_method(name, "pruning", root=project)
    assert not files_under(project)


@pytest.mark.parametrize("family, words", [("none", "not one of"), ("quantum", "not one of")])
def test_bad_families_are_refused(project, family, words):
    with pytest.raises(ScaffoldError, match=words):
        new_method("ok-name", family, root=project)
    assert not files_under(project)


def test_existing_files_and_registered_names_are_refused(project):
    (project / "docs" / "methods").mkdir(parents=True)
    (project / "docs" / "methods" / "my-prune.md").write_text("mine")
    with pytest.raises(ScaffoldError, match="refusing to overwrite docs/methods/my-prune.md"):
        new_method("my-prune", "pruning", root=project)
    assert files_under(project) == {project / "docs" / "methods" / "my-prune.md"}
    with pytest.raises(ScaffoldError, match="already registered"):
        new_method("kd", "distillation", root=REPO_ROOT)  # (and baselines/distillation/kd.py exists anyway)
    with pytest.raises(ScaffoldError, match="modality"):
        new_method("ok-name", "pruning", ("images",), root=project)


def test_names_map_to_python_names():
    assert module_name("2of4") == "method_2of4" and class_name("2of4") == "Method2of4"
    assert module_name("layer-drop") == "layer_drop" and class_name("layer-drop") == "LayerDrop"


def test_is_template_reads_the_marker_or_the_text():
    from bench.registry import get_method_spec

    assert not is_template(get_method_spec("kd")) and not is_template(get_method_spec("none"))
    assert is_template(SimpleNamespace(cls=object, summary="TEMPLATE: does nothing", paper="x"))
    mod = type(sys)("fake_template_module")
    mod.BENCH_TEMPLATE = True
    cls = type("Fake", (), {"__module__": "fake_template_module"})
    sys.modules["fake_template_module"] = mod
    try:
        assert is_template(SimpleNamespace(cls=cls, summary="prunes", paper="Someone 2024"))
    finally:
        del sys.modules["fake_template_module"]


# --- the submission path, end to end -----------------------------------------------------------------------

REAL_APPLY = '''
        import torch

        with torch.no_grad():  # zero the `strength` share of the smallest weights of every layer
            for m in model.modules():
                if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)):
                    k = int(self.config.strength * m.weight.numel())
                    if k:
                        cut = m.weight.abs().flatten().kthvalue(k).values
                        m.weight.mul_(m.weight.abs() > cut)
'''


def make_real(src: str) -> str:
    """What a researcher does to the generated module: real work in apply, a paper, no template marker."""
    edits = [
        ("# `bench check` refuses this method while this line is here. Delete it once `apply` really does "
         "something.\nBENCH_TEMPLATE = True\n", ""),
        ('paper="TEMPLATE: the paper\'s authors and title", year=None', 'paper="Han et al., Learning both Weights '
         'and Connections for Efficient Neural Networks", year=2015'),
        ('summary="TEMPLATE: does nothing yet (returns the reference unchanged); edit before submitting"',
         'summary="layer-wise magnitude pruning, one shot"'),
        ("strength: float = 0.0  # EXAMPLE, unused by the template: replace it with the method's own "
         "hyper-parameters", "strength: float = 0.5  # share of each layer's weights set to zero"),
        ("        # TEMPLATE: transform `model` here", REAL_APPLY + "        # transform `model` here"),
        ('description="template: no transformation (the identity)"', 'description="one-shot layer-wise mask"'),
    ]
    for old, new in edits:
        assert old in src, f"the template changed: update this test's edit of {old[:40]!r}"
        src = src.replace(old, new)
    return src


def test_the_submission_path_end_to_end(tmp_path):
    """generate -> its tests pass -> check refuses the template -> edit into a real method -> commit -> run ->
    commit the result -> check passes, having smoke-run the new method."""
    repo = tmp_path / "repo"
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info", ".pytest_cache")
    for d in ("bench", "tasks", "baselines", "leaderboard"):
        shutil.copytree(REPO_ROOT / d, repo / d, ignore=ignore)
    for f in ("pyproject.toml", ".gitignore", "tests/conftest.py"):
        if (REPO_ROOT / f).is_file():
            (repo / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO_ROOT / f, repo / f)
    env = {**os.environ, "PYTHONPATH": str(repo), "PYTHONDONTWRITEBYTECODE": "1", "COLUMNS": "200",
           "GIT_AUTHOR_NAME": "r", "GIT_AUTHOR_EMAIL": "r@example.org", "GIT_COMMITTER_NAME": "r",
           "GIT_COMMITTER_EMAIL": "r@example.org"}

    def sh(*args: str, ok: bool = True) -> subprocess.CompletedProcess:
        p = subprocess.run(list(args), cwd=repo, env=env, capture_output=True, text=True, timeout=300)
        if ok:
            assert p.returncode == 0, f"{args}:\n{p.stdout}\n{p.stderr}"
        return p

    def bench(*args: str, ok: bool = True) -> subprocess.CompletedProcess:
        return sh(sys.executable, "-m", "bench", *args, ok=ok)

    sh("git", "init", "-q", "-b", "main")
    sh("git", "add", ".")
    sh("git", "commit", "-q", "-m", "base")
    base = sh("git", "rev-parse", "HEAD").stdout.strip()

    out = bench("new", "method", "my-prune", "--family", "pruning").stdout
    module = repo / "baselines" / "pruning" / "my_prune.py"
    assert module.is_file() and "BENCH_TEMPLATE" in out
    assert "my-prune" in bench("list", "methods").stdout  # registered as generated
    sh(sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/baselines/test_my_prune.py")

    refused = bench("check", "--base", base, ok=False)
    assert refused.returncode == 1 and "still the generated template" in refused.stdout

    module.write_text(make_real(module.read_text()))
    sh("git", "add", "baselines", "tests", "docs")
    sh("git", "commit", "-q", "-m", "my-prune: layer-wise magnitude pruning")
    bench("run", "--method", "my-prune", "--task", "digits")  # from committed code: a clean git state
    (result,) = (repo / "results").rglob("*.json")
    assert result.parent == repo / "results" / "cpu" / "digits" / "my-prune"
    sh("git", "add", "results")
    sh("git", "commit", "-q", "-m", "my-prune on digits")

    checked = bench("check", "--base", base)
    assert "PASSED" in checked.stdout and "methods new or changed: my-prune" in checked.stdout
    assert "Smoke runs" in checked.stdout
    smoke_line = [line for line in checked.stdout.splitlines() if "my-prune" in line and "digits" in line]
    assert smoke_line and " ok " in smoke_line[0]
