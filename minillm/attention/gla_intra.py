"""GLA's intra-chunk score matrix as one autograd Function with a hand-written backward.

A[t, s] = sum_d q_td k_sd exp(g_td - g_sd) for s <= t inside a chunk (zero above the diagonal),
built by doubling: the (2h x 2h) diagonal blocks are [[A_left, 0], [X, A_right]], where the
(h x h) block X pairs the right half's queries with the left half's keys. With reference
r = the left half's last position, exp(g_t - g_s) = exp(g_t - g_r) * exp(g_r - g_s) and both
factors are <= 1, so X is one small matmul of two scaled inputs and no exp ever sees a positive
argument. Autograd of that construction spends most of its time on plumbing (zero-filled
select/unbind gradients, stacks, negations, accumulations); the backward here writes each
level's gradients straight into three preallocated buffers: for X = Q' K'^T with
Q' = Q exp(g_R - g_r), K' = K exp(g_r - g_L): dQ = (dX K') exp(g_R - g_r), dK = (dX^T Q')
exp(g_r - g_L), dg_R = (dX K') * Q', dg_L = -(dX^T Q') * K', and g_r collects minus the sum of
both over the block's rows. Not twice differentiable.

``intra_scores_autograd`` is the same construction left to autograd: slower eagerly, but
traceable, so it is what the ``compiled`` backend hands to ``torch.compile`` (which fuses the
elementwise passes the hand-written backward can only trim).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable


def _halves(x: Tensor, h: int) -> tuple[Tensor, Tensor]:
    """(B, H, n, c, D) -> left and right halves of every 2h-block: two (B, H, n, m, h, D) views."""
    c = x.shape[-2]
    return x.reshape(*x.shape[:-2], c // (2 * h), 2, h, x.shape[-1]).unbind(-3)


def _cross_block(a: Tensor, h: int) -> Tensor:
    """View of the (right rows, left columns) block of every 2h-diagonal block of a (.., c, c):
    (B, H, n, m, h, h)."""
    c = a.shape[-1]
    m = c // (2 * h)
    blocks = a.view(*a.shape[:-2], m, 2, h, m, 2, h)[..., :, 1, :, :, 0, :]  # (.., m, h, m, h)
    return blocks.diagonal(dim1=-4, dim2=-2).movedim(-1, -3)  # (.., m, h, h)


def _scaled(q: Tensor, k: Tensor, g: Tensor, h: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Right-half queries and left-half keys scaled to the left half's last position, with the
    scale factors (all <= 1): (q', k', exp(g_R - g_r), exp(g_r - g_L)), each (.., m, h, D_k)."""
    g_l, g_r = _halves(g, h)
    ref = g_l[..., -1:, :]  # (B, H, n, m, 1, D_k)
    e_r, e_l = (g_r - ref).exp_(), (ref - g_l).exp_()
    return _halves(q, h)[1] * e_r, _halves(k, h)[0] * e_l, e_r, e_l


def intra_scores_autograd(q: Tensor, k: Tensor, g: Tensor) -> Tensor:
    """``GLAIntraScores.apply`` through autograd: (B, H, n, c, D_k) x3 -> A (B, H, n, c, c)."""
    c = q.shape[-2]
    a = (q * k).sum(-1)[..., None, None]  # (B, H, n, c, 1, 1) the s = t terms
    h = 1
    while h < c:
        qs, ks, _, _ = _scaled(q, k, g, h)  # (B, H, n, m, h, D_k)
        x = qs @ ks.transpose(-1, -2)  # (B, H, n, m, h, h)
        a_l, a_r = a.reshape(*x.shape[:-3], -1, 2, h, h).unbind(-3)  # (B, H, n, m, h, h)
        top = F.pad(a_l, (0, h))  # (B, H, n, m, h, 2h): no query of the left sees the right
        a = torch.cat((top, torch.cat((x, a_r), -1)), -2)  # (B, H, n, m, 2h, 2h)
        h *= 2
    return a.squeeze(-3)  # (B, H, n, c, c)


class GLAIntraScores(torch.autograd.Function):
    """(q, k, g) chunked (B, H, n, c, D_k), g cumulated from each chunk's start -> A (B, H, n,
    c, c), lower triangular; c a power of two."""

    @staticmethod
    def forward(ctx: Any, q: Tensor, k: Tensor, g: Tensor) -> Tensor:
        c = q.shape[-2]
        a = q.new_zeros(*q.shape[:-1], c)  # (B, H, n, c, c)
        a.diagonal(dim1=-2, dim2=-1).copy_((q * k).sum(-1))  # the s = t terms
        levels, h = [], 1
        while h < c:
            qs, ks, e_r, e_l = _scaled(q, k, g, h)
            _cross_block(a, h).copy_(qs @ ks.transpose(-1, -2))  # (.., m, h, h)
            levels.append((qs, ks, e_r, e_l))
            h *= 2
        ctx.save_for_backward(q, k)
        ctx.levels = levels
        return a

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, da: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        q, k = ctx.saved_tensors
        da = da.contiguous()
        diag = da.diagonal(dim1=-2, dim2=-1)[..., None]  # (B, H, n, c, 1)
        dq, dk = (diag * k).contiguous(), (diag * q).contiguous()  # (B, H, n, c, D_k)
        dg = torch.zeros_like(dq)
        h = 1
        for qs, ks, e_r, e_l in ctx.levels:
            dx = _cross_block(da, h)  # (B, H, n, m, h, h)
            dqs, dks = dx @ ks, dx.transpose(-1, -2) @ qs  # (B, H, n, m, h, D_k)
            _halves(dq, h)[1].addcmul_(dqs, e_r)
            _halves(dk, h)[0].addcmul_(dks, e_l)
            g_r, g_l = dqs.mul_(qs), dks.mul_(ks)  # d/dg_R and -d/dg_L
            dg_l, dg_r = _halves(dg, h)
            dg_r.add_(g_r)
            dg_l.sub_(g_l)
            dg_l[..., -1:, :].sub_(g_r.sum(-2, keepdim=True) - g_l.sum(-2, keepdim=True))
            h *= 2
        return dq, dk, dg
