"""Rotary position embedding (Su et al. 2021), computed from explicit positions.

cos/sin are computed from the positions on the fly (no table), so any position works: a
rolling-window cache can decode past ``max_len``.
"""

from __future__ import annotations

import torch
from torch import Tensor


def rope_angles(positions: Tensor, head_dim: int, base: float) -> tuple[Tensor, Tensor]:
    """cos and signed sin, each (B, 1, T, head_dim), for positions (B, T): what ``apply_rope``
    takes. The rotation's sign is folded into sin (-sin on the first half, +sin on the second),
    so applying it is one roll and two multiplies instead of a negate, a concat and three."""
    inv_freq = base ** (
        -torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim
    )
    angles = positions.to(torch.float32)[..., None] * inv_freq  # (B, T, D/2)
    cos, sin = angles.cos(), angles.sin()
    return torch.cat((cos, cos), dim=-1)[:, None], torch.cat((-sin, sin), dim=-1)[:, None]


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate pairs (i, i + D/2) of x (B, H, T, D); computed in fp32, returned in x's dtype.

    x * cos + [-x2, x1] * [sin, sin] = x * cos + [x2, x1] * [-sin, sin] (signed ``sin``).
    """
    xf = x.float()
    return torch.addcmul(xf * cos, xf.roll(x.shape[-1] // 2, dims=-1), sin).to(x.dtype)
