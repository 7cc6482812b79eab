"""The one block class both models are built from (pre-norm; RMSNorm, SwiGLU by default).

Decoder-only: causal self-attention. Encoder: bidirectional self-attention. Encoder-decoder's
decoder: causal self-attention plus cross-attention over the encoder memory.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from minillm.attention import Cache, build_attention
from minillm.attention.cache import static_address
from minillm.models.config import NORMS, ModelConfig
from minillm.models.mlp import build_mlp
from minillm.positions import Positions, build_positions


class Block(nn.Module):
    def __init__(
        self, cfg: ModelConfig, attn: Any, role: str, cross_attn: Any | None = None
    ) -> None:
        super().__init__()
        self.attn_norm = build_norm(cfg)
        self.attn = build_attention(attn, cfg.dim, cfg.n_heads, role)
        self.cross_norm = self.cross_attn = None
        if cross_attn is not None:
            self.cross_norm = build_norm(cfg)
            self.cross_attn = build_attention(cross_attn, cfg.dim, cfg.n_heads, "cross")
        self.mlp_norm = build_norm(cfg)
        self.mlp = build_mlp(cfg.mlp, cfg.dim, cfg.hidden)
        self.dropout = dropout(cfg.dropout)

    def forward(
        self,
        x: Tensor,
        *,
        positions: Tensor,
        mask: Tensor | None = None,
        cache: tuple[Any, Any] | None = None,
        memory: Tensor | None = None,
        memory_mask: Tensor | None = None,
        past: Tensor | None = None,
    ) -> Tensor:
        """x (B, T, dim) -> (B, T, dim). ``cache`` is (self cache, cross cache or None).

        ``past`` (B, M, dim): Transformer-XL memory, the hidden states that entered this block
        before ``x`` (detached by the caller). It sits left of ``x`` like left padding: then
        ``mask`` (B, M + T) and ``positions`` (B, M + T) cover the concatenation (False for
        slots holding no memory). The memory's own query rows are computed and dropped (every
        causal kind works unchanged; the attention costs (M + T) / T of a plain one).
        """
        self_cache, cross_cache = cache if cache is not None else (None, None)
        t = x.shape[1]
        full = x if past is None else torch.cat((past, x), dim=1)  # (B, M + T, dim)
        h = self.attn(self.attn_norm(full), positions=positions, cache=self_cache, mask=mask)
        x = x + self.dropout(h[:, -t:])  # (B, T, dim)
        if self.cross_attn is not None:
            h = self.cross_attn(
                self.cross_norm(x),
                positions=positions,
                cache=cross_cache,
                memory=memory,
                mask=memory_mask,
            )
            x = x + self.dropout(h)
        return x + self.dropout(self.mlp(self.mlp_norm(x)))

    def init_cache(
        self,
        batch_size: int,
        max_len: int,
        device: torch.device | str,
        dtype: torch.dtype,
        memory_len: int | None = None,
        lookahead: int = 0,
    ) -> tuple[Cache, Cache | None]:
        self_cache = self.attn.init_cache(batch_size, max_len, device, dtype, lookahead)
        cross_cache = None
        if self.cross_attn is not None:
            if memory_len is None:
                raise ValueError("a block with cross-attention needs memory_len for its cache")
            cross_cache = self.cross_attn.init_cache(batch_size, memory_len, device, dtype)
        return self_cache, cross_cache


def build_norm(cfg: ModelConfig) -> nn.Module:
    """A ``model.norm`` over ``dim`` features (RMSNorm, or LayerNorm with a bias): every norm of
    every model, inside the blocks and after them."""
    return NORMS[cfg.norm](cfg.dim, eps=cfg.norm_eps)


def dropout(p: float) -> nn.Module:
    """``nn.Dropout(p)``, or ``nn.Identity`` when p = 0: a decode step calls it 2-3 times a
    block, and even an inactive Dropout costs a dispatch each time."""
    return nn.Dropout(p) if p else nn.Identity()


def init_block_weights(blocks: nn.ModuleList, std: float, n_layers: int) -> None:
    """GPT-2 init: N(0, std), output projections scaled by 1/sqrt(2 * n_layers)."""
    out_std = std / (2 * n_layers) ** 0.5
    for block in blocks:
        for attn in (block.attn, block.cross_attn):
            if attn is not None:
                attn.init_weights(std, out_std)
        block.mlp.init_weights(std, out_std)


def stack_positions(cfg: ModelConfig, blocks: nn.ModuleList, causal: bool) -> Positions | None:
    """The positions module of one stack (``model.positions``), handed to the self-attention of
    each of its ``blocks`` (one T5 table per stack, as in T5); None when ``model.positions`` is
    null: each kind keeps its own default (RoPE where it takes rotations, else none).
    Cross-attention keeps no positions: query and memory positions are not aligned."""
    if cfg.positions is None:
        return None
    module = build_positions(cfg.positions, cfg.dim, cfg.n_heads, cfg.max_len, causal)
    module.init_weights(cfg.init_std)
    for block in blocks:
        block.attn.use_positions(module)
    return module


def embed_positions(x: Tensor, module: Positions | None, positions: Tensor) -> Tensor:
    """Token embeddings x (B, T, dim) plus absolute positions (a learned table), if any."""
    return x if module is None else module.embed(x, positions)


def positions_from_mask(
    mask: Tensor | None, batch_size: int, t: int, device: torch.device
) -> Tensor:
    """(B, T) positions: 0, 1, ... from each row's first real token (left padding -> 0)."""
    if mask is None:
        return torch.arange(t, device=device).expand(batch_size, t)
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


