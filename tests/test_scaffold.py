"""`bench new method`, `bench new task` and the submission path end to end: generate, test, be refused, edit
into a real method, run, commit, check; a generated task and method run together. Everything is generated into
temporary folders, never into this checkout."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from bench.provenance import REPO_ROOT
from bench.scaffold import ScaffoldError, class_name, is_template, module_name, new_method, new_task


def files_under(root: Path) -> set[Path]:
    return {p for p in root.rglob("*") if p.is_file()}


@pytest.fixture
def project(tmp_path) -> Path:
    (tmp_path / "baselines" / "pruning").mkdir(parents=True)
    (tmp_path / "tasks").mkdir()
    return tmp_path


def test_generates_the_method_and_its_test_where_the_repository_keeps_them(project):
    g = new_method("my-prune", "pruning", ("image-classification",), root=project)
    assert [p.relative_to(project).as_posix() for p in g.files] == [
        "baselines/pruning/my_prune.py", "tests/baselines/pruning/test_my_prune.py"]
    src = g.files[0].read_text()
    assert "BENCH_TEMPLATE = True" in src and 'register_method("my-prune", family="pruning"' in src
    assert "class MyPruneConfig" in src and '("image-classification",)' in src
    assert "bench run --method my-prune" in src  # its documentation is its docstring
    compile(src, "m.py", "exec")
    compile(g.files[1].read_text(), "t.py", "exec")
    for p in g.files:  # the folders the repository uses for them
        assert (REPO_ROOT / p.relative_to(project).parent).is_dir(), p


def test_generates_a_task_and_its_test_where_the_repository_keeps_them(project):
    g = new_task("my-blobs", "image-classification", root=project, classes=3)
    assert [p.relative_to(project).as_posix() for p in g.files] == ["tasks/my_blobs.py", "tests/tasks/test_my_blobs.py"]
    src = g.files[0].read_text()
    assert "BENCH_TEMPLATE = True" in src and '@register_task("my-blobs", modality="image-classification"' in src
    assert "CLASSES = 3" in src and "class MyBlobs(ImageClassificationTask)" in src
    compile(src, "t.py", "exec")
    compile(g.files[1].read_text(), "tt.py", "exec")
    for p in g.files:
        assert (REPO_ROOT / p.relative_to(project).parent).is_dir(), p


@pytest.mark.parametrize("modality, words", [("causal-lm", "has no task template yet"), ("pictures", "has a template for")])
def test_a_task_modality_without_a_template_is_refused_naming_the_ones_with_one(project, modality, words):
    with pytest.raises(ScaffoldError, match=words) as e:
        new_task("my-task", modality, root=project)
    assert "image-classification" in str(e.value) and "Adding a task" in str(e.value)
    assert not files_under(project)
    with pytest.raises(ScaffoldError, match="already registered"):
        new_task("digits", root=REPO_ROOT)
    with pytest.raises(ScaffoldError, match="lower-case"):
        new_task("My Task", root=project)


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
    mine = project / "tests" / "baselines" / "pruning" / "test_my_prune.py"
    mine.parent.mkdir(parents=True)
    mine.write_text("mine")
    with pytest.raises(ScaffoldError, match="refusing to overwrite tests/baselines/pruning/test_my_prune.py"):
        new_method("my-prune", "pruning", root=project)
    assert files_under(project) == {mine} and mine.read_text() == "mine"
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


class Project:
    """A copy of the project's code in a temporary folder, with `sh` and `bench` run there."""

    def __init__(self, tmp_path: Path):
        self.repo = repo = tmp_path / "repo"
        ignore = shutil.ignore_patterns("__pycache__", "*.egg-info", ".pytest_cache")
        for d in ("bench", "tasks", "baselines", "leaderboard"):
            shutil.copytree(REPO_ROOT / d, repo / d, ignore=ignore)
        for f in ("pyproject.toml", ".gitignore", "tests/conftest.py"):
            if (REPO_ROOT / f).is_file():
                (repo / f).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(REPO_ROOT / f, repo / f)
        self.env = {**os.environ, "PYTHONPATH": str(repo), "PYTHONDONTWRITEBYTECODE": "1", "COLUMNS": "200",
                    "GIT_AUTHOR_NAME": "r", "GIT_AUTHOR_EMAIL": "r@example.org", "GIT_COMMITTER_NAME": "r",
                    "GIT_COMMITTER_EMAIL": "r@example.org"}

    def sh(self, *args: str, ok: bool = True) -> subprocess.CompletedProcess:
        p = subprocess.run(list(args), cwd=self.repo, env=self.env, capture_output=True, text=True, timeout=300)
        if ok:
            assert p.returncode == 0, f"{args}:\n{p.stdout}\n{p.stderr}"
        return p

    def bench(self, *args: str, ok: bool = True) -> subprocess.CompletedProcess:
        return self.sh(sys.executable, "-m", "bench", *args, ok=ok)


