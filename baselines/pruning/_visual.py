"""What the visual-token dropping methods (`vtw`, `fastv`) share: a LLaVA forward that can drop visual positions
from the sequence before any decoder layer, the greedy decoding that follows it on the shortened KV cache, the
text-to-visual attention FastV ranks by, and the counters behind `Applied.stats`.

Not a method (the leading underscore keeps the registry's discovery out of it). Module scope is torch-free.

Contract (`VisionLanguageExtra` in bench/api.py): `subject.model` is a transformers `LlavaForConditionalGeneration`
whose decoder layers are `model.model.language_model.layers` (Llama-style: `input_layernorm`, `self_attn` with
`q_proj`); `extra["image_token_id"]` marks the visual positions of `input_ids`.

Why written here rather than delegated to `model.generate`: a dropped token leaves the sequence of the layers
after K only, so the decoder's layers hold caches of different lengths (layers < K: the whole prompt; layers >= K:
what was kept), and the sequence a layer sees must be cut between two layers. transformers' `generate` runs the
decoder as one module over one sequence length, and its `Cache` bookkeeping (positions from `get_seq_length`, one
causal mask for every layer) assumes one length for all layers. The loop below calls transformers' own pieces
unchanged (`get_image_features`, `get_placeholder_mask`, the rotary embedding, each `LlamaDecoderLayer`,
`create_causal_mask`, `DynamicCache`), so with nothing dropped it computes what `generate` computes, bit for bit
(tests/baselines/pruning/test_vtw.py, test_fastv.py).

Positions: a kept token keeps its position in the prompt (its rotary angle), as in FastV's code (the kept
indices become the position ids) and VTW's (the text tokens are untouched); a generated token is at prompt
length + its index, as without dropping.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

from bench.config import ConfigError

if TYPE_CHECKING:
    import torch

# (layer index i, hidden states 1 x n x d entering layer i, visual mask n, state) -> the positions (indices into
# the current n) to keep from layer i on, or None to keep all
Select = Callable[[int, "torch.Tensor", "torch.Tensor", "Prefill"], "torch.Tensor | None"]


@dataclass
class VisualCounts:
    """Counters over every question answered with the method (`Applied.stats`).

    visual_tokens: visual positions in the prompts; visual_token_layers: visual positions times the decoder layers
    that processed them (the reference: visual_tokens x layers); visual_kept_after_drop: visual positions still in
    the sequence after the drop; kv_entries / kv_entries_full: tokens held by the KV cache summed over the layers
    after the prefill, with dropping and as the reference holds them."""

    layers: int = 0
    sequences: int = 0
    visual_tokens: int = 0
    visual_token_layers: int = 0
    visual_kept_after_drop: int = 0
    kv_entries: int = 0
    kv_entries_full: int = 0
    drop_layers: list[int] = field(default_factory=list)

    def as_dict(self) -> dict[str, float]:
        v = max(1, self.visual_tokens)
        return {"sequences": self.sequences, "visual_tokens_per_question": self.visual_tokens / max(1, self.sequences),
                "visual_kept_after_drop": self.visual_kept_after_drop / v,
                "visual_token_layers_kept": self.visual_token_layers / (v * max(1, self.layers)),
                "kv_entries_per_question": self.kv_entries / max(1, self.sequences),
                "kv_kept_fraction": self.kv_entries / max(1, self.kv_entries_full),
                "drop_layer": (sum(self.drop_layers) / len(self.drop_layers)) if self.drop_layers else self.layers}


@dataclass
class Prefill:
    """One prompt's pass through the decoder: what a `Select` may read (the layer about to run, the original
    positions still in the sequence, the rotary angles, the cache filled by the layers before)."""

    model: object
    positions: "torch.Tensor"  # original prompt positions still in the sequence, 1-D
    cos: "torch.Tensor"
    sin: "torch.Tensor"
    cache: object


def decoder(model):
    """The decoder (`LlamaModel`) of a LLaVA model, or a ConfigError naming what the methods need."""
    inner = getattr(model, "model", None)
    lm = getattr(inner, "language_model", None)
    layers = getattr(lm, "layers", None)
    if layers is None or not hasattr(inner, "get_image_features") or not all(
            hasattr(l, "input_layernorm") and hasattr(getattr(l, "self_attn", None), "q_proj") for l in layers):
        raise ConfigError(f"visual-token dropping needs a LLaVA-style model (model.model.get_image_features and "
                          f"Llama-style decoder layers at model.model.language_model.layers); got "
                          f"{type(model).__name__}")
    return lm


def embed(model, input_ids: "torch.Tensor", pixel_values: "torch.Tensor") -> "torch.Tensor":
    """The decoder's input: token embeddings with the projected patch features scattered into the image
    positions, as `LlavaModel.forward` does."""
    inner = model.model
    embeds = inner.get_input_embeddings()(input_ids)
    feats = inner.get_image_features(pixel_values=pixel_values, return_dict=True).pooler_output
    import torch

    feats = torch.cat(list(feats), dim=0).to(embeds.device, embeds.dtype)
    mask = inner.get_placeholder_mask(input_ids, inputs_embeds=embeds, image_features=feats)
    return embeds.masked_scatter(mask, feats)


def _mask(lm, h: "torch.Tensor"):
    """The causal mask a prompt of h's length gets from the decoder with an empty cache (None where SDPA's own
    causal flag serves, as in `LlamaModel.forward`)."""
    import torch
    from transformers.masking_utils import create_causal_mask

    return create_causal_mask(config=lm.config, inputs_embeds=h, attention_mask=None, cache=None,
                              position_ids=torch.arange(h.shape[1], device=h.device)[None])


def prefill(model, input_ids: "torch.Tensor", pixel_values: "torch.Tensor", image_token_id: int, select: Select,
            counts: VisualCounts):
    """One prompt (batch 1) through the decoder, `select` consulted before every layer: (the last layer's hidden
    states of the positions kept, the filled `DynamicCache`)."""
    import torch
    from transformers import DynamicCache

    if input_ids.ndim != 2 or input_ids.shape[0] != 1:
        raise ValueError(f"visual-token dropping answers one question at a time (batch 1); got input_ids of shape "
                         f"{tuple(input_ids.shape)}")
    lm = decoder(model)
    visual = (input_ids[0] == image_token_id)
    if bool(visual[-1]):
        raise ValueError("the prompt ends with a visual token; a dropping method needs the text after the images")
    n_layers = len(lm.layers)
    h = embed(model, input_ids, pixel_values)
    pos = torch.arange(h.shape[1], device=h.device)
    cos, sin = lm.rotary_emb(h, position_ids=pos[None])
    cache = DynamicCache(config=lm.config)
    state = Prefill(model, pos, cos, sin, cache)
    mask = _mask(lm, h)
    drop_at = n_layers
    for i, layer in enumerate(lm.layers):
        keep = select(i, h, visual, state)
        if keep is not None and keep.numel() < h.shape[1]:
            if int((~visual[keep]).sum()) != int((~visual).sum()):
                raise RuntimeError(f"layer {i}: the selection dropped a text position")
            h, visual = h[:, keep], visual[keep]
            state.positions, state.cos, state.sin = state.positions[keep], state.cos[:, keep], state.sin[:, keep]
            mask = _mask(lm, h)
            drop_at = min(drop_at, i)
        counts.visual_token_layers += int(visual.sum())
        h = layer(h, attention_mask=mask, position_ids=state.positions[None], cache=cache, use_cache=True,
                  position_embeddings=(state.cos, state.sin))
    counts.layers = n_layers
    counts.sequences += 1
    counts.visual_tokens += int((input_ids[0] == image_token_id).sum())
    counts.visual_kept_after_drop += int(visual.sum())
    counts.kv_entries += sum(l.get_seq_length() for l in cache.layers)
    counts.kv_entries_full += n_layers * input_ids.shape[1]
    counts.drop_layers.append(drop_at)
    return h, cache


def next_logits(model, h: "torch.Tensor") -> "torch.Tensor":
    """The next-token logits (vocabulary) after the last position of `h`, the decoder's last hidden states."""
    lm = model.model.language_model
    return model.lm_head(lm.norm(h[:, -1:]))[0, -1]