@dataclass
class DecodeState:
    """What a batch carries between a model's ``step`` calls (returned by its ``start``).

    Cached: ``caches`` holds one (self cache, cross cache or None) pair per block. Slow twin
    (``caches`` None): every decoder input so far (``tokens``, ``mask``) and the encoder
    output, run in full at each step. Rows are whatever the generation loop makes of them
    (prompts, samples, beams); ``reorder`` moves every per-row tensor and cache along.
    """

    positions: Tensor  # (B, 1) position of each row's next token
    capacity: int | None  # most tokens (prompt + new) a row may hold; None: no limit
    caches: list[tuple[Cache, Cache | None]] | None = None
    tokens: Tensor | None = None  # (B, t) slow twin: every decoder input so far
    mask: Tensor | None = None  # (B, t) slow twin: real tokens of ``tokens``, None if all
    memory: Tensor | None = None  # (B, S, dim) slow twin: encoder output
    memory_mask: Tensor | None = None  # (B, S) slow twin: real source tokens

    def __post_init__(self) -> None:
        self.positions = static_address(self.positions.clone())  # advanced in place

    def _cache_list(self) -> list[Cache]:
        return [c for pair in self.caches or () for c in pair if c is not None]

    @property
    def nbytes(self) -> int:
        held = (self.tokens, self.mask, self.memory, self.memory_mask)
        return sum(c.nbytes for c in self._cache_list()) + sum(
            t.numel() * t.element_size() for t in held if t is not None
        )

    def reorder(self, rows: Tensor) -> None:
        """Row i becomes old row ``rows[i]``; ``rows`` may change the number of rows (a
        prefilled batch expanding into samples or beams)."""
        if rows.shape[0] == self.positions.shape[0]:
            self.positions.copy_(self.positions.index_select(0, rows))
        else:
            self.positions = static_address(self.positions.index_select(0, rows))
        for name in ("tokens", "mask", "memory", "memory_mask"):
            if getattr(self, name) is not None:
                setattr(self, name, getattr(self, name).index_select(0, rows))
        for cache in self._cache_list():
            cache.reorder(rows)

    def rollback(self, n: int) -> int:
        """Forget the last ``n`` tokens of every row (speculative decoding's rejected drafts).

        Returns how many tokens before them had to go too (a recurrent state only returns to
        a saved point); the caller feeds those again with ``step``.
        """
        caches = [pair[0] for pair in self.caches or ()]  # cross caches hold the source
        done = [c.rollback(n) for c in caches]
        back = max(done, default=n)
        for cache, m in zip(caches, done, strict=True):
            if m < back and cache.rollback(back - m) != back - m:
                raise ValueError(f"caches disagree on how far back they can roll: {done}")
        self.positions.sub_(back)
        if self.tokens is not None and back:
            self.tokens = self.tokens[:, :-back]
            self.mask = None if self.mask is None else self.mask[:, :-back]
        return back - n

    def next_positions(self, t: int) -> Tensor:
        """Positions (B, T) of ``t`` new tokens; moves the state past them."""
        positions = self.positions + torch.arange(t, device=self.positions.device)  # (B, T)
        self.positions.add_(t)
        return positions

    def extend(self, tokens: Tensor) -> None:
        """Slow twin: append ``tokens`` (B, T) to the inputs run at each step."""
        self.tokens = torch.cat((self.tokens, tokens), dim=1)
        if self.mask is not None:
            self.mask = torch.cat((self.mask, torch.ones_like(tokens, dtype=torch.bool)), dim=1)
        self.positions.add_(tokens.shape[1])


def decode_capacity(
    caches: list[tuple[Cache, Cache | None]], max_len: int, positions: Positions | None = None
) -> int | None:
    """The model's context ``max_len`` if some self-attention cache fills up (grows with the
    sequence) or the positions have a table of ``max_len`` rows (learned), else None: O(window)
    and O(1) caches decode past it (relative positions take any distance; quality past the
    trained length is another matter)."""
    bounded = positions is not None and positions.max_positions is not None
    return max_len if bounded or any(c.capacity is not None for c, _ in caches) else None
