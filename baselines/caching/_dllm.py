"""The mask predictor of a diffusion LM (`tasks._kit.dllm`: transformers' `LlamaForCausalLM` with an all-keys
mask) opened up layer by layer, so that `dllm-cache` and `fast-dllm` can compute some positions of a layer and
take the others' features from a cache.

Why hand-written: transformers runs a decoder layer on every position it is given, and its KV `Cache` only
appends keys after the ones it holds (the autoregressive pattern). A diffusion LM's caches need what it lacks:
keys and values *replaced in place* at arbitrary positions (the response tokens a step recomputes, a block in the
middle of the sequence), queries for a subset of positions attending to all keys, and a layer's attention and
FFN outputs kept per position to be reused for the positions not recomputed. The pieces that are the model's
own stay the library's: the rotary embedding (`model.model.rotary_emb`), `apply_rotary_pos_emb`, the attention
kernel the model is configured with (`ALL_ATTENTION_FUNCTIONS`, as `LlamaAttention.forward` picks it), the
norms, projections and MLP modules. With every position computed, `full_pass` performs the same operations on
the same shapes as `LlamaForCausalLM.forward` (test: equal to `dllm.logits` to float tolerance).

One layer, for the positions `idx` it recomputes (q: queries, K/V: every position's keys and values, the
recomputed ones written in place):

    n = RMSNorm_in(h[idx]);  q, k, v = RoPE(W_q n), RoPE(W_k n), W_v n;  K[idx], V[idx] = k, v
    a = W_o softmax(q K^T / sqrt(d) + M) V                         (M: 0 on real keys, -inf on padding)
    h1 = h + A   (A[idx] = a, the other rows from the cache)
    f = MLP(RMSNorm_post(h1[idx]));  h_out = h1 + F   (F[idx] = f)

Module scope is torch-free.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


def llama_parts(model):
    """(decoder, lm_head) of a LlamaForCausalLM-like model, refused with the reason otherwise."""
    decoder = getattr(model, "model", None)
    layers = getattr(decoder, "layers", None)
    if layers is None or not hasattr(decoder, "rotary_emb") or not hasattr(model, "lm_head"):
        raise ValueError(f"the diffusion-LM caches need a Llama-style mask predictor (model.model.layers, "
                         f"model.model.rotary_emb, model.lm_head); got {type(model).__name__}")
    layer = layers[0]
    for name in ("input_layernorm", "post_attention_layernorm", "mlp", "self_attn"):
        if not hasattr(layer, name):
            raise ValueError(f"the diffusion-LM caches need Llama decoder layers; {type(layer).__name__} has no "
                             f"{name}")
    return decoder, model.lm_head


@dataclass
class Frame:
    """What every layer of one network call shares: RoPE (cos, sin) of every position (B, L, d) and the additive
    key mask (B, 1, 1, L)."""

    cos: "torch.Tensor"
    sin: "torch.Tensor"
    keys: "torch.Tensor"

    @classmethod
    def of(cls, model, ids: "torch.Tensor", attention_mask: "torch.Tensor") -> "Frame":
        import torch

        from tasks._kit import dllm

        decoder, _ = llama_parts(model)
        dtype = next(model.parameters()).dtype
        probe = torch.zeros((1, 1, 1), dtype=dtype, device=ids.device)  # rotary_emb reads its dtype and device
        cos, sin = decoder.rotary_emb(probe, dllm.positions(attention_mask))
        keys = dllm.bidirectional_mask(attention_mask, dtype)[:, :, :1]  # every query row is the same
        return cls(cos, sin, keys)


@dataclass
class LayerCache:
    """One layer's cached features over all L positions: rotated keys and values (B, kv heads, L, d), the
    attention output after W_o and the FFN output (B, L, D). `step` records the sampler step each position's
    features were computed at (B, L), for the tests and the statistics."""

    k: "torch.Tensor | None" = None
    v: "torch.Tensor | None" = None
    attn: "torch.Tensor | None" = None
    ffn: "torch.Tensor | None" = None
    step: "torch.Tensor | None" = None


@dataclass
class Caches:
    layers: list[LayerCache] = field(default_factory=list)

    def reset(self, n: int) -> None:
        self.layers = [LayerCache() for _ in range(n)]


def gather_rows(t: "torch.Tensor", idx: "torch.Tensor", dim: int = 1) -> "torch.Tensor":
    """t's rows `idx` (B, n) along `dim` (1 for (B, L, ...), 2 for (B, heads, L, d)), per batch row."""
    shape = [1] * t.ndim
    shape[0], shape[dim] = idx.shape
    expand = list(t.shape)
    expand[dim] = idx.shape[1]
    return t.gather(dim, idx.view(shape).expand(expand))


def scatter_rows(t: "torch.Tensor", idx: "torch.Tensor", src: "torch.Tensor", dim: int = 1) -> "torch.Tensor":
    shape = [1] * t.ndim
    shape[0], shape[dim] = idx.shape
    return t.scatter(dim, idx.view(shape).expand(src.shape), src)


