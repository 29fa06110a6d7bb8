"""`gsm8k-dllm`: lm-eval's own gsm8k task answered by a masked diffusion LM, offline, on GSM8K-format fixture files
(`test_gsm8k`'s writers) and a tiny random Llama whose config names a [MASK] id."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))  # for the fixture writers, under --import-mode=importlib too

import test_gsm8k as gsm8k_fixtures  # noqa: E402

from bench import api  # noqa: E402
from bench.profiles import load_profile  # noqa: E402
from bench.progress import Reporter  # noqa: E402
from bench.registry import get_task_spec  # noqa: E402
from tasks import gsm8k, gsm8k_dllm  # noqa: E402
from tasks._kit import dllm, lm, pretrained  # noqa: E402
from tasks.base import RunContext  # noqa: E402
from tasks.gsm8k_dllm import GSM8KDLLM  # noqa: E402


def save_mask_llama(folder: Path, tok, hidden: int = 32, layers: int = 2, seed: int = 0) -> int:
    """A tiny random LlamaForCausalLM with one row more than the tokenizer, that row's id as the config's
    mask_token_id (as LLaDA-8B's config.json names 126336); returns the mask id."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    mask = len(tok)
    cfg = LlamaConfig(vocab_size=mask + 1, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=2048,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, bos_token_id=None,
                      tie_word_embeddings=False, mask_token_id=mask)
    LlamaForCausalLM(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    return mask


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("gsm8k-dllm")
    data = root / "data"
    data.mkdir()
    gsm8k_fixtures.write_jsonl(data / "train.jsonl", gsm8k_fixtures.TRAIN)
    gsm8k_fixtures.write_jsonl(data / "test.jsonl", gsm8k_fixtures.TEST)
    rows = gsm8k_fixtures.TRAIN + gsm8k_fixtures.TEST
    tok = lm.train_tokenizer([lm.prompt_of(q) + " " + a for q, a in rows], vocab_size=400)
    mask = save_mask_llama(root / "reference", tok)
    return {"data": data, "reference": root / "reference", "mask": mask, "tok": tok, "root": root}


@pytest.fixture(scope="module")
def env(files):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(gsm8k.DATA_ENV, str(files["data"]))
        mp.setenv(gsm8k_dllm.REFERENCE_ENV, str(files["reference"]))
        mp.delenv(gsm8k_dllm.TRUST_ENV, raising=False)
        mp.delenv(gsm8k_dllm.SHIFT_ENV, raising=False)
        yield files


def context(budget: str = "smoke") -> RunContext:
    return RunContext(profile=load_profile("cpu"), seed=0, progress=Reporter(), batch_size=1, budget=budget)


@pytest.fixture(scope="module")
def task(env) -> GSM8KDLLM:
    torch.set_num_threads(1)
    t = GSM8KDLLM()
    t.load(context())
    return t


@pytest.fixture(scope="module")
def reference(task):
    w = task.reference_weights(context())
    return task.subject_from_state(w.state, context())


def remote_folder(folder: Path, tok, **config) -> Path:
    """A checkpoint folder whose config.json has LLaDA-8B's auto_map (its code is never imported here)."""
    folder.mkdir()
    cfg = {"architectures": ["LLaDAModelLM"], "model_type": "llada",
           "auto_map": {"AutoConfig": "configuration_llada.LLaDAConfig", "AutoModel": "modeling_llada.LLaDAModelLM",
                        "AutoModelForCausalLM": "modeling_llada.LLaDAModelLM"}, **config}
    (folder / "config.json").write_text(json.dumps(cfg))
    tok.save_pretrained(folder)
    return folder


# ---- the task ----------------------------------------------------------------------------------------------

def test_registered_as_a_full_diffusion_lm_task_with_arith_dllms_capabilities():
    spec = get_task_spec("gsm8k-dllm")
    assert (spec.modality, spec.tier, spec.metric, spec.higher_is_better, spec.version) == \
        ("diffusion-lm", "full", "exact_match", True, "1")
    caps = {c for c in api.CAPABILITIES if api.offers(spec.cls, c)}
    assert caps == {c for c in api.CAPABILITIES if api.offers(get_task_spec("arith-dllm").cls, c)}
    assert not caps & {api.Draft, api.Student, api.ShiftedPrompts}  # gsm8k's, which a dLLM cannot offer
    assert api.offers(gsm8k.GSM8K, api.Draft)  # (so it must not be a subclass of GSM8K)


def test_it_is_gsm8ks_lm_eval_task_and_data(task, env):
    assert task.config == gsm8k.lm_eval_config(env["data"])
    assert task.test == [{"question": q, "answer": a} for q, a in gsm8k_fixtures.TEST]
    assert len(task.data_fingerprint()) == 64
    assert [r["question"] for r in task.training_rows()] == [q for q, _ in gsm8k_fixtures.TRAIN]


def test_the_mask_id_is_the_configs_then_the_tokenizers_else_refused(task, env):
    assert task.mask_id == env["mask"] == len(task.tokenizer) and not task.remote and task.logit_shift == 0

    class Tok:
        mask_token_id = 7

    assert gsm8k_dllm.mask_id_of({"mask_token_id": 126336}, Tok(), "x") == 126336  # LLaDA-8B's config
    assert gsm8k_dllm.mask_id_of({}, Tok(), "x") == 7
    Tok.mask_token_id = None
    with pytest.raises(gsm8k_dllm.MaskIdMissing, match="mask_token_id"):
        gsm8k_dllm.mask_id_of({}, Tok(), "x")


def test_preflight_passes_for_a_local_plain_model(env):
    assert GSM8KDLLM().preflight(context()) == []


def test_remote_code_is_refused_without_the_opt_in(env, tmp_path, monkeypatch):
    folder = remote_folder(tmp_path / "llada", env["tok"], mask_token_id=5)
    monkeypatch.setenv(gsm8k_dllm.REFERENCE_ENV, str(folder))
    problems = GSM8KDLLM().preflight(context())
    assert len(problems) == 1
    assert gsm8k_dllm.TRUST_ENV in problems[0] and "modeling_llada.LLaDAModelLM" in problems[0]
    assert gsm8k_dllm.REFERENCE_ENV in problems[0]
    t = GSM8KDLLM()
    t.load(context())  # data, tokenizer and the config as a plain dict: no code of the checkpoint is imported
    assert t.remote and t.mask_id == 5
    with pytest.raises(gsm8k_dllm.RemoteCodeRefused, match=gsm8k_dllm.TRUST_ENV):
        t.reference_weights(context())  # loading refuses as well, not only the preflight
    monkeypatch.setenv(gsm8k_dllm.TRUST_ENV, "1")
    assert GSM8KDLLM().preflight(context()) == []
    cls, kwargs = t._auto()
    assert cls.__name__ == "AutoModel" and kwargs == {"trust_remote_code": True}


def test_the_fingerprint_follows_the_shift(task, env, monkeypatch):
    monkeypatch.setenv(gsm8k_dllm.SHIFT_ENV, "1")
    shifted = GSM8KDLLM()
    shifted.load(context())
    assert shifted.logit_shift == 1 and len(task.data_fingerprint()) == 64
    assert shifted.data_fingerprint() != task.data_fingerprint()  # a cached reference evaluation is not reused


def test_a_bad_shift_setting_is_refused_by_name(env, monkeypatch):
    monkeypatch.setenv(gsm8k_dllm.SHIFT_ENV, "2")
    assert any(gsm8k_dllm.SHIFT_ENV in p for p in GSM8KDLLM().preflight(context()))


def test_a_remote_code_models_forward_gets_the_2d_mask_and_the_shift():
    seen = {}

    class Out:
        def __init__(self, logits):
            self.logits = logits

    def model(input_ids, attention_mask):
        seen["mask"] = attention_mask
        return Out(torch.arange(input_ids.shape[1], dtype=torch.float)[None, :, None].expand(1, -1, 3))

    x, mask = torch.zeros((1, 4), dtype=torch.long), torch.ones((1, 4), dtype=torch.long)
    out = gsm8k_dllm.remote_forward(model, x, mask, {"shift": 0})
    assert seen["mask"] is mask and out[0, :, 0].tolist() == [0, 1, 2, 3]
    out = gsm8k_dllm.remote_forward(model, x, mask, {"shift": 1})
    assert out[0, :, 0].tolist() == [0, 0, 1, 2]  # position i - 1 predicts token i


# ---- the subject and the sampler ------------------------------------------------------------------------------

def test_the_sampler_settings_fit_lm_evals_generation_length(task):
    full, smoke = task.sampling(context("full")), task.sampling(context())
    assert (full.gen_length, full.block_length, full.steps) == (256, 32, 256)
    assert (smoke.gen_length, smoke.block_length, smoke.steps) == (16, 8, 16)
    full.validate()
    smoke.validate()
    assert full.gen_length <= gsm8k.MAX_GEN_TOKS  # what lm-eval's HFLM asks for (its default max_gen_toks)


def test_the_reference_subject_generates_through_the_kits_sampler(task, reference):
    extra = reference.extra
    assert extra["mask_id"] == task.mask_id and extra["shift"] == 0 and "forward" not in extra  # the kit's
    assert reference.model.get_input_embeddings().num_embeddings == task.mask_id + 1
    prompt = task.workload_contexts(context())[0]
    ids = task.tokenizer(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"]
    steps = []
    extra["observe"] = steps.append
    try:
        with torch.inference_mode():
            out = lm.generate_ids(reference, ids, gsm8k.MAX_GEN_TOKS)
            direct = dllm.sample(reference.model, ids, torch.ones_like(ids), extra["sampling"], task.mask_id)
    finally:
        extra["observe"] = None
    assert len(steps) == 16 and all(s["unmasked"] == 1 for s in steps)  # one token per step, 2 blocks of 8
    assert torch.equal(out[0, :ids.shape[1]], ids[0])
    assert out.shape[1] <= ids.shape[1] + 16 and not (out == task.mask_id).any()
    n = out.shape[1]  # the hook's answer is the kit's sampler's, cut by the task's stop rule
    assert torch.equal(out[0], direct[0, :n]) or (out[0, ids.shape[1]:] == task.tokenizer.pad_token_id).any()


def test_workload_counts_sampler_steps(task, reference):
    fn, calls, unit = task.workload(reference, context())
    assert calls == 16 * gsm8k.SMOKE_WORKLOAD_SIZE and "steps" in unit
    assert len(fn()) == gsm8k.SMOKE_WORKLOAD_SIZE


# ---- whole runs ------------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_none_runs_on_gsm8k_dllm(env, results_root):
    """`bench run --method none`: the reference against itself, answer for answer (slow: ~45 s on 2 busy cores;
    the dllm-steps run below covers the reference arm by default)."""
    from bench.runner import run
    from bench.store import load_result

    out = run("gsm8k-dllm", "none", budget="smoke", results_root=results_root)
    r = load_result(out.path, results_root)
    assert r.status == "ok" and r.quality.delta == 0
    assert r.fidelity.metric == "identical_answer_tokens" and r.fidelity.value == 1.0


def test_dllm_steps_runs_on_gsm8k_dllm(env, results_root):
    """The whole loop at smoke budget: the reference (loaded from the folder, sampled by the kit's sampler in 16
    steps) evaluated by lm-eval and timed, against the same sampler in 8 steps."""
    from bench.runner import run
    from bench.store import load_result

    out = run("gsm8k-dllm", "dllm-steps", budget="smoke", results_root=results_root)
    r = load_result(out.path, results_root)
    assert r.status == "ok" and r.task.tier == "full" and r.task.modality == "diffusion-lm"
    assert not r.task.reference_canonical and len(r.task.reference_sha256) == 64
    assert r.quality.metric == "exact_match" and r.quality.n == gsm8k.SMOKE_EVAL_SIZE
    assert r.fidelity.metric == "identical_answer_tokens" and 0 <= r.fidelity.value <= 1
    assert r.speed.items_per_call == 16 and "steps" in r.speed.unit  # the reference's sampler: 16 steps a problem
    assert r.method_stats["steps"] == 8 and r.method_stats["reference_steps"] == 16
    assert r.method_stats["tokens_unmasked_per_step"] == pytest.approx(2.0)
    assert r.method_stats["network_calls"] == 8 * gsm8k.SMOKE_EVAL_SIZE  # the evaluation's, 8 steps a problem


# ---- a remote-code checkpoint, loaded with the opt-in ----------------------------------------------------------

REMOTE_MODELING = '''\
"""A tiny stand-in for LLaDA's modeling_llada.py: a mask predictor that is bidirectional by its own code and
takes the 2-D padding mask, as LLaDAModelLM does."""
import torch
from transformers import LlamaConfig, LlamaForCausalLM


class TinyDLLMConfig(LlamaConfig):
    model_type = "tiny-dllm"


class TinyDLLM(LlamaForCausalLM):
    config_class = TinyDLLMConfig
    calls_2d = 0

    def forward(self, input_ids=None, attention_mask=None, **kwargs):
        if attention_mask is not None and attention_mask.dim() == 2:
            type(self).calls_2d += 1
            keys = attention_mask[:, None, None, :].bool().expand(-1, 1, input_ids.shape[1], -1)
            dtype = self.lm_head.weight.dtype
            attention_mask = torch.zeros(keys.shape, dtype=dtype, device=keys.device).masked_fill(
                ~keys, torch.finfo(dtype).min)
        return super().forward(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
'''


def test_a_remote_code_checkpoint_loads_with_the_opt_in_and_samples_through_its_own_forward(task, reference, env,
                                                                                            tmp_path, monkeypatch):
    """The plain reference's weights saved as a remote-code checkpoint (an auto_map naming the folder's own
    modeling file): with BENCH_TRUST_REMOTE_CODE=1 it loads through AutoModel, the subject's forward is
    `remote_forward` (the model's own 2-D mask), and the sampler writes the same answer as the kit's 4-D-mask
    path on the plain Llama: both are the same bidirectional network."""
    folder = tmp_path / "tinydllm"
    reference.model.save_pretrained(folder)
    env["tok"].save_pretrained(folder)
    (folder / "modeling_tinydllm.py").write_text(REMOTE_MODELING)
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(model_type="tiny-dllm", architectures=["TinyDLLM"],
               auto_map={"AutoConfig": "modeling_tinydllm.TinyDLLMConfig", "AutoModel": "modeling_tinydllm.TinyDLLM"})
    (folder / "config.json").write_text(json.dumps(cfg))
    monkeypatch.setenv(gsm8k_dllm.REFERENCE_ENV, str(folder))
    monkeypatch.setenv(gsm8k_dllm.TRUST_ENV, "1")
    assert GSM8KDLLM().preflight(context()) == []
    t = GSM8KDLLM()
    t.load(context())
    w = t.reference_weights(context())
    remote = t.subject_from_state(w.state, context())
    assert type(remote.model).__name__ == "TinyDLLM"  # the folder's own class (transformers_modules.*)
    assert type(remote.model).__module__.startswith("transformers_modules")
    assert remote.extra["forward"] is gsm8k_dllm.remote_forward and remote.extra["mask_id"] == task.mask_id
    assert w.sha256 == pretrained.state_sha256(reference.model.state_dict())  # the same weights, hashed as loaded
    prompt = t.workload_contexts(context())[0]
    ids = t.tokenizer(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"]
    before = type(remote.model).calls_2d
    with torch.inference_mode():
        a = lm.generate_ids(remote, ids, gsm8k.MAX_GEN_TOKS)
        b = lm.generate_ids(reference, ids, gsm8k.MAX_GEN_TOKS)
    assert type(remote.model).calls_2d - before == 16  # every sampler step through the model's own 2-D mask
    assert torch.equal(a, b)
