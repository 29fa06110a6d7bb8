"""EAGLE's draft head and its training (Li et al., "EAGLE: Speculative Sampling Requires Rethinking Feature
Uncertainty", ICML 2024, arXiv:2401.15077); the decoding loop is in `baselines.decoding.eagle`.

Not a method (the leading underscore keeps the registry's discovery out of it). Module scope is torch-free.

Features. f_t is the target's top-layer feature at position t: the decoder's normalised output, the vector its LM
head maps to p_{t+1} = softmax(LMHead(f_t)) (the paper calls it the "second-to-top layer", the LM head being the
top). e(x) is the target's frozen token embedding. Both stay frozen; so does the LM head.

The draft (section 4.1, `EagleHead`): one decoder layer over the fused input

    g_t = FC([e(x_{t+1}); f_t]),          FC: R^{2d} -> R^d (with bias, as in the authors' code)
    f^_{t+1} = Draft(f_{<=t}, x_{<=t+1}) = Layer(g_1..g_t)_t     (causal self-attention over the g's)
    p^_{t+2} = softmax(LMHead(f^_{t+1}))

Layer is transformers' `LlamaDecoderLayer` built from the reference's width, heads, MLP size and rotary settings,
with its own rotary embedding; as in the authors' code its input RMSNorm is left out (g is already a mix of
normalised features and embeddings). Pair (f_t, x_{t+1}) sits at draft position t - 1 (0-based: the first pair of
a sequence is at 0), so a drafted chain continues the positions of the committed sequence.

Training (section 4.2, `eagle_loss`), on sequences the reference itself wrote (its greedy answers to the task's
training prompts, `baselines.decoding.medusa.self_distilled`), with f from the frozen reference:

    L_reg = SmoothL1(f_{t+1}, f^_{t+1})                (mean over the d features; beta = 1)
    L_cls = CrossEntropy(p_{t+2}, p^_{t+2}) = -sum_v p_{t+2}(v) log p^_{t+2}(v),   p_{t+2} = softmax(LMHead(f_{t+1}))
    L = L_reg + w_cls * L_cls                          (w_cls = 0.1 in the paper)

averaged over the positions t whose x_{t+2} is an answer token (what the draft predicts while decoding). Data
augmentation (section 4.2): the input features get uniform noise, f_t + u with u ~ U(-noise, noise) elementwise
(noise = 0.1 in the paper), so the draft learns to continue from its own slightly wrong features f^. The optimiser
loop is the tasks' (`tasks._kit.lm.fit_lm`: AdamW, warm-up then cosine, clipping) with the head as the trained
module. The reference's features are a pure function of the token sequence, so they are computed once per
sequence and memoised (up to `FEATURE_MEMO_BYTES`; past that they are recomputed per batch).

Held-out measurement (`heldout_metrics`): on held-out self-distilled answers, with the true features as input, the
share of positions where the draft's rank-i token is the reference's own next token (a[i], i < TOPK; a[0] is the
top-1 accuracy), and the loss L.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

TOPK = 10  # ranks scored in the held-out accuracy a[i] (the static tree's branching reads them)
FEATURE_MEMO_BYTES = 1 << 30  # memoised reference features during training, at most (float32)


def draft_config(config):
    """A one-layer `LlamaConfig` with the reference's width, attention heads, MLP size, norm epsilon and rotary
    settings (any Llama-like reference: Llama, Qwen2, Mistral configs carry these fields)."""
    from transformers import LlamaConfig

    d = config.hidden_size
    heads = config.num_attention_heads
    kw = dict(vocab_size=1, hidden_size=d, intermediate_size=getattr(config, "intermediate_size", 4 * d),
              num_hidden_layers=1, num_attention_heads=heads,
              num_key_value_heads=getattr(config, "num_key_value_heads", None) or heads,
              head_dim=getattr(config, "head_dim", None) or d // heads,
              rms_norm_eps=getattr(config, "rms_norm_eps", 1e-6),
              max_position_embeddings=getattr(config, "max_position_embeddings", 2048),
              hidden_act=getattr(config, "hidden_act", "silu"), bos_token_id=None, eos_token_id=None,
              pad_token_id=None, tie_word_embeddings=False)
    rope = getattr(config, "rope_parameters", None)
    if rope:
        kw["rope_parameters"] = dict(rope)
    cfg = LlamaConfig(**kw)
    cfg._attn_implementation = "sdpa"  # takes the explicit 4-D additive masks the drafting passes build
    return cfg


def _module():
    import torch
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

    from tasks._kit.lm import cache_kwargs

    class EagleHead(torch.nn.Module):
        """FC([e; f]) then one decoder layer: features (B, T, d) and token embeddings (B, T, d) -> f^ (B, T, d)."""

        def __init__(self, config):
            super().__init__()
            d = config.hidden_size
            self.config = config
            self.fc = torch.nn.Linear(2 * d, d, bias=True)
            self.layer = LlamaDecoderLayer(config, layer_idx=0)
            self.layer.input_layernorm = torch.nn.Identity()
            self.rotary = LlamaRotaryEmbedding(config)
            self._cache_kw = None

        def forward(self, feats: "torch.Tensor", embeds: "torch.Tensor", position_ids: "torch.Tensor",
                    mask: "torch.Tensor", cache=None) -> "torch.Tensor":
            x = self.fc(torch.cat([embeds, feats], dim=-1))
            pe = self.rotary(x, position_ids)
            kw = {}
            if cache is not None:
                if self._cache_kw is None:
                    self._cache_kw = next(iter(cache_kwargs(self.layer, cache)))
                kw = {self._cache_kw: cache, "use_cache": True}
            out = self.layer(x, attention_mask=mask, position_ids=position_ids, position_embeddings=pe, **kw)
            return out[0] if isinstance(out, tuple) else out

    return EagleHead


def build_head(model, seed: int = 0):
    """A freshly initialised draft head for `model` (PyTorch's default initialisation, seeded; the reference's
    random state is left alone), in float32."""
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return _module()(draft_config(model.config)).float()


def head_parameters(head) -> int:
    return sum(p.numel() for p in head.parameters())


def head_macs_per_token(head, vocab: int) -> int:
    """Multiply-accumulates of one drafted token: every linear map of the head (FC, attention projections, MLP)
    and the LM head's d x V map (attention over the context itself left out, as in MAC counts of decoders)."""
    import torch

    lin = sum(m.weight.numel() for m in head.modules() if isinstance(m, torch.nn.Linear))
    return int(lin + vocab * head.config.hidden_size)


