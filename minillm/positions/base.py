"""The interface every positions kind implements (see ``minillm/positions/__init__.py``).

A kind is an ``nn.Module`` with a nested ``Config`` dataclass and a ``mechanism`` saying how
order reaches the model; an attention kind lists the mechanisms it can take
(``Attention.positions_accepted``). The three hooks below default to "do nothing", so each
kind overrides only the one of its mechanism and the callers never branch on a kind's name.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from torch import Tensor, nn

MECHANISMS = ("rotary", "bias", "absolute", "none")


class Positions(nn.Module):
    """Base class. Built once per stack (``build_positions``) and handed to each of its
    attentions, which use it without owning it (a learned table is saved once).

    - ``rotary``: ``rotate(q, k, positions)`` turns queries and keys (attention calls it).
    - ``bias``: ``bias(q_pos, k_pos)`` is added to the attention scores (attention calls it).
    - ``absolute``: ``embed(x, positions)`` adds to the token embeddings (the model calls it).
    - ``none``: nothing (NoPE: order comes from causality alone).
    """

    mechanism: ClassVar[str] = "none"

    @dataclass
    class Config:
        pass

    def __init__(self, cfg: Any, dim: int, n_heads: int, max_len: int, causal: bool) -> None:
        super().__init__()
        self.cfg = cfg
        self.dim, self.n_heads, self.max_len, self.causal = dim, n_heads, max_len, causal

    @property
    def max_positions(self) -> int | None:
        """Most positions it can encode (a table's rows); None: any."""
        return None

    def init_weights(self, std: float) -> None:
        """Normal(0, std) for learned tables; kinds without parameters have nothing to do."""

    def rotate(
        self, q: Tensor, k: Tensor, positions: Tensor, seq_dim: int = 2
    ) -> tuple[Tensor, Tensor]:
        """q, k (B, H, T, D) (or (B, T, H, D) with ``seq_dim=1``) at ``positions`` (B, T)."""
        return q, k

    def bias(self, q_pos: Tensor, k_pos: Tensor) -> Tensor | None:
        """Float score bias (*, H, T, S) for query positions (*, T) and key positions (*, S),
        a function of ``q_pos - k_pos`` only; None: no bias."""
        return None

    def embed(self, x: Tensor, positions: Tensor) -> Tensor:
        """Token embeddings x (B, T, dim) with the positions (B, T) added."""
        return x
