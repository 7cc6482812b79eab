"""Positions registry: how attention learns token order, chosen by ``model.positions``.

Adding a kind = one file in this folder and one line in ``POSITIONS``. Each kind declares its
``mechanism`` (``rotary``, ``bias``, ``absolute`` or ``none``; see ``base.py``) and each
attention kind the mechanisms it accepts (``Attention.positions_accepted``).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from minillm import checks
from minillm.positions.alibi import ALiBiPositions, alibi_slopes
from minillm.positions.base import MECHANISMS, Positions
from minillm.positions.learned import LearnedPositions
from minillm.positions.none import NoPositions
from minillm.positions.rope import RotaryPositions, apply_rope
from minillm.positions.t5 import T5Positions, relative_bucket

POSITIONS: dict[str, type[Positions]] = {
    "rope": RotaryPositions,
    "alibi": ALiBiPositions,
    "t5": T5Positions,
    "learned": LearnedPositions,
    "none": NoPositions,
}

__all__ = [
    "MECHANISMS",
    "POSITIONS",
    "Positions",
    "alibi_slopes",
    "apply_rope",
    "build_positions",
    "positions_config",
    "positions_kind",
    "positions_with",
    "relative_bucket",
]


def positions_kind(cfg: Mapping[str, Any] | str) -> str:
    """The registry key of a positions config (a bare key or ``{"kind": key, **knobs}``)."""
    return cfg if isinstance(cfg, str) else cfg.get("kind")


def positions_with(mechanisms: Iterable[str]) -> list[str]:
    """Registry keys whose mechanism is one of ``mechanisms``."""
    return [key for key, cls in POSITIONS.items() if cls.mechanism in tuple(mechanisms)]


def positions_config(cfg: Mapping[str, Any] | str) -> tuple[type[Positions], Any]:
    """Resolve ``{"kind": key, **knobs}`` (or a bare key) to (class, filled Config)."""
    cfg = {"kind": cfg} if isinstance(cfg, str) else dict(cfg)
    kind = cfg.pop("kind", None)
    if kind not in POSITIONS:
        raise ValueError(
            f"unknown model.positions {kind!r}; valid: {', '.join(POSITIONS)} "
            "(or null: each attention kind's own default)"
        )
    cls = POSITIONS[kind]
    return cls, checks.options(f"positions kind {kind!r}", cls.Config, cfg)


def build_positions(
    cfg: Mapping[str, Any] | str, dim: int, n_heads: int, max_len: int, causal: bool
) -> Positions:
    """The positions module of one stack: ``n_heads`` heads of ``dim // n_heads`` features,
    ``max_len`` tokens (the learned table's rows), ``causal`` (decoder) or not (encoder)."""
    cls, config = positions_config(cfg)
    return cls(config, dim, n_heads, max_len, causal)
