"""Prefill, decode and ``generate_ids()`` over any attention kind's cache (gpt-fast style).

The prompt is prefilled with the parallel form, then one token per step goes through the
caches. Each kind owns its cache (``init_cache``); this code never asks which kind it runs.
Per step the only host sync is the one batched read of the new tokens (EOS, stop strings,
streaming). ``use_cache=False`` recomputes the full forward every step: the slow twin.

Left padding: rows are padded on the left and the prefill call gets ``mask``; decode steps
pass each row's next position explicitly, so padded rows see the same positions they would
alone.

Context: only kinds whose cache is a ``KVCache`` have a limit, the model's ``max_len`` (prompt
+ new tokens): a longer prompt is an error unless ``truncate="left"``, and a row stops (with a
warning) when it fills the context. Rolling-window and recurrent caches keep O(window) / O(1)
memory and decode past ``max_len`` (RoPE is computed from positions, so any position works;
quality past the trained length is another matter).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, fields, replace
from typing import Any

import torch
from torch import Tensor, nn

from minillm.attention import KVCache
from minillm.generation.sampling import SamplingConfig, mark_seen, process_logits, sample

TRUNCATE = (None, "left")


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
    batch_size: int = 32  # rows per forward when there are many prompts x samples

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.truncate not in TRUNCATE:
            raise ValueError(f"truncate must be one of {TRUNCATE}, got {self.truncate!r}")
        for name, low in (("max_new_tokens", 0), ("num_samples", 1), ("batch_size", 1)):
            if getattr(self, name) < low:
                raise ValueError(f"{name} must be >= {low}, got {getattr(self, name)}")
        if isinstance(self.stop, str):
            self.stop = [self.stop]

    @classmethod
    def from_options(cls, options: dict[str, Any]) -> GenerationConfig:
        names = sorted(f.name for f in fields(cls))
        unknown = sorted(set(options) - set(names))
        if unknown:
            raise ValueError(f"unknown generation option(s) {unknown}; valid: {names}")
        return cls(**options)


def prefill(model: nn.Module, input_ids: Tensor, mask: Tensor | None, caches: list[Any]) -> Tensor:
    """Run the prompt (B, T) through the model, filling ``caches``; logits (B, V) of the last
    position (real in every row, since padding is on the left)."""
    return model(input_ids, mask=mask, caches=caches)[:, -1]


def decode_step(model: nn.Module, tokens: Tensor, positions: Tensor, caches: list[Any]) -> Tensor:
    """One new token per row: tokens, positions (B, 1) -> logits (B, V); appends to caches."""
    return model(tokens, positions=positions, caches=caches)[:, -1]


_compiled: dict[str, Callable[..., Tensor]] = {}


def compiled_decode_step(device: torch.device) -> Callable[..., Tensor]:
    """``decode_step`` under torch.compile (CUDA: ``reduce-overhead``, i.e. CUDA graphs).

    Cache lengths are host ints, so the graph is recompiled once with a dynamic length and
    then reused for every step.
    """
    mode = "reduce-overhead" if device.type == "cuda" else "default"
    if mode not in _compiled:
        step = torch.compile(decode_step, mode=mode, dynamic=True)
        # CUDA graphs reuse their output buffer: copy the logits out before the next replay
        _compiled[mode] = (lambda *a: step(*a).clone()) if device.type == "cuda" else step
    return _compiled[mode]


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


def decode_steps(
    model: nn.Module,
    input_ids: Tensor,
    mask: Tensor | None,
    cfg: GenerationConfig,
    generator: torch.Generator | None = None,
) -> Iterator[tuple[Tensor, Tensor]]:
    """Yield (raw logits (B, V), sampled tokens (B,)) for up to ``cfg.max_new_tokens`` steps.

    The next step runs only when the consumer asks for it, so breaking out of the loop (all
    rows stopped) wastes no forward. No host sync happens in here.
    """
    b, t = input_ids.shape
    n_real = mask.sum(-1, keepdim=True) if mask is not None else torch.full((b, 1), t)
    positions = (n_real - 1).to(input_ids.device)  # (B, 1) last real position per row
    if cfg.use_cache:
        caches = model.init_caches(b, t + cfg.max_new_tokens, input_ids.device)
        step = compiled_decode_step(input_ids.device) if cfg.compile else decode_step
        logits = prefill(model, input_ids, mask, caches)  # (B, V)
    else:
        logits = model(input_ids, mask=mask)[:, -1]
    seen = None  # (B, V) tokens already in each row, for the repetition penalty
    if cfg.repetition_penalty != 1.0:
        seen = mark_seen(torch.zeros_like(logits, dtype=torch.bool), input_ids, mask)
    for i in range(cfg.max_new_tokens):
        tokens = sample(process_logits(logits, cfg, seen), cfg, generator)  # (B,)
        yield logits, tokens
        if i == cfg.max_new_tokens - 1:
            return
        if seen is not None:
            mark_seen(seen, tokens[:, None])
        positions = positions + 1
        if cfg.use_cache:
            logits = step(model, tokens[:, None], positions, caches)
        else:  # slow twin: the whole sequence again, positions from the mask as at prefill
            input_ids = torch.cat((input_ids, tokens[:, None]), dim=1)
            if mask is not None:
                mask = torch.cat((mask, mask.new_ones(b, 1)), dim=1)
            logits = model(input_ids, mask=mask)[:, -1]


def context_limit(model: nn.Module) -> int | None:
    """Most tokens (prompt + generated) a row may hold: ``max_len`` if some block's
    self-attention cache is a ``KVCache``, None when every cache is O(window) or O(1)."""
    probe = model.init_caches(1, 1)
    if any(isinstance(cache[0], KVCache) for cache in probe):
        return model.cfg.max_len
    return None


def fit_prompts(
    prompts: Sequence[Sequence[int]], limit: int | None, truncate: str | None = None
) -> list[list[int]]:
    """Every prompt must leave room for one new token in ``limit``, or is cut on the left."""
    prompts = [list(p) for p in prompts]
    if any(not p for p in prompts):
        raise ValueError("every prompt needs at least one token")
    if limit is None:
        return prompts
    for i, p in enumerate(prompts):
        if len(p) >= limit and truncate != "left":
            raise ValueError(
                f"prompt {i} has {len(p)} tokens but the model's context is {limit} tokens "
                f"(max_len of its KV cache), so no new token fits; shorten the prompt or pass "
                f"truncate='left' to keep its last {limit - 1} tokens"
            )
    return [p[1 - limit :] if len(p) >= limit else p for p in prompts]


@torch.inference_mode()
def generate_ids(
    model: nn.Module,
    prompts: Sequence[Sequence[int]],
    cfg: GenerationConfig | None = None,
    *,
    eos_id: int | None = None,
    pad_id: int = 0,
    on_token: Callable[[int, list[int]], bool] | None = None,
    **options: Any,
) -> list[list[int]]:
    """Token-level generation: ``num_samples`` completions per prompt, prompt-major.

    Returns each row's new tokens, without the prompt and without the EOS that ended it.
    ``on_token(row, tokens_so_far)`` runs after every new token of a live row (streaming,
    stop strings); returning True stops that row. ``options`` override fields of ``cfg``.
    With a context limit a row also stops when prompt + new tokens fill it (with a warning).
    """
    cfg = GenerationConfig.from_options({**(vars(cfg) if cfg else {}), **options})
    limit = context_limit(model)
    rows = [p for p in fit_prompts(prompts, limit, cfg.truncate) for _ in range(cfg.num_samples)]
    caps = [min(cfg.max_new_tokens, limit - len(p)) if limit else cfg.max_new_tokens for p in rows]
    device = next(model.parameters()).device
    generator = torch.Generator(device).manual_seed(cfg.seed) if cfg.seed is not None else None
    out: list[list[int]] = [[] for _ in rows]
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(rows), cfg.batch_size):
            live = list(range(start, min(start + cfg.batch_size, len(rows))))
            ids, mask = left_pad([rows[r] for r in live], pad_id, device)
            steps = replace(cfg, max_new_tokens=max(caps[r] for r in live))
            for _, tokens in decode_steps(model, ids, mask, steps, generator):
                new = tokens.tolist()  # the one batched host sync per step
                live = [r for r in live if _push(r, new[r - start], out, eos_id, on_token, caps)]
                if not live:
                    break
    finally:
        model.train(was_training)
    if any(len(o) == c < cfg.max_new_tokens for o, c in zip(out, caps, strict=True)):
        warnings.warn(
            f"generation stopped at the model's context of {limit} tokens (prompt + new) before "
            f"max_new_tokens={cfg.max_new_tokens}; caches that do not grow have no such limit",
            stacklevel=3,  # the caller (inference_mode's wrapper sits in between)
        )
    return out


def _push(
    row: int,
    token: int,
    out: list[list[int]],
    eos_id: int | None,
    on_token: Callable[[int, list[int]], bool] | None,
    caps: list[int],
) -> bool:
    """Append ``token`` to ``out[row]``; False when the row is finished."""
    if token == eos_id:
        return False
    out[row].append(token)
    stop = on_token is not None and on_token(row, out[row])
    return not stop and len(out[row]) < caps[row]
