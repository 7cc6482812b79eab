"""Sliding-window softmax attention (``local``), O(T * window) in time and memory.

Causal: query t sees keys s with ``t - window < s <= t``. Bidirectional: ``|t - s| <= window // 2``.
Computed by blocks: every block of queries attends, through one batched SDPA call, to the
keys of its band only (its own block plus the ``window - 1`` keys before it, and the
``window // 2`` after it when bidirectional) under a small (block, band) mask; no T x T mask
is ever built. Keys are cached already rotated (RoPE) in a ``RollingKVCache`` of ``window``
slots, so generation memory is O(window) however long the sequence. Positions as in ``mha``
(rotary, bias, absolute or none); a bias is built per block over its band only.

No ``cross`` role: a window over encoder memory has no meaning (query and memory positions
are not aligned), so cross-attention uses a global kind.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from minillm.attention.base import Attention
from minillm.attention.bounded_cache import RollingKVCache
from minillm.positions import Positions

QUERY_BLOCK = 128  # queries per block; each block reads block + before + after keys


def banded_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    key_valid: Tensor | None,
    before: int,
    after: int,
    dropout: float = 0.0,
    positions: tuple[Positions, Tensor, Tensor] | None = None,
) -> Tensor:
    """Softmax attention of each query to the keys from ``before`` back to ``after`` ahead.

    q (B, T, H, D); k, v (B, P + T, H_kv, D) whose last T keys are the queries' own tokens and
    first ``P <= before`` earlier context (a cache); key_valid (B, P + T) bool or None (all
    real). A query always sees its own key, so a padding query gets a finite (ignored) output.
    ``positions``: (module, query positions (B, T), key positions (B, P + T)) whose score bias
    is added, or None. Returns (B, T, H, D).
    """
    b, t, h, d = q.shape
    p, h_kv = k.shape[1] - t, k.shape[2]
    if p + t - 1 <= (min(before, after) if after else before):  # every band holds every key
        return _dense_attention(q, k, v, key_valid, not after, dropout, positions)
    block = min(QUERY_BLOCK, t)
    n = -(-t // block)  # query blocks
    span = block + before + after  # keys one block reads
    pad = (before - p, n * block - t + after)
    if key_valid is None:
        key_valid = torch.ones(b, p + t, dtype=torch.bool, device=q.device)
    key_valid = F.pad(key_valid, pad, value=False)  # (B, before + n * block + after)

    def bands(x: Tensor) -> Tensor:  # overlapping strided views, copied only if B > 1
        x = F.pad(x, (0, 0, 0, 0, *pad)).unfold(1, span, block)  # (B, n, H_kv, D, span)
        return x.permute(0, 1, 2, 4, 3).reshape(b * n, h_kv, span, d)

    q = F.pad(q, (0, 0, 0, 0, 0, n * block - t)).view(b * n, block, h, d).transpose(1, 2)
    j = torch.arange(block, device=q.device)[:, None]  # query offset in its block
    m = torch.arange(span, device=q.device)[None, :]  # key offset in the band
    in_band = (m >= j) & (m <= j + before + after)  # (block, span)
    allowed = in_band & (key_valid.unfold(1, span, block)[:, :, None, :] | (m == j + before))
    extra = None
    if positions is not None:
        module, q_pos, k_pos = positions
        q_pos = F.pad(q_pos, (0, n * block - t)).view(b, n, block)  # (B, n, block)
        k_pos = F.pad(k_pos, pad).unfold(1, span, block)  # (B, n, span)
        extra = module.bias(q_pos, k_pos)  # (B, n, H, block, span) or None
    if extra is None:
        bias = torch.zeros(allowed.shape, dtype=q.dtype, device=q.device)
        bias = bias.masked_fill_(~allowed, float("-inf")).view(b * n, 1, block, span)
    else:
        bias = torch.where(allowed[:, :, None], extra.to(q.dtype), float("-inf"))
        bias = bias.view(b * n, h, block, span)
    y = F.scaled_dot_product_attention(
        q, bands(k), bands(v), attn_mask=bias, dropout_p=dropout, enable_gqa=h != h_kv
    )  # (B * n, H, block, D)
    return y.transpose(1, 2).reshape(b, n * block, h, d)[:, :t]  # (B, T, H, D)


def _dense_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    key_valid: Tensor | None,
    causal: bool,
    dropout: float,
    positions: tuple[Positions, Tensor, Tensor] | None = None,
) -> Tensor:
    """Every query's band holds all keys: plain SDPA (T <= window, and decoding steps)."""
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, T, D)
    t, s = q.shape[2], k.shape[2]
    bias = None if positions is None else positions[0].bias(*positions[1:])  # (B, H, T, S)
    mask, is_causal = None, causal and key_valid is None and t == s > 1 and bias is None
    if key_valid is not None or (causal and t > 1 and not is_causal):
        q_idx = s - t + torch.arange(t, device=q.device)[:, None]  # (T, 1)
        k_idx = torch.arange(s, device=q.device)[None, :]  # (1, S)
        mask = k_idx <= q_idx if causal else torch.ones_like(k_idx, dtype=torch.bool)
        if key_valid is not None:
            mask = mask & (key_valid[:, None, :] | (k_idx == q_idx))  # (B, T, S)
        mask = mask.unsqueeze(-3)  # (B | 1, 1, T, S)
    if bias is not None:
        bias = bias.to(q.dtype)
        mask = bias if mask is None else torch.where(mask, bias, float("-inf"))  # (B, H, T, S)
    y = F.scaled_dot_product_attention(
        q, k, v, mask, dropout, is_causal, enable_gqa=q.shape[1] != k.shape[1]
    )  # (B, H, T, D)
    return y.transpose(1, 2)  # (B, T, H, D)