def generate(model, input_ids: "torch.Tensor", pixel_values: "torch.Tensor", max_new_tokens: int,
             eos_ids, image_token_id: int, select: Select, counts: VisualCounts) -> "torch.Tensor":
    """Greedy answer to one prompt (batch 1), prompt included: `prefill`, then one token at a time on the cache
    the prefill left (each layer's own length). Stops after any of `eos_ids`."""
    import torch

    lm = decoder(model)
    with torch.no_grad():
        h, cache = prefill(model, input_ids, pixel_values, image_token_id, select, counts)
        new: list[int] = []
        length = input_ids.shape[1]
        eos = {int(e) for e in eos_ids}
        for t in range(max_new_tokens):
            token = int(next_logits(model, h).argmax())
            new.append(token)
            if token in eos or t == max_new_tokens - 1:
                break
            h = lm.embed_tokens(torch.tensor([[token]], device=input_ids.device))
            p = torch.tensor([[length + t]], device=input_ids.device)
            angles = lm.rotary_emb(h, position_ids=p)
            for layer in lm.layers:  # one query: it attends to every key its layer kept, no mask needed
                h = layer(h, attention_mask=None, position_ids=p, cache=cache, use_cache=True,
                          position_embeddings=angles)
    tail = torch.tensor(new, dtype=input_ids.dtype, device=input_ids.device)
    return torch.cat([input_ids[0], tail])[None]


def text_to_visual_attention(layer, h: "torch.Tensor", visual: "torch.Tensor", state: Prefill,
                             keys: "torch.Tensor") -> "torch.Tensor":
    """FastV's ranking score of every visual position: the attention it receives in `layer` from the text
    positions, averaged over the heads and the text queries,

        s_j = 1 / (H |T|) sum_h sum_{i in T} softmax_j(q_i^h . k_j^h / sqrt(d) + causal_{ij}),   j visual,

    with `h` the layer's input (1 x n x d) and `keys` its rotated keys as the layer cached them (1 x kv heads x
    n x d). The queries are recomputed for the text rows only (the fused attention kernel returns no
    probabilities; recomputing |T| of n query rows costs less than running the layer with eager attention)."""
    import torch
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    attn = layer.self_attn
    text = (~visual).nonzero().flatten()
    x = layer.input_layernorm(h[:, text])
    q = attn.q_proj(x).view(1, text.numel(), -1, attn.head_dim).transpose(1, 2)
    q, _ = apply_rotary_pos_emb(q, q, state.cos[:, text], state.sin[:, text])
    k = keys.repeat_interleave(q.shape[1] // keys.shape[1], dim=1)  # grouped-query heads share their KV head
    logits = (q @ k.transpose(-1, -2)).float() * attn.scaling
    n = h.shape[1]
    future = torch.arange(n, device=h.device)[None, :] > text[:, None]  # causal: query i sees keys j <= i
    probs = logits.masked_fill(future, float("-inf")).softmax(-1)  # 1 x heads x |T| x n
    return probs.mean(dim=(0, 1, 2))[visual]
