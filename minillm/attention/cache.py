"""Generation caches: the ``Cache`` protocol and one small type per kind of memory.

Code outside a kind sees a cache only through the protocol: ``length``, ``capacity``,
``nbytes``, ``reorder(rows)`` and ``rollback(n)``. ``update(...)`` belongs to each type and its
kind: the kind hands over what the new tokens add and gets back what its queries read.

Two ways to read, same results:

- eager (host ints): slices to the tokens written, no mask when there is no padding;
- fixed-shape, while ``torch.compile`` traces or inside ``fixed_shape_decoding()``: whole
  buffers plus masks, write offsets taken from the device tensor ``end``, so a decode step has
  the same shapes at every position and compiles once (and CUDA graphs can replay it).

Buffers are allocated once and written in place; ``reorder`` keeps their addresses unless it
changes the batch size (beams or samples expanding from a prefilled batch).
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


def _buffer(shape: tuple[int, ...], device: torch.device | str, dtype: torch.dtype) -> Tensor:
    return static_address(torch.zeros(shape, device=device, dtype=dtype))


def causal_mask(query: Tensor, keys: Tensor, valid: Tensor | None) -> Tensor:
    """Bool mask (B | 1, 1, T, S): query slot ``query[t]`` sees key slots ``keys[s] <= it`` that
    are ``valid`` (B, S). A query always sees itself, so a padding query stays finite."""
    allowed = keys[None, :] <= query[:, None]  # (T, S)
    if valid is None:
        return allowed[None, None]
    own = keys[None, :] == query[:, None]
    return (allowed & (valid[:, None, :] | own))[:, None]  # (B, 1, T, S)


class _Stream:
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


class KVCache(_Stream):
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
        self.k, self.v = _buffer(shape, device, dtype), _buffer(shape, device, dtype)
        self.valid = _buffer((batch_size, max_len), device, torch.bool)
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


class RollingKVCache(_Stream):
    """The last ``window`` keys/values in a ring of ``window + lookahead`` slots: ``k``, ``v``
    (B, H_kv, slots, D), ``valid`` (B, slots), ``index`` (slots,) the stream index (0, 1, 2, ...
    over all tokens written) of each slot, -1 while empty.

    Memory is O(window) whatever the sequence length, so ``capacity`` is None: it decodes
    past any max_len. Keys are stored already rotated (RoPE). ``lookahead`` spare slots let a
    step write that many extra tokens and ``rollback`` them (speculative decoding).
    """

    _tensors = ("k", "v", "valid")
    _shared = ("index",)

    def __init__(
        self,
        batch_size: int,
        n_kv_heads: int,
        window: int,
        head_dim: int,
        device: torch.device | str,
        dtype: torch.dtype,
        lookahead: int = 0,
    ) -> None:
        self.window, self.lookahead = window, lookahead
        self.slots = window + lookahead
        shape = (batch_size, n_kv_heads, self.slots, head_dim)
        self.k, self.v = _buffer(shape, device, dtype), _buffer(shape, device, dtype)
        self.valid = _buffer((batch_size, self.slots), device, torch.bool)
        self.index = static_address(torch.full((self.slots,), -1, device=device, dtype=torch.long))
        self.has_padding = False
        self._init_stream(device)

    @property
    def capacity(self) -> None:
        return None

    def update(
        self, k: Tensor, v: Tensor, valid: Tensor | None
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        """Write k, v (B, H_kv, T, D), valid (B, T); return, oldest first, the ``window - 1``
        tokens before them (fewer in eager mode while fewer were written) and the new ones:
        keys, values (B, H_kv, P + T, D) and their validity (B, P + T), or None if all real."""
        before = self.window - 1
        new_valid = valid
        if valid is not None:
            self.has_padding = True
        if fixed_shapes():  # always ``before`` slots; the ones not (or no longer) held are masked
            stream = self.end - before + torch.arange(before, device=k.device)  # (P,)
            slots = stream % self.slots
            held = (self.index[slots] == stream) & (stream >= 0)  # (P,) still in the ring
            ctx_valid = self.valid[:, slots] & held  # (B, P)
        else:
            held = min(self.length, before)
            stream = torch.arange(self.length - held, self.length, device=k.device)
            slots = stream % self.slots
            ctx_valid = self.valid[:, slots] if self.has_padding else None
        k_ctx, v_ctx = self.k[:, :, slots], self.v[:, :, slots]  # (B, H_kv, P, D)
        key_valid = None
        if ctx_valid is not None:
            if new_valid is None:
                new_valid = torch.ones(k.shape[0], k.shape[2], dtype=torch.bool, device=k.device)
            key_valid = torch.cat((ctx_valid, new_valid), dim=1)  # (B, P + T)
        self._write(k, v, valid)
        return torch.cat((k_ctx, k), dim=2), torch.cat((v_ctx, v), dim=2), key_valid

    def _write(self, k: Tensor, v: Tensor, valid: Tensor | None) -> None:
        """Only the last ``slots`` of the T new tokens are kept."""
        t = k.shape[2]
        keep = min(t, self.slots)
        stream = self.end + (t - keep) + torch.arange(keep, device=k.device)  # (keep,)
        slots = stream % self.slots
        self.k.index_copy_(2, slots, k[:, :, t - keep :])
        self.v.index_copy_(2, slots, v[:, :, t - keep :])
        if valid is None:
            valid = torch.ones(k.shape[0], t, dtype=torch.bool, device=k.device)
        self.valid.index_copy_(1, slots, valid[:, t - keep :])
        self.index.index_copy_(0, slots, stream)
        self._advance(t)

    def rollback(self, n: int) -> int:
        """Forget the last ``n <= lookahead`` tokens. A step writes at most lookahead + 1
        tokens, so the slots it took held tokens older than any later query's window, and
        the window before the forgotten tokens is intact."""
        if n > self.lookahead:
            raise ValueError(
                f"rollback n={n}: a rolling cache can take back at most lookahead="
                f"{self.lookahead} tokens; allocate it with a larger lookahead"
            )
        return super().rollback(n)


class RecurrentState(_Stream):
    """Fixed-size state of a linear-attention kind, O(1) in sequence length (``capacity`` None).

    ``state`` (B, H, D_k, D_v) is the running sum of key-value outer products (decayed, for
    gated kinds); ``normalizer`` (B, H, D_k) the running sum of keys, for kinds that divide by
    it. For cross-attention it holds the memory's summary, written once.

    A sum cannot be taken apart, so with ``lookahead > 0`` each ``update`` first saves the
    state it replaces (the last ``lookahead + 1`` are kept, O(lookahead) memory) and
    ``rollback`` returns to the newest saved point at or before the tokens to forget: exactly
    there after one-token steps, further back (to re-feed) after a multi-token step.
    """

    _tensors = ("state", "normalizer")

    def __init__(self, state: Tensor, normalizer: Tensor | None = None, lookahead: int = 0) -> None:
        self.state = static_address(state)
        self.normalizer = None if normalizer is None else static_address(normalizer)
        self.lookahead = lookahead
        self.saved: list[tuple[int, Tensor, Tensor | None]] = []  # (length, state, normalizer)
        self._init_stream(state.device)

    @property
    def capacity(self) -> None:
        return None

    def update(self, t: int, state: Tensor, normalizer: Tensor | None = None) -> None:
        """The state (and normalizer) after absorbing ``t`` more tokens."""
        if self.lookahead:
            z = None if self.normalizer is None else self.normalizer.clone()
            self.saved = [*self.saved[-self.lookahead :], (self.length, self.state.clone(), z)]
        self.state.copy_(state)
        if normalizer is not None:
            self.normalizer.copy_(normalizer)
        self._advance(t)

    def rollback(self, n: int) -> int:
        if n == 0:
            return 0
        target = self.length - n
        while self.saved and self.saved[-1][0] > target:
            self.saved.pop()
        if not self.saved:
            raise ValueError(
                f"rollback n={n}: this recurrent state saved no point that far back; build it "
                f"with a larger lookahead (it has {self.lookahead})"
            )
        length, state, normalizer = self.saved.pop()
        self.state.copy_(state)
        if normalizer is not None:
            self.normalizer.copy_(normalizer)
        back = self.length - length
        super().rollback(back)
        return back

    def reorder(self, rows: Tensor) -> None:
        super().reorder(rows)
        self.saved = [
            (n, s.index_select(0, rows), None if z is None else z.index_select(0, rows))
            for n, s, z in self.saved
        ]

    @property
    def nbytes(self) -> int:
        held = [t for _, s, z in self.saved for t in (s, z) if t is not None]
        return super().nbytes + sum(t.numel() * t.element_size() for t in held)
