"""Generation caches: the ``Cache`` protocol and one small type per kind of memory.

Code outside a kind sees a cache only through the protocol: ``length``, ``capacity``,
``nbytes``, ``reorder(rows)`` and ``rollback(n)``. ``update(...)`` belongs to each type and its
kind: the kind hands over what the new tokens add and gets back what its queries read.

Two ways to read, same results:

- eager (host ints): slices to the tokens written, no mask when there is no padding;
- fixed-shape, while ``torch.compile`` traces or inside ``fixed_shape_decoding()``: whole
  buffers plus masks, write offsets taken from the device tensor ``end``, so a decode step has
  the same shapes at every position and compiles once (and CUDA graphs can replay it).

The caches whose memory does not grow with the sequence (``local``'s rolling window, the
linear kinds' recurrent state) are in ``minillm/attention/bounded_cache.py``, on this module's
``StreamCache``. Buffers are allocated once and written in place; ``reorder`` keeps their
addresses unless it changes the batch size (beams or samples expanding from a prefilled batch).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor

_FIXED = [False]  # set by fixed_shape_decoding()


@runtime_checkable
class Cache(Protocol):
    """What generation code may ask of any cache (see the module docstring)."""

    update: Any  # the kind's own write-and-read call; its arguments belong to the type

    @property
    def length(self) -> int:
        """Tokens written so far (left padding included)."""
        ...

    @property
    def capacity(self) -> int | None:
        """Most tokens it can hold; None when it never fills (rolling window, recurrent)."""
        ...

    @property
    def nbytes(self) -> int: ...

    def reorder(self, rows: Tensor) -> None:
        """Row i becomes old row ``rows[i]`` (beam search; expansion when the size changes)."""
        ...

    def rollback(self, n: int) -> int:
        """Forget the last ``n`` tokens written (speculative decoding's rejected drafts).

        Returns how many it forgot: ``n``, or more for a cache that can only return to a
        saved point (a recurrent state after a multi-token step); the caller feeds those
        extra tokens again. Caches take back at most the ``lookahead`` they were built with.
        """
        ...


def fixed_shapes() -> bool:
    """True while torch.compile traces a step, or inside ``fixed_shape_decoding()``."""
    return _FIXED[0] or torch.compiler.is_compiling()


@contextlib.contextmanager
def fixed_shape_decoding() -> Iterator[None]:
    """Run the fixed-shape path eagerly (tests, benchmarks of its eager cost)."""
    before, _FIXED[0] = _FIXED[0], True
    try:
        yield
    finally:
        _FIXED[0] = before


def static_address(t: Tensor) -> Tensor:
    """Mark a tensor a compiled CUDA step mutates in place as static, so CUDA graphs
    (compile mode ``reduce-overhead``) keep it instead of skipping the graph; no-op elsewhere."""
    if t.is_cuda:
        torch._dynamo.mark_static_address(t)
    return t


def new_buffer(shape: tuple[int, ...], device: torch.device | str, dtype: torch.dtype) -> Tensor:
    return static_address(torch.zeros(shape, device=device, dtype=dtype))


def causal_mask(query: Tensor, keys: Tensor, valid: Tensor | None) -> Tensor:
    """Bool mask (B | 1, 1, T, S): query slot ``query[t]`` sees key slots ``keys[s] <= it`` that
    are ``valid`` (B, S). A query always sees itself, so a padding query stays finite."""
    allowed = keys[None, :] <= query[:, None]  # (T, S)
    if valid is None:
        return allowed[None, None]
    own = keys[None, :] == query[:, None]
    return (allowed & (valid[:, None, :] | own))[:, None]  # (B, 1, T, S)


class StreamCache:
    """Token count of a cache: ``end`` on the device (fixed-shape steps read it) and a host copy
    for eager slicing, None after a compiled step (then recovered with one sync)."""

    _tensors: tuple[str, ...] = ()  # names of the per-row tensors (batch first)
    _shared: tuple[str, ...] = ()  # tensors common to all rows (counted in nbytes)

    def _init_stream(self, device: torch.device | str) -> None:
        self.end = static_address(torch.zeros((), dtype=torch.long, device=device))
        self._length: int | None = 0

    @property
    def length(self) -> int:
        if self._length is None:
            self._length = int(self.end)
        return self._length

    def _advance(self, t: int) -> None:
        self.end.add_(t)
        if torch.compiler.is_compiling():
            self._length = None  # a store only: reading it here would specialise the graph
        else:
            self._length = self.length + t

    def rollback(self, n: int) -> int:
        length = self.length
        if not 0 <= n <= length:
            raise ValueError(f"rollback n={n}: must be in [0, {length}] (tokens held)")
        self.end.sub_(n)
        self._length = length - n
        return n

    def reorder(self, rows: Tensor) -> None:
        for name in self._tensors:
            t = getattr(self, name)
            if t is None:
                continue
            if rows.shape[0] != t.shape[0]:  # a new batch size: new buffers
                setattr(self, name, static_address(t.index_select(0, rows)))
                continue
            held = self._held(t)  # in place, written part only: a compiled step keeps its inputs
            held.copy_(held.index_select(0, rows))

    def _held(self, t: Tensor) -> Tensor:
        """The part of per-row tensor ``t`` that holds written tokens (all of it by default)."""
        return t

    @property
    def nbytes(self) -> int:
        tensors = (getattr(self, n) for n in (*self._tensors, *self._shared))
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)


class KVCache(StreamCache):
    """Keys/values of the KV heads only: ``k``, ``v`` (B, H_kv, max_len, D), ``valid`` (B, max_len).

    O(sequence) memory, so it has a ``capacity``. ``valid`` marks real (not left-pad) tokens.
    Cross-attention uses it too, filled once from the encoder memory and then only ``read``.
    """

    _tensors = ("k", "v", "valid")

    def __init__(
        self,
        batch_size: int,
        n_kv_heads: int,
        max_len: int,
        head_dim: int,
        device: torch.device | str,
        dtype: torch.dtype,
    ) -> None:
        shape = (batch_size, n_kv_heads, max_len, head_dim)
        self.k, self.v = new_buffer(shape, device, dtype), new_buffer(shape, device, dtype)
        self.valid = new_buffer((batch_size, max_len), device, torch.bool)
        self.max_len = max_len
        self.has_padding = False  # set once a mask was written; then every read is masked
        self._init_stream(device)

    @property
    def capacity(self) -> int:
        return self.max_len

    def _held(self, t: Tensor) -> Tensor:
        return t.narrow(2 if t.dim() == 4 else 1, 0, self.length)  # k, v: dim 2; valid: dim 1

    def update(
        self, k: Tensor, v: Tensor, valid: Tensor | None
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        """Write k, v (B, H_kv, T, D) and valid (B, T) after the tokens held.

        Returns the keys and values to attend over and the causal mask (B | 1, 1, T, S) of
        the new queries, or None when plain causality needs none (T == 1, or T == S).
        """
        if valid is not None:
            self.has_padding = True
        if fixed_shapes():
            return self._update_fixed(k, v, valid)
        t, start = k.shape[2], self.length
        end = start + t
        if end > self.max_len:
            raise ValueError(
                f"KV cache overflow: it holds max_len={self.max_len} tokens, {start} are used "
                f"and {t} more were given; allocate it with a larger max_len"
            )
        self.k[:, :, start:end] = k
        self.v[:, :, start:end] = v
        self.valid[:, start:end] = True if valid is None else valid
        self._advance(t)
        keys, values = self.k[:, :, :end], self.v[:, :, :end]
        if not self.has_padding and (t == 1 or start == 0):
            return keys, values, None
        slots = torch.arange(end, device=k.device)
        valid_so_far = self.valid[:, :end] if self.has_padding else None
        return keys, values, causal_mask(slots[start:], slots, valid_so_far)

    def _update_fixed(
        self, k: Tensor, v: Tensor, valid: Tensor | None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Same write at slots ``end + arange(T)``; the whole buffer is read, under a mask."""
        t = k.shape[2]
        query = self.end + torch.arange(t, device=k.device)  # (T,) slots of the new tokens
        self.k[:, :, query] = k  # index_put_: compiled, it stays an in-place scatter
        self.v[:, :, query] = v
        self.valid[:, query] = True if valid is None else valid
        self._advance(t)
        slots = torch.arange(self.max_len, device=k.device)
        mask = causal_mask(query, slots, self.valid if self.has_padding else None)
        return self.k, self.v, mask

    def read(self) -> tuple[Tensor, Tensor, Tensor | None]:
        """Keys, values (B, H_kv, S, D) written so far and their validity (B, S) or None (all
        real): what cross-attention attends to at every decoding step."""
        n = self.max_len if fixed_shapes() else self.length
        valid = self.valid[:, :n] if self.has_padding else None
        return self.k[:, :, :n], self.v[:, :, :n], valid
