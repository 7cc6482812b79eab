"""Linear attention (``linear``), Katharopoulos et al. 2020, "Transformers are RNNs".

phi(x) = elu(x) + 1 replaces the softmax kernel: o_t = phi(q_t) S / (phi(q_t) . z + eps) with
S = sum phi(k_i) v_i^T and z = sum phi(k_i) over the keys the query sees. Causal: the keys up
to t, in the chunkwise form of ``linear_ops`` (O(T D^2)); bidirectional and cross: all (real)
keys, a global sum. Padding keys are zeroed after the feature map, so they add nothing.

No RoPE: rotating the non-negative features would break phi's positivity (and thus the
normaliser); order comes from causality and the rest of the network, as in the paper.

Caches are ``RecurrentState`` (S, z), fixed size whatever the length. For ``cross`` the state
is the source summary, computed at the first call (the one given ``memory``) and reused at
every decoding step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from minillm.attention.base import Attention
from minillm.attention.bounded_cache import RecurrentState
from minillm.attention.linear_ops import (
    chunk_linear_attention,
    linear_attention_readout,
    linear_attention_summary,
)


def elu_feature_map(x: Tensor) -> Tensor:
    return F.elu(x) + 1.0


class LinearAttention(Attention):
    roles = ("causal", "bidirectional", "cross")

    @dataclass
    class Config:
        chunk_size: int = 64  # tokens per chunk of the causal form; does not change results
        eps: float = 1e-6  # added to the normaliser phi(q) . z
        bias: bool = False

    def __init__(self, cfg: Config, dim: int, n_heads: int, role: str) -> None:
        super().__init__(cfg, dim, n_heads, role)
        if cfg.chunk_size < 1:
            raise ValueError(f"linear attention needs chunk_size >= 1, got {cfg.chunk_size}")
        self.q_proj = nn.Linear(dim, dim, bias=cfg.bias)
        self.k_proj = nn.Linear(dim, dim, bias=cfg.bias)
        self.v_proj = nn.Linear(dim, dim, bias=cfg.bias)
        self.o_proj = nn.Linear(dim, dim, bias=cfg.bias)

    def init_cache(
        self,
        batch_size: int,
        max_len: int,
        device: torch.device | str,
        dtype: torch.dtype,
        lookahead: int = 0,
    ) -> RecurrentState:
        """State (B, H, D, D) and normaliser (B, H, D) in at least fp32; ``max_len`` unused."""
        shape = (batch_size, self.n_heads, self.head_dim)
        dtype = torch.promote_types(dtype, torch.float32)
        state = torch.zeros(*shape, self.head_dim, device=device, dtype=dtype)
        normalizer = torch.zeros(shape, device=device, dtype=dtype)
        return RecurrentState(state, normalizer, lookahead=lookahead)

    def _heads(self, proj: nn.Linear, x: Tensor) -> Tensor:
        b, t, _ = x.shape
        return proj(x).view(b, t, self.n_heads, self.head_dim).transpose(1, 2)  # (B, H, T, D)

    def _keys_values(self, src: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor]:
        k = elu_feature_map(self._heads(self.k_proj, src))  # (B, H, S, D)
        if mask is not None:
            k = k * mask[:, None, :, None].to(k.dtype)  # padding keys contribute nothing
        return k, self._heads(self.v_proj, src)

    def flops_per_token(self, context: int) -> float:
        """Projections plus, per head: the causal chunked form's state read/update (the
        normaliser rides as a ones column of v, hence d + 1) and its intra-chunk product;
        the global (bidirectional, cross) form's state product."""
        d = self.head_dim
        if not self.causal:
            return self.projection_flops() + self.n_heads * (4 * d * d + 2 * d)
        c = min(self.cfg.chunk_size, context)
        return self.projection_flops() + self.n_heads * (4 * d * (d + 1) + 2 * c * (2 * d + 1))

    def forward(
        self,
        x: Tensor,
        *,
        positions: Tensor,
        cache: RecurrentState | None = None,
        memory: Tensor | None = None,
        mask: Tensor | None = None,
    ) -> Tensor:
        b, t, _ = x.shape
        q = elu_feature_map(self._heads(self.q_proj, x))  # (B, H, T, D)
        if self.causal:
            y = self._causal(q, x, cache, mask)
        else:
            if self.role == "cross" and memory is None:
                s, z = cache.state, cache.normalizer  # source summary, written at the first call
            else:
                k, v = self._keys_values(memory if self.role == "cross" else x, mask)
                s, z = linear_attention_summary(k, v)  # (B, H, D, D), (B, H, D)
                if cache is not None:
                    cache.update(k.shape[2], s, z)
            y = linear_attention_readout(q, s, z, self.cfg.eps)  # (B, H, T, D)
        return self.o_proj(y.transpose(1, 2).reshape(b, t, self.dim))

    def _causal(
        self, q: Tensor, x: Tensor, cache: RecurrentState | None, mask: Tensor | None
    ) -> Tensor:
        k, v = self._keys_values(x, mask)  # (B, H, T, D)
        if cache is None:
            s = q.new_zeros(*q.shape[:2], self.head_dim, self.head_dim)
            z = q.new_zeros(q.shape[:2] + (self.head_dim,))
        else:
            s, z = cache.state, cache.normalizer
        y, s, z = chunk_linear_attention(q, k, v, s, z, self.cfg.chunk_size, self.cfg.eps)
        if cache is not None:
            cache.update(x.shape[1], s, z)
        return y

    def attention_weights(self, x: Tensor, *, positions: Tensor) -> Tensor:
        """phi(q_t) . phi(k_s) over the keys query t sees, divided by their sum (+ eps):
        (B, H, T, T), non-negative, rows summing to ~1; ``weights @ v`` is the output before
        ``o_proj``."""
        if self.role == "cross":
            raise NotImplementedError("attention_weights covers the self-attention roles")
        q = elu_feature_map(self._heads(self.q_proj, x))  # (B, H, T, D)
        k = elu_feature_map(self._heads(self.k_proj, x))
        scores = q @ k.transpose(-1, -2)  # (B, H, T, T)
        if self.causal:
            scores = scores.tril()
        return scores / (scores.sum(-1, keepdim=True) + self.cfg.eps)