def project(layer, h_sel: "torch.Tensor", cos: "torch.Tensor", sin: "torch.Tensor"):
    """(q, k, v) of the selected rows h_sel (B, n, D), heads split, q and k rotated: `LlamaAttention.forward`'s
    first lines."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    attn = layer.self_attn
    x = layer.input_layernorm(h_sel)
    shape = (*x.shape[:-1], -1, attn.head_dim)
    q = attn.q_proj(x).view(shape).transpose(1, 2)
    k = attn.k_proj(x).view(shape).transpose(1, 2)
    v = attn.v_proj(x).view(shape).transpose(1, 2)
    q, k = apply_rotary_pos_emb(q, k, cos, sin)
    return q, k, v


def values_of(layer, h_sel: "torch.Tensor") -> "torch.Tensor":
    """W_v RMSNorm_in(h) of the selected rows, heads split (B, kv heads, n, d): what dLLM-Cache's V-verify reads."""
    attn = layer.self_attn
    x = layer.input_layernorm(h_sel)
    return attn.v_proj(x).view(*x.shape[:-1], -1, attn.head_dim).transpose(1, 2)


def attend(layer, q: "torch.Tensor", k: "torch.Tensor", v: "torch.Tensor", key_mask: "torch.Tensor"):
    """W_o softmax(q K^T / sqrt(d) + M) V for n queries over all keys, through the model's attention kernel."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
    from transformers.models.llama.modeling_llama import eager_attention_forward

    attn = layer.self_attn
    kernel = ALL_ATTENTION_FUNCTIONS.get_interface(attn.config._attn_implementation, eager_attention_forward)
    mask = key_mask.expand(-1, -1, q.shape[2], -1)
    out, _ = kernel(attn, q, k, v, mask, dropout=0.0, scaling=attn.scaling)
    return attn.o_proj(out.reshape(*out.shape[:2], -1).contiguous())


def ffn(layer, h1_sel: "torch.Tensor") -> "torch.Tensor":
    return layer.mlp(layer.post_attention_layernorm(h1_sel))


def head(model, h: "torch.Tensor") -> "torch.Tensor":
    """Final norm and lm_head of the rows given."""
    decoder, lm_head = llama_parts(model)
    return lm_head(decoder.norm(h))


def full_pass(model, ids: "torch.Tensor", attention_mask: "torch.Tensor", caches: Caches | None = None,
              step: int = 0, rows: tuple[int, int] | None = None) -> "torch.Tensor":
    """Every position through every layer (the reference's network call), storing each layer's K, V, attention
    and FFN outputs in `caches` when given. Returns the logits of positions rows = (lo, hi) (all by default)."""
    import torch

    decoder, _ = llama_parts(model)
    frame = Frame.of(model, ids, attention_mask)
    h = decoder.embed_tokens(ids)
    if caches is not None and len(caches.layers) != len(decoder.layers):
        caches.reset(len(decoder.layers))
    for i, layer in enumerate(decoder.layers[: model.config.num_hidden_layers]):
        q, k, v = project(layer, h, frame.cos, frame.sin)
        a = attend(layer, q, k, v, frame.keys)
        h1 = h + a
        f = ffn(layer, h1)
        h = h1 + f
        if caches is not None:
            c = caches.layers[i]
            c.k, c.v, c.attn, c.ffn = k, v, a, f
            c.step = torch.full(ids.shape, step, dtype=torch.long, device=ids.device)
    lo, hi = rows if rows is not None else (0, ids.shape[1])
    return head(model, h[:, lo:hi])


def logit_rows(step: dict) -> tuple[int, int]:
    """The network rows whose logits predict the current block's tokens lo..hi: the block itself, or with the
    model's logit shift (`tasks._kit.dllm.shifted`, Dream) the rows one to the left."""
    shift = step.get("shift", 0)
    return step["lo"] - shift, step["hi"] - shift


def padded_logits(block: "torch.Tensor", length: int, lo: int) -> "torch.Tensor":
    """A (B, L, V) logits tensor holding `block`'s rows at lo..lo+n and zeros elsewhere: the sampler reads only
    the current block's positions (the others' confidences are set to -inf before any choice)."""
    import torch

    out = torch.zeros((block.shape[0], length, block.shape[2]), dtype=block.dtype, device=block.device)
    out[:, lo:lo + block.shape[1]] = block
    return out


@dataclass
class Counts:
    """Counters over every network call a cached forward made (`Applied.stats`): position-layer features
    recomputed against those a full pass computes."""

    calls: int = 0
    full_calls: int = 0
    recomputed: int = 0  # positions computed, summed over calls and layers
    positions: int = 0  # positions a full pass would compute, summed over calls and layers
    sequences: int = 0
    extra: dict = field(default_factory=dict)

    def add(self, recomputed: int, positions: int, full: bool) -> None:
        self.calls += 1
        self.full_calls += int(full)
        self.recomputed += recomputed
        self.positions += positions

    def as_dict(self, layers: int) -> dict[str, float]:
        calls = max(self.calls, 1)
        out = {"network_calls": float(self.calls), "full_calls": float(self.full_calls),
               "partial_calls": float(self.calls - self.full_calls),
               "steps_per_sequence": self.calls / max(self.sequences, 1),
               "tokens_recomputed_per_step": self.recomputed / max(layers, 1) / calls,
               "tokens_per_step_full": self.positions / max(layers, 1) / calls,
               "cache_hit_share": 1.0 - self.recomputed / max(self.positions, 1)}
        out.update({k: float(v) for k, v in self.extra.items()})
        return out
