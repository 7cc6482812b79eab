"""Twins of the kinds that take a softmax over keys: mha/gqa/mqa, local, sparse, additive,
linformer: explicit per-query loops over the keys each query may see."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from minillm.attention.additive import AdditiveAttention
from minillm.attention.linformer import LinformerAttention
from minillm.attention.local import LocalAttention
from minillm.attention.mha import MultiHeadAttention
from minillm.attention.reference.common import (
    bias_reference,
    grouped_qkv,
    project,
    softmax_reference,
    split_heads,
)
from minillm.attention.sparse import SparseAttention
from minillm.attention.sparse_ops import random_key_blocks


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
    cross = attn.role == "cross"  # cross-attention has no positions
    q, k, v = grouped_qkv(attn, x, src, None if cross else positions)  # (B, H, *, D)
    bias = None if cross else bias_reference(attn.pos_encoding, positions)
    valid = mask if mask is not None else torch.ones(b, s, dtype=torch.bool)

    def allowed(row: int, query: int) -> list[int]:
        if not attn.causal:
            return [j for j in range(s) if valid[row, j]]
        # a causal query always sees itself, so a left-pad query gets a finite output
        return [j for j in range(query + 1) if valid[row, j] or j == query]

    y = softmax_reference(q, k, v, allowed, bias)
    return project(attn.o_proj, y.transpose(1, 2).reshape(b, t, attn.dim))


def local_reference(
    attn: LocalAttention,
    x: Tensor,
    *,
    positions: Tensor,
    memory: Tensor | None = None,
    mask: Tensor | None = None,
) -> Tensor:
    """Full softmax per query over the keys of its window: causal t - window < s <= t,
    bidirectional |t - s| <= window // 2; a query always sees itself (finite pad outputs)."""
    b, t, _ = x.shape
    q, k, v = grouped_qkv(attn, x, x, positions)  # (B, H, T, D)
    valid = mask if mask is not None else torch.ones(b, t, dtype=torch.bool)
    window = attn.cfg.window
    before, after = (window - 1, 0) if attn.causal else (window // 2, window // 2)

    def allowed(row: int, query: int) -> list[int]:
        near = range(max(0, query - before), min(t, query + after + 1))
        return [j for j in near if valid[row, j] or j == query]

    y = softmax_reference(q, k, v, allowed, bias_reference(attn.pos_encoding, positions))
    return project(attn.o_proj, y.transpose(1, 2).reshape(b, t, attn.dim))


def sparse_reference(
    attn: SparseAttention,
    x: Tensor,
    *,
    positions: Tensor,
    memory: Tensor | None = None,
    mask: Tensor | None = None,
) -> Tensor:
    """Full softmax per query over the keys its pattern names, by positions: causal s in (p -
    local, p] or a global s < n_global with s <= p; bidirectional |p - s| <= local // 2, a global
    key or query, or a key in one of the query block's random blocks. Padding queries see
    only themselves."""
    b, t, _ = x.shape
    q, k, v = grouped_qkv(attn, x, x, positions)  # (B, H, T, D)
    valid = mask if mask is not None else torch.ones(b, t, dtype=torch.bool)
    g, bs, local = attn.cfg.n_global, attn.cfg.block_size, attn.local
    lengths = valid.sum(1)
    row_blocks = -(-lengths // bs)
    n = int(row_blocks.max())
    blocks = random_key_blocks(attn.random_seed, row_blocks, n, attn.cfg.random_blocks)

    def allowed(row: int, query: int) -> list[int]:
        if not valid[row, query]:
            return [query]
        p = int(positions[row, query])
        keys = []
        for j in range(t):
            s = int(positions[row, j])
            if not valid[row, j]:
                continue
            if attn.causal:
                seen = p - local < s <= p or s < g and s <= p
            else:
                random = attn.cfg.random_blocks and s // bs in blocks[row, p // bs].tolist()
                seen = abs(p - s) <= local // 2 or s < g or p < g or bool(random)
            if seen:
                keys.append(j)
        return keys

    y = softmax_reference(q, k, v, allowed)
    return project(attn.o_proj, y.transpose(1, 2).reshape(b, t, attn.dim))


def additive_reference(
    attn: AdditiveAttention,
    x: Tensor,
    *,
    positions: Tensor,
    memory: Tensor | None = None,
    mask: Tensor | None = None,
) -> Tensor:
    """w_h^T tanh(W_q q + W_k k) for one query at a time over the keys mha's masks allow
    (a causal query always sees itself), softmax, sum of values; no RoPE."""
    b, t, _ = x.shape
    src = memory if attn.role == "cross" else x
    s = src.shape[1]
    a = split_heads(project(attn.q_proj, x), attn.n_heads)  # (B, H, T, A)
    k = split_heads(project(attn.k_proj, src), attn.n_heads)  # (B, H, S, A)
    v = split_heads(project(attn.v_proj, src), attn.n_heads)  # (B, H, S, D)
    valid = mask if mask is not None else torch.ones(b, s, dtype=torch.bool)
    out = torch.zeros(b, attn.n_heads, t, attn.head_dim, dtype=x.dtype)
    for row in range(b):
        for i in range(t):
            if attn.causal:
                keys = [j for j in range(i + 1) if valid[row, j] or j == i]
            else:
                keys = [j for j in range(s) if valid[row, j]]
            z = torch.tanh(a[row, :, i, None, :] + k[row][:, keys])  # (H, n, A)
            scores = (z * attn.score[:, None, :]).sum(-1)  # (H, n)
            out[row, :, i] = (scores.softmax(-1)[..., None] * v[row][:, keys]).sum(1)
    return project(attn.o_proj, out.transpose(1, 2).reshape(b, t, attn.dim))


def linformer_reference(
    attn: LinformerAttention,
    x: Tensor,
    *,
    positions: Tensor,
    memory: Tensor | None = None,
    mask: Tensor | None = None,
) -> Tensor:
    """Keys and values summed along the sequence one real token at a time (the r-th real
    token weighted by column r of E, F), then a full softmax per query over the k rows."""
    b, t, _ = x.shape
    src = memory if attn.role == "cross" else x
    s, h, d = src.shape[1], attn.n_heads, attn.head_dim
    q = split_heads(project(attn.q_proj, x), h)  # (B, H, T, D)
    k = split_heads(project(attn.k_proj, src), h)  # (B, H, S, D)
    v = split_heads(project(attn.v_proj, src), h)
    e = attn.e_proj.expand(h, -1, -1)  # (H, k, max_len), shared or per head
    f = (attn.e_proj if attn.f_proj is None else attn.f_proj).expand(h, -1, -1)
    valid = mask if mask is not None else torch.ones(b, s, dtype=torch.bool)
    out = torch.zeros_like(q)
    for row in range(b):
        k_rows = torch.zeros(h, attn.cfg.k, d, dtype=x.dtype)
        v_rows = torch.zeros(h, attn.cfg.k, d, dtype=x.dtype)
        real = 0
        for j in range(s):
            if valid[row, j]:
                k_rows = k_rows + e[:, :, real, None] * k[row, :, j, None, :]
                v_rows = v_rows + f[:, :, real, None] * v[row, :, j, None, :]
                real += 1
        for i in range(t):
            scores = (k_rows @ q[row, :, i, :, None]).squeeze(-1) / math.sqrt(d)  # (H, k)
            out[row, :, i] = (scores.softmax(-1)[..., None] * v_rows).sum(1)
    return project(attn.o_proj, out.transpose(1, 2).reshape(b, t, attn.dim))