def causal_mask(n: int, past: int, dtype, device) -> "torch.Tensor":
    """(1, 1, n, past + n) additive mask: n new entries after `past` cached ones, each sees the cache and the new
    entries up to itself."""
    import torch

    m = torch.full((n, past + n), torch.finfo(dtype).min, dtype=dtype)
    m[:, :past] = 0
    m[:, past:] = torch.triu(m[:, past:], diagonal=1)
    return m.to(device)[None, None]


# ---- training -----------------------------------------------------------------------------------------------

def eagle_loss(head, feats: "torch.Tensor", embeds: "torch.Tensor", labels: "torch.Tensor", lm_weight: "torch.Tensor",
               w_cls: float, noise: float = 0.0, generator=None) -> tuple["torch.Tensor", dict]:
    """L = L_reg + w_cls L_cls on a batch: reference features f (B, T, d), token embeddings e (B, T, d), labels
    (B, T) (-100 off the answers). Draft position i reads (f_i, e_{i+1}) and predicts f_{i+1} and p_{i+2}; it
    counts when labels[i + 2] is set. Returns (loss, {"reg", "cls", "positions", "top1"})."""
    import torch
    import torch.nn.functional as F

    b, t, d = feats.shape
    n = t - 1
    inp = feats[:, :-1]
    if noise > 0:
        inp = inp + (torch.rand(inp.shape, generator=generator, device="cpu").to(inp.device) * 2 - 1) * noise
    pos = torch.arange(n, device=feats.device)[None].expand(b, n)
    out = head(inp, embeds[:, 1:], pos, causal_mask(n, 0, feats.dtype, feats.device))  # f^_{i+1}, (B, n, d)
    target = feats[:, 1:]
    valid = torch.nn.functional.pad(labels[:, 2:], (0, 1), value=-100) != -100  # (B, n)
    count = valid.sum().clamp_min(1)
    reg = (F.smooth_l1_loss(out, target, reduction="none").mean(-1) * valid).sum() / count
    logp_hat = F.log_softmax(F.linear(out, lm_weight), dim=-1)
    with torch.no_grad():
        p = F.softmax(F.linear(target, lm_weight), dim=-1)
    cls = (-(p * logp_hat).sum(-1) * valid).sum() / count
    with torch.no_grad():
        top1 = ((logp_hat.argmax(-1) == p.argmax(-1)) & valid).sum()
    return reg + w_cls * cls, {"reg": float(reg.detach()), "cls": float(cls.detach()), "positions": int(valid.sum()),
                               "top1": int(top1)}


