"""Full tasks whose reference is a published checkpoint: where it comes from, how it is identified, and how
the loaded model is kept (`gsm8k`, `glue-*`).

Where: every model is configured by one environment variable (`BENCH_GSM8K_REFERENCE`, ...) whose value is
either a local Hugging Face model folder (`config.json`, the weights, the tokenizer files) or a hub id,
optionally pinned to a revision as `org/name@revision` (a branch, tag or commit). Unset, the task's default hub
id is used. Hub downloads go through `transformers` into the usual Hugging Face cache (`HF_HOME`).

Identity: the result records `state_sha256(state)` of the weights as loaded (sha256 over the sorted tensor
names, dtypes, shapes and raw bytes), so two results compare as "same reference" only when the weights are
the same bit for bit, whatever the revision or folder they came from. There is no published hash to check
against (`reference_canonical` is False): we could not download the checkpoints where this was written.

Keeping: the runner turns `reference_weights(ctx).state` into a subject with `subject_from_state`, which for a
small embedded model builds the architecture and loads the state. For a 1.5 B-parameter checkpoint that would
initialise a second model and copy every tensor; `Pretrained` hands back the model the state came from.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from tasks.base import ReferenceWeights, RunContext, Subject

if TYPE_CHECKING:
    import torch


class PretrainedNotFound(OSError):
    """A configured model folder or hub id could not be loaded; the message names the variable."""


@dataclass(frozen=True)
class ModelSource:
    env: str  # the environment variable that configures it
    value: str  # its value, or the default
    path: str  # a local folder, or the hub id
    revision: str | None  # hub revision (None: the default branch); always None for a folder
    local: bool

    def describe(self) -> str:
        return self.path if self.local else f"{self.path}@{self.revision or 'main'} (hub)"

    def hint(self) -> str:
        return (f"Set {self.env} to a local Hugging Face model folder (config.json, model.safetensors or "
                f"pytorch_model.bin, tokenizer files) or to a hub id such as org/name or org/name@revision")


def model_source(env: str, default: str) -> ModelSource:
    """The model configured by `env` (see the module docstring). A value that looks like a path (absolute,
    `./`, `~`, or with more than one `/`) must be an existing folder."""
    value = os.environ.get(env, "").strip() or default
    folder = Path(value).expanduser()
    if folder.is_dir():
        return ModelSource(env, value, str(folder.resolve()), None, True)
    repo, _, revision = value.partition("@")
    looks_like_path = value.startswith(("/", ".", "~")) or repo.count("/") != 1
    if looks_like_path:
        raise PretrainedNotFound(f"{env}={value}: no such folder. " + ModelSource(env, value, value, None,
                                                                                 True).hint())
    return ModelSource(env, value, repo, revision or None, False)


def in_hub_cache(repo_id: str, filename: str, revision: str | None = None, repo_type: str = "model") -> bool:
    """Whether `filename` of a hub repository is in the local Hugging Face cache (`HF_HOME`), found without the
    network."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return False
    try:
        return isinstance(try_to_load_from_cache(repo_id, filename, revision=revision, repo_type=repo_type), str)
    except ValueError:  # a malformed repository id: the load will say so
        return False


def dataset_cached(repo_id: str) -> bool:
    """Whether a hub dataset has a local copy: its files in the hub cache, or `datasets`' prepared copy."""
    try:
        from huggingface_hub import constants
    except ImportError:
        return False
    hub_copy = Path(constants.HF_HUB_CACHE) / f"datasets--{repo_id.replace('/', '--')}"
    prepared = Path(os.environ.get("HF_DATASETS_CACHE") or Path(constants.HF_HOME) / "datasets") \
        / repo_id.replace("/", "___")
    return hub_copy.is_dir() or prepared.is_dir()


def dataset_problem(repo_id: str, what: str, remedy: str) -> str | None:
    """Why the hub dataset `repo_id` cannot be read here, found without reading it (a task's preflight, when no
    local copy is configured); None when the hub answers or the local cache has a copy. `remedy` says how to
    point the task at a local copy (its environment variable and the layout it expects)."""
    from bench import preflight

    net = preflight.hub()
    if net.ok or dataset_cached(repo_id):
        return None
    return (f"the {what} data is the hub dataset {repo_id}, which this machine cannot reach ({net.why}), and the "
            f"local Hugging Face cache has no copy of it. {remedy}")


def source_problem(env: str, default: str, what: str, marker: str = "config.json", hint: str | None = None,
                   make=None) -> str | None:
    """Why the model configured by `env` cannot be loaded here, found without loading it (a task's preflight);
    None when it can: a local folder that holds `marker`, or a hub id that the hub can serve now or the local
    Hugging Face cache holds. `make(env, default)` resolves the source (default `model_source`); `hint` says
    what a local copy is (default `ModelSource.hint`)."""
    from bench import preflight

    try:
        source = (make or model_source)(env, default)
    except PretrainedNotFound as e:
        return str(e)
    hint = hint or source.hint()
    if source.local:
        if not (Path(source.path) / marker).is_file():
            return f"{env}={source.value}: the folder has no {marker}, so it is not a copy of the {what}. {hint}"
        return None
    net = preflight.hub()
    if net.ok or in_hub_cache(source.path, marker, source.revision):
        return None
    name = f"{source.path}@{source.revision}" if source.revision else source.path
    return (f"the {what} is {name} on the Hugging Face hub, which this machine cannot reach ({net.why}), and the "
            f"local Hugging Face cache has no copy of it. {hint}")


def load_model(auto_class, source: ModelSource, what: str, **kwargs):
    """`auto_class.from_pretrained` in the checkpoint's own dtype, with an error that names the variable."""
    try:
        return auto_class.from_pretrained(source.path, revision=source.revision, dtype="auto", **kwargs)
    except (OSError, ValueError) as e:
        raise PretrainedNotFound(f"could not load the {what} from {source.describe()} ({source.env}): {e}\n"
                                 f"{source.hint()}") from e


def load_tokenizer(source: ModelSource, what: str):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(source.path, revision=source.revision)
    except (OSError, ValueError) as e:
        raise PretrainedNotFound(f"could not load the {what}'s tokenizer from {source.describe()} "
                                 f"({source.env}): {e}\n{source.hint()}") from e


def state_sha256(state: dict[str, "torch.Tensor"]) -> str:
    """`bench.cache.state_sha256`: the one hash of weights, shared with the methods' cache keys."""
    from bench import cache

    return cache.state_sha256(state)


def source_of(model, source: ModelSource) -> str:
    """Where the weights came from, with the hub commit they resolved to when known."""
    commit = getattr(model.config, "_commit_hash", None)
    return source.path if source.local else f"hf://{source.path}@{commit or source.revision or 'main'}"


class Pretrained:
    """Mixin for a task whose reference is a loaded checkpoint (see the module docstring)."""

    _kept: "tuple[dict, torch.nn.Module] | None" = None

    def keep(self, model: "torch.nn.Module", source: ModelSource) -> ReferenceWeights:
        state = model.state_dict()
        self._kept = (state, model)
        return ReferenceWeights(state, state_sha256(state), False, source_of(model, source))

    def subject_from_state(self, state: dict, ctx: RunContext) -> Subject:
        if self._kept is not None and state is self._kept[0]:
            return self.prepare(self._kept[1], ctx)
        model = self.build_reference()
        model.load_state_dict(state)
        return self.prepare(model, ctx)
