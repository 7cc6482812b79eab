"""Linformer (``linformer``), Wang et al. 2020, "Linformer: Self-Attention with Linear Complexity".

Keys and values are projected along the sequence before a softmax attention: K' = E K and
V' = F V with E, F (k, max_len) learned, so every query attends over ``k`` rows whatever the
length S: O(S * k) time and memory instead of O(S^2). A sequence of S <= max_len tokens uses
the first S columns; a longer one is an error (E and F have no column for it). E and F are
shared by the heads (the paper's headwise sharing) unless ``per_head_projection``, and F = E
with ``share_kv_projection`` (its key-value sharing).

Padding keys are dropped before the projection and the r-th *real* key of a row takes column
r, so a padded row (left or right) projects exactly like its unpadded self.

Roles: ``bidirectional`` and ``cross`` only. Every projected row mixes all positions, so there
is no causal form (a causal variant would need a projection per prefix). No RoPE: E's columns
are tied to positions, which is where Linformer's order information lives. The encoder role
has no cache (it runs once over the source); the cross role keeps the memory's projected
keys/values (B, H, k, D) in a ``LinformerCrossCache``, computed once per source.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from minillm.attention.base import Attention
from minillm.attention.cache import StreamCache, new_buffer


class LinformerCrossCache(StreamCache):
    """The memory projected along the sequence: ``k``, ``v`` (B, H, k, D), written once by the
    call that is given ``memory`` and read at every decoding step. Its size depends on ``k``,
    not on the source length; ``length`` counts the source tokens it summarises."""

    _tensors = ("k", "v")

    def __init__(
        self,
        batch_size: int,
        n_heads: int,
        rows: int,
        head_dim: int,
        device: torch.device | str,
        dtype: torch.dtype,
    ) -> None:
        shape = (batch_size, n_heads, rows, head_dim)
        self.k, self.v = new_buffer(shape, device, dtype), new_buffer(shape, device, dtype)
        self._init_stream(device)

    @property
    def capacity(self) -> None:
        return None  # decoding never writes to it

    def update(self, source_len: int, k: Tensor, v: Tensor) -> None:
        """Store the projected keys and values (B, H, k, D) of a ``source_len``-token memory."""
        self.k.copy_(k)
        self.v.copy_(v)
        self._advance(source_len)

    def read(self) -> tuple[Tensor, Tensor]:
        return self.k, self.v


class LinformerAttention(Attention):
    roles = ("bidirectional", "cross")

    @dataclass
    class Config:
        k: int = 256  # projected length: every query attends over k rows
        max_len: int = 1024  # longest sequence (encoder input or cross memory); E, F columns
        per_head_projection: bool = False  # an E (and F) per head; False: shared by the heads
        share_kv_projection: bool = False  # F = E
        bias: bool = False

    def __init__(self, cfg: Config, dim: int, n_heads: int, role: str) -> None:
        super().__init__(cfg, dim, n_heads, role)
        if cfg.k < 1 or cfg.max_len < 1:
            raise ValueError(
                f"linformer needs k >= 1 and max_len >= 1, got k={cfg.k}, max_len={cfg.max_len}"
            )
        self.q_proj = nn.Linear(dim, dim, bias=cfg.bias)
        self.k_proj = nn.Linear(dim, dim, bias=cfg.bias)
        self.v_proj = nn.Linear(dim, dim, bias=cfg.bias)
        self.o_proj = nn.Linear(dim, dim, bias=cfg.bias)
        shape = (n_heads if cfg.per_head_projection else 1, cfg.k, cfg.max_len)
        self.e_proj = nn.Parameter(torch.empty(shape))  # E: keys along the sequence
        self.f_proj = None if cfg.share_kv_projection else nn.Parameter(torch.empty(shape))
        self._init_sequence_projections()

    def _init_sequence_projections(self) -> None:
        """N(0, 1/max_len): at full length a projected row has about one key's scale."""
        for p in (self.e_proj, self.f_proj):
            if p is not None:
                nn.init.normal_(p, 0.0, self.cfg.max_len**-0.5)

    def init_weights(self, std: float, out_std: float) -> None:
        super().init_weights(std, out_std)
        self._init_sequence_projections()

    @property
    def value_projection(self) -> Tensor:
        """F (P, k, max_len), P = 1 or H; E itself when shared."""
        return self.e_proj if self.f_proj is None else self.f_proj

    def init_cache(
        self,
        batch_size: int,
        max_len: int,
        device: torch.device | str,
        dtype: torch.dtype,
        lookahead: int = 0,
    ) -> LinformerCrossCache:
        """Cross role only: the projected memory (B, H, k, D); ``max_len`` = source length."""
        if self.role != "cross":
            raise ValueError(
                "linformer keeps no cache in the bidirectional role: an encoder runs once over "
                "the whole source; use it as encoder or cross attention, not as a decoder"
            )
        self._check_length(max_len)
        return LinformerCrossCache(
            batch_size, self.n_heads, self.cfg.k, self.head_dim, device, dtype
        )

    def flops_per_token(self, context: int) -> float:
        """Projections, then per head: E K and F V (2 * k * head_dim each per key token,
        counted per token as the key/value projections are) and attention over the k rows
        (4 * k * head_dim). Independent of ``context``: the cost is linear in length."""
        return self.projection_flops() + 8 * self.n_heads * self.cfg.k * self.head_dim

    def _check_length(self, s: int) -> None:
        if s > self.cfg.max_len:
            raise ValueError(
                f"linformer got a sequence of {s} tokens but its E/F projections cover "
                f"max_len={self.cfg.max_len}; set the attention's max_len >= {s} or shorten it"
            )

    def _heads(self, proj: nn.Linear, x: Tensor) -> Tensor:
        b, t, _ = x.shape
        return proj(x).view(b, t, self.n_heads, self.head_dim).transpose(1, 2)  # (B, H, T, D)

    def _along_sequence(self, y: Tensor, proj: Tensor, mask: Tensor | None) -> Tensor:
        """y (B, H, S, D) -> (B, H, k, D): row j sums the real tokens, the r-th real token of
        a row weighted by ``proj[:, j, r]``; padding tokens add nothing."""
        s = y.shape[2]
        if mask is None:
            return proj[None, :, :, :s] @ y  # (1, P, k, S) @ (B, H, S, D) -> (B, H, k, D)
        rank = (mask.long().cumsum(1) - 1).clamp(min=0)  # (B, S) column of each real token
        cols = proj[:, :, rank].permute(2, 0, 1, 3)  # (B, P, k, S)
        return (cols * mask[:, None, None, :].to(cols.dtype)) @ y  # (B, H, k, D)

    def _projected(self, src: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor]:
        """Keys and values of ``src`` (B, S, dim), projected along the sequence: (B, H, k, D)."""
        self._check_length(src.shape[1])
        k = self._along_sequence(self._heads(self.k_proj, src), self.e_proj, mask)
        v = self._along_sequence(self._heads(self.v_proj, src), self.value_projection, mask)
        return k, v

    def forward(
        self,
        x: Tensor,
        *,
        positions: Tensor,
        cache: LinformerCrossCache | None = None,
        memory: Tensor | None = None,
        mask: Tensor | None = None,
    ) -> Tensor:
        b, t, _ = x.shape
        q = self._heads(self.q_proj, x)  # (B, H, T, D)
        if self.role == "cross" and memory is None:
            k, v = cache.read()  # (B, H, k, D), written by the call given the memory
        else:
            src = memory if self.role == "cross" else x
            k, v = self._projected(src, mask)  # (B, H, k, D)
            if cache is not None:
                cache.update(src.shape[1], k, v)
        y = F.scaled_dot_product_attention(q, k, v)  # (B, H, T, D)
        return self.o_proj(y.transpose(1, 2).reshape(b, t, self.dim))

    def attention_weights(self, x: Tensor, *, positions: Tensor) -> Tensor:
        """Token-mixing weights (B, H, T, T): softmax over the k rows times F's first T
        columns, so ``weights @ v`` is the output before ``o_proj``. Not a distribution:
        F's entries have either sign."""
        if self.role == "cross":
            raise NotImplementedError("attention_weights covers the self-attention roles")
        t = x.shape[1]
        q = self._heads(self.q_proj, x)  # (B, H, T, D)
        k, _ = self._projected(x, None)  # (B, H, k, D)
        rows = (q @ k.transpose(-1, -2) * self.head_dim**-0.5).softmax(-1)  # (B, H, T, k)
        return rows @ self.value_projection[None, :, :, :t]  # (B, H, T, T)