def test_a_generated_task_and_a_generated_method_run_together(tmp_path):
    """`bench new task` + `bench new method` of one modality: registered, listed as compatible, their generated
    tests pass, a smoke run of the pair writes a valid record, and no file outside their own was edited;
    `bench check` refuses both while they are templates."""
    pr = Project(tmp_path)
    pr.env["BENCH_CACHE"] = str(tmp_path / "cache")
    before = {p: p.read_bytes() for p in pr.repo.rglob("*") if p.is_file()}
    pr.bench("new", "task", "my-blobs", "--modality", "image-classification")
    pr.bench("new", "method", "my-prune", "--family", "pruning")
    after = {p: p.read_bytes() for p in pr.repo.rglob("*") if p.is_file() and "__pycache__" not in p.parts}
    assert {p for p in before if after.get(p) != before[p]} == set()  # nothing of the project was edited
    assert {p.relative_to(pr.repo).as_posix() for p in set(after) - set(before)} == {
        "tasks/my_blobs.py", "tests/tasks/test_my_blobs.py", "baselines/pruning/my_prune.py",
        "tests/baselines/pruning/test_my_prune.py"}
    listed = pr.bench("list", "methods", "--task", "my-blobs").stdout
    assert "my-prune" in listed and "kd" in listed  # a template task offers what its kind offers
    pr.sh(sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/tasks/test_my_blobs.py")
    pr.bench("run", "--method", "my-prune", "--task", "my-blobs", "--budget", "smoke", "--results-dir", "out")
    (record,) = (pr.repo / "out").rglob("*.json")
    assert record.parent == pr.repo / "out" / "cpu" / "my-blobs" / "my-prune"
    pr.bench("validate", "out")
    refused = pr.bench("check", "--no-smoke", "--results-dir", "out", ok=False).stdout
    assert "my-blobs" in refused and "task still the generated template" in refused
    assert "my-prune" in refused and "still the generated template" in refused


def test_the_submission_path_end_to_end(tmp_path):
    """generate -> its tests pass -> check refuses the template -> edit into a real method -> commit -> run ->
    commit the result -> check passes, having smoke-run the new method."""
    pr = Project(tmp_path)
    repo, sh, bench = pr.repo, pr.sh, pr.bench

    sh("git", "init", "-q", "-b", "main")
    sh("git", "add", ".")
    sh("git", "commit", "-q", "-m", "base")
    base = sh("git", "rev-parse", "HEAD").stdout.strip()

    out = bench("new", "method", "my-prune", "--family", "pruning").stdout
    module = repo / "baselines" / "pruning" / "my_prune.py"
    assert module.is_file() and "BENCH_TEMPLATE" in out
    assert "my-prune" in bench("list", "methods").stdout  # registered as generated
    sh(sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/baselines/pruning/test_my_prune.py")

    refused = bench("check", "--base", base, ok=False)
    assert refused.returncode == 1 and "still the generated template" in refused.stdout

    module.write_text(make_real(module.read_text()))
    sh("git", "add", "baselines", "tests")
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
