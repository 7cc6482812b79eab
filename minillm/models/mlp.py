"""Feed-forward registry: ``MLPS`` by name, ``build_mlp`` the one place a kind is chosen.

Every kind is built as ``cls(config, dim, hidden)`` from its nested ``Config``; its weights
start as its ``init_weights(std, out_std)`` says (input projections N(0, std), the output
projection ``down_proj`` N(0, out_std), biases zero). ``hidden`` is the model's feed-forward width
(``ModelConfig.hidden``: ``model.mlp_hidden``, else the SwiGLU width 8/3 * dim); a kind may
derive its own widths from it (``moe``: expert width = hidden / active experts, equal active
parameters). ``gelu`` uses it as is: GPT-2's 4 * dim is ``model.mlp_hidden=<4 * dim>``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn

from minillm import checks
from minillm.models.moe import MoEMLP, init_gated


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

    def init_weights(self, std: float, out_std: float) -> None:
        init_gated(self, std, out_std)


class GeluMLP(nn.Module):
    """down(gelu(up(x))): GPT-2's and BERT's feed-forward (HF GPT-2: c_fc = up_proj, c_proj =
    down_proj), two matrices of width ``hidden`` where SwiGLU has three."""

    @dataclass
    class Config:
        bias: bool = True  # on both projections, as GPT-2
        # "tanh": GPT-2's approximation (HF gelu_new / gelu_pytorch_tanh); "none": exact erf
        approximate: str = "tanh"

        def __post_init__(self) -> None:
            checks.choice("model.mlp.bias", self.bias, (False, True))
            checks.choice("model.mlp.approximate", self.approximate, ("tanh", "none"))

    def __init__(self, config: Config, dim: int, hidden: int) -> None:
        super().__init__()
        self.approximate = config.approximate
        self.up_proj = nn.Linear(dim, hidden, bias=config.bias)
        self.down_proj = nn.Linear(hidden, dim, bias=config.bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.gelu(self.up_proj(x), approximate=self.approximate))

    def init_weights(self, std: float, out_std: float) -> None:
        nn.init.normal_(self.up_proj.weight, 0.0, std)
        nn.init.normal_(self.down_proj.weight, 0.0, out_std)
        for proj in (self.up_proj, self.down_proj):
            if proj.bias is not None:
                nn.init.zeros_(proj.bias)


MLPS: dict[str, type[nn.Module]] = {
    "swiglu": SwiGLU,
    "moe": MoEMLP,
    "gelu": GeluMLP,
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
    return cls, checks.options(f"model.mlp: kind {kind!r}", cls.Config, cfg)


def build_mlp(cfg: Mapping[str, Any] | str, dim: int, hidden: int) -> nn.Module:
    """The feed-forward named by ``cfg`` (a registry key or ``{"kind": ..., **knobs}``)."""
    cls, config = mlp_config(cfg)
    return cls(config, dim, hidden)
