"""Rotary position embedding (``rope``; Su et al. 2021, "RoFormer"), from explicit positions.

Queries and keys are rotated by angles proportional to their positions, so their dot product
depends on the distance only. cos/sin are computed from the positions on the fly (no table),
so any position works: a rolling-window cache can decode past ``max_len``.

Long context: ``ntk_factor`` s > 1 applies the "NTK-aware" scaling (bloc97, 2023; the form
Code Llama and YaRN build on): the base becomes ``base * s ** (D / (D - 2))``, so the slowest
frequency turns s times slower (positions up to s x the trained length stay within the angles
seen in training) while the fastest, which resolve neighbouring tokens, barely change. It needs
no fine-tuning; s = 1 is plain RoPE.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from minillm.positions.base import Positions


class RotaryPositions(Positions):
    mechanism = "rotary"

    @dataclass
    class Config:
        base: float = 10000.0  # wavelength scale: frequency i is base ** (-2i / D)
        ntk_factor: float = 1.0  # NTK-aware context extension (module docstring); 1 = off

        def __post_init__(self) -> None:
            if not self.base > 1:
                raise ValueError(f"rope base={self.base}: must be > 1 (10000 is the usual)")
            if not self.ntk_factor >= 1:
                raise ValueError(
                    f"rope ntk_factor={self.ntk_factor}: must be >= 1 (1 = no scaling; s "
                    "extends the context about s times)"
                )

    def effective_base(self, head_dim: int) -> float:
        """The base after NTK-aware scaling, for a head of ``head_dim`` features."""
        return self.cfg.base * self.cfg.ntk_factor ** (head_dim / max(head_dim - 2, 1))

    def angles(self, positions: Tensor, head_dim: int) -> tuple[Tensor, Tensor]:
        """cos and signed sin, each (B, 1, T, head_dim), for positions (B, T)."""
        return rope_angles(positions, head_dim, self.effective_base(head_dim))

    def rotate(
        self, q: Tensor, k: Tensor, positions: Tensor, seq_dim: int = 2
    ) -> tuple[Tensor, Tensor]:
        cos, sin = self.angles(positions, q.shape[-1])  # (B, 1, T, D)
        if seq_dim == 1:
            cos, sin = cos.transpose(1, 2), sin.transpose(1, 2)  # (B, T, 1, D)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin)


def rope_angles(positions: Tensor, head_dim: int, base: float) -> tuple[Tensor, Tensor]:
    """cos and signed sin, each (B, 1, T, head_dim), for positions (B, T): what ``apply_rope``
    takes. The rotation's sign is folded into sin (-sin on the first half, +sin on the second),
    so applying it is one roll and two multiplies instead of a negate, a concat and three."""
    exponents = torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32)
    inv_freq = base ** (-exponents / head_dim)  # (D/2,)
    angles = positions.to(torch.float32)[..., None] * inv_freq  # (B, T, D/2)
    cos, sin = angles.cos(), angles.sin()
    return torch.cat((cos, cos), dim=-1)[:, None], torch.cat((-sin, sin), dim=-1)[:, None]


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate pairs (i, i + D/2) of x (B, H, T, D); computed in fp32, returned in x's dtype.

    x * cos + [-x2, x1] * [sin, sin] = x * cos + [x2, x1] * [-sin, sin] (signed ``sin``).
    """
    xf = x.float()
    return torch.addcmul(xf * cos, xf.roll(x.shape[-1] // 2, dims=-1), sin).to(x.dtype)
