"""The machinery of `osd` (online speculative decoding): the recording decoder, the replay buffer, the distillation
update, and the per-window statistics of a stream. The equations are in `baselines/decoding/osd.py`'s docstring.

Not a method (the leading underscore keeps the registry's discovery out of it). Module scope is torch-free.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from baselines.decoding.speculative import SpeculativeConfig, SpeculativeDecoder

if TYPE_CHECKING:
    import torch

DIVERGENCES = ("fkl", "rkl", "jsd")
POSITIONS = ("all", "corrections")
JSD_BETA = 0.5  # GKD's generalised JSD at beta = 0.5: the symmetric Jensen-Shannon divergence


def token_divergence(target_logits: "torch.Tensor", draft_logits: "torch.Tensor", kind: str) -> "torch.Tensor":
    """D(p || q_theta) at each row (n, V) -> (n,), computed in float32 over the whole vocabulary, temperature 1:
    fkl = sum_v p log(p/q), rkl = sum_v q log(q/p), jsd = b KL(p||m) + (1-b) KL(q||m), m = b p + (1-b) q."""
    import math

    import torch

    lp = torch.log_softmax(target_logits.float(), -1)
    lq = torch.log_softmax(draft_logits.float(), -1)

    def kl(la, lb):  # sum_v a (log a - log b); a = 0 contributes 0
        a = la.exp()
        return torch.where(a > 0, a * (la - lb), torch.zeros_like(a)).sum(-1)

    if kind == "fkl":
        return kl(lp, lq)
    if kind == "rkl":
        return kl(lq, lp)
    if kind == "jsd":
        b = JSD_BETA
        lm = torch.logsumexp(torch.stack([lp + math.log(b), lq + math.log(1 - b)]), 0)
        return b * kl(lp, lm) + (1 - b) * kl(lq, lm)
    raise ValueError(f"divergence {kind!r}: valid ones are {', '.join(DIVERGENCES)}")


@dataclass
class Record:
    """One served query in the replay buffer: x = ids[:start], the target's verified output y = ids[start:], and
    the target's logits p(.|x, y_<t) for t = 1..|y| (row t-1), as its verification passes computed them."""

    ids: "torch.Tensor"  # (L,) prompt and emitted tokens
    start: int  # |x|
    target_logits: "torch.Tensor"  # (|y|, V)
    corrected: "torch.Tensor"  # (|y|,) bool: the draft had proposed another token here (the target corrected it)

    def mask(self, positions: str) -> "torch.Tensor":
        import torch

        return torch.ones_like(self.corrected) if positions == "all" else self.corrected


def draft_logits(draft, rec: Record) -> "torch.Tensor":
    """q_theta's logits at the positions of y: one forward pass over x, y_<|y| (the logit at position i predicts
    token i + 1), the last |y| rows."""
    m = rec.ids.shape[0] - rec.start
    return draft(input_ids=rec.ids[None, :-1], use_cache=False, logits_to_keep=m).logits[0]


def buffer_divergence(draft, records, kind: str, positions: str) -> float:
    """The objective's value on `records`: the mean of D(p || q_theta) over their recorded positions (no grad)."""
    import torch

    total, n = 0.0, 0
    with torch.no_grad():
        for r in records:
            keep = r.mask(positions)
            if keep.any():
                d = token_divergence(r.target_logits[keep], draft_logits(draft, r)[keep], kind)
                total, n = total + float(d.sum()), n + int(keep.sum())
    return total / max(1, n)


@dataclass
class QueryStats:
    """What serving one query took: the speculative counts, and the update that followed it (if any)."""

    drafted: int = 0
    accepted: int = 0
    passes: int = 0  # target forward passes
    emitted: int = 0
    update_seconds: float = 0.0


@dataclass
class OnlineSettings:
    num_draft_tokens: int
    update_interval: int  # I: an update after every I-th query
    buffer_size: int  # the most recent queries kept in R
    lr: float
    steps_per_update: int
    divergence: str
    positions: str
    max_steps: int  # optimiser steps over the whole stream (the smoke budget caps it)