class LocalAttention(Attention):
    roles = ("causal", "bidirectional")
    positions_accepted = ("rotary", "bias", "absolute", "none")

    @dataclass
    class Config:
        window: int = 256  # keys a causal query sees, itself included
        n_kv_heads: int | None = None  # None: one KV head per query head
        dropout: float = 0.0
        bias: bool = False

    def __init__(self, cfg: Config, dim: int, n_heads: int, role: str) -> None:
        super().__init__(cfg, dim, n_heads, role)
        if cfg.window < 1:
            raise ValueError(f"local attention needs window >= 1, got {cfg.window}")
        self.grouped_kv_projections(cfg.n_kv_heads, cfg.bias)
        # keys a query sees before / after itself
        self.before = cfg.window - 1 if self.causal else cfg.window // 2
        self.after = 0 if self.causal else cfg.window // 2

    def init_cache(
        self,
        batch_size: int,
        max_len: int,
        device: torch.device | str,
        dtype: torch.dtype,
        lookahead: int = 0,
    ) -> RollingKVCache:
        """``window`` (+ ``lookahead``) slots whatever ``max_len``: memory O(window)."""
        shape = (batch_size, self.n_kv_heads, self.cfg.window, self.head_dim)
        return RollingKVCache(*shape, device, dtype, lookahead=lookahead)

    def _heads(self, proj: nn.Linear, x: Tensor, n: int) -> Tensor:
        b, t, _ = x.shape
        return proj(x).view(b, t, n, self.head_dim)  # (B, T, n, D)

    def flops_per_token(self, context: int) -> float:
        """Projections plus QK^T and AV over the keys in the window (not the whole context)."""
        keys = min(self.before + self.after + 1, context)
        return self.projection_flops() + 4 * self.n_heads * self.head_dim * keys

    def forward(
        self,
        x: Tensor,
        *,
        positions: Tensor,
        cache: RollingKVCache | None = None,
        memory: Tensor | None = None,
        mask: Tensor | None = None,
    ) -> Tensor:
        b, t, _ = x.shape
        q = self._heads(self.q_proj, x, self.n_heads)  # (B, T, H, D)
        k = self._heads(self.k_proj, x, self.n_kv_heads)  # (B, T, H_kv, D)
        v = self._heads(self.v_proj, x, self.n_kv_heads)
        q, k = self.pos_encoding.rotate(q, k, positions, seq_dim=1)
        valid, k_pos = mask, positions
        if cache is not None:
            if not self.causal:
                raise ValueError("bidirectional local attention runs once; it takes no cache")
            # the up to window - 1 cached keys the new queries can see, then the new ones
            k, v, valid = cache.update(k.transpose(1, 2), v.transpose(1, 2), mask)
            k, v = k.transpose(1, 2), v.transpose(1, 2)  # (B, P + T, H_kv, D)
            # the P + T keys are consecutive tokens ending at the last query (pads are masked)
            back = torch.arange(k.shape[1] - 1, -1, -1, device=x.device)  # (P + T,)
            k_pos = positions[:, -1:] - back  # (B, P + T)
        dropout = self.cfg.dropout if self.training else 0.0
        pos = (self.pos_encoding, positions, k_pos)
        y = banded_attention(q, k, v, valid, self.before, self.after, dropout, pos)  # (B, T, H, D)
        return self.o_proj(y.reshape(b, t, self.dim))

    def attention_weights(self, x: Tensor, *, positions: Tensor) -> Tensor:
        """Softmax weights (B, H, T, T) over each query's window, zero outside it; with V's
        KV heads repeated, ``weights @ v`` is the output before ``o_proj``."""
        t = x.shape[1]
        q = self._heads(self.q_proj, x, self.n_heads).transpose(1, 2)  # (B, H, T, D)
        k = self._heads(self.k_proj, x, self.n_kv_heads).transpose(1, 2)  # (B, H_kv, T, D)
        q, k = self.pos_encoding.rotate(q, k, positions)
        k = k.repeat_interleave(self.n_heads // self.n_kv_heads, dim=1)  # (B, H, T, D)
        scores = q @ k.transpose(-1, -2) * self.head_dim**-0.5  # (B, H, T, T)
        bias = self.pos_encoding.bias(positions, positions)  # (B, H, T, T) or None
        if bias is not None:
            scores = scores + bias
        i = torch.arange(t, device=x.device)
        ahead = i[None, :] - i[:, None]  # (T, T) key index minus query index
        in_window = (ahead >= -self.before) & (ahead <= self.after)
        return scores.masked_fill(~in_window, float("-inf")).softmax(-1)
