"""The ``fla`` backend: flash-linear-attention's Triton chunk kernels behind our op signatures.

UNVERIFIED here: written against fla's documented API (fla 0.5, ``fla.ops.gla.chunk_gla`` and
``fla.ops.gated_delta_rule.chunk_gated_delta_rule``) on a machine without CUDA or fla; the
GPU-marked test in tests/test_linear_ops.py compares it with the ``torch`` backend and has not
run yet. What the adapter bridges:

- layout: ours (B, H, T, D), fla's (B, T, H, D); gates and betas ours (B, H, T), fla's (B, T, H);
- scale: our queries arrive already scaled, so ``scale=1.0`` (fla's default is D_k^-1/2);
- gates: both take natural-log decays (log alpha <= 0; fla converts to base 2 inside);
- state: fla's ``initial_state`` / final state are (B, H, D_k, D_v) like ours, in fp32;
  ``output_final_state=True`` always (the cache needs it);
- the plain delta rule (``log_alpha=None``) runs as the gated one with zero log-gates, because
  fla's ``chunk_delta_rule`` refuses fp32 inputs;
- fla picks its own chunk size (64): results do not depend on it, so ``chunk_size`` is unused.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _bthd(x: Tensor) -> Tensor:
    return x.transpose(1, 2).contiguous()  # (B, H, T, ...) <-> (B, T, H, ...)


def chunk_gla(
    q: Tensor, k: Tensor, v: Tensor, log_alpha: Tensor, state: Tensor, chunk_size: int
) -> tuple[Tensor, Tensor]:
    """``linear_ops.chunk_gla`` on fla's kernel: same arguments, shapes and results."""
    from fla.ops.gla import chunk_gla as fla_chunk_gla

    o, final = fla_chunk_gla(
        _bthd(q),
        _bthd(k),
        _bthd(v),
        _bthd(log_alpha),
        scale=1.0,
        initial_state=state.float(),
        output_final_state=True,
    )
    return o.transpose(1, 2), final.to(state.dtype)  # (B, H, T, D_v), (B, H, D_k, D_v)


def chunk_delta_rule(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    beta: Tensor,
    log_alpha: Tensor | None,
    state: Tensor,
    chunk_size: int,
) -> tuple[Tensor, Tensor]:
    """``linear_ops.chunk_delta_rule`` on fla's gated delta rule kernel (keys already
    L2-normalised, so ``use_qk_l2norm_in_kernel=False``)."""
    from fla.ops.gated_delta_rule import chunk_gated_delta_rule

    if log_alpha is None:
        log_alpha = torch.zeros_like(beta, dtype=torch.float32)
    o, final = chunk_gated_delta_rule(
        _bthd(q),
        _bthd(k),
        _bthd(v),
        log_alpha.float().transpose(1, 2).contiguous(),  # (B, T, H)
        beta.transpose(1, 2).contiguous(),  # (B, T, H)
        scale=1.0,
        initial_state=state.float(),
        output_final_state=True,
    )
    return o.transpose(1, 2), final.to(state.dtype)  # (B, H, T, D_v), (B, H, D_k, D_v)
