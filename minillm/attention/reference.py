"""Slow, obvious twins of the attention kinds, used only by tests.

Each twin recomputes a module's output from its own weights with explicit per-query loops and
no fused kernels, so the fast path (SDPA, chunked forms, caches) can be checked against it,
outputs and gradients. ``REFERENCES`` maps a kind's class to its twin.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from minillm.attention.base import Attention
from minillm.attention.mha import MultiHeadAttention


def rope_reference(x: Tensor, positions: Tensor, base: float) -> Tensor:
    """RoPE as complex rotation of pairs (i, i + D/2): x (B, H, T, D), positions (B, T)."""
    half = x.shape[-1] // 2
    z = torch.complex(x[..., :half].double(), x[..., half:].double())
    freqs = base ** (-torch.arange(half, dtype=torch.float64) * 2 / x.shape[-1])
    angle = positions.double()[:, None, :, None] * freqs  # (B, 1, T, D/2)
    z = z * torch.polar(torch.ones_like(angle), angle)
    return torch.cat((z.real, z.imag), dim=-1).to(x.dtype)


def softmax_reference(
    q: Tensor, k: Tensor, v: Tensor, allowed: Callable[[int, int], bool]
) -> Tensor:
    """q (B, H, T, D), k/v (B, H, S, D) with KV heads already repeated; one query at a time.

    ``allowed(b, t)`` returns the list of key indices query t of row b may see.
    """
    b_size, _, t_size, d = q.shape
    out = torch.zeros_like(q)
    for b in range(b_size):
        for t in range(t_size):
            keys = allowed(b, t)
            scores = (k[b][:, keys] @ q[b, :, t, :, None]).squeeze(-1) / math.sqrt(d)  # (H, n)
            out[b, :, t] = (scores.softmax(-1)[..., None] * v[b][:, keys]).sum(1)
    return out


def mha_reference(
    attn: MultiHeadAttention,
    x: Tensor,
    *,
    positions: Tensor,
    memory: Tensor | None = None,
    mask: Tensor | None = None,
) -> Tensor:
    b, t, _ = x.shape
    src = memory if attn.role == "cross" else x
    s = src.shape[1]

    def heads(w: Tensor, inp: Tensor, n: int) -> Tensor:
        return (inp @ w.T).view(b, inp.shape[1], n, attn.head_dim).transpose(1, 2)

    q = heads(attn.q_proj.weight, x, attn.n_heads)
    k = heads(attn.k_proj.weight, src, attn.n_kv_heads)
    v = heads(attn.v_proj.weight, src, attn.n_kv_heads)
    if attn.role != "cross":
        q = rope_reference(q, positions, attn.cfg.rope_base)
        k = rope_reference(k, positions, attn.cfg.rope_base)
    group = attn.n_heads // attn.n_kv_heads
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    valid = mask if mask is not None else torch.ones(b, s, dtype=torch.bool)

    def allowed(row: int, query: int) -> list[int]:
        if not attn.causal:
            return [j for j in range(s) if valid[row, j]]
        # a causal query always sees itself, so a left-pad query gets a finite output
        return [j for j in range(query + 1) if valid[row, j] or j == query]

    y = softmax_reference(q, k, v, allowed)
    return y.transpose(1, 2).reshape(b, t, attn.dim) @ attn.o_proj.weight.T


REFERENCES: dict[type[Attention], Callable[..., Tensor]] = {
    MultiHeadAttention: mha_reference,
}
