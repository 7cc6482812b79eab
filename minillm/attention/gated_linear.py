"""Gated linear attention (``gated_linear``), Yang et al. 2023, "Gated Linear Attention
Transformers with Hardware-Efficient Training".

S_t = diag(alpha_t) S_{t-1} + k_t^T v_t and o_t = q_t S_t per head, with a data-dependent
decay alpha_t = sigmoid(x_t W_1 W_2 + b)^(1/tau) (low rank ``gate_low_rank``, tau =
``gate_logit_normalizer``), kept as log alpha = logsigmoid(.) / tau <= 0. The head outputs are
RMS-normalised per head, multiplied by a swish output gate and projected back, as in the paper
(keys of ``expand_k * dim``, values of ``expand_v * dim`` features in all, queries scaled by
D_k^-1/2 as in fla). Training runs the chunkwise form of ``linear_ops.chunk_gla``; decoding
carries S in a ``RecurrentState``. No RoPE: the decay already encodes recency.

Causal only: the decay runs one way. (A two-direction variant would be a different model.)
Left-padding steps get alpha = 1 and k = 0, so they leave the state untouched and a padded
row equals its unpadded self.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from minillm.attention.base import Attention
from minillm.attention.bounded_cache import RecurrentState
from minillm.attention.linear_backends import chunk_gla


class GatedLinearAttention(Attention):
    roles = ("causal",)

    @dataclass
    class Config:
        chunk_size: int = 64  # power of two; does not change results
        expand_k: float = 0.5  # key (and query) features = expand_k * dim
        expand_v: float = 1.0  # value features = expand_v * dim
        gate_low_rank: int = 16
        gate_logit_normalizer: float = 16.0  # tau: alpha = sigmoid(.) ** (1 / tau)
        norm_eps: float = 1e-5

    def __init__(self, cfg: Config, dim: int, n_heads: int, role: str) -> None:
        super().__init__(cfg, dim, n_heads, role)
        if cfg.chunk_size < 1 or cfg.chunk_size & (cfg.chunk_size - 1):
            raise ValueError(f"gated_linear needs a power-of-two chunk_size, got {cfg.chunk_size}")
        key_dim, value_dim = int(dim * cfg.expand_k), int(dim * cfg.expand_v)
        if key_dim % n_heads or value_dim % n_heads:
            raise ValueError(
                f"gated_linear: key dim {key_dim} and value dim {value_dim} (expand_k, "
                f"expand_v times dim={dim}) must both be divisible by n_heads={n_heads}"
            )
        self.key_dim, self.value_dim = key_dim, value_dim
        self.head_k, self.head_v = key_dim // n_heads, value_dim // n_heads
        self.q_proj = nn.Linear(dim, key_dim, bias=False)
        self.k_proj = nn.Linear(dim, key_dim, bias=False)
        self.v_proj = nn.Linear(dim, value_dim, bias=False)
        self.g_proj = nn.Linear(dim, value_dim, bias=False)  # swish output gate
        self.gate_down = nn.Linear(dim, cfg.gate_low_rank, bias=False)  # decay, low rank
        self.gate_up = nn.Linear(cfg.gate_low_rank, key_dim, bias=True)
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

    def log_gates(self, x: Tensor) -> Tensor:
        """log alpha (B, H, T, D_k) = logsigmoid(x W_1 W_2 + b) / tau, always <= 0."""
        logits = self.gate_up(self.gate_down(x))  # (B, T, key_dim)
        return self._heads(F.logsigmoid(logits) / self.cfg.gate_logit_normalizer, self.head_k)

    def flops_per_token(self, context: int) -> float:
        """Projections (gates included: they are low-rank linear maps) plus, per head, the
        intra-chunk scores and mixing over a chunk and the state read and update."""
        c = min(self.cfg.chunk_size, 1 << (context - 1).bit_length())
        per_head = c * self.head_k + 2 * c * self.head_v + 4 * self.head_k * self.head_v
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
        q = self._heads(self.q_proj(x), self.head_k) * self.head_k**-0.5  # (B, H, T, D_k)
        k = self._heads(self.k_proj(x), self.head_k)  # (B, H, T, D_k)
        v = self._heads(self.v_proj(x), self.head_v)  # (B, H, T, D_v)
        log_alpha = self.log_gates(x)  # (B, H, T, D_k)
        if mask is not None:  # padding: alpha = 1 and k = 0, the state passes unchanged
            real = mask[:, None, :, None].to(k.dtype)  # (B, 1, T, 1)
            k, log_alpha = k * real, log_alpha * real
        if cache is None:
            state = k.new_zeros(b, self.n_heads, self.head_k, self.head_v)
        else:
            state = cache.state
        y, state = chunk_gla(q, k, v, log_alpha, state, self.cfg.chunk_size)  # (B, H, T, D_v)
        if cache is not None:
            cache.update(t, state)
        y = self.o_norm(y.transpose(1, 2))  # (B, T, H, D_v)
        y = y.reshape(b, t, self.value_dim) * F.silu(self.g_proj(x))
        return self.o_proj(y)

    def attention_weights(self, x: Tensor, *, positions: Tensor) -> Tensor:
        """Decayed weights A[t, s] = sum_d q_td k_sd prod_{s<r<=t} alpha_rd for s <= t, zero
        above the diagonal: (B, H, T, T), ``A @ v`` is the output before ``o_norm`` and the
        output gate. Not a distribution: entries can be negative, rows need not sum to 1.
        Builds a (B, H, T, T, D_k) tensor: meant for short prompts."""
        t, dtype = x.shape[1], torch.promote_types(x.dtype, torch.float32)
        q = self._heads(self.q_proj(x), self.head_k) * self.head_k**-0.5  # (B, H, T, D_k)
        k = self._heads(self.k_proj(x), self.head_k)  # (B, H, T, D_k)
        g = self.log_gates(x).to(dtype).cumsum(2)  # (B, H, T, D_k) log-decay from the start
        causal = torch.ones(t, t, dtype=torch.bool, device=x.device).tril()[..., None]
        log_decay = (g[:, :, :, None] - g[:, :, None]).masked_fill(~causal, float("-inf"))
        return torch.einsum("bhtd,bhsd,bhtsd->bhts", q.to(dtype), k.to(dtype), log_decay.exp())
