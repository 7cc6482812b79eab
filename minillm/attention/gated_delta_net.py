"""Gated DeltaNet (``gated_delta_net``), Yang, Kautz and Hatamizadeh 2024, "Gated Delta Networks:
Improving Mamba2 with Delta Rule".

DeltaNet (``delta_net.py``, same projections, normalisation and cache) with a per-head scalar
decay: S_t = alpha_t (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T, o_t = q_t S_t. The decay
is Mamba2's, as in the paper and fla: log alpha_t = g_t = -exp(A_log) * softplus(x_t W_a +
dt_bias) <= 0, with A_log, dt_bias one per head, initialised as fla does (A ~ U(0, 16),
dt = softplus(dt_bias) log-uniform in [1e-3, 0.1]). So alpha can forget fast (erase the whole
memory on a topic switch) while beta edits one key at a time. After the per-head RMSNorm a
swish output gate (as ``gated_linear``) multiplies the heads before o_proj. The short causal
convolutions on q, k, v (``conv_size``, default 4 as fla) and their cache are DeltaNet's.
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from minillm.attention.delta_net import DeltaNetAttention

DT_MIN, DT_MAX, A_MAX = 1e-3, 0.1, 16.0  # fla / Mamba2 initial ranges


class GatedDeltaNetAttention(DeltaNetAttention):
    registry_key: ClassVar[str] = "gated_delta_net"

    def __init__(self, cfg: DeltaNetAttention.Config, dim: int, n_heads: int, role: str) -> None:
        super().__init__(cfg, dim, n_heads, role)
        self.a_proj = nn.Linear(dim, n_heads, bias=False)  # decay input, one per head
        self.A_log = nn.Parameter(torch.empty(n_heads))
        self.dt_bias = nn.Parameter(torch.empty(n_heads))
        self.g_proj = nn.Linear(dim, self.value_dim, bias=False)  # swish output gate
        self._init_decay()

    def _init_decay(self) -> None:
        with torch.no_grad():
            self.A_log.copy_(torch.empty_like(self.A_log).uniform_(0.0, A_MAX).log())
            log_dt = torch.rand_like(self.dt_bias) * math.log(DT_MAX / DT_MIN) + math.log(DT_MIN)
            dt = log_dt.exp()
            self.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # softplus^-1(dt)

    def init_weights(self, std: float, out_std: float) -> None:
        super().init_weights(std, out_std)
        self._init_decay()

    def log_decay(self, x: Tensor) -> Tensor:
        """g = log alpha (B, H, T) = -exp(A_log) * softplus(x W_a + dt_bias), always <= 0."""
        dt = F.softplus(self.a_proj(x).float() + self.dt_bias)  # (B, T, H)
        return (-self.A_log.float().exp() * dt).transpose(1, 2)  # (B, H, T)

    def output(self, y: Tensor, x: Tensor) -> Tensor:
        """Per-head RMSNorm, swish gate silu(x W_g), o_proj: (B, T, dim)."""
        b, _, t, _ = y.shape
        y = self.o_norm(y.transpose(1, 2)).reshape(b, t, self.value_dim)  # (B, T, value_dim)
        return self.o_proj(y * F.silu(self.g_proj(x)))
