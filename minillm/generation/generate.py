"""Token-level generation for any architecture: ``generate_ids`` and ``GenerationConfig``.

Prompts are left-padded into batches; the model's ``start`` prefills them (an
encoder-decoder also encodes ``sources``), then the one loop of ``loop.py`` runs a
``Sampler`` (greedy, sampling) or a ``BeamSearch`` (``num_beams > 1``) over ``step``.
``use_cache=False`` makes every step a full forward: the slow twin the tests compare to.

Context: the state's ``capacity`` (the model's ``max_len`` when a cache fills up, None for
O(window) / O(1) caches) bounds prompt + new tokens per row. A prompt that leaves no room is an
error unless ``truncate="left"``, and a row stops (with a warning) when it fills the context.
The prompt check needs the state, so a batch with a prompt too long is prefilled once for
nothing before the error (or the truncated retry).
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

import torch
from torch import Tensor, nn

from minillm.generation.beam import BeamSearch
from minillm.generation.loop import decode, step_function
from minillm.generation.sampling import Sampler, SamplingConfig, check_options, mark_seen
from minillm.generation.speculative import speculative_decode

TRUNCATE = (None, "left")
Scored = tuple[list[list[int]], list[float | None]]  # tokens per output row, beam scores


@dataclass
class GenerationConfig(SamplingConfig):
    """Decoding options (sampling ones inherited from ``SamplingConfig``)."""

    max_new_tokens: int = 64
    seed: int | None = None  # None: the global torch RNG
    num_samples: int = 1  # completions per prompt (rows prompt-major)
    stop: list[str] = field(default_factory=list)  # stop strings, cut from the returned text
    use_cache: bool = True  # False: full forward each step (slow twin)
    compile: bool = False  # torch.compile the decode step only
    truncate: str | None = None  # "left": drop the oldest prompt tokens to fit the context
    batch_size: int = 32  # rows per forward when there are many prompts x samples (x beams)
    num_beams: int = 1  # > 1: beam search (temperature, top_k, top_p do not apply)
    length_penalty: float = 1.0  # beam scores are log-prob / length ** length_penalty
    early_stopping: bool = True  # beam: stop a prompt once num_beams hypotheses ended
    n_best: int = 1  # beam: hypotheses returned per prompt, best first
    draft_k: int = 4  # speculative decoding (a draft_model given): proposals per round

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        checks = (
            ("truncate", self.truncate in TRUNCATE, f"must be one of {TRUNCATE}"),
            ("max_new_tokens", self.max_new_tokens >= 0, "must be >= 0"),
            ("num_samples", self.num_samples >= 1, "must be >= 1"),
            ("batch_size", self.batch_size >= 1, "must be >= 1"),
            ("num_beams", self.num_beams >= 1, "must be >= 1 (1 = no beam search)"),
            ("n_best", 1 <= self.n_best <= self.num_beams, "must be in [1, num_beams]"),
            ("draft_k", self.draft_k >= 1, "must be >= 1"),
            ("num_samples", self.num_samples == 1 or self.num_beams == 1,
             "must be 1 with num_beams > 1 (n_best gives several hypotheses)"),
        )  # fmt: skip
        check_options(self, checks)

    @property
    def outputs_per_prompt(self) -> int:
        return self.n_best if self.num_beams > 1 else self.num_samples

    @classmethod
    def from_options(cls, options: dict[str, Any]) -> GenerationConfig:
        names = sorted(f.name for f in fields(cls))
        unknown = sorted(set(options) - set(names))
        if unknown:
            raise ValueError(f"unknown generation option(s) {unknown}; valid: {names}")
        return cls(**options)


def check_speculative(cfg: GenerationConfig) -> None:
    """Speculative decoding here is greedy, one row per prompt, eager."""
    checks = (
        ("temperature", cfg.greedy, "must be 0 with a draft_model (speculation is greedy)"),
        ("num_beams", cfg.num_beams == 1, "must be 1 with a draft_model"),
        ("num_samples", cfg.num_samples == 1, "must be 1 with a draft_model"),
        ("compile", not cfg.compile, "must be false with a draft_model (it runs eagerly)"),
    )
    check_options(cfg, checks)


def left_pad(
    prompts: Sequence[Sequence[int]], pad_id: int, device: torch.device | str
) -> tuple[Tensor, Tensor | None]:
    """ids (B, T) padded on the left, mask (B, T) True for real tokens, or None if no padding."""
    t = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), t), pad_id, dtype=torch.long)
    mask = torch.zeros(len(prompts), t, dtype=torch.bool)
    for row, p in enumerate(prompts):
        ids[row, t - len(p) :] = torch.tensor(p, dtype=torch.long)
        mask[row, t - len(p) :] = True
    ids = ids.to(device)
    return ids, (None if bool(mask.all()) else mask.to(device))


def pad_right(
    seqs: Sequence[Sequence[int]], pad_id: int, device: torch.device | str
) -> tuple[Tensor, Tensor]:
    """ids (B, S) padded on the right with ``pad_id``, mask (B, S) True for real tokens."""
    lengths = torch.tensor([len(x) for x in seqs])
    ids = torch.full((len(seqs), int(lengths.max())), pad_id, dtype=torch.long)
    for row, x in enumerate(seqs):
        ids[row, : len(x)] = torch.tensor(x, dtype=torch.long)
    mask = torch.arange(ids.shape[1])[None, :] < lengths[:, None]  # (B, S)
    return ids.to(device), mask.to(device)


@torch.inference_mode()
def generate_ids(
    model: nn.Module,
    prompts: Sequence[Sequence[int]],
    cfg: GenerationConfig | None = None,
    *,
    sources: Sequence[Sequence[int]] | None = None,
    eos_id: int | None = None,
    pad_id: int = 0,
    on_token: Callable[[int, list[int]], bool] | None = None,
    draft_model: nn.Module | None = None,
    **options: Any,
) -> list[list[int]]:
    """New tokens of ``outputs_per_prompt`` rows per prompt (prompt-major), without the prompt
    and the EOS that ended them; see ``generate_scored``."""
    cfg = GenerationConfig.from_options({**(vars(cfg) if cfg else {}), **options})
    kw = dict(sources=sources, eos_id=eos_id, pad_id=pad_id, on_token=on_token)
    kw["draft_model"] = draft_model
    return generate_scored(model, prompts, cfg, **kw)[0]


@torch.inference_mode()
def generate_scored(
    model: nn.Module,
    prompts: Sequence[Sequence[int]],
    cfg: GenerationConfig,
    *,
    sources: Sequence[Sequence[int]] | None = None,
    eos_id: int | None = None,
    pad_id: int = 0,
    on_token: Callable[[int, list[int]], bool] | None = None,
    draft_model: nn.Module | None = None,
) -> Scored:
    """Token rows and their beam scores (None when sampling), for any architecture.

    ``prompts`` are what the decoder continues (an encoder-decoder's: ``[<bos>]``);
    ``sources`` (encoder-decoder only, one per prompt) are encoded once per prompt.
    ``on_token(row, tokens_so_far)`` runs after every new token of a live row when sampling
    (streaming, stop strings); returning True stops that row. ``draft_model`` (greedy only):
    speculative decoding with ``draft_k`` proposals a round; same output, fewer target steps.
    """
    prompts = [list(p) for p in prompts]
    if any(not p for p in prompts):
        raise ValueError("every prompt needs at least one token")
    if sources is not None and len(sources) != len(prompts):
        raise ValueError(f"got {len(sources)} sources for {len(prompts)} prompts")
    per_prompt = cfg.outputs_per_prompt
    if cfg.max_new_tokens == 0:
        return [[] for _ in range(len(prompts) * per_prompt)], [None] * len(prompts) * per_prompt
    if draft_model is not None:
        check_speculative(cfg)
    device = next(model.parameters()).device
    generator = torch.Generator(device).manual_seed(cfg.seed) if cfg.seed is not None else None
    step = step_function(model, cfg.compile)
    chunk = max(1, cfg.batch_size // (cfg.num_beams * cfg.num_samples))  # prompts per batch
    tokens: list[list[int]] = []
    scores: list[float | None] = []
    capped: int | None = None  # the context some row stopped at
    with _eval_mode(model, draft_model):
        for first in range(0, len(prompts), chunk):
            batch = _Batch(model, prompts[first : first + chunk], first, cfg, pad_id, draft_model)
            batch.sources = None if sources is None else sources[first : first + chunk]
            out, out_scores, hit = batch.run(step, eos_id, on_token, generator)
            tokens, scores, capped = tokens + out, scores + out_scores, capped or hit
    if capped:
        warnings.warn(
            f"generation stopped at the model's context of {capped} tokens (prompt + new) before "
            f"max_new_tokens={cfg.max_new_tokens}; caches that do not grow have no such limit",
            stacklevel=3,  # the caller (inference_mode's wrapper sits in between)
        )
    return tokens, scores


@contextlib.contextmanager
def _eval_mode(*models: nn.Module | None) -> Iterator[None]:
    """Models in eval mode (no dropout) for the duration, then back to how they were."""
    models = tuple(m for m in models if m is not None)
    modes = [m.training for m in models]
    for m in models:
        m.eval()
    try:
        yield
    finally:
        for m, mode in zip(models, modes, strict=True):
            m.train(mode)


class _Batch:
    """One batch of prompts: prefill (checked against the context), search, results."""

    def __init__(
        self,
        model: nn.Module,
        prompts: list[list[int]],
        first: int,
        cfg: GenerationConfig,
        pad_id: int,
        draft: nn.Module | None = None,
    ) -> None:
        self.model, self.prompts, self.first, self.cfg = model, prompts, first, cfg
        self.pad_id, self.draft = pad_id, draft
        self.device = next(model.parameters()).device
        self.sources: Sequence[Sequence[int]] | None = None

    def _start(self, model: nn.Module, lookahead: int) -> tuple[Tensor, Any]:
        self.ids, self.mask = left_pad(self.prompts, self.pad_id, self.device)
        inputs: dict[str, Any] = {"mask": self.mask, "lookahead": lookahead}
        if self.sources is not None:
            src_ids, src_mask = pad_right(self.sources, self.pad_id, self.device)
            inputs |= {"src_ids": src_ids, "src_mask": src_mask}
        cfg = self.cfg
        return model.start(
            self.ids, max_new_tokens=cfg.max_new_tokens, use_cache=cfg.use_cache, **inputs
        )

    def start(self) -> tuple[tuple[Tensor, Any], Any, int | None]:
        """Prefill the model (and the draft); prompts must leave room for a new token in the
        context: ((logits, state), draft state or None, context or None)."""
        lookahead = self.cfg.draft_k if self.draft is not None else 0
        first = self._start(self.model, lookahead)
        draft_state = None if self.draft is None else self._start(self.draft, lookahead)[1]
        states = (first[1], draft_state)
        limit = min((s.capacity for s in states if s and s.capacity is not None), default=None)
        if limit is None or all(len(p) < limit for p in self.prompts):
            return first, draft_state, limit
        if self.cfg.truncate != "left":
            i, p = next((i, p) for i, p in enumerate(self.prompts) if len(p) >= limit)
            raise ValueError(
                f"prompt {self.first + i} has {len(p)} tokens but the model's context is {limit} "
                f"tokens (max_len of its KV cache), so no new token fits; shorten the prompt or "
                f"pass truncate='left' to keep its last {limit - 1} tokens"
            )
        self.prompts = [p[1 - limit :] if len(p) >= limit else p for p in self.prompts]
        return self.start()

    def run(
        self,
        step: Callable[[Tensor, Any], Tensor],
        eos_id: int | None,
        on_token: Callable[[int, list[int]], bool] | None,
        generator: torch.Generator | None,
    ) -> tuple[list[list[int]], list[float | None], int | None]:
        """(tokens per output row, scores, the context if a row stopped there, else None)."""
        cfg = self.cfg
        (logits, state), draft_state, limit = self.start()
        caps = [min(cfg.max_new_tokens, limit - len(p)) if limit else cfg.max_new_tokens
                for p in self.prompts]  # fmt: skip
        seen = None  # (P, V) tokens already in each prompt, for the repetition penalty
        if cfg.repetition_penalty != 1.0:
            seen = mark_seen(torch.zeros_like(logits, dtype=torch.bool), self.ids, self.mask)
        if cfg.num_beams > 1:
            search = BeamSearch(caps, cfg.num_beams, length_penalty=cfg.length_penalty,
                                early_stopping=cfg.early_stopping, eos_id=eos_id,
                                sampling=cfg, seen=seen)  # fmt: skip
            decode(logits, state, search, step)
            best = [h for hyps in search.results(cfg.n_best) for h in hyps]
            tokens, scores = [t for _, t in best], [s for s, _ in best]
            caps = [c for c in caps for _ in range(cfg.n_best)]
        else:
            offset = self.first * cfg.num_samples
            hook = None if on_token is None else (lambda r, t: on_token(offset + r, t))
            caps = [c for c in caps for _ in range(cfg.num_samples)]
            search = Sampler(cfg, caps, cfg.num_samples, eos_id=eos_id, on_token=hook,
                             generator=generator, seen=seen)  # fmt: skip
            if self.draft is None:
                decode(logits, state, search, step)
            else:
                speculative_decode(
                    self.model, self.draft, (logits, state), draft_state, search, cfg.draft_k
                )
            tokens, scores = search.out, [None] * len(caps)
        hit = any(len(t) == c < cfg.max_new_tokens for t, c in zip(tokens, caps, strict=True))
        return tokens, scores, limit if hit else None
