"""The backend slot of the gated chunk ops (``gated_linear``'s GLA, ``delta_net`` and
``gated_delta_net``'s delta rule): one signature, several implementations.

- ``torch``: pure PyTorch (``linear_ops``), every device; the reference the others must equal.
- ``compiled``: ``torch.compile`` of the same functions, GLA's intra-chunk scores in their
  plain-autograd form (Inductor cannot see into the hand-written backward). Fixed shapes: one
  compile per new sequence length, a minute or more on CPU, so never chosen by ``auto``. On one
  CPU thread it cut the GLA op at T = 4096 from ~79 to ~58 ms in a same-process A/B, but
  ``bench_attention`` under heavy load showed no layer-level gain: opt in and measure.
- ``fla``: flash-linear-attention's Triton kernels (``linear_fla``), CUDA tensors only.

Chosen by ``set_backend(name)`` or else the environment variable ``MINILLM_LINEAR_BACKEND``
(``torch|compiled|fla|auto``, default ``auto``), read at every call so a process can switch.
``auto`` = ``fla`` for CUDA inputs when ``import fla`` works, else ``torch``. The choice is a
property of the process, not of a model: checkpoints and configs do not record it.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from minillm.attention import linear_fla, linear_ops
from minillm.attention.gla_intra import intra_scores_autograd

ENV = "MINILLM_LINEAR_BACKEND"


@dataclass(frozen=True)
class Backend:
    chunk_gla: Callable[..., tuple[Tensor, Tensor]]
    chunk_delta_rule: Callable[..., tuple[Tensor, Tensor]]
    cuda_only: bool = False


@functools.cache
def _compiled_gla() -> Callable[..., tuple[Tensor, Tensor]]:
    traceable = functools.partial(linear_ops.chunk_gla, intra_scores=intra_scores_autograd)
    return torch.compile(traceable, dynamic=False)


@functools.cache
def _compiled_delta_rule() -> Callable[..., tuple[Tensor, Tensor]]:
    return torch.compile(linear_ops.chunk_delta_rule, dynamic=False)


BACKENDS: dict[str, Backend] = {
    "torch": Backend(linear_ops.chunk_gla, linear_ops.chunk_delta_rule),
    "compiled": Backend(
        lambda *args: _compiled_gla()(*args), lambda *args: _compiled_delta_rule()(*args)
    ),
    "fla": Backend(linear_fla.chunk_gla, linear_fla.chunk_delta_rule, cuda_only=True),
}
_chosen: str | None = None


@functools.cache
def fla_available() -> bool:
    """Whether fla's two kernels import (fla needs triton; a broken install counts as absent)."""
    try:
        import fla.ops.gated_delta_rule  # noqa: F401
        import fla.ops.gla  # noqa: F401
    except ImportError:
        return False
    return True


def set_backend(name: str | None) -> None:
    """Use ``name`` from now on (None: back to the environment variable)."""
    if name is not None and name not in (*BACKENDS, "auto"):
        raise ValueError(f"unknown linear backend {name!r}; use one of {[*BACKENDS, 'auto']}")
    global _chosen
    _chosen = name


def backend_name(device: torch.device) -> str:
    """The backend a call on ``device`` runs: the chosen one, with ``auto`` resolved."""
    name = _chosen or os.environ.get(ENV, "auto")
    if name == "auto":
        return "fla" if device.type == "cuda" and fla_available() else "torch"
    if name not in BACKENDS:
        raise ValueError(
            f"{ENV}={name!r} is not a linear backend; use one of {[*BACKENDS, 'auto']}"
        )
    if BACKENDS[name].cuda_only and (device.type != "cuda" or not fla_available()):
        raise ValueError(
            f"linear backend {name!r} needs CUDA tensors and `import fla` (got {device.type}, fla "
            f"{'importable' if fla_available() else 'not importable'}); use auto or torch"
        )
    return name


def chunk_gla(
    q: Tensor, k: Tensor, v: Tensor, log_alpha: Tensor, state: Tensor, chunk_size: int
) -> tuple[Tensor, Tensor]:
    """``linear_ops.chunk_gla`` (arguments, shapes and results) on the selected backend."""
    op = BACKENDS[backend_name(q.device)].chunk_gla
    return op(q, k, v, log_alpha, state, chunk_size)


def chunk_delta_rule(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    beta: Tensor,
    log_alpha: Tensor | None,
    state: Tensor,
    chunk_size: int,
) -> tuple[Tensor, Tensor]:
    """``linear_ops.chunk_delta_rule`` (arguments, shapes and results) on the selected backend."""
    op = BACKENDS[backend_name(q.device)].chunk_delta_rule
    return op(q, k, v, beta, log_alpha, state, chunk_size)
