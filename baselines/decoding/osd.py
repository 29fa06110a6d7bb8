"""`osd`: online speculative decoding (Liu et al., "Online Speculative Decoding", ICML 2024, arXiv:2310.07177).

Greedy speculative decoding (`speculative`'s draft-and-verify loop: the output is the target's greedy output
token for token) whose draft q_theta keeps learning while it serves, from what the target p verified. Queries
x_1, x_2, ... arrive as a stream; for each, speculative decoding produces the target's output y (accepted drafts
and the target's corrections), and its verification passes have already computed the target's distribution
p(. | x, y_<t) at every position t of y. The buffer R records, per served query (`_osd.Record`):

    (x, y, { p(. | x, y_<t) : t = 1..|y| }, { c_t : t = 1..|y| })

c_t = 1 where the draft had proposed another token than y_t (the target's correction), 0 where the draft's token
was accepted (or none was proposed: the bonus token after a fully accepted block). R keeps the `buffer_size`
most recent queries (= I by default: each update sees the I queries since the last, the paper's Algorithm 1,
which clears its buffer after an update). Every I-th query (I = `update_interval`) the draft takes
`steps_per_update` optimiser steps (AdamW, learning rate eta = `lr`, no weight decay, its state kept across
updates) on the distillation objective over R (`_osd.OnlineSpeculativeDecoder.update`):

    L(theta)  = (1 / N) sum_{(x, y) in R} sum_{t in T(x, y)} D( p(. | x, y_<t) || q_theta(. | x, y_<t) )
    theta    <- theta - eta * AdamW( grad_theta L(theta) )

with T(x, y) = every position of y (`positions=all`: accepted tokens and corrections) or only the corrections
{t : c_t = 1} (`positions=corrections`, the paper's Algorithm 1 records the target's distribution where the draft
was rejected), N = sum |T| (a mean per token: Adam's step is nearly invariant to the constant), and the token-level
divergence over the vocabulary V (`_osd.token_divergence`, temperature 1, float32):

    fkl  D = KL(p || q)   = sum_v p(v) log p(v)/q(v)            (forward KL: the paper's default choice)
    rkl  D = KL(q || p)   = sum_v q(v) log q(v)/p(v)            (reverse KL)
    jsd  D = JSD_0.5(p||q) = 0.5 KL(p || m) + 0.5 KL(q || m),  m = 0.5 p + 0.5 q   (GKD's generalised JSD)

The target's distributions are the logits its verification passes produced (no extra target pass); the draft's
are one forward pass over (x, y) per buffered query and step. Only the draft changes, never the target, so the
greedy output stays the target's own throughout the stream (tested in float32 with updates firing).

The workload is a stream, measured on two of them, each served twice from the same starting draft: online (the
draft learns) and frozen (the same speculative decoding, `learn=False`: the control). Each stream is cut into
`stream_windows` windows of consecutive queries; the record's method statistics give acceptance (accepted /
drafted) and tokens per target pass per window, first vs last, for both arms:
- `eval_*`: the task's test distribution: the runner's evaluation itself, the queries in the order lm-eval sends
  them (the draft learns as it serves them); the frozen arm replays the same queries afterwards.
- `shifted_*`: `shifted_queries` prompts from the task's `ShiftedPrompts` (arith: long chains of 4-6 operations,
  where its models trained on 1-3), decoded up to `max_new_tokens`, after the evaluation, from the initial draft.
The frozen control's quality is the reference's (the method is lossless), so it is reported as these statistics
beside the online arm's, not as a `ControlResult` in the task's metric.

What the timed calls measure: the draft as it stands after the evaluation stream, with updates paused (the paper
schedules updates off the serving path), i.e. speculative decoding with the adapted draft. The update cost is
reported beside it (`eval_update_seconds_per_query`) and the total seconds of online updates on the evaluation
stream are the record's training cost. The adapted draft is cached (keyed by the task's data, the reference and
initial draft weights, the settings, the seed, budget, device and dtype) so that timing workers and `bench
remeasure`, which apply the method without evaluating it, time the same draft; a run that finds it cached serves
its evaluation with it, and computes the eval stream's online arm by replaying the queries from the initial draft
(`eval_replay_matches_cache` says whether the replay ended at the cached weights bit for bit).

Under `--budget smoke` the optimiser steps of each stream stop at `SMOKE_STEPS`. Low precision: the draft is
trained in the run's dtype (float32 on the CPU profiles); exactness is the speculative loop's, so on bf16 profiles
the caveat of `speculative` (near-tie argmax flips between one- and multi-token target passes) applies.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, fields

from baselines.base import Applied, Cost, Method
from baselines.decoding._osd import DIVERGENCES, POSITIONS
from bench.api import Draft, ShiftedPrompts
from bench.config import ConfigError, check_range
from bench.registry import register_method

SMOKE_SHIFTED_QUERIES = 16  # the shifted stream's length under --budget smoke (two updates at I = 8)
UNLIMITED_STEPS = 10 ** 9  # a stream's optimiser steps under the full budget (the smoke budget caps them)


def _choice(name: str, value: str, valid: tuple[str, ...]) -> None:
    if value not in valid:
        raise ConfigError(f"{name}={value!r} is not one of: {', '.join(valid)}")


def _integer(name: str, value: int, lo: int, hi: int) -> None:
    try:
        check_range(name, value, lo=lo, hi=hi)
    except ConfigError as e:
        raise ConfigError(f"{e} (valid: integers {lo} <= {name} <= {hi})") from None


@dataclass(frozen=True)
class OSDConfig:
    # gamma, drafts per target pass: `speculative`'s default, so the frozen control is that method exactly
    num_draft_tokens: int = 4
    # I: the draft is updated after every I-th query. The paper updates every few queries (small I adapts
    # fastest; each update costs steps_per_update draft passes over the buffer); 8 makes the update cost per
    # query about one draft training pass over one query
    update_interval: int = 8
    # |R|: the most recent queries the update trains on; = I is the paper's Algorithm 1 (its buffer is cleared
    # after each update, so every served query is trained on once per step). On arith's shifted stream (200
    # queries) |R| = 32 with 4 steps reached a last-window acceptance of 0.732 against 0.720 here, for 15x the
    # update time (61 s against 4 s)
    buffer_size: int = 8
    # eta, AdamW's learning rate (no weight decay). On arith's 0.47M-parameter draft, shifted stream, last window:
    # 0.720 at 1e-3 against the frozen draft's 0.684; 3e-3 overshoots (0.668, below the frozen draft)
    lr: float = 1e-3
    # optimiser steps per update, each over the whole buffer
    steps_per_update: int = 2
    # D: fkl (forward KL, the paper's default), rkl (reverse KL) or jsd (GKD's JSD at beta 0.5)
    divergence: str = "fkl"
    # which positions of y the loss reads: all (accepted tokens and corrections) or corrections (where the
    # draft was rejected, the paper's Algorithm 1)
    positions: str = "all"
    # windows each stream is cut into for first-vs-last acceptance (10: a tenth of the stream each)
    stream_windows: int = 10
    # length of the shifted stream (16 under --budget smoke): 200 queries at I = 8 give 25 updates, enough to see
    # acceptance move, in about a minute per arm on arith on 2 CPU cores
    shifted_queries: int = 200
    # the shifted stream's generation cap (arith answers end with EOS after at most ~150 tokens)
    max_new_tokens: int = 256

    def validate(self) -> None:
        _integer("num_draft_tokens", self.num_draft_tokens, 1, 64)
        _integer("update_interval", self.update_interval, 1, 100_000)
        _integer("buffer_size", self.buffer_size, 1, 100_000)
        check_range("lr", self.lr, lo=0, lo_open=True, hi=1)
        _integer("steps_per_update", self.steps_per_update, 0, 10_000)
        _choice("divergence", self.divergence, DIVERGENCES)
        _choice("positions", self.positions, POSITIONS)
        _integer("stream_windows", self.stream_windows, 1, 1000)
        _integer("shifted_queries", self.shifted_queries, 0, 100_000)
        _integer("max_new_tokens", self.max_new_tokens, 1, 100_000)


@register_method("osd", family="decoding", paper="Liu et al., Online Speculative Decoding", year=2024,
                 url="https://arxiv.org/abs/2310.07177", modalities=("causal-lm",), requires=(Draft, ShiftedPrompts),
                 summary="speculative decoding whose draft is distilled online (forward KL by default) on the "
                         "target's verified tokens and corrections, every I queries, from a buffer of recent "
                         "queries; exact greedy output")
class OSD(Method):
    Config = OSDConfig

    def apply(self, subject, task, ctx) -> Applied:
        import torch

        from baselines.decoding import _osd
        from baselines.decoding._common import check_same_vocabulary, draft_subject, single_row
        from bench import cache
        from bench.api import require
        from tasks.base import Subject

        cfg = self.config
        cfg.validate()
        shifted_task = require(task, ShiftedPrompts, "osd measures its draft's adaptation on a shifted stream")
        draft = draft_subject(task, ctx, "osd").model
        check_same_vocabulary(subject.model, draft, "osd")
        target, tok = subject.model, subject.extra["tokenizer"]
        eos = tok.eos_token_id
        initial = copy.deepcopy(draft)  # every replayed arm starts from the task's draft as published
        settings = _osd.OnlineSettings(cfg.num_draft_tokens, cfg.update_interval, cfg.buffer_size, cfg.lr,
                                       cfg.steps_per_update, cfg.divergence, cfg.positions,
                                       max_steps=ctx.budget.steps(UNLIMITED_STEPS))
        config = {f.name: getattr(cfg, f.name) for f in fields(cfg)}
        key = cache.key(task.spec.name, task.spec.version, task.data_fingerprint(), cache.weights_digest(target),
                        cache.weights_digest(draft), config, ctx.seed, ctx.budget, ctx.device, ctx.dtype)
        path = cache.method_dir("osd", task) / f"draft-{key}.safetensors"
        hit = cache.load_bundle(path)
        if hit is not None:  # the adapted draft, as an earlier run's evaluation stream left it
            draft.load_state_dict(hit[0])
        served = _osd.OnlineSpeculativeDecoder(target, draft, settings, eos, learn=hit is None)
        stream: list = []  # (prompt ids, max_new_tokens) in arrival order
        state: dict = {}

        def generate(subj, input_ids, max_new_tokens, attention_mask=None):
            row = single_row(input_ids, attention_mask, "osd")
            if "stats" not in state:  # the evaluation stream: remember its queries, in order
                stream.append((row.clone(), max_new_tokens))
            new = served.serve(row, max_new_tokens)
            return torch.cat([input_ids, torch.tensor([new], dtype=input_ids.dtype, device=input_ids.device)], 1)

        n_draft = sum(p.numel() for p in draft.parameters())
        cost = Cost(description=f"online distillation of the task's draft ({n_draft} parameters) while serving "
                                f"the evaluation stream")

        def fresh():
            return copy.deepcopy(initial)

        def stats() -> dict[str, float]:
            if "stats" in state:
                return state["stats"]
            state["stats"] = {}
            served.learn, served.log = False, False  # the stream is over: the timed calls use the draft as it is
            prompts, lens = [p for p, _ in stream], [m for _, m in stream]
            out: dict[str, float] = {}
            with ctx.progress.step("osd: the evaluation stream's frozen-draft control"):
                frozen = _osd.run_stream(target, fresh(), prompts, lens, settings, eos, learn=False)
            if hit is None:
                online = served
                meta = {"seconds": served.update_seconds, "steps": served.steps, "updates": served.updates,
                        "tokens": served.tokens_trained}
                cache.cached_bundle(path, lambda: ({k: v.detach().clone() for k, v in draft.state_dict().items()},
                                                   meta))
            else:
                with ctx.progress.step("osd: replaying the evaluation stream from the initial draft"):
                    online = _osd.run_stream(target, fresh(), prompts, lens, settings, eos, learn=True)
                out["eval_replay_matches_cache"] = float(cache.weights_digest(online.draft)
                                                         == cache.state_sha256(hit[0]))
            ev = _osd.StreamResult(online.queries, frozen.queries, online.updates, online.steps,
                                   online.update_seconds)
            out.update(_osd.stream_stats("eval", ev, cfg.stream_windows))
            out["acceptance_rate"] = out.get("eval_online_acceptance_all", 0.0)
            out["mean_accepted_length"] = out.get("eval_online_tokens_per_pass_all", 0.0)
            out["eval_final_divergence_drop"] = ((online.losses[0] - online.losses[-1]) / online.losses[0]
                                                 if len(online.losses) > 1 and online.losses[0] > 0 else 0.0)
            n_shift = ctx.budget.pick(cfg.shifted_queries, min(cfg.shifted_queries, SMOKE_SHIFTED_QUERIES))
            if n_shift:
                texts = shifted_task.shifted_prompts(n_shift, ctx.seed)
                sp = [tok(t, return_tensors="pt", add_special_tokens=False)["input_ids"][0].to(ctx.device)
                      for t in texts]
                lens = [cfg.max_new_tokens] * len(sp)
                with ctx.progress.step(f"osd: shifted stream of {len(sp)} queries, online and frozen"):
                    on = _osd.run_stream(target, fresh(), sp, lens, settings, eos, learn=True)
                    off = _osd.run_stream(target, fresh(), sp, lens, settings, eos, learn=False)
                sh = _osd.StreamResult(on.queries, off.queries, on.updates, on.steps, on.update_seconds)
                out.update(_osd.stream_stats("shifted", sh, cfg.stream_windows))
            cost.seconds, cost.steps = online.update_seconds, online.steps
            cost.samples_seen, cost.tokens_seen = online.samples_trained, online.tokens_trained
            cost.description = (f"online distillation ({cfg.divergence}, positions={cfg.positions}) of the task's "
                                f"draft ({n_draft} parameters) while serving the {len(prompts)} evaluation queries: "
                                f"{online.updates} updates every {cfg.update_interval} queries, {online.steps} "
                                f"AdamW steps over a buffer of the last {cfg.buffer_size} queries "
                                f"({online.update_seconds:.1f} s); shifted stream: {shifted_task.shift}")
            state["stats"] = out
            return out

        extra = {**subject.extra, "generate": generate, "draft": draft}
        return Applied(Subject(subject.model, subject.kind, extra), cost, stats=stats)