class OnlineSpeculativeDecoder(SpeculativeDecoder):
    """Greedy speculative decoding whose draft is distilled online on what the target verified (`learn`), or
    the same decoding with the draft frozen (`learn=False`: the control). `serve` is one query of the stream."""

    def __init__(self, target, draft, settings: OnlineSettings, eos_id: int | None, learn: bool = True):
        super().__init__(target, draft, SpeculativeConfig(num_draft_tokens=settings.num_draft_tokens), eos_id)
        self.settings, self.learn = settings, learn
        self.buffer: deque[Record] = deque(maxlen=settings.buffer_size)
        self.queries: list[QueryStats] = []
        self.served = 0
        self.log = True  # keep per-query stats (off once the stream is over, while the timed calls run)
        self.optimizer = None
        self.updates = self.steps = self.tokens_trained = self.samples_trained = 0
        self.update_seconds = 0.0
        self.losses: list[float] = []  # the objective before each update's first step
        if learn:
            for p in draft.parameters():
                p.requires_grad_(True)

    def serve(self, prompt: "torch.Tensor", max_new_tokens: int) -> list[int]:
        """Decode one query (1-D prompt); when learning, buffer it and update the draft after every I-th."""
        import torch

        st = self.stats
        before = (st.drafted_tokens, st.accepted_tokens, st.target_forward_passes, st.emitted_tokens)
        with torch.inference_mode():
            out, rec = self._decode(prompt, max_new_tokens, record=self.learn)
        q = QueryStats(st.drafted_tokens - before[0], st.accepted_tokens - before[1],
                       st.target_forward_passes - before[2], st.emitted_tokens - before[3])
        self.served += 1
        if self.learn:
            if rec is not None:
                self.buffer.append(rec)
            if self.served % self.settings.update_interval == 0:
                q.update_seconds = self.update()
        if self.log:
            self.queries.append(q)
        return out

    def _decode(self, prompt: "torch.Tensor", max_new_tokens: int, record: bool) -> tuple[list[int], Record | None]:
        """`SpeculativeDecoder.generate`'s greedy loop, recording the target's logits at every emitted position
        (rows 0..n of each verification pass: the n accepted drafts, then the correction or the bonus token)."""
        import torch

        rows, wrong = [], []

        def keep(logits: "torch.Tensor", n: int, g: int, emitted: list[int]) -> None:
            rows.append(logits[:len(emitted)])
            wrong.extend(([False] * n + [n < g])[:len(emitted)])

        out = self.generate(prompt, max_new_tokens, on_verify=keep if record else None)
        if not record or not out:
            return out, None
        return out, Record(torch.cat([prompt, torch.tensor(out, device=prompt.device)]), prompt.shape[0],
                           torch.cat(rows), torch.tensor(wrong, dtype=torch.bool, device=prompt.device))

    def update(self) -> float:
        """steps_per_update AdamW steps on the mean of D(p || q_theta) over the buffer's recorded positions;
        returns the seconds it took (0 when the buffer holds no position or the step budget is spent)."""
        import torch

        s = self.settings
        steps = min(s.steps_per_update, s.max_steps - self.steps)
        if steps <= 0 or not self.buffer:
            return 0.0
        t0 = time.perf_counter()
        with torch.inference_mode(False), torch.enable_grad():
            # the recorded tensors were made under inference mode: clones are ordinary tensors autograd can save
            recs = [Record(r.ids.clone(), r.start, r.target_logits.clone(), r.corrected.clone()) for r in self.buffer]
            n = sum(int(r.mask(s.positions).sum()) for r in recs)
            if n == 0:
                return 0.0
            if self.optimizer is None:
                self.optimizer = torch.optim.AdamW([p for p in self.draft.parameters() if p.requires_grad],
                                                   lr=s.lr, weight_decay=0.0)
            for i in range(steps):
                self.optimizer.zero_grad(set_to_none=True)
                total = 0.0
                for r in recs:  # one sequence at a time: the gradient of the sum, without padding
                    keep = r.mask(s.positions)
                    if not keep.any():
                        continue
                    loss = token_divergence(r.target_logits[keep], draft_logits(self.draft, r)[keep],
                                            s.divergence).sum() / n
                    loss.backward()
                    total += float(loss.detach())
                if i == 0:
                    self.losses.append(total)
                self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        self.updates += 1
        self.steps += steps
        self.tokens_trained += steps * n
        self.samples_trained += steps * len(recs)
        seconds = time.perf_counter() - t0
        self.update_seconds += seconds
        return seconds


def windows(queries: list[QueryStats], n_windows: int) -> list[dict[str, float]]:
    """The stream cut into min(n_windows, len) contiguous windows of (nearly) equal size, each with its
    acceptance rate (accepted / drafted) and tokens per target pass (emitted / passes)."""
    k = min(n_windows, len(queries))
    out = []
    for w in range(k):
        part = queries[w * len(queries) // k:(w + 1) * len(queries) // k]
        out.append({"acceptance": sum(q.accepted for q in part) / max(1, sum(q.drafted for q in part)),
                    "tokens_per_pass": sum(q.emitted for q in part) / max(1, sum(q.passes for q in part)),
                    "queries": len(part)})
    return out


@dataclass
class StreamResult:
    """Both arms of one stream: the online learner and the frozen control, query by query."""

    online: list[QueryStats] = field(default_factory=list)
    frozen: list[QueryStats] = field(default_factory=list)
    updates: int = 0
    steps: int = 0
    update_seconds: float = 0.0


def stream_stats(name: str, res: StreamResult, n_windows: int) -> dict[str, float]:
    """`<name>_{online,frozen}_{acceptance,tokens_per_pass}_{first,last,all}`, the acceptance of every window,
    and the stream's update counts, for the record's method statistics."""
    out: dict[str, float] = {f"{name}_queries": float(len(res.online)), f"{name}_updates": float(res.updates),
                             f"{name}_update_steps": float(res.steps),
                             f"{name}_update_seconds": res.update_seconds,
                             f"{name}_update_seconds_per_query": res.update_seconds / max(1, len(res.online))}
    for arm, qs in (("online", res.online), ("frozen", res.frozen)):
        if not qs:
            continue
        ws = windows(qs, n_windows)
        out[f"{name}_windows"] = float(len(ws))
        whole = windows(qs, 1)[0]
        for metric in ("acceptance", "tokens_per_pass"):
            out[f"{name}_{arm}_{metric}_first"] = ws[0][metric]
            out[f"{name}_{arm}_{metric}_last"] = ws[-1][metric]
            out[f"{name}_{arm}_{metric}_all"] = whole[metric]
        for i, w in enumerate(ws):
            out[f"{name}_{arm}_acceptance_w{i}"] = w["acceptance"]
    if res.online and res.frozen:
        out[f"{name}_acceptance_last_gain"] = (out[f"{name}_online_acceptance_last"]
                                               - out[f"{name}_frozen_acceptance_last"])
    return out


def run_stream(target, draft, prompts: list["torch.Tensor"], max_new_tokens: list[int], settings: OnlineSettings,
               eos: int | None, learn: bool) -> OnlineSpeculativeDecoder:
    """Serve `prompts` (1-D) in order with `draft` (updated in place when `learn`)."""
    dec = OnlineSpeculativeDecoder(target, draft, settings, eos, learn)
    for p, m in zip(prompts, max_new_tokens):
        dec.serve(p, m)
    return dec
