"""Feed-forward registry: ``MLPS`` by name, ``build_mlp`` the one place a kind is chosen.

Every kind is built as ``cls(config, dim, hidden)`` from its nested ``Config`` and names its
weights ``gate_proj``/``up_proj``/``down_proj`` (``init_block_weights`` initialises them).
``hidden`` is the dense SwiGLU width (``ModelConfig.hidden``); a kind may derive its own
widths from it (``moe``: expert width = hidden / active experts, equal active parameters).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn

from minillm.models.moe import MoEMLP


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x)), Shazeer 2020."""

    @dataclass
    class Config:
        """SwiGLU has no knobs of its own: its width is ``model.mlp_hidden``."""

    def __init__(self, config: Config, dim: int, hidden: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


MLPS: dict[str, type[nn.Module]] = {
    "swiglu": SwiGLU,
    "moe": MoEMLP,
}


def mlp_config(cfg: Mapping[str, Any] | str) -> tuple[type[nn.Module], Any]:
    """Resolve ``{"kind": key, **knobs}`` (or a bare key) to (class, filled Config)."""
    cfg = {"kind": cfg} if isinstance(cfg, str) else dict(cfg)
    kind = cfg.pop("kind", None)
    if kind is None:
        raise ValueError(
            f"model.mlp={cfg}: needs a kind ({', '.join(MLPS)}), e.g. "
            "'model.mlp={kind:moe,n_experts:8}'"
        )
    if kind not in MLPS:
        raise ValueError(f"model.mlp={kind!r}: choose one of {', '.join(MLPS)}")
    cls = MLPS[kind]
    names = {f.name for f in dataclasses.fields(cls.Config)}
    unknown = sorted(set(cfg) - names)
    if unknown:
        raise ValueError(
            f"model.mlp: kind {kind!r} has no option(s) {unknown}; its options are {sorted(names)}"
        )
    return cls, cls.Config(**cfg)


def build_mlp(cfg: Mapping[str, Any] | str, dim: int, hidden: int) -> nn.Module:
    """The feed-forward named by ``cfg`` (a registry key or ``{"kind": ..., **knobs}``)."""
    cls, config = mlp_config(cfg)
    return cls(config, dim, hidden)
