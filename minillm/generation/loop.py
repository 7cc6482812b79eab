"""The one decoding loop, over any model that implements the two decoding calls.

A model generates through ``start(input_ids, mask=..., max_new_tokens=..., use_cache=...,
**inputs) -> (logits (B, V), state)`` (prefill; an encoder-decoder also takes ``src_ids``,
``src_mask``) and ``step(tokens (N, T), state) -> logits (N, T, V)``; the state offers
``reorder(rows)``, ``rollback(n)``, ``nbytes`` and ``capacity``. A ``Search`` (``Sampler``:
greedy and sampling; ``BeamSearch``) turns each step's logits into the next tokens and,
when rows move (samples or beams expanding from a prompt, beams reordering), the rows the
state must be reordered by. This loop never asks which model, kind or search it runs.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import torch
from torch import Tensor, nn

Step = Callable[[Tensor, Any], Tensor]  # (tokens (N, T), state) -> logits (N, T, V)


class Search(Protocol):
    """Chooses tokens; ``done`` once every row is finished (checked after each choice)."""

    done: bool

    def choose(self, logits: Tensor) -> tuple[Tensor, Tensor | None]:
        """logits (N, V) of each row's next token -> the tokens (M,) to feed next and the
        old row (M,) each new row continues (None: rows stay as they are)."""
        ...


def decode(logits: Tensor, state: Any, search: Search, step: Step) -> None:
    """Choose, reorder, step, until the search is done (no step is run after the last
    choice). ``logits`` and ``state`` come from the model's ``start``."""
    while True:
        tokens, rows = search.choose(logits)
        if search.done:
            return
        if rows is not None:
            state.reorder(rows)
        logits = step(tokens[:, None], state)[:, -1]  # (N, V)


# torch.compile options by device type; others get torch.compile's defaults (inductor).
# CUDA: CUDA graphs. Tests swap in a cheap backend (aot_eager, or a CompileCounter).
COMPILE_OPTIONS: dict[str, dict[str, Any]] = {"cuda": {"mode": "reduce-overhead"}}
_compiled: dict[tuple[str, str], Callable[..., Tensor]] = {}


def _model_step(model: nn.Module, tokens: Tensor, state: Any) -> Tensor:
    return model.step(tokens, state)


def step_function(model: nn.Module, compile: bool) -> Step:
    """``model.step``, or ``model.step`` under torch.compile (``COMPILE_OPTIONS``).

    Caches read with fixed shapes while compiled (``minillm.attention.cache``), and positions
    and lengths are device tensors, so one graph serves every position of a run.
    """
    if not compile:
        return model.step
    device = next(model.parameters()).device.type
    options = COMPILE_OPTIONS.get(device, {})
    key = (device, repr(sorted(options.items())))
    if key not in _compiled:
        compiled = torch.compile(_model_step, **options)
        # CUDA graphs reuse their output buffer: copy the logits out before the next replay
        _compiled[key] = (lambda *a: compiled(*a).clone()) if device == "cuda" else compiled
    return lambda tokens, state: _compiled[key](model, tokens, state)


def prefill(model: nn.Module, input_ids: Tensor, mask: Tensor | None, caches: list[Any]) -> Tensor:
    """Raw cache call (``minillm.evaluation.report`` times it): run the prompt (B, T) through a
    decoder-only model into ``caches``; logits (B, V) of the last position."""
    return model(input_ids, mask=mask, caches=caches)[:, -1]


def decode_step(model: nn.Module, tokens: Tensor, positions: Tensor, caches: list[Any]) -> Tensor:
    """Raw cache call: tokens, positions (B, 1) -> logits (B, V); appends to ``caches``."""
    return model(tokens, positions=positions, caches=caches)[:, -1]