class Features:
    """The frozen reference's top-layer features of token sequences, memoised by sequence (they are a function
    of the tokens alone), and its embeddings; both in float32, without gradients."""

    def __init__(self, model):
        self.model = model
        self.decoder = model.get_decoder()
        self.embed = model.get_input_embeddings()
        self.lm_weight = model.get_output_embeddings().weight.detach().float()
        self.memo: dict[tuple[int, ...], "torch.Tensor"] = {}
        self.bytes = 0

    def __call__(self, ids: "torch.Tensor", mask: "torch.Tensor") -> tuple["torch.Tensor", "torch.Tensor"]:
        """(features (B, T, d), embeddings (B, T, d)) of a right-padded batch (padding rows are zeros)."""
        import torch

        lengths = mask.sum(1).tolist()
        rows = [tuple(ids[r, :n].tolist()) for r, n in enumerate(lengths)]
        d = self.lm_weight.shape[1]
        feats = torch.zeros(ids.shape[0], ids.shape[1], d, device=ids.device)
        todo = [r for r, key in enumerate(rows) if key not in self.memo]
        with torch.no_grad():
            if todo:
                sel = torch.tensor(todo, device=ids.device)
                h = self.decoder(input_ids=ids[sel], attention_mask=mask[sel]).last_hidden_state.float()
                for j, r in enumerate(todo):
                    f = h[j, :lengths[r]]
                    if self.bytes + f.numel() * 4 <= FEATURE_MEMO_BYTES:
                        self.memo[rows[r]] = f.clone()
                        self.bytes += f.numel() * 4
                    feats[r, :lengths[r]] = f
            for r, key in enumerate(rows):
                if key in self.memo:
                    feats[r, :lengths[r]] = self.memo[key]
            embeds = self.embed(ids).float()
        return feats, embeds


def train_head(model, examples, heldout, cfg, ctx, pad_id: int):
    """Fit a fresh head on `examples` ((ids, labels) pairs) with `eagle_loss` for `ctx.budget.steps(cfg.steps)`
    AdamW steps, then measure it on `heldout`. Returns (head, `lm.TrainStats`, held-out metrics)."""
    import math

    import torch

    from tasks._kit import lm

    head = build_head(model, ctx.seed)
    features = Features(model)
    noise_gen = torch.Generator().manual_seed(ctx.seed + 1)

    def batch_loss(h_mod, ids, mask, labels):
        f, e = features(ids, mask)
        loss, parts = eagle_loss(h_mod, f, e, labels, features.lm_weight.to(ids.device), cfg.w_cls, cfg.noise,
                                 noise_gen)
        return loss, parts["positions"]

    recipe = lm.LMRecipe(epochs=cfg.steps / math.ceil(max(1, len(examples)) / cfg.batch_size), lr=cfg.lr,
                         batch_size=cfg.batch_size, warmup_steps=cfg.warmup_steps)
    stats = lm.fit_lm(head, examples, recipe, ctx, seed=ctx.seed, pad_id=pad_id, batch_loss=batch_loss,
                      description="Training the EAGLE draft head on the frozen reference's features")
    metrics = heldout_metrics(head, features, heldout, cfg, ctx.device, pad_id)
    return head, stats, metrics


def heldout_metrics(head, features: "Features", heldout, cfg, device, pad_id: int) -> dict:
    """{"accuracy": a[i] (the draft's rank-i token is the reference's next token, i < TOPK), "loss", "reg", "cls",
    "positions"} on `heldout`, with the reference's true features as input (no noise)."""
    import torch
    import torch.nn.functional as F

    from tasks._kit import lm

    head.eval()
    w = features.lm_weight.to(device)
    ranks = min(TOPK, w.shape[0])
    hits = torch.zeros(ranks)
    total, reg, cls, loss = 0, 0.0, 0.0, 0.0
    with torch.no_grad():
        for i in range(0, len(heldout), cfg.batch_size):
            idx = list(range(i, min(i + cfg.batch_size, len(heldout))))
            ids, mask, labels = (x.to(device) for x in lm.collate(heldout, idx, pad_id))
            f, e = features(ids, mask)
            batch, parts = eagle_loss(head, f, e, labels, w, cfg.w_cls)
            n = parts["positions"]
            total += n
            reg, cls, loss = reg + parts["reg"] * n, cls + parts["cls"] * n, loss + float(batch) * n
            pos = torch.arange(ids.shape[1] - 1, device=device)[None].expand(ids.shape[0], -1)
            out = head(f[:, :-1], e[:, 1:], pos, causal_mask(ids.shape[1] - 1, 0, f.dtype, device))
            top = F.linear(out, w).topk(ranks, dim=-1).indices
            want = F.linear(f[:, 1:], w).argmax(-1)
            valid = F.pad(labels[:, 2:], (0, 1), value=-100) != -100
            hits += ((top == want[..., None]) & valid[..., None]).sum((0, 1)).float().cpu()
    n = max(1, total)
    return {"accuracy": (hits / n).tolist(), "loss": loss / n, "reg": reg / n, "cls": cls / n, "positions": total}
