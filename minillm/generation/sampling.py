"""Logits processing and sampling, all on device: no ``.item()``, no host branching on values.

Shapes: ``B`` rows (prompts x samples), ``V`` vocabulary. Every function takes and returns
(B, V) logits; filtered-out tokens get ``-inf``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class SamplingConfig:
    """How the next token is chosen from the logits. ``temperature=0`` is greedy."""

    temperature: float = 1.0
    top_k: int | None = None  # None or 0: off
    top_p: float = 1.0  # 1.0: off
    repetition_penalty: float = 1.0  # 1.0: off; > 1 discourages tokens already in the row

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if self.top_k is not None and self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 or None = off), got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1] (1 = off), got {self.top_p}")
        if self.repetition_penalty <= 0:
            raise ValueError(
                f"repetition_penalty must be > 0 (1 = off), got {self.repetition_penalty}"
            )

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def apply_repetition_penalty(logits: Tensor, seen: Tensor, penalty: float) -> Tensor:
    """CTRL's penalty (Keskar et al. 2019): seen tokens' logits divided by ``penalty`` if
    positive, multiplied if negative. ``seen`` (B, V) bool marks tokens already in the row."""
    penalized = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalized, logits)


def top_k_filter(logits: Tensor, k: int) -> Tensor:
    """Keep exactly the ``k`` largest logits per row (ties broken by index), -inf elsewhere."""
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    keep = torch.zeros_like(logits, dtype=torch.bool)
    keep.scatter_(-1, logits.topk(k, dim=-1).indices, True)
    return logits.masked_fill(~keep, float("-inf"))


def top_p_filter(logits: Tensor, p: float) -> Tensor:
    """Nucleus filter (Holtzman et al. 2019): keep the smallest set of most likely tokens whose
    probability mass is >= ``p``; the most likely token is always kept."""
    if p >= 1.0:
        return logits
    sorted_logits, order = logits.sort(dim=-1, descending=True)  # (B, V)
    probs = sorted_logits.softmax(-1)
    mass_before = probs.cumsum(-1) - probs  # mass of the strictly more likely tokens
    drop_sorted = mass_before >= p  # already >= p without this token: not needed
    drop = torch.zeros_like(drop_sorted).scatter_(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def process_logits(logits: Tensor, cfg: SamplingConfig, seen: Tensor | None = None) -> Tensor:
    """Repetition penalty, temperature, top-k, top-p, in that order (as HF does)."""
    logits = logits.float()
    if cfg.repetition_penalty != 1.0 and seen is not None:
        logits = apply_repetition_penalty(logits, seen, cfg.repetition_penalty)
    if cfg.greedy:
        return logits
    if cfg.temperature != 1.0:
        logits = logits / cfg.temperature
    if cfg.top_k:
        logits = top_k_filter(logits, cfg.top_k)
    return top_p_filter(logits, cfg.top_p)


def sample(logits: Tensor, cfg: SamplingConfig, generator: torch.Generator | None = None) -> Tensor:
    """Next token ids (B,) from processed logits (B, V), without a host sync.

    Sampling uses the exponential-race trick (argmax of p / E with E ~ Exp(1) is a draw from
    p), which, unlike ``torch.multinomial``, never synchronizes with the host.
    """
    if cfg.greedy:
        return logits.argmax(-1)
    probs = logits.softmax(-1)
    noise = torch.empty_like(probs).exponential_(1.0, generator=generator)
    return (probs / noise).argmax(-1)


def mark_seen(seen: Tensor, tokens: Tensor, valid: Tensor | None = None) -> Tensor:
    """Set ``seen[b, tokens[b, t]] = True`` (in place) where ``valid`` (B, T); returns ``seen``."""
    if valid is None:
        return seen.scatter_(-1, tokens, True)
    counts = torch.zeros(seen.shape, dtype=torch.int32, device=seen.device)
    counts.scatter_add_(-1, tokens, valid.to(torch.int32))  # duplicates add, padding adds 0
    return seen.logical_or_(counts > 0)
