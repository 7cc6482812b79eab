"""Softmax attention with grouped key/value heads: ``mha`` (H_kv = H), ``gqa``, ``mqa`` (H_kv = 1).

One implementation; the registry presets only ``n_kv_heads``. Computed with
``scaled_dot_product_attention`` (flash/efficient kernels where the device has them). The cache
holds the KV heads only, so MQA's cache is ``n_heads`` times smaller than MHA's.

Positions (``minillm.positions``, the model's ``model.positions``): RoPE rotates q and k (the
default); ALiBi and T5 add a (B, H, T, S) bias to the scores, passed to SDPA as a float mask
(-inf where a key is not allowed); learned and none leave attention alone. Cached keys are
stored rotated; a bias needs their positions, which follow from their slots (``forward``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from minillm.attention.base import Attention
from minillm.attention.cache import KVCache


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


def with_bias(
    bias: Tensor, allowed: Tensor | None, t: int, s: int, causal: bool, dtype: torch.dtype
) -> Tensor:
    """SDPA's float mask: the positions ``bias`` (B | 1, H, T, S) where ``allowed`` (B | 1, 1,
    T, S; None: plain causality for causal queries, else all), -inf elsewhere."""
    if allowed is None and causal:
        allowed = softmax_attention_mask(t, s, s - t, True, None, bias.device)
    bias = bias.to(dtype)
    return bias if allowed is None else torch.where(allowed, bias, float("-inf"))


class MultiHeadAttention(Attention):
    roles = ("causal", "bidirectional", "cross")
    positions_accepted = ("rotary", "bias", "absolute", "none")

    @dataclass
    class Config:
        n_kv_heads: int | None = None  # None: one KV head per query head (plain MHA)
        dropout: float = 0.0
        bias: bool = False

    def __init__(self, cfg: Config, dim: int, n_heads: int, role: str) -> None:
        super().__init__(cfg, dim, n_heads, role)
        self.grouped_kv_projections(cfg.n_kv_heads, cfg.bias)

    def init_cache(
        self,
        batch_size: int,
        max_len: int,
        device: torch.device | str,
        dtype: torch.dtype,
        lookahead: int = 0,
    ) -> KVCache:
        """KV cache for ``max_len`` + ``lookahead`` tokens (cross: ``max_len`` = source length)."""
        n = max_len + lookahead
        return KVCache(batch_size, self.n_kv_heads, n, self.head_dim, device, dtype)

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
        if self.role == "cross":
            k, v, allowed = self._memory(memory, mask, cache)  # (B, H_kv, S, D)
        else:
            k = self._heads(self.k_proj, x, self.n_kv_heads)  # (B, H_kv, T, D)
            v = self._heads(self.v_proj, x, self.n_kv_heads)
            q, k = self.pos_encoding.rotate(q, k, positions)
            # an expanded arange (every row alike, no padding): one bias serves all rows
            q_pos = k_pos = positions[:1] if positions.stride(0) == 0 else positions
            if cache is not None:
                # real tokens of a row sit at contiguous positions and slots, so a key's
                # position is the last query's minus their slot distance (pads are masked)
                last_slot = cache.end + (t - 1)  # a new tensor: update moves ``end``
                k, v, allowed = cache.update(k, v, mask)  # (B, H_kv, S, D)
                slots = torch.arange(k.shape[2], device=x.device)
                q_pos, k_pos = positions, positions[:, -1:] - last_slot + slots  # (B, S)
            elif mask is not None:
                allowed = softmax_attention_mask(t, t, 0, self.causal, mask, x.device)
            else:
                allowed = None
            bias = self.pos_encoding.bias(q_pos, k_pos)  # (B | 1, H, T, S) or None
            if bias is not None:
                allowed = with_bias(bias, allowed, t, k.shape[2], self.causal, q.dtype)
        y = self._attend(q, k, v, allowed)  # (B, H, T, D)
        return self.o_proj(y.transpose(1, 2).reshape(b, t, self.dim))

    def _memory(
        self, memory: Tensor | None, mask: Tensor | None, cache: KVCache | None
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        """Cross role: keys, values of the memory and the mask of its real keys (B, 1, 1, S).

        With a cache, the first call (``memory`` given) writes them; later calls (``memory``
        None) read them back, so the memory is projected once per source.
        """
        if memory is None:
            k, v, mask = cache.read()
        else:
            k = self._heads(self.k_proj, memory, self.n_kv_heads)  # (B, H_kv, S, D)
            v = self._heads(self.v_proj, memory, self.n_kv_heads)
            if cache is not None:
                cache.update(k, v, mask)
        return k, v, None if mask is None else mask[:, None, None, :]

    def _attend(self, q: Tensor, k: Tensor, v: Tensor, allowed: Tensor | None) -> Tensor:
        """SDPA under ``allowed`` (B | 1, 1 | H, T, S), bool or a float bias; None means plain
        causality (is_causal when T > 1) for causal queries, everything for the others."""
        dropout = self.cfg.dropout if self.training else 0.0
        is_causal = allowed is None and self.causal and q.shape[2] > 1
        return F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=allowed,
            dropout_p=dropout,
            is_causal=is_causal,
            enable_gqa=self.n_kv_heads != self.n_heads,
        )

    def attention_weights(self, x: Tensor, *, positions: Tensor) -> Tensor:
        """Softmax weights (B, H, T, T), rows summing to 1 (zero above the diagonal when
        causal); with V's KV heads repeated, ``weights @ v`` is the output before ``o_proj``."""
        if self.role == "cross":
            raise NotImplementedError("attention_weights covers the self-attention roles")
        t = x.shape[1]
        q = self._heads(self.q_proj, x, self.n_heads)  # (B, H, T, D)
        k = self._heads(self.k_proj, x, self.n_kv_heads)  # (B, H_kv, T, D)
        q, k = self.pos_encoding.rotate(q, k, positions)
        k = k.repeat_interleave(self.n_heads // self.n_kv_heads, dim=1)  # (B, H, T, D)
        scores = q @ k.transpose(-1, -2) * self.head_dim**-0.5  # (B, H, T, T)
        bias = self.pos_encoding.bias(positions, positions)  # (B, H, T, T) or None
        if bias is not None:
            scores = scores + bias
        allowed = softmax_attention_mask(t, t, 0, self.causal, None, x.device)  # (1, 1, T, T)
        if allowed is not None:
            scores = scores.masked_fill(~allowed, float("-inf"))
        return scores.softmax(-1)
