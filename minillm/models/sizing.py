"""Parameter matching: compare attention kinds at one model size (``match_params``).

Kinds differ in their attention parameters (``mqa`` shares one K/V head, ``gated_linear`` adds
gates), so the same ``dim``/``n_layers`` gives different model sizes. ``match_params`` gives
the SwiGLU MLP (3 * dim * hidden weights a block, the only size knob independent of the
attention kind) the difference, so that every kind has the reference kind's parameter count
to within ``n_layers * 1.5 * dim`` parameters (rounding of ``hidden``).

With ``mlp=moe`` the same width change applies to ``mlp_hidden``, from which each expert's
width derives (``hidden // (top_k + shared_expert)``): the *active* parameters per token then
match the reference's (to within the rounding by ``top_k``), while the total grows with the
``n_experts - top_k`` idle experts. An explicit ``mlp.expert_hidden`` is left as given.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from minillm.attention import build_attention
from minillm.models.config import ModelConfig


def attention_params(attn: Mapping[str, Any] | str, dim: int, n_heads: int) -> int:
    """Parameters of one causal attention module of this kind (built on the meta device)."""
    with torch.device("meta"):
        module = build_attention(attn, dim, n_heads, "causal")
    return sum(p.numel() for p in module.parameters())


def match_params(model: Mapping[str, Any], reference: Mapping[str, Any] | str) -> dict[str, Any]:
    """``model`` (ModelConfig fields, ``attn`` included) with ``mlp_hidden`` set so that the
    decoder has as many parameters as the same config with ``reference`` attention (a
    registry key or ``{"kind": ..., **knobs}``) and the default or given MLP width. A hybrid
    (``layers``) gives every block the mean attention gap of its layers."""
    cfg = ModelConfig.from_dict(dict(model))
    if cfg.arch != "decoder":
        raise ValueError(f"match_params sizes decoder-only models, not arch={cfg.arch!r}")
    ours = [attention_params(a, cfg.dim, cfg.n_heads) for a in cfg.layer_attns()]  # hybrids
    gap = attention_params(reference, cfg.dim, cfg.n_heads) - sum(ours) / len(ours)
    hidden = cfg.hidden + round(gap / (3 * cfg.dim))  # SwiGLU: 3 * dim * hidden weights
    if hidden < 1:
        raise ValueError(
            f"match_params: attention {cfg.attn_label!r} has {-gap:.0f} more parameters per "
            f"block than {reference!r}, more than the MLP of width {cfg.hidden} can give back"
        )
    return {**model, "mlp_hidden": hidden}
