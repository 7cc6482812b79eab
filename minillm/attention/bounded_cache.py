"""Caches of bounded size, on the ``Cache`` protocol of ``minillm/attention/cache.py``: the
rolling window of ``local`` (O(window) memory), ``sparse``'s global tokens + rolling window, and
the recurrent state of the linear kinds (O(1) in the sequence length). All decode past
``max_len``, so their ``capacity`` is None.
"""

from __future__ import annotations

import torch
from torch import Tensor

from minillm.attention.cache import StreamCache, fixed_shapes, new_buffer, static_address


class RollingKVCache(StreamCache):
    """The last ``window`` keys/values in a ring of ``window + lookahead`` slots: ``k``, ``v``
    (B, H_kv, slots, D), ``valid`` (B, slots), ``index`` (slots,) the stream index (0, 1, 2, ...
    over all tokens written) of each slot, -1 while empty. A subclass may keep ``first`` fixed
    slots before the ring (``SparseKVCache``'s global tokens).

    Memory is O(window) whatever the sequence length, so ``capacity`` is None: it decodes
    past any max_len. Keys are stored already rotated (RoPE). ``lookahead`` spare slots let a
    step write that many extra tokens and ``rollback`` them (speculative decoding).
    """

    _tensors = ("k", "v", "valid")
    _shared = ("index",)
    first = 0  # slots before the ring
    name = "a rolling cache"  # in messages

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
        self.ring = window + lookahead
        self.slots = self.first + self.ring
        shape = (batch_size, n_kv_heads, self.slots, head_dim)
        self.k, self.v = new_buffer(shape, device, dtype), new_buffer(shape, device, dtype)
        self.valid = new_buffer((batch_size, self.slots), device, torch.bool)
        index = torch.cat((torch.arange(self.first), torch.full((self.ring,), -1))).to(device)
        self.index = static_address(index)
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
            slots = self.first + stream % self.ring
            held = (self.index[slots] == stream) & (stream >= 0)  # (P,) still in the ring
            ctx_valid = self.valid[:, slots] & held  # (B, P)
        else:
            held = min(self.length, before)
            stream = torch.arange(self.length - held, self.length, device=k.device)
            slots = self.first + stream % self.ring
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
        """Only the last ``ring`` of the T new tokens are kept."""
        t = k.shape[2]
        keep = min(t, self.ring)
        stream = self.end + (t - keep) + torch.arange(keep, device=k.device)  # (keep,)
        slots = self.first + stream % self.ring
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
                f"rollback n={n}: {self.name} can take back at most lookahead="
                f"{self.lookahead} tokens; allocate it with a larger lookahead"
            )
        return super().rollback(n)


class RecurrentState(StreamCache):
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


class SparseKVCache(RollingKVCache):
    """``sparse``'s cache: the row's global tokens plus a rolling window, O(window) memory.

    ``RollingKVCache`` over the last ``local`` tokens, after ``first = n_global`` fixed slots:
    slot j < n_global holds the row's token at position j (written once, when it arrives);
    there ``index`` is the position, in the ring the stream index (-1 while empty).

    Global slots are read under ``position < query position - (local - 1)`` (nearer ones are in
    the ring), so a rolled-back global token is invisible until its position is written again.
    """

    name = "a sparse cache"

    def __init__(
        self,
        batch_size: int,
        n_kv_heads: int,
        n_global: int,
        local: int,
        head_dim: int,
        device: torch.device | str,
        dtype: torch.dtype,
        lookahead: int = 0,
    ) -> None:
        self.n_global = self.first = n_global
        super().__init__(batch_size, n_kv_heads, local, head_dim, device, dtype, lookahead)

    def update(  # type: ignore[override]
        self, k: Tensor, v: Tensor, valid: Tensor | None, positions: Tensor
    ) -> tuple[Tensor, Tensor, Tensor | None, Tensor, Tensor, Tensor]:
        """Write k, v (B, H_kv, T, D), valid (B, T) at ``positions`` (B, T). Returns, oldest
        first, the ``local - 1`` ring tokens before the new ones and the new ones: keys, values
        (B, H_kv, P + T, D), validity (B, P + T) or None; then the global slots (new tokens
        included): keys, values (B, H_kv, n_global, D) and validity (B, n_global)."""
        keys, values, key_valid = super().update(k, v, valid)
        self._write_globals(k, v, valid, positions)
        g = self.n_global
        return keys, values, key_valid, self.k[:, :, :g], self.v[:, :, :g], self.valid[:, :g]

    def _write_globals(self, k: Tensor, v: Tensor, valid: Tensor | None, positions: Tensor) -> None:
        """Slot j takes the real new token at position j, if any (no host sync, no scatter
        with repeated indices: padding tokens share position 0 with the first real one)."""
        g = self.n_global
        sel = positions[:, :, None] == torch.arange(g, device=k.device)  # (B, T, g)
        if valid is not None:
            sel = sel & valid[:, :, None]
        found = sel.any(1)  # (B, g)
        new_k = torch.einsum("btg,bhtd->bhgd", sel.to(k.dtype), k)  # (B, H_kv, g, D)
        new_v = torch.einsum("btg,bhtd->bhgd", sel.to(v.dtype), v)
        keep = found[:, None, :, None]
        self.k[:, :, :g] = torch.where(keep, new_k, self.k[:, :, :g])
        self.v[:, :, :g] = torch.where(keep, new_v, self.v[:, :, :g])
        self.valid[:, :g] |= found
