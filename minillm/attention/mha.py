"""Softmax attention with grouped key/value heads: ``mha`` (H_kv = H), ``gqa``, ``mqa`` (H_kv = 1).

One implementation; the registry presets only ``n_kv_heads``. Computed with
``scaled_dot_product_attention`` (flash/efficient kernels where the device has them). The cache
holds the KV heads only, so MQA's cache is ``n_heads`` times smaller than MHA's.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from minillm.attention.base import Attention
from minillm.attention.cache import KVCache
from minillm.attention.rope import apply_rope, rope_angles


def softmax_attention_mask(
    t: int, s: int, offset: int, causal: bool, key_valid: Tensor | None, device: torch.device
) -> Tensor | None:
    """Boolean mask (B or 1, 1, T, S) of allowed (query, key) pairs, or None if all allowed.

    Query i sits at key index ``offset + i``. A query may always see itself, so a left-pad
    query (whose keys are all padding) gets a finite output instead of NaN; it is ignored.
    """
    if key_valid is None and (not causal or t == 1):
        return None
    q_idx = offset + torch.arange(t, device=device)[:, None]  # (T, 1)
    k_idx = torch.arange(s, device=device)[None, :]  # (1, S)
    allowed = k_idx <= q_idx if causal else torch.ones(t, s, dtype=torch.bool, device=device)
    if key_valid is not None:
        allowed = allowed & key_valid[:, None, :]  # (B, T, S)
        if causal:
            allowed = allowed | (k_idx == q_idx)
    else:
        allowed = allowed[None]
    return allowed[:, None]  # (B|1, 1, T, S)


class MultiHeadAttention(Attention):
    roles = ("causal", "bidirectional", "cross")

    @dataclass
    class Config:
        n_kv_heads: int | None = None  # None: one KV head per query head (plain MHA)
        rope_base: float = 10000.0
        dropout: float = 0.0
        bias: bool = False

    def __init__(self, cfg: Config, dim: int, n_heads: int, role: str) -> None:
        super().__init__(cfg, dim, n_heads, role)
        self.n_kv_heads = cfg.n_kv_heads or n_heads
        if self.n_kv_heads < 1 or n_heads % self.n_kv_heads:
            raise ValueError(
                f"n_heads={n_heads} is not divisible by n_kv_heads={self.n_kv_heads}; "
                f"choose an n_kv_heads that divides {n_heads} (1 gives MQA, {n_heads} gives MHA)"
            )
        kv_dim = self.n_kv_heads * self.head_dim
        self.q_proj = nn.Linear(dim, dim, bias=cfg.bias)
        self.k_proj = nn.Linear(dim, kv_dim, bias=cfg.bias)
        self.v_proj = nn.Linear(dim, kv_dim, bias=cfg.bias)
        self.o_proj = nn.Linear(dim, dim, bias=cfg.bias)

    def init_cache(
        self, batch_size: int, max_len: int, device: torch.device | str, dtype: torch.dtype
    ) -> KVCache:
        """KV cache for ``max_len`` tokens (cross role: ``max_len`` = source length)."""
        return KVCache(batch_size, self.n_kv_heads, max_len, self.head_dim, device, dtype)

    def flops_per_token(self, context: int) -> float:
        """Projections plus QK^T and AV over ``context`` keys for each query head.

        A causal query is counted against all ``context`` keys, not the ~half it may see:
        the PaLM / nanoGPT / torchtitan convention, so MFU compares with theirs. GQA/MQA
        share K/V heads but every query head still does its own 4 * head_dim * context.
        """
        return self.projection_flops() + 4 * self.n_heads * self.head_dim * context

    def _heads(self, proj: nn.Linear, x: Tensor, n: int) -> Tensor:
        b, t, _ = x.shape
        return proj(x).view(b, t, n, self.head_dim).transpose(1, 2)  # (B, n, T, D)

    def forward(
        self,
        x: Tensor,
        *,
        positions: Tensor,
        cache: KVCache | None = None,
        memory: Tensor | None = None,
        mask: Tensor | None = None,
    ) -> Tensor:
        b, t, _ = x.shape
        q = self._heads(self.q_proj, x, self.n_heads)  # (B, H, T, D)
        offset = 0
        if self.role == "cross":
            if cache is not None and cache.length > 0:  # memory keys computed once per source
                k, v = cache.k[:, :, : cache.length], cache.v[:, :, : cache.length]
                key_valid = cache.valid[:, : cache.length] if cache.has_padding else None
            else:
                k = self._heads(self.k_proj, memory, self.n_kv_heads)  # (B, H_kv, S, D)
                v = self._heads(self.v_proj, memory, self.n_kv_heads)
                key_valid = mask
                if cache is not None:
                    cache.append(k, v, mask)
        else:
            k = self._heads(self.k_proj, x, self.n_kv_heads)  # (B, H_kv, T, D)
            v = self._heads(self.v_proj, x, self.n_kv_heads)
            cos, sin = rope_angles(positions, self.head_dim, self.cfg.rope_base)
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
            key_valid = mask
            if cache is not None:
                offset = cache.length
                k, v, key_valid = cache.append(k, v, mask)  # (B, H_kv, S, D)
        y = self._attend(q, k, v, key_valid, offset)  # (B, H, T, D)
        return self.o_proj(y.transpose(1, 2).reshape(b, t, self.dim))

    def _attend(
        self, q: Tensor, k: Tensor, v: Tensor, key_valid: Tensor | None, offset: int
    ) -> Tensor:
        t, s = q.shape[2], k.shape[2]
        dropout = self.cfg.dropout if self.training else 0.0
        gqa = self.n_kv_heads != self.n_heads
        if key_valid is None and self.causal and offset == 0 and t == s:
            return F.scaled_dot_product_attention(
                q, k, v, is_causal=True, dropout_p=dropout, enable_gqa=gqa
            )
        attn_mask = softmax_attention_mask(t, s, offset, self.causal, key_valid, q.device)
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, dropout_p=dropout, enable_gqa=gqa
        )

    def attention_weights(self, x: Tensor, *, positions: Tensor) -> Tensor:
        """Softmax weights (B, H, T, T), rows summing to 1 (zero above the diagonal when
        causal); with V's KV heads repeated, ``weights @ v`` is the output before ``o_proj``."""
        if self.role == "cross":
            raise NotImplementedError("attention_weights covers the self-attention roles")
        t = x.shape[1]
        q = self._heads(self.q_proj, x, self.n_heads)  # (B, H, T, D)
        k = self._heads(self.k_proj, x, self.n_kv_heads)  # (B, H_kv, T, D)
        cos, sin = rope_angles(positions, self.head_dim, self.cfg.rope_base)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        k = k.repeat_interleave(self.n_heads // self.n_kv_heads, dim=1)  # (B, H, T, D)
        scores = q @ k.transpose(-1, -2) * self.head_dim**-0.5  # (B, H, T, T)
        allowed = softmax_attention_mask(t, t, 0, self.causal, None, x.device)  # (1, 1, T, T)
        if allowed is not None:
            scores = scores.masked_fill(~allowed, float("-inf"))
        return scores.softmax(-1)
