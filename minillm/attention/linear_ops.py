"""Chunkwise kernels of the linear-attention kinds, apart from their modules (as fla does).

Pure PyTorch, vectorised across chunks; only the cheap (D_k, D_v) state recurrence (GLA, the
delta rule) is a Python loop over chunks, over ``unbind`` views (never slices of a big tensor,
which would make backward quadratic). All compute in at least fp32 (running sums and cumulated
log-gates lose too much in bf16) and return outputs in the inputs' dtype. Sequences are padded
at the end to whole chunks with zero keys, zero log-gates and (delta rule) zero betas, which
leaves every real output and the carried state unchanged.

These are the ``torch`` backend of the gated ops; the kinds call them through
``linear_backends`` (which may swap in compiled or fla kernels that must give the same results).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from minillm.attention.gla_intra import GLAIntraScores


def _chunks(x: Tensor, c: int) -> Tensor:
    """(B, H, T, D) -> (B, H, n, c, D), zero-padded at the end to whole chunks."""
    b, h, t, d = x.shape
    n = -(-t // c)
    if n * c != t:
        x = F.pad(x, (0, 0, 0, n * c - t))
    return x.reshape(b, h, n, c, d)


def _at_least_fp32(*xs: Tensor) -> tuple[Tensor, ...]:
    return tuple(x.to(torch.promote_types(x.dtype, torch.float32)) for x in xs)


def linear_attention_summary(k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    """Global sums over all keys: S = sum k_i v_i^T (B, H, D_k, D_v), z = sum k_i (B, H, D_k)."""
    k, v = _at_least_fp32(k, v)
    return k.transpose(-1, -2) @ v, k.sum(2)


def linear_attention_readout(q: Tensor, state: Tensor, normalizer: Tensor, eps: float) -> Tensor:
    """o = q S / (q . z + eps) for q (B, H, T, D_k) against a summary (S, z): (B, H, T, D_v)."""
    (qf,) = _at_least_fp32(q)
    return ((qf @ state) / (qf @ normalizer[..., None] + eps)).to(q.dtype)


def chunk_linear_attention(
    q: Tensor, k: Tensor, v: Tensor, state: Tensor, normalizer: Tensor, chunk_size: int, eps: float
) -> tuple[Tensor, Tensor, Tensor]:
    """Causal o_t = q_t S_t / (q_t . z_t + eps), S_t = S_0 + sum_{i<=t} k_i v_i^T, z_t likewise.

    q, k (B, H, T, D_k) already feature-mapped (non-negative; padding keys zeroed), v (B, H, T,
    D_v); state (B, H, D_k, D_v) and normalizer (B, H, D_k) are S_0, z_0. Returns o (B, H, T,
    D_v) and the state and normalizer after the last token. A column of ones appended to v
    carries z through the same products as S (its output column is the denominator).
    """
    t, dtype = q.shape[2], v.dtype
    q, k, v, state, normalizer = _at_least_fp32(q, k, v, state, normalizer)
    c = min(chunk_size, t)
    v = torch.cat((v, torch.ones_like(v[..., :1])), -1)  # (B, H, T, D_v + 1)
    q, k, v = _chunks(q, c), _chunks(k, c), _chunks(v, c)  # (B, H, n, c, D)
    causal = torch.ones(c, c, dtype=torch.bool, device=q.device).tril()
    scores = (q @ k.transpose(-1, -2)).masked_fill(~causal, 0.0)  # (B, H, n, c, c)
    state = torch.cat((state, normalizer[..., None]), -1)  # (B, H, D_k, D_v + 1)
    states = []
    for kv in (k.transpose(-1, -2) @ v).unbind(2):  # (B, H, D_k, D_v + 1) per chunk
        states.append(state)
        state = state + kv
    out = q @ torch.stack(states, 2) + scores @ v  # (B, H, n, c, D_v + 1)
    o = out[..., :-1] / (out[..., -1:] + eps)  # (B, H, n, c, D_v)
    return o.flatten(2, 3)[:, :, :t].to(dtype), state[..., :-1], state[..., -1]


def chunk_gla(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    log_alpha: Tensor,
    state: Tensor,
    chunk_size: int,
    *,
    intra_scores: Callable[[Tensor, Tensor, Tensor], Tensor] = GLAIntraScores.apply,
) -> tuple[Tensor, Tensor]:
    """Gated linear attention: S_t = diag(alpha_t) S_{t-1} + k_t^T v_t, o_t = q_t S_t.

    q, k, log_alpha (B, H, T, D_k) with log_alpha <= 0; v (B, H, T, D_v); state (B, H, D_k,
    D_v) is S_0. ``chunk_size`` is a power of two (shorter inputs use the next power of two
    >= T). Every decay factor is exp of a difference of cumulated log-gates that is <= 0, so
    the result stays finite however strong the decay. Returns o (B, H, T, D_v) and S_T.
    ``intra_scores`` builds each chunk's decayed score matrix (``gla_intra``).
    """
    t, dtype = q.shape[2], v.dtype
    q, k, v, log_alpha, state = _at_least_fp32(q, k, v, log_alpha, state)
    c = min(chunk_size, 1 << (t - 1).bit_length())
    # one copy of the head-transposed inputs here beats one per batched matmul below
    q, k, v, g = (_chunks(x.contiguous(), c) for x in (q, k, v, log_alpha))  # (B, H, n, c, D)
    g = g.cumsum(-2)  # log-decay from the chunk start to each position, inclusive
    o = intra_scores(q, k, g) @ v  # (B, H, n, c, D_v) within each chunk
    g_end = g[..., -1:, :]  # (B, H, n, 1, D_k) log-decay across the whole chunk
    u = (k * (g_end - g).exp()).transpose(-1, -2) @ v  # (B, H, n, D_k, D_v) chunk's own sum
    states = []
    for decay, u_chunk in zip(g_end.squeeze(-2).exp().unbind(2), u.unbind(2), strict=True):
        states.append(state)
        state = torch.addcmul(u_chunk, decay[..., None], state)  # (B, H, D_k, D_v)
    o = o + (q * g.exp()) @ torch.stack(states, 2)  # (B, H, n, c, D_v)
    return o.flatten(2, 3)[:, :, :t].to(dtype), state


def chunk_delta_rule(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    beta: Tensor,
    log_alpha: Tensor | None,
    state: Tensor,
    chunk_size: int,
) -> tuple[Tensor, Tensor]:
    """(Gated) delta rule: S_t = alpha_t (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T and
    o_t = q_t S_t, with S (D_k, D_v) and k_t a column in the outer products.

    q, k (B, H, T, D_k) with ||k_t|| <= 1 (else the state can grow without bound); v (B, H, T,
    D_v); beta (B, H, T) in [0, 1]; log_alpha (B, H, T) <= 0, or None for alpha = 1 (DeltaNet);
    state (B, H, D_k, D_v) is S_0. ``chunk_size`` is a power of two (shorter inputs use the
    next power of two >= T). Returns o (B, H, T, D_v) and S_T.

    Chunkwise WY form (Yang et al. 2024): inside a chunk, with G_t the log-decay from the chunk
    start and A[i, j] = beta_i exp(G_i - G_j) k_i . k_j (j < i), the rows
    u_i = beta_i (v_i - k_i^T alpha_i S_{i-1}) solve (I + A) U = beta V - beta exp(G) K S_0,
    i.e. U = U~ - W S_0 with U~, W one unit-triangular solve per chunk, for all chunks at once.
    Only U and S_{n+1} = exp(G_c) S_n + (exp(G_c - G) K)^T U run chunk by chunk. Decay factors
    are exp of differences <= 0, so strong decay underflows to 0 and never overflows.
    """
    with torch.autocast(q.device.type, enabled=False):  # fp32 matmuls and solve, always
        t, dtype = q.shape[2], v.dtype
        q, k, v, beta, state = _at_least_fp32(q, k, v, beta, state)
        c = min(chunk_size, 1 << (t - 1).bit_length())
        q, k, v = _chunks(q, c), _chunks(k, c), _chunks(v, c)  # (B, H, n, c, D)
        beta = _chunks(beta[..., None], c)  # (B, H, n, c, 1) zero on end padding: absorbs nothing
        causal = torch.ones(c, c, dtype=torch.bool, device=q.device).tril()
        scores = q @ k.transpose(-1, -2)  # (B, H, n, c, c)
        a = (beta * k) @ k.transpose(-1, -2)  # (B, H, n, c, c); only the strict lower part is read
        k_beta, k_end = beta * k, k
        decay = q.new_ones(*q.shape[:3], 1, 1)  # (B, H, n, 1, 1) state decay across each chunk
        if log_alpha is None:
            scores = scores.masked_fill(~causal, 0.0)
        else:
            (log_alpha,) = _at_least_fp32(log_alpha)
            g = _chunks(log_alpha[..., None], c).cumsum(-2)  # (B, H, n, c, 1) log-decay, inclusive
            gap = (g - g.transpose(-1, -2)).masked_fill(~causal, float("-inf")).exp()  # (.., c, c)
            scores, a = scores * gap, a * gap
            k_beta, q = k_beta * g.exp(), q * g.exp()
            k_end = k * (g[..., -1:, :] - g).exp()  # decay from each position to the chunk end
            decay = g[..., -1:, :].exp()  # (B, H, n, 1, 1)
        rhs = torch.cat((beta * v, k_beta), -1)  # (B, H, n, c, D_v + D_k)
        uw = torch.linalg.solve_triangular(a, rhs, upper=False, unitriangular=True)
        u_tilde, w = uw.split((v.shape[-1], k.shape[-1]), -1)  # (B, H, n, c, D_v), (.., D_k)
        states, us = [], []
        steps = zip(u_tilde.unbind(2), w.unbind(2), k_end.unbind(2), decay.unbind(2), strict=True)
        for u_i, w_i, k_i, decay_i in steps:
            states.append(state)
            u_i = u_i - w_i @ state  # (B, H, c, D_v)
            us.append(u_i)
            state = decay_i * state + k_i.transpose(-1, -2) @ u_i  # (B, H, D_k, D_v)
        o = q @ torch.stack(states, 2) + scores @ torch.stack(us, 2)  # (B, H, n, c, D_v)
        return o.flatten(2, 3)[:, :, :t].to(dtype), state


def delta_rule_step(
    q: Tensor, k: Tensor, v: Tensor, beta: Tensor, log_alpha: Tensor | None, state: Tensor
) -> tuple[Tensor, Tensor]:
    """One token of ``chunk_delta_rule`` (the decode step): shapes as there with T = 1.

    S = alpha S; S = S + beta k (v - k^T S) (erase at k, then write); o = q S. A handful of
    small matmuls instead of the chunk form's triangular solve and chunk bookkeeping.
    """
    with torch.autocast(q.device.type, enabled=False):
        dtype = v.dtype
        q, k, v, beta, state = _at_least_fp32(q, k, v, beta, state)
        if log_alpha is not None:
            (log_alpha,) = _at_least_fp32(log_alpha)
            state = state * log_alpha.exp()[..., None]  # (B, H, 1, 1)
        u = beta[..., None] * (v - k @ state)  # (B, H, 1, D_v)
        state = state + k.transpose(-1, -2) @ u  # (B, H, D_k, D_v)
        return (q @ state).to(dtype), state
