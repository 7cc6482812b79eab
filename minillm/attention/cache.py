"""Generation caches, one small type per kind of memory an attention kind needs.

All tensors are allocated once with fixed shapes and written by index; the write offset is a
host-side int (``length``), so no step reads a tensor value back to the host. Every cache can
``reorder(beam_indices)`` (beam search) and reports ``nbytes`` (benchmarks, tests).
"""

from __future__ import annotations

import torch
from torch import Tensor


def _tensors_nbytes(*tensors: Tensor | None) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


class KVCache:
    """Keys/values of the KV heads only: ``k``, ``v`` (B, H_kv, max_len, D), ``valid`` (B, max_len).

    Memory grows with ``max_len``: O(sequence). ``valid`` marks real (not left-pad) tokens.
    Cross-attention uses it too, filled once from the encoder memory (``length == S``).
    """

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
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.valid = torch.zeros(batch_size, max_len, device=device, dtype=torch.bool)
        self.max_len = max_len
        self.length = 0
        self.has_padding = False  # set once a mask was written; decides if steps need a mask

    def append(
        self, k: Tensor, v: Tensor, valid: Tensor | None
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        """Write k, v (B, H_kv, T, D) and valid (B, T) at ``length``.

        Returns the keys, values and key mask held so far; the mask is ``None`` while no
        padding was ever written (so unpadded decoding builds no mask at all).
        """
        end = self.length + k.shape[2]
        if end > self.max_len:
            raise ValueError(
                f"KV cache overflow: it holds max_len={self.max_len} tokens, {self.length} are "
                f"used and {k.shape[2]} more were given; allocate it with a larger max_len"
            )
        self.k[:, :, self.length : end] = k
        self.v[:, :, self.length : end] = v
        if valid is None:
            self.valid[:, self.length : end] = True
        else:
            self.valid[:, self.length : end] = valid
            self.has_padding = True
        self.length = end
        key_valid = self.valid[:, :end] if self.has_padding else None
        return self.k[:, :, :end], self.v[:, :, :end], key_valid

    def reorder(self, beam_indices: Tensor) -> None:
        """Row i becomes old row ``beam_indices[i]`` (in place: buffers keep their address)."""
        for t in (self.k, self.v, self.valid):
            t.copy_(t.index_select(0, beam_indices))

    @property
    def nbytes(self) -> int:
        return _tensors_nbytes(self.k, self.v, self.valid)


class RollingKVCache:
    """The last ``window`` keys/values in a ring: ``k``, ``v`` (B, H_kv, window, D).

    Memory is O(window) whatever the sequence length. ``index`` (window,) holds the stream
    index (0, 1, 2, ... over all tokens written) of each slot, -1 while empty; keys are stored
    already rotated (RoPE), so slot order does not matter to a single query.
    """

    def __init__(
        self,
        batch_size: int,
        n_kv_heads: int,
        window: int,
        head_dim: int,
        device: torch.device | str,
        dtype: torch.dtype,
    ) -> None:
        shape = (batch_size, n_kv_heads, window, head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.valid = torch.zeros(batch_size, window, device=device, dtype=torch.bool)
        self.index = torch.full((window,), -1, device=device, dtype=torch.long)
        self.window = window
        self.length = 0
        self.has_padding = False

    def append(self, k: Tensor, v: Tensor, valid: Tensor | None) -> None:
        """Write k, v (B, H_kv, T, D), valid (B, T); only the last ``window`` tokens are kept."""
        t = k.shape[2]
        keep = min(t, self.window)
        first = self.length + t - keep  # stream index of the first token kept
        stream = torch.arange(first, first + keep, device=self.index.device)
        slots = stream % self.window
        self.k[:, :, slots] = k[:, :, t - keep :]
        self.v[:, :, slots] = v[:, :, t - keep :]
        if valid is None:
            self.valid[:, slots] = True
        else:
            self.valid[:, slots] = valid[:, t - keep :]
            self.has_padding = True
        self.index[slots] = stream
        self.length += t

    def reorder(self, beam_indices: Tensor) -> None:
        for t in (self.k, self.v, self.valid):
            t.copy_(t.index_select(0, beam_indices))

    @property
    def nbytes(self) -> int:
        return _tensors_nbytes(self.k, self.v, self.valid, self.index)


class RecurrentState:
    """Fixed-size state of a linear-attention kind, O(1) in sequence length.

    ``state`` (B, H, D_k, D_v) is the running sum of key-value outer products (decayed, for
    gated kinds); ``normalizer`` (B, H, D_k) the running sum of keys, for kinds that divide by
    it. ``length`` counts tokens absorbed (for cross-attention: filled once from the memory).
    """

    def __init__(self, state: Tensor, normalizer: Tensor | None = None) -> None:
        self.state = state
        self.normalizer = normalizer
        self.length = 0

    def reorder(self, beam_indices: Tensor) -> None:
        for t in (self.state, self.normalizer):
            if t is not None:
                t.copy_(t.index_select(0, beam_indices))

    @property
    def nbytes(self) -> int:
        return _tensors_nbytes(self.state, self.normalizer)
