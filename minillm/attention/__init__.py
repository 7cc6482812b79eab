"""Attention registry: every kind by name, with the presets that distinguish its variants.

Adding a kind = one file in this folder, one line in ``ATTENTION``, one ``conf/attn/<kind>.yaml``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from minillm import checks
from minillm.attention.additive import AdditiveAttention
from minillm.attention.base import ROLES, Attention
from minillm.attention.bounded_cache import RecurrentState, RollingKVCache
from minillm.attention.cache import Cache, KVCache, fixed_shape_decoding
from minillm.attention.delta_net import DeltaNetAttention
from minillm.attention.gated_delta_net import GatedDeltaNetAttention
from minillm.attention.gated_linear import GatedLinearAttention
from minillm.attention.linear import LinearAttention
from minillm.attention.linformer import LinformerAttention
from minillm.attention.local import LocalAttention
from minillm.attention.mha import MultiHeadAttention
from minillm.attention.performer import PerformerAttention
from minillm.attention.sparse import SparseAttention

# key -> (class, preset knobs). Variants that differ only in numbers are presets, not classes.
ATTENTION: dict[str, tuple[type[Attention], dict[str, Any]]] = {
    "mha": (MultiHeadAttention, {}),
    "mqa": (MultiHeadAttention, {"n_kv_heads": 1}),
    "gqa": (MultiHeadAttention, {"n_kv_heads": 2}),
    "local": (LocalAttention, {}),
    "linear": (LinearAttention, {}),
    "gated_linear": (GatedLinearAttention, {}),
    "additive": (AdditiveAttention, {}),
    "linformer": (LinformerAttention, {}),
    "delta_net": (DeltaNetAttention, {}),
    "gated_delta_net": (GatedDeltaNetAttention, {}),
    "sparse": (SparseAttention, {}),
    "performer": (PerformerAttention, {}),
}

__all__ = [
    "ATTENTION",
    "ROLES",
    "Attention",
    "Cache",
    "KVCache",
    "RecurrentState",
    "RollingKVCache",
    "attention_config",
    "build_attention",
    "fixed_shape_decoding",
    "kinds_for_role",
]


def kinds_for_role(role: str) -> list[str]:
    """Registry keys whose kind can serve in ``role``."""
    return [key for key, (cls, _) in ATTENTION.items() if role in cls.roles]


def attention_config(cfg: Mapping[str, Any] | str) -> tuple[type[Attention], Any]:
    """Resolve ``{"kind": key, **knobs}`` (or a bare key) to (class, filled Config)."""
    cfg = {"kind": cfg} if isinstance(cfg, str) else dict(cfg)
    kind = cfg.pop("kind", None)
    if kind not in ATTENTION:
        raise ValueError(
            f"unknown attention kind {kind!r}; valid kinds: {', '.join(sorted(ATTENTION))}"
        )
    cls, preset = ATTENTION[kind]
    return cls, checks.options(f"attention kind {kind!r}", cls.Config, {**preset, **cfg})


def build_attention(cfg: Mapping[str, Any] | str, dim: int, n_heads: int, role: str) -> Attention:
    """Build the kind named by ``cfg["kind"]`` for ``role`` (causal, bidirectional or cross)."""
    if role not in ROLES:
        raise ValueError(f"unknown attention role {role!r}; roles are {', '.join(ROLES)}")
    cls, config = attention_config(cfg)
    if role not in cls.roles:
        kind = cfg if isinstance(cfg, str) else cfg["kind"]
        raise ValueError(
            f"attention kind {kind!r} cannot serve as {role} attention; kinds that can: "
            f"{', '.join(kinds_for_role(role))}"
        )
    attn = cls(config, dim, n_heads, role)
    attn.kind = cfg if isinstance(cfg, str) else cfg["kind"]  # for messages (use_positions)
    return attn
