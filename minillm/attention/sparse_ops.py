"""The functional op of ``sparse`` (``minillm/attention/sparse.py``), apart from its module as
fla keeps kernels apart from layers: BigBird's random key blocks and the blockwise attention
of query blocks over their band plus the global keys."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def random_key_blocks(seed: Tensor, row_blocks: Tensor, n: int, r: int) -> Tensor:
    """(B, n, min(r, n)) key blocks for query blocks 0..n-1: per query block, the r blocks
    j < ``row_blocks`` (B,) with the lowest hash(seed, i, j). Fewer than r real blocks: the
    rest are blocks past the row's end, which hold no real key."""
    i = torch.arange(n, device=row_blocks.device)[:, None]
    j = torch.arange(n, device=row_blocks.device)[None, :]
    h = (seed.to(row_blocks.device) + i * 1000003 + j * 998244353) & 0xFFFFFFFF  # (n, n)
    for _ in range(2):  # integer mixing (xorshift-multiply), exact on every device
        h = ((h ^ (h >> 16)) * 0x45D9F3B) & 0xFFFFFFFF
    score = torch.where(j < row_blocks[:, None, None], h, h + (1 << 32))  # (B, n, n)
    return score.topk(min(r, n), dim=-1, largest=False).indices


def sparse_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    key_valid: Tensor | None,
    query_valid: Tensor | None,
    before: int,
    after: int,
    extra: tuple[Tensor, Tensor, Tensor] | None,
    block: int,
    dropout: float = 0.0,
) -> Tensor:
    """Each query reads its band (``before`` keys back to ``after`` ahead) and extra keys.

    q (B, T, H, D); k, v (B, P + T, H_kv, D) whose last T keys are the queries' own and first
    P <= before earlier context; key_valid (B, P + T), query_valid (B, T) bool or None (all
    real). ``extra`` = keys, values (B, n | 1, E, H_kv, D) per query block of ``block`` and
    allowed (B, T, E): whether query t reads extra e of its block (none it also has in its
    band). A padding query sees only itself. Returns (B, T, H, D).
    """
    b, t, h, d = q.shape
    p, h_kv = k.shape[1] - t, k.shape[2]
    block = min(block, t)
    n = -(-t // block)  # query blocks
    span = block + before + after  # band keys one block reads
    pad = (before - p, n * block - t + after)
    if key_valid is None:
        key_valid = torch.ones(b, p + t, dtype=torch.bool, device=q.device)
    if query_valid is None:
        query_valid = torch.ones(b, t, dtype=torch.bool, device=q.device)
    query_valid = F.pad(query_valid, (0, n * block - t)).view(b, n, block, 1)

    def bands(x: Tensor) -> Tensor:
        x = F.pad(x, (0, 0, 0, 0, *pad)).unfold(1, span, block)  # (B, n, H_kv, D, span)
        return x.permute(0, 1, 4, 2, 3)  # (B, n, span, H_kv, D)

    j = torch.arange(block, device=q.device)[:, None]  # query offset in its block
    m = torch.arange(span, device=q.device)[None, :]  # key offset in the band
    in_band = (m >= j) & (m <= j + before + after)  # (block, span)
    key_ok = F.pad(key_valid, pad, value=False).unfold(1, span, block)[:, :, None]  # (B,n,1,span)
    allowed = in_band & ((key_ok & query_valid) | (m == j + before))  # (B, n, block, span)
    k, v = bands(k), bands(v)  # (B, n, span, H_kv, D)
    if extra is not None:
        ek, ev, e_allowed = extra
        e_allowed = F.pad(e_allowed, (0, 0, 0, n * block - t)).view(b, n, block, -1)
        allowed = torch.cat((allowed, e_allowed & query_valid), -1)  # (B, n, block, span + E)
        k = torch.cat((k, ek.expand(b, n, *ek.shape[2:])), 2)  # (B, n, span + E, H_kv, D)
        v = torch.cat((v, ev.expand(b, n, *ev.shape[2:])), 2)
    k, v = (x.flatten(0, 1).transpose(1, 2) for x in (k, v))  # (B * n, H_kv, span + E, D)
    q = F.pad(q, (0, 0, 0, 0, 0, n * block - t)).view(b * n, block, h, d).transpose(1, 2)
    bias = torch.zeros(allowed.shape, dtype=q.dtype, device=q.device)
    bias = bias.masked_fill_(~allowed, float("-inf")).flatten(0, 1)[:, None]  # (B*n,1,blk,keys)
    y = F.scaled_dot_product_attention(
        q, k, v, attn_mask=bias, dropout_p=dropout, enable_gqa=h != h_kv
    )  # (B * n, H, block, D)
    return y.transpose(1, 2).reshape(b, n * block, h, d)[:, :t]  # (B, T, H, D)


def take_rows(x: Tensor, idx: Tensor) -> Tensor:
    """Row-wise reindex along dim 1: x (B, T, ...), idx (B, T)."""
    return x.gather(1, idx.view(*idx.shape, *[1] * (x.dim() - 2)).expand_as(x))
