"""T5's relative position bias (``t5``; Raffel et al. 2020, "Exploring the Limits of Transfer
Learning with a Unified Text-to-Text Transformer", section 2.1).

Each key-minus-query distance falls in one of ``n_buckets`` buckets: one per distance below
``n_buckets / 2`` (exact), then logarithmically wider ones up to ``max_distance``, beyond which
all distances share the last bucket. Each bucket holds one learned scalar per head, added to
the scores. One table serves every layer of a stack, as in T5. Causal attention spends all
buckets on keys behind the query; bidirectional attention (an encoder) spends half on keys
behind and half on keys ahead.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from minillm.positions.base import Positions


def relative_bucket(
    relative: Tensor, bidirectional: bool, n_buckets: int, max_distance: int
) -> Tensor:
    """Bucket (long, same shape) of each ``relative`` = key position - query position: T5's
    ``_relative_position_bucket`` (mesh-tensorflow), exactly."""
    buckets = torch.zeros_like(relative)
    if bidirectional:
        n_buckets //= 2
        buckets = buckets + (relative > 0).long() * n_buckets  # keys ahead: upper half
        distance = relative.abs()
    else:
        distance = (-relative).clamp(min=0)  # keys ahead (masked anyway) share bucket 0
    exact = n_buckets // 2
    far = distance.clamp(min=exact).float()  # only read where distance >= exact: no log(0)
    log_bucket = (
        exact
        + (torch.log(far / exact) / math.log(max_distance / exact) * (n_buckets - exact)).long()
    )
    log_bucket = log_bucket.clamp(max=n_buckets - 1)
    return buckets + torch.where(distance < exact, distance, log_bucket)


class T5Positions(Positions):
    mechanism = "bias"

    @dataclass
    class Config:
        n_buckets: int = 32  # learned scalars per head; half exact distances, half log-spaced
        max_distance: int = 128  # distances from here on share the last bucket

        def __post_init__(self) -> None:
            if self.n_buckets < 4:
                raise ValueError(f"t5 n_buckets={self.n_buckets}: must be >= 4 (32 is T5's)")
            if self.max_distance <= self.n_buckets // 2:
                raise ValueError(
                    f"t5 max_distance={self.max_distance}: must exceed n_buckets // 2 = "
                    f"{self.n_buckets // 2} (128 is T5's)"
                )

    def __init__(self, cfg: Config, dim: int, n_heads: int, max_len: int, causal: bool) -> None:
        super().__init__(cfg, dim, n_heads, max_len, causal)
        self.table = nn.Embedding(cfg.n_buckets, n_heads)  # (buckets, H)
        nn.init.zeros_(self.table.weight)

    def init_weights(self, std: float) -> None:
        nn.init.normal_(self.table.weight, 0.0, std)

    def bias(self, q_pos: Tensor, k_pos: Tensor) -> Tensor:
        relative = k_pos[..., None, :] - q_pos[..., :, None]  # (*, T, S)
        bucket = relative_bucket(
            relative, not self.causal, self.cfg.n_buckets, self.cfg.max_distance
        )
        return self.table(bucket).movedim(-1, -3).float()  # (*, H, T, S)
