"""The methodology page: what every figure means and how it is measured, generated from the profiles, the task
registry and the record's JSON Schema, with what has no results yet and the command that would make it.

The prose for the record's top-level fields lives in `FIELDS`; a test keeps it in step with the schema, so a
new field cannot reach the site unexplained. Nothing here reads the clock: the page says "results up to" the
latest record's date, so the same results tree still builds the same bytes.
"""

from __future__ import annotations

import json
from collections import Counter
from importlib import metadata, resources
from pathlib import Path
from typing import Any

from leaderboard import data as D

# What each top-level field of a result record means (bench/schema/result-1.schema.json). Kept in step with
# the schema by tests/leaderboard/test_methodology.py.
FIELDS = {
    "schema": "the record format's version (`result-1`): a reader refuses versions it does not know",
    "run_id": "UTC time of the run, the config hash's first 8 hex digits and a random suffix; also the file name",
    "created_at": "when the run finished (ISO 8601, UTC)",
    "status": "`ok`, or `failed` with `error` (type, message, traceback): a failed run is kept, never ranked",
    "budget": "`full` for leaderboard runs; `smoke` caps every training at 20 steps for CI and is never shown",
    "seed": "the seed of everything random in the run (data order, initialisation, sampling)",
    "task": "the task's name, version, tier and modality, the fingerprint of its data and the sha256 of the "
            "reference model it loaded (an embedded task's reference is a committed artifact)",
    "method": "the method's name, family, version, paper, year and URL, and the hyper-parameters it ran with",
    "profile": "the hardware profile the run was made under, the machine detected and where the two differ",
    "provenance": "bench version, git sha and dirty flag, the exact command, a config hash, the versions of the "
                  "packages that can change a number, the pinned environment (lock) and what the task and "
                  "method import",
    "quality": "the task's metric for the method and the reference on the same examples, the change and its "
               "paired 95% bootstrap interval (the same examples resampled for both)",
    "fidelity": "agreement with the reference's own outputs (top-1 agreement, identical answer tokens, SSIM)",
    "controls": "comparisons the method's paper implies, e.g. the same student trained without the teacher, with "
                "the method's gain over it and its interval",
    "speed": "the speedup t_ref / t_method: the median of paired ABBA ratios timed in one process, its 95% "
             "bootstrap interval, the precision reached, the contention measured and the verdict "
             "(`ok`/`unreliable` with reasons)",
    "memory": "peak memory of one workload call for the reference and the method, and how it was measured",
    "size": "parameters, non-zero parameters and safetensors bytes of both models; sparsity and whether the "
            "runtime skips the zeros",
    "compute": "MACs (or network evaluations) per timed call, from torch's flop counter",
    "cost": "what the method itself cost: training or calibration seconds, steps, samples and tokens",
    "training": "for a method that makes a smaller training set (dataset distillation): training the task's "
                "architecture on it against training it on the full split (seconds, steps, samples, rows), the "
                "time and samples ratios, and the one-off cost of making the set; absent for other methods",
    "method_stats": "what the method reports about itself at run time, e.g. how often a cache fired or the "
                    "draft tokens accepted (the proof that a cache or a draft really worked)",
    "error": "for a failed run: the exception's type, message and traceback",
}

