"""Model FLOPs per token, from the model's shape: the numerator of MFU.

Counts 2 FLOPs per multiply-add of every matmul: the ``nn.Linear`` layers (MLP, LM head) and,
by kind, each attention module's own count (``Attention.flops_per_token``: its projections
plus its token mixing) and each mixture of experts' (``MoEMLP.flops_per_token``: the router
and the experts a token is routed to, so MoE FLOPs and MFU count active parameters only).
Embedding lookups, norms, activations, RoPE and the loss are elementwise and not counted
(PaLM appendix B, nanoGPT, torchtitan do the same). Training is 3x the forward (the backward
computes two matmuls per forward one); activation recomputation is not counted, as MFU
requires.
"""

from __future__ import annotations

from torch import nn

from minillm.attention import Attention
from minillm.models.moe import MoEMLP


def forward_flops_per_token(model: nn.Module, context: int) -> float:
    """Forward FLOPs per token of ``model`` at sequence length ``context``.

    Every module is taken to run once per token: exact for ``DecoderLM``; for an
    encoder-decoder it assumes source length = target length = ``context``. Raises
    ``NotImplementedError`` if an attention kind does not count its FLOPs.
    """
    counted = [m for m in model.modules() if isinstance(m, Attention | MoEMLP)]
    inside = {id(sub) for module in counted for sub in module.modules()}
    dense = sum(
        2 * m.in_features * m.out_features
        for m in model.modules()
        if isinstance(m, nn.Linear) and id(m) not in inside
    )
    attention = sum(m.flops_per_token(context) for m in counted if isinstance(m, Attention))
    experts = sum(m.flops_per_token() for m in counted if isinstance(m, MoEMLP))
    return float(dense + attention + experts)


def train_flops_per_token(model: nn.Module, context: int) -> float:
    """Forward + backward FLOPs per trained token: 3x the forward."""
    return 3.0 * forward_flops_per_token(model, context)
