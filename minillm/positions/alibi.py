"""Attention with linear biases (``alibi``; Press et al. 2022, "Train Short, Test Long").

Head h adds ``-slope_h * |t - s|`` to the score of query t and key s: a penalty linear in the
distance, steeper for some heads (local) than others (long-range). No parameters. Slopes are
the paper's: for n heads a power of two, the geometric sequence starting at and with ratio
2^(-8/n); otherwise the 2^floor(log2 n) slopes of that count, then every other slope of twice
that count (the paper's reference code). Bidirectional (encoder) attention uses the same
symmetric ``|t - s|``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from minillm.positions.base import Positions


def alibi_slopes(n_heads: int) -> list[float]:
    """The paper's per-head slopes (descending) for ``n_heads`` heads."""

    def power_of_two(n: int) -> list[float]:
        start = 2 ** (-8 / n)
        return [start ** (i + 1) for i in range(n)]

    closest = 2 ** math.floor(math.log2(n_heads))
    extra = power_of_two(2 * closest)[0::2][: n_heads - closest]
    return power_of_two(closest) + extra


class ALiBiPositions(Positions):
    mechanism = "bias"

    def __init__(
        self, cfg: Positions.Config, dim: int, n_heads: int, max_len: int, causal: bool
    ) -> None:
        super().__init__(cfg, dim, n_heads, max_len, causal)
        slopes = torch.tensor(alibi_slopes(n_heads), dtype=torch.float32)
        self.register_buffer("slopes", slopes, persistent=False)  # (H,) moves with the model

    def bias(self, q_pos: Tensor, k_pos: Tensor) -> Tensor:
        distance = (q_pos[..., :, None] - k_pos[..., None, :]).abs()  # (*, T, S)
        slopes = self.slopes.view(-1, 1, 1)  # (H, 1, 1)
        return -slopes * distance[..., None, :, :].float()  # (*, H, T, S)
