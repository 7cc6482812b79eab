"""Slow, obvious twins of the attention kinds, used only by tests.

Each twin recomputes a module's output from its own weights with explicit per-query loops and
no fused kernels, so the fast path (SDPA, chunked forms, caches) can be checked against it,
outputs and gradients. ``REFERENCES`` maps a kind's class to its twin; the twins live in
``softmax.py`` and ``recurrent.py``, what they share in ``common.py``.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor

from minillm.attention.additive import AdditiveAttention
from minillm.attention.base import Attention
from minillm.attention.delta_net import DeltaNetAttention
from minillm.attention.gated_delta_net import GatedDeltaNetAttention
from minillm.attention.gated_linear import GatedLinearAttention
from minillm.attention.linear import LinearAttention
from minillm.attention.linformer import LinformerAttention
from minillm.attention.local import LocalAttention
from minillm.attention.mha import MultiHeadAttention
from minillm.attention.performer import PerformerAttention
from minillm.attention.reference.common import rope_reference, softmax_reference
from minillm.attention.reference.recurrent import (
    delta_net_reference,
    delta_rule_reference,
    gated_delta_net_reference,
    gated_linear_reference,
    linear_reference,
    performer_reference,
)
from minillm.attention.reference.softmax import (
    additive_reference,
    linformer_reference,
    local_reference,
    mha_reference,
    sparse_reference,
)
from minillm.attention.sparse import SparseAttention

__all__ = ["REFERENCES", "delta_rule_reference", "rope_reference", "softmax_reference"]

REFERENCES: dict[type[Attention], Callable[..., Tensor]] = {
    MultiHeadAttention: mha_reference,
    LocalAttention: local_reference,
    LinearAttention: linear_reference,
    GatedLinearAttention: gated_linear_reference,
    DeltaNetAttention: delta_net_reference,
    GatedDeltaNetAttention: gated_delta_net_reference,
    AdditiveAttention: additive_reference,
    LinformerAttention: linformer_reference,
    SparseAttention: sparse_reference,
    PerformerAttention: performer_reference,
}
