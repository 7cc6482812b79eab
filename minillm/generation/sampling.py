"""Logits processing and sampling, all on device: no ``.item()``, no host branching on values.

Shapes: ``B`` rows (prompts x samples), ``V`` vocabulary. Every function takes and returns
(B, V) logits; filtered-out tokens get ``-inf``.
"""

from __future__ import annotations

from collections.abc import Callable
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
        checks = (
            ("temperature", self.temperature >= 0, "must be >= 0 (0 = greedy)"),
            ("top_k", self.top_k is None or self.top_k >= 0, "must be >= 0 (0 or None = off)"),
            ("top_p", 0.0 < self.top_p <= 1.0, "must be in (0, 1] (1 = off)"),
            ("repetition_penalty", self.repetition_penalty > 0, "must be > 0 (1 = off)"),
        )
        check_options(self, checks)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def check_options(cfg: object, checks: tuple[tuple[str, bool, str], ...]) -> None:
    """Raise ``ValueError("key=value: what works")`` for the first failed (key, ok, what)."""
    for name, ok, what in checks:
        if not ok:
            raise ValueError(f"{name}={getattr(cfg, name)!r}: {what}")


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


class Sampler:
    """Greedy decoding and sampling as a ``Search``: rows are prompts x ``num_samples``
    (prompt-major), expanded from the prefilled prompts at the first choice.

    One host sync per step (the new tokens) drives the bookkeeping: EOS (not kept), each
    row's cap (``max_new_tokens``, or the context), and ``on_token(row, tokens_so_far)``
    (streaming, stop strings; True stops the row). Finished rows keep being fed (their
    tokens are ignored) so the batch keeps its shape.
    """

    def __init__(
        self,
        cfg: SamplingConfig,
        caps: list[int],
        num_samples: int = 1,
        *,
        eos_id: int | None = None,
        on_token: Callable[[int, list[int]], bool] | None = None,
        generator: torch.Generator | None = None,
        seen: Tensor | None = None,
    ) -> None:
        self.cfg, self.caps, self.num_samples = cfg, caps, num_samples
        self.eos_id, self.on_token, self.generator = eos_id, on_token, generator
        self.seen = seen  # (P, V) tokens in each prompt, for the repetition penalty
        self.out: list[list[int]] = [[] for _ in caps]
        self.live = list(range(len(caps)))
        self.done = False
        self._expanded = num_samples == 1

    def choose(self, logits: Tensor) -> tuple[Tensor, Tensor | None]:
        rows = None
        if not self._expanded:  # (P, V) prompts -> (P * num_samples, V) rows
            rows = torch.arange(logits.shape[0], device=logits.device)
            rows = rows.repeat_interleave(self.num_samples)
            logits = logits[rows]
            self.seen = None if self.seen is None else self.seen[rows]
            self._expanded = True
        tokens = sample(process_logits(logits, self.cfg, self.seen), self.cfg, self.generator)
        if self.seen is not None:
            self.seen.scatter_(-1, tokens[:, None], True)
        self.record(tokens.tolist())  # the one host sync per step
        return tokens, rows

    def record(self, new: list[int]) -> None:
        """Take each live row's next token (also used by speculative decoding)."""
        self.live = [r for r in self.live if self._push(r, new[r])]
        self.done = not self.live

    def _push(self, row: int, token: int) -> bool:
        """Append ``token`` to row ``row``; False when the row is finished."""
        if token == self.eos_id:
            return False
        self.out[row].append(token)
        stop = self.on_token is not None and self.on_token(row, self.out[row])
        return not stop and len(self.out[row]) < self.caps[row]
