"""`bench new method NAME --family F`: a working method module, its test and a docs stub, from templates.

The generated method is the identity and says so: its summary and paper start with "TEMPLATE" and its module
sets `BENCH_TEMPLATE = True`. It runs, and passes the registry's contract tests and its own generated test,
but `bench check` (what CI runs on a pull request) refuses it and any result made with it until the marker is
gone: `is_template` is the one test of that.

Files (relative to the project root, refused when any exists; all or nothing):
    baselines/<family>/<module>.py      the method
    tests/baselines/test_<module>.py    its tests
    docs/methods/<name>.md              what it does, its hyper-parameters, how to run it
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
    """A name, family or place that a new method cannot have; nothing was written."""


@dataclass
class Generated:
    name: str
    family: str
    module: str  # dotted, e.g. baselines.pruning.my_method
    files: list[Path]


def module_name(name: str) -> str:
    mod = name.replace("-", "_")
    return f"method_{mod}" if mod[0].isdigit() else mod


def class_name(name: str) -> str:
    cls = "".join(part.capitalize() for part in name.split("-") if part)
    return f"Method{cls}" if cls[0].isdigit() else cls


def is_template(spec) -> bool:
    """True while a registered method is still the generated template (its marker, or TEMPLATE text)."""
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


def new_method(name: str, family: str, modalities: tuple[str, ...] = ("image-classification",),
               root: Path | None = None) -> Generated:
    from bench.registry import FAMILIES, METHODS, MODALITIES
    from bench.store import atomic_write_text

    if not NAME_RE.match(name or "") or name.endswith("-") or "--" in name:
        raise ScaffoldError(f"method name {name!r}: use lower-case letters, digits and single dashes, at most 40 "
                            f"characters, e.g. 'my-pruning' (it is also a folder name in results/)")
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
    test_path = root / "tests" / "baselines" / f"test_{mod}.py"
    doc_path = root / "docs" / "methods" / f"{name}.md"
    existing = [p for p in (method_path, test_path, doc_path) if p.exists()]
    if existing:
        raise ScaffoldError("refusing to overwrite " + ", ".join(str(p.relative_to(root)) for p in existing))
    mods = ", ".join(f'"{m}"' for m in modalities)
    values = dict(name=name, family=family, cls=class_name(name), module=mod,
                  modalities=f"({mods}{',' if len(modalities) == 1 else ''})",
                  module_path=f"baselines/{family}/{mod}.py")
    texts = {}
    for tmpl, path in (("method.py.tmpl", method_path), ("test_method.py.tmpl", test_path),
                       ("doc.md.tmpl", doc_path)):
        source = resources.files("bench").joinpath("templates", tmpl).read_text(encoding="utf-8")
        texts[path] = Template(source).substitute(values)
    compile(texts[method_path], str(method_path), "exec")  # a template bug must not reach the user's tree
    family_init = root / "baselines" / family / "__init__.py"
    written = []
    try:
        if not family_init.exists():
            atomic_write_text(family_init, f'"""The {family} family of methods."""\n')
            written.append(family_init)
        for path, text in texts.items():
            atomic_write_text(path, text)
            written.append(path)
    except BaseException:
        for p in written:
            p.unlink(missing_ok=True)
        raise
    return Generated(name, family, f"baselines.{family}.{mod}", [method_path, test_path, doc_path])
