"""`bench new method NAME --family F` and `bench new task NAME --modality M`: a working module and its test,
from templates.

The generated method is the identity, the generated task a small synthetic one, and both say so: their
summary starts with "TEMPLATE" and their module sets `BENCH_TEMPLATE = True`. They run, and pass the
registries' contract tests and their own generated tests, but `bench check` (what CI runs on a pull request)
refuses them and any result made with them until the marker is gone: `is_template` is the one test of that.
A generated task and a generated method of the same modality run together end to end (`--budget smoke`) with
no edit outside their own files. Their documentation is their module docstring.

Files (relative to the project root, refused when any exists; all or nothing):
    baselines/<family>/<module>.py              the method
    tests/baselines/<family>/test_<module>.py   its tests
    tasks/<module>.py                           the task
    tests/tasks/test_<module>.py                its tests
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from string import Template

NAME_RE = re.compile(r"^[a-z0-9][a-z0-9-]{0,39}$")
TEMPLATE_MARKER = "BENCH_TEMPLATE"


class ScaffoldError(ValueError):
    """A name, family, modality or place that a new method or task cannot have; nothing was written."""


# The modalities `bench new task` has a template for; any other needs a task written by hand (CONTRIBUTING.md,
# "Adding a task", and the task of that modality in tasks/ to start from).
TASK_TEMPLATES = {"image-classification": "task_image_classification.py.tmpl"}


@dataclass
class Generated:
    name: str
    family: str  # the method's family; for a task, its modality
    module: str  # dotted, e.g. baselines.pruning.my_method
    files: list[Path]


def module_name(name: str) -> str:
    mod = name.replace("-", "_")
    return f"method_{mod}" if mod[0].isdigit() else mod


def class_name(name: str) -> str:
    cls = "".join(part.capitalize() for part in name.split("-") if part)
    return f"Method{cls}" if cls[0].isdigit() else cls


def is_template(spec) -> bool:
    """True while a registered method or task is still the generated template (its marker, or TEMPLATE text)."""
    mod = sys.modules.get(getattr(spec.cls, "__module__", ""), None)
    if mod is not None and getattr(mod, TEMPLATE_MARKER, False):
        return True
    return any(str(getattr(spec, f, "")).lstrip().upper().startswith("TEMPLATE") for f in ("summary", "paper"))


def find_root(start: Path | None = None) -> Path:
    """The project root: the folder with baselines/ and bench/ (the working folder or one above it)."""
    here = Path(start or Path.cwd()).resolve()
    for d in (here, *here.parents):
        if (d / "baselines").is_dir() and (d / "bench").is_dir():
            return d
    raise ScaffoldError(f"{here} is not inside the project (no baselines/ and bench/ above it); run from the "
                        f"project root or pass --root")


def _check_name(name: str, what: str, example: str) -> None:
    if not NAME_RE.match(name or "") or name.endswith("-") or "--" in name:
        raise ScaffoldError(f"{what} name {name!r}: use lower-case letters, digits and single dashes, at most 40 "
                            f"characters, e.g. {example!r} (it is also a folder name in results/)")


def _render(tmpl: str, values: dict) -> str:
    source = resources.files("bench").joinpath("templates", tmpl).read_text(encoding="utf-8")
    return Template(source).substitute(values)


def _write_all(root: Path, texts: dict[Path, str], packages: list[tuple[Path, str]]) -> None:
    """Write every file or none: refuse when any exists, remove what was written when one write fails."""
    from bench.store import atomic_write_text

    existing = [p for p in texts if p.exists()]
    if existing:
        raise ScaffoldError("refusing to overwrite " + ", ".join(str(p.relative_to(root)) for p in existing))
    written = []
    try:
        for init, doc in packages:
            if not init.exists():
                atomic_write_text(init, doc)
                written.append(init)
        for path, text in texts.items():
            atomic_write_text(path, text)
            written.append(path)
    except BaseException:
        for p in written:
            p.unlink(missing_ok=True)
        raise


def new_method(name: str, family: str, modalities: tuple[str, ...] = ("image-classification",),
               root: Path | None = None) -> Generated:
    from bench.registry import FAMILIES, METHODS, MODALITIES

    _check_name(name, "method", "my-pruning")
    families = [f for f in FAMILIES if f != "none"]
    if family not in families:
        raise ScaffoldError(f"family {family!r} is not one of {', '.join(families)}")
    bad = [m for m in modalities if m not in MODALITIES]
    if bad or not modalities:
        raise ScaffoldError(f"modality {', '.join(map(repr, bad)) or '(none given)'}: choose from "
                            f"{', '.join(MODALITIES)}")
    root = Path(root).resolve() if root is not None else find_root()
    if not (root / "baselines").is_dir():
        raise ScaffoldError(f"{root} has no baselines/ folder: --root must be the project root")
    if name in METHODS.names() and root == find_root(Path(__file__).parent):
        raise ScaffoldError(f"a method named {name!r} is already registered ({METHODS.get(name).cls.__module__})")
    mod = module_name(name)
    method_path = root / "baselines" / family / f"{mod}.py"
    test_path = root / "tests" / "baselines" / family / f"test_{mod}.py"
    mods = ", ".join(f'"{m}"' for m in modalities)
    values = dict(name=name, family=family, cls=class_name(name), module=mod,
                  modalities=f"({mods}{',' if len(modalities) == 1 else ''})",
                  module_path=f"baselines/{family}/{mod}.py")
    texts = {method_path: _render("method.py.tmpl", values), test_path: _render("test_method.py.tmpl", values)}
    compile(texts[method_path], str(method_path), "exec")  # a template bug must not reach the user's tree
    _write_all(root, texts, [(root / "baselines" / family / "__init__.py", f'"""The {family} family of methods."""\n')])
    return Generated(name, family, f"baselines.{family}.{mod}", list(texts))


def new_task(name: str, modality: str = "image-classification", root: Path | None = None,
             classes: int = 4) -> Generated:
    """A working embedded task of `modality` on synthetic data, and its test (see the module docstring)."""
    from bench.registry import MODALITIES, TASKS

    _check_name(name, "task", "my-task")
    if modality not in TASK_TEMPLATES:
        known = f" ({modality!r} is a modality, but has no task template yet)" if modality in MODALITIES else ""
        raise ScaffoldError(f"modality {modality!r}{known}: `bench new task` has a template for "
                            f"{', '.join(TASK_TEMPLATES)}; for another, start from a task of that modality in "
                            f"tasks/ (`bench list tasks`) and CONTRIBUTING.md, 'Adding a task'")
    if not 2 <= classes <= 100:
        raise ScaffoldError(f"classes {classes}: a classification task needs 2 to 100 classes")
    root = Path(root).resolve() if root is not None else find_root()
    if not (root / "tasks").is_dir():
        raise ScaffoldError(f"{root} has no tasks/ folder: --root must be the project root")
    if name in TASKS.names() and root == find_root(Path(__file__).parent):
        raise ScaffoldError(f"a task named {name!r} is already registered ({TASKS.get(name).cls.__module__})")
    mod = module_name(name).replace("method_", "task_", 1)
    task_path = root / "tasks" / f"{mod}.py"
    test_path = root / "tests" / "tasks" / f"test_{mod}.py"
    values = dict(name=name, modality=modality, cls=class_name(name).replace("Method", "Task", 1), module=mod,
                  classes=classes)
    texts = {task_path: _render(TASK_TEMPLATES[modality], values), test_path: _render("test_task.py.tmpl", values)}
    compile(texts[task_path], str(task_path), "exec")
    _write_all(root, texts, [])
    return Generated(name, modality, f"tasks.{mod}", list(texts))
