"""Learned absolute positions (``learned``; GPT-2, BERT): a table of ``max_len`` rows, row p
added to the embedding of the token at position p. Attention is untouched, so every kind takes
it. Positions past the table have no row: a longer input is an error, and generation stops at
``max_len`` tokens (left padding does not count: positions start at each row's first token).
"""

from __future__ import annotations

from torch import Tensor, nn

from minillm.positions.base import Positions


class LearnedPositions(Positions):
    mechanism = "absolute"

    def __init__(
        self, cfg: Positions.Config, dim: int, n_heads: int, max_len: int, causal: bool
    ) -> None:
        super().__init__(cfg, dim, n_heads, max_len, causal)
        self.table = nn.Embedding(max_len, dim)  # (max_len, dim)
        nn.init.zeros_(self.table.weight)

    @property
    def max_positions(self) -> int:
        return self.max_len

    def init_weights(self, std: float) -> None:
        nn.init.normal_(self.table.weight, 0.0, std)

    def embed(self, x: Tensor, positions: Tensor) -> Tensor:
        t = positions.shape[-1]
        if t > self.max_len:
            raise ValueError(
                f"input of {t} tokens is longer than the learned position table's "
                f"max_len={self.max_len} rows; shorten the input or train with a larger "
                "model.max_len (or choose relative positions: rope, alibi, t5)"
            )
        return x + self.table(positions)  # (B, T, dim)
