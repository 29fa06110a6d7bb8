"""diffusers' `DiTTransformer2DModel` forward, opened up at the two residual branches of every block.

Each DiT block (a `BasicTransformerBlock` with `norm_type="ada_norm_zero"`, no cross-attention) computes

    (s1, g1, s2, c2, g2) = adaLN(t, y)                          (cheap: the block's own embedding + linear)
    h <- h + g1 * Attn(LN(h))                                   attention branch
    h <- h + g2 * MLP(LN(h) * (1 + c2) + s2)                    MLP branch

FORA, ToCa and TaylorSeer cache (or forecast) the *ungated* branch outputs Attn(.) and MLP(.) and always
recompute the modulation from the current timestep, as the DiT implementations of ToCa and TaylorSeer do.
`dit_forward(model, x, t, y, branch)` calls `branch(layer, "attn"|"mlp", compute, inputs)` for each branch;
`compute(tokens)` runs the real sub-layer on `inputs` (or on a subset of its tokens, for ToCa), and the
callback returns the branch output to use. With `branch = lambda l, m, f, x: f(x)` the result equals
`model(x, t, y).sample` (the refresh-every-step tests check it to float tolerance).
"""

from __future__ import annotations

from typing import Any, Callable


def check_dit_blocks(model, method: str) -> None:
    """Refuse block variants whose forward `dit_forward` does not reproduce."""
    for i, b in enumerate(model.transformer_blocks):
        problems = []
        if getattr(b, "norm_type", None) != "ada_norm_zero":
            problems.append(f"norm_type={getattr(b, 'norm_type', None)!r} (needs 'ada_norm_zero')")
        if getattr(b, "attn2", None) is not None:
            problems.append("has cross-attention")
        if getattr(b, "pos_embed", None) is not None or getattr(b, "_chunk_size", None) is not None:
            problems.append("uses per-block positional embedding or chunked feed-forward")
        if problems:
            raise ValueError(f"{method}: transformer_blocks.{i} is not a plain DiT block: {'; '.join(problems)}")


def dit_forward(model, x, timestep, labels, branch: Callable[[int, str, Callable, Any], Any]):
    """The denoiser output (B, C_out, H, W), with every attention / MLP branch routed through `branch`."""
    h = dit_blocks(model, model.pos_embed(x), timestep, labels, branch)
    return dit_head(model, h, timestep, labels)


def dit_blocks(model, h, timestep, labels, branch: Callable[[int, str, Callable, Any], Any]):
    """The token states after every transformer block, from the patch embedding's `h` (B, N, D)."""
    for i, block in enumerate(model.transformer_blocks):
        normed, g1, s2, c2, g2 = block.norm1(h, timestep, labels, hidden_dtype=h.dtype)
        a = branch(i, "attn", lambda z, blk=block: blk.attn1(z), normed)
        h = h + g1.unsqueeze(1) * a
        mlp_in = block.norm3(h) * (1 + c2[:, None]) + s2[:, None]
        m = branch(i, "mlp", lambda z, blk=block: blk.ff(z), mlp_in)
        h = h + g2.unsqueeze(1) * m
    return h


def dit_head(model, h, timestep, labels):
    """The output layer: adaLN from the timestep and label embedding, projection, unpatchify."""
    import torch
    import torch.nn.functional as F

    cond = model.transformer_blocks[0].norm1.emb(timestep, labels, hidden_dtype=h.dtype)
    shift, scale = model.proj_out_1(F.silu(cond)).chunk(2, dim=1)
    h = model.proj_out_2(model.norm_out(h) * (1 + scale[:, None]) + shift[:, None])
    p, c = model.patch_size, model.out_channels
    side = int(h.shape[1] ** 0.5)
    h = h.reshape(-1, side, side, p, p, c)
    return torch.einsum("nhwpqc->nchpwq", h).reshape(-1, c, side * p, side * p)


def attention_probs(attn, z):
    """Head-averaged self-attention probabilities softmax(QK^T / sqrt(d)) of a diffusers `Attention` on z.

    (B, N, N). ToCa scores tokens with it; the processor itself (SDPA) does not return the map.
    """
    import torch

    q, k = attn.to_q(z), attn.to_k(z)
    b, n, _ = q.shape
    heads = attn.heads
    q = q.view(b, n, heads, -1).transpose(1, 2)
    k = k.view(b, n, heads, -1).transpose(1, 2)
    if getattr(attn, "norm_q", None) is not None:
        q, k = attn.norm_q(q), attn.norm_k(k)
    probs = torch.softmax(q @ k.transpose(-1, -2) * (q.shape[-1] ** -0.5), dim=-1)
    return probs.mean(dim=1)


def make_dit_call(model, forward: Callable[[Any, Any, Any], Any]):
    """The proxy call for a DiT: parse the model-style arguments, run `forward(x, t, y)`, wrap the output."""
    from baselines.caching._common import split_call, wrap_output

    def call(*args, **kwargs):
        x, t, y, return_dict, _ = split_call(args, kwargs, "hidden_states")
        return wrap_output(model, forward(x, t, y), return_dict)

    return call
