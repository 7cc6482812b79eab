"""DeltaNet (``delta_net``), Yang et al. 2024, "Parallelizing Linear Transformers with the Delta
Rule over Sequence Length".

Per head, S_t = (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T and o_t = q_t S_t (S is
(D_k, D_v), as in the other linear kinds): each token first erases what S held at its key, by
a fraction beta_t = sigmoid(x_t W_beta), then writes its value there, so a key written twice
reads back its latest value (plain linear attention only ever adds). Projections follow fla's
layer without its short convolutions (fla's ``use_short_conv=False`` path, left out here to
keep one cache tensor): q, k, v = silu(x W), then q and k are L2-normalised per head (which
keeps every transition contractive) and q is scaled by D_k^-1/2. The head outputs are
RMS-normalised per head and projected back. Training runs the chunkwise WY form of
``linear_ops.chunk_delta_rule``; decoding carries S in a ``RecurrentState``. No RoPE.

Causal only: the state is a sequential read-write memory. Left-padding steps get beta = 0
(and, gated, alpha = 1), so they leave the state untouched and a padded row equals its
unpadded self.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from minillm.attention.base import Attention
from minillm.attention.bounded_cache import RecurrentState
from minillm.attention.linear_ops import chunk_delta_rule

L2_EPS = 1e-6  # x / sqrt(|x|^2 + eps), as fla's l2norm


def l2_normalize(x: Tensor) -> Tensor:
    return x * torch.rsqrt(x.square().sum(-1, keepdim=True) + L2_EPS)


class DeltaNetAttention(Attention):
    roles = ("causal",)
    registry_key: ClassVar[str] = "delta_net"  # for messages raised before build sets kind

    @dataclass
    class Config:
        chunk_size: int = 64  # power of two; does not change results
        expand_k: float = 1.0  # key (and query) features = expand_k * dim
        expand_v: float = 1.0  # value features = expand_v * dim
        norm_eps: float = 1e-5

    def __init__(self, cfg: Config, dim: int, n_heads: int, role: str) -> None:
        super().__init__(cfg, dim, n_heads, role)
        if cfg.chunk_size < 1 or cfg.chunk_size & (cfg.chunk_size - 1):
            raise ValueError(
                f"{self.registry_key} needs a power-of-two chunk_size, got {cfg.chunk_size}; try 64"
            )
        key_dim, value_dim = int(dim * cfg.expand_k), int(dim * cfg.expand_v)
        if key_dim % n_heads or value_dim % n_heads or not key_dim or not value_dim:
            raise ValueError(
                f"{self.registry_key}: key dim {key_dim} and value dim {value_dim} (expand_k, "
                f"expand_v times dim={dim}) must be positive multiples of n_heads={n_heads}"
            )
        self.key_dim, self.value_dim = key_dim, value_dim
        self.head_k, self.head_v = key_dim // n_heads, value_dim // n_heads
        self.q_proj = nn.Linear(dim, key_dim, bias=False)
        self.k_proj = nn.Linear(dim, key_dim, bias=False)
        self.v_proj = nn.Linear(dim, value_dim, bias=False)
        self.b_proj = nn.Linear(dim, n_heads, bias=False)  # beta, one per head
        self.o_norm = nn.RMSNorm(self.head_v, eps=cfg.norm_eps)  # per head, shared weight
        self.o_proj = nn.Linear(value_dim, dim, bias=False)

    def init_weights(self, std: float, out_std: float) -> None:
        super().init_weights(std, out_std)
        self.o_norm.reset_parameters()

    def init_cache(
        self,
        batch_size: int,
        max_len: int,
        device: torch.device | str,
        dtype: torch.dtype,
        lookahead: int = 0,
    ) -> RecurrentState:
        """State (B, H, D_k, D_v) only, kept in at least fp32; ``max_len`` does not matter."""
        shape = (batch_size, self.n_heads, self.head_k, self.head_v)
        dtype = torch.promote_types(dtype, torch.float32)
        return RecurrentState(torch.zeros(shape, device=device, dtype=dtype), lookahead=lookahead)

    def _heads(self, y: Tensor, d: int) -> Tensor:
        b, t, _ = y.shape
        return y.view(b, t, self.n_heads, d).transpose(1, 2)  # (B, H, T, d)

    def log_decay(self, x: Tensor) -> Tensor | None:
        """log alpha (B, H, T) <= 0; None here: DeltaNet does not decay its state."""
        return None

    def output(self, y: Tensor, x: Tensor) -> Tensor:
        """y (B, H, T, D_v) head outputs -> per-head RMSNorm -> o_proj: (B, T, dim)."""
        b, _, t, _ = y.shape
        return self.o_proj(self.o_norm(y.transpose(1, 2)).reshape(b, t, self.value_dim))

    def flops_per_token(self, context: int) -> float:
        """Projections plus, per head and chunk of c tokens, per token: the k k^T and q k^T
        scores, the unit-triangular solve for [U~, W] (~ c/2 multiply-adds per column), the
        intra-chunk mixing, and the state read, correction and update (three D_k x D_v)."""
        c = min(self.cfg.chunk_size, 1 << (context - 1).bit_length())
        dk, dv = self.head_k, self.head_v
        per_head = 4 * c * dk + c * (dk + dv) + 2 * c * dv + 6 * dk * dv
        return self.projection_flops() + self.n_heads * per_head

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
        q = l2_normalize(self._heads(F.silu(self.q_proj(x)), self.head_k)) * self.head_k**-0.5
        k = l2_normalize(self._heads(F.silu(self.k_proj(x)), self.head_k))  # (B, H, T, D_k)
        v = self._heads(F.silu(self.v_proj(x)), self.head_v)  # (B, H, T, D_v)
        beta = torch.sigmoid(self.b_proj(x)).transpose(1, 2)  # (B, H, T)
        log_alpha = self.log_decay(x)  # (B, H, T) or None
        if mask is not None:  # padding: beta = 0 and alpha = 1, the state passes unchanged
            real = mask[:, None, :].to(beta.dtype)  # (B, 1, T)
            beta = beta * real
            log_alpha = None if log_alpha is None else log_alpha * real
        if cache is None:
            state = k.new_zeros(b, self.n_heads, self.head_k, self.head_v)
        else:
            state = cache.state
        y, state = chunk_delta_rule(q, k, v, beta, log_alpha, state, self.cfg.chunk_size)
        if cache is not None:
            cache.update(t, state)
        return self.output(y, x)  # (B, T, dim)