MEASURES = [
    ("Quality", "The task's metric on a fixed evaluation set, for the method and for the unmodified reference on "
                "the same examples. Δ is method minus reference, in percentage points (pp) for a metric between 0 "
                "and 1 and in the metric's own units otherwise (FID); its 95% interval is a paired bootstrap over "
                "the examples. Quality is exactly repeatable for a fixed seed and profile."),
    ("Speed", "Reference and method are timed in one process on the same inputs, interleaved in ABBA order after "
              "warm-up. The speedup is the median of the per-pair ratios t_ref / t_method with a percentile "
              "bootstrap 95% interval; pairs go on until the interval is within the profile's precision target "
              "or its time cap (table below). While the pairs run bench measures what else used the machine; a "
              "figure is <em>unreliable</em> when other processes used more than the profile's share of the "
              "cores, when the precision was not reached, or when the speedup drifted between the two halves. "
              "An unreliable figure is shown greyed with its reasons and never ranked."),
    ("Noise floor", "The <code>none</code> method times the reference against itself: its interval shows how far "
                    "timing noise reaches on a task and profile. A speedup whose interval overlaps it cannot be "
                    "told from noise."),
    ("Memory", "On CUDA, <code>torch.cuda.max_memory_allocated</code> over one workload call. On the CPU, the peak "
               "bytes of live tensor storage during one call (parameters and buffers included), counted by a "
               "<code>TorchDispatchMode</code>: what CUDA's counter counts, and deterministic. Shown with its "
               "ratio to the reference's."),
    ("Size and compute", "Parameters, non-zero parameters and safetensors bytes; MACs per timed call from torch's "
                         "flop counter. Zeros a dense kernel does not skip cost the same time: the speedup shows it."),
    ("Training cost", "The method's own training or calibration time, steps and samples on the profile's machine; "
                      "the reference's training is not counted."),
    ("Quality budget and ranks", "A task page opens on the task's quality budget (1% of the reference's value "
                                 "unless the task declares another, e.g. 2% for FID). Only methods within it whose "
                                 "speedup interval lies wholly above 1× are ranked; a rank is 1 + the number of "
                                 "those that are faster beyond doubt (intervals separated), and '=' marks a rank "
                                 "whose interval overlaps another's. <code>bench recommend</code> applies the same "
                                 "rules."),
    ("Tiers", "<em>embedded</em> tasks run offline on a CPU from data that ships with the project; <em>full</em> "
              "tasks (GLUE, GSM8K, CIFAR-10, COCO, ImageNet FID) load real data and models and mostly need a GPU "
              "profile."),
]


def _schema() -> dict[str, Any]:
    text = resources.files("bench").joinpath("schema/result-1.schema.json").read_text(encoding="utf-8")
    return json.loads(text)


def _ref_name(node: dict[str, Any]) -> str | None:
    for n in [node] + list(node.get("anyOf", [])) + [node.get("items", {})]:
        ref = n.get("$ref") if isinstance(n, dict) else None
        if ref:
            return ref.rsplit("/", 1)[-1]
    items = next((n.get("items") for n in node.get("anyOf", []) if isinstance(n, dict) and "items" in n), None)
    return _ref_name(items) if isinstance(items, dict) else None


def record_fields() -> list[dict[str, Any]]:
    """The record's top-level fields, each with its meaning (`FIELDS`) and its sub-fields from the schema (with
    the schema's own description where it has one)."""
    schema = _schema()
    defs, required = schema.get("$defs", {}), set(schema.get("required", []))
    out = []
    for name, node in schema["properties"].items():
        sub = []
        ref = _ref_name(node)
        if ref and ref in defs:
            for k, v in defs[ref].get("properties", {}).items():
                sub.append({"name": k, "text": v.get("description", "")})
        out.append({"name": name, "text": FIELDS.get(name, node.get("description", "")), "required": name in required,
                    "sub": sub})
    return out


def profiles_view(rows: list[dict], records: list) -> list[dict[str, Any]]:
    from bench.profiles import load_profile, profile_names

    counts = Counter(r.profile.name for r, _, _ in records)
    out = []
    for name in profile_names():
        p = load_profile(name)
        t = p.timing
        out.append({"name": name, "description": p.description, "device": p.device, "dtype": p.dtype,
                    "threads": p.threads, "lock": getattr(p, "lock", ""),
                    "batch": ", ".join(f"{k} {v}" for k, v in p.batch_size.items()),
                    "timing": f"±{t.precision:.0%} target, {t.min_repeats}-{t.max_repeats} pairs, at least "
                              f"{t.min_time_s:g} s, at most {t.max_time_s:g} s an attempt, {t.attempts} attempts; "
                              f"contended above {t.max_other_share:.0%} of the cores",
                    "expect": ("CUDA GPU" + (f" named like '{p.expect.gpu_name_contains}'" if p.expect.gpu_name_contains
                                             else "") + (f", at least {p.expect.min_gpu_memory_gb:g} GB"
                                                         if p.expect.min_gpu_memory_gb else ""))
                              if p.expect.cuda else f"no GPU needed, at least {p.expect.min_cpus} CPUs",
                    "n": counts.get(name, 0),
                    "command": f"bench run --method none --task {'digits' if p.device == 'cpu' else 'cifar10'} "
                               f"--profile {name}"})
    return out


def tasks_view(task_specs: dict, records: list) -> list[dict[str, Any]]:
    counts = Counter((r.task.name, r.profile.name) for r, _, _ in records)
    out = []
    for name in sorted(set(task_specs) | {r.task.name for r, _, _ in records}):
        spec = task_specs.get(name)
        have = sorted(p for (t, p) in counts if t == name)
        out.append({"name": name, "tier": spec.tier if spec else "", "modality": spec.modality if spec else "",
                    "metric": spec.metric if spec else "", "budget": getattr(spec, "quality_budget", "1%"),
                    "summary": spec.summary if spec else "",
                    "profiles": [(p, counts[name, p]) for p in have], "has_page": bool(have),
                    "command": f"bench run --method none --task {name}"
                               + ("" if not spec or spec.tier == "embedded" else " --profile h100-bf16")})
    return out


def noise_view(rows: list[dict]) -> list[dict[str, Any]]:
    from leaderboard.pages import fspeed_ci

    out = []
    for task, prof in sorted({(r["task"], r["profile"]) for r in rows}):
        nf = D.noise_floor([r for r in rows if r["task"] == task and r["profile"] == prof])
        out.append({"task": task, "profile": prof, "speed": fspeed_ci(nf["speedup"], nf["slo"], nf["shi"]) if nf else "",
                    "ok": bool(nf and nf["speed_ok"]), "page": nf["page"] if nf else "",
                    "command": D.noise_floor_command(task, prof)})
    return out


def repository_url() -> str:
    """The project's repository, from the installed package's metadata (`[project.urls]`); empty when none."""
    try:
        urls = metadata.metadata("bench").get_all("Project-URL") or []
    except metadata.PackageNotFoundError:
        return ""
    for u in urls:
        label, _, url = u.partition(",")
        if label.strip().lower() in ("repository", "source", "homepage") and url.strip().startswith("https://"):
            return url.strip()
    return ""


def methodology_page(rows: list[dict], records: list, task_specs: dict, docs: dict[str, str],
                     repo_url: str | None = None) -> dict[str, Any]:
    """Everything the methodology page shows. `docs` maps the site's copies of the project's documents
    (CONTRIBUTING, CITATION) to their file names, for links."""
    latest = max((r.created_at for r, _, _ in records), default="")
    example = next((rel for r, rel, _ in records if r.status == "ok" and r.budget == "full"), "")
    lock = next((p["lock"] for p in profiles_view(rows, records) if p["name"] == "cpu" and p["lock"]), "")
    install = f'pip install -c locks/{lock}.txt -e ".[dev]"' if lock else 'pip install -e ".[dev]"'
    return {"measures": MEASURES, "fields": record_fields(), "profiles": profiles_view(rows, records),
            "tasks": tasks_view(task_specs, records), "noise": noise_view(rows), "latest": latest[:10],
            "install": install, "reproduce": f"bench reproduce results/{example}" if example else "",
            "repo": repo_url or repository_url(), "docs": docs}


def copy_docs(site: Path) -> dict[str, str]:
    """Copy CONTRIBUTING.md and CITATION.cff from the checkout the site is built from, when they are there, as
    plain-text files the methodology page links to; returns {title: file name}."""
    from bench.provenance import REPO_ROOT

    out = {}
    for title, name in (("How to contribute a method (CONTRIBUTING.md)", "CONTRIBUTING.md"),
                        ("How to cite (CITATION.cff)", "CITATION.cff")):
        src = REPO_ROOT / name
        if src.is_file():
            (site / "docs").mkdir(exist_ok=True)
            (site / "docs" / (name + ".txt")).write_bytes(src.read_bytes())
            out[title] = "docs/" + name + ".txt"
    return out
