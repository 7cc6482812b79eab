"""Text in, text out, for every architecture: prompts are encoded as the architecture reads
them (``PROMPT_INPUTS``: a decoder-only model continues the prompt, an encoder-decoder
translates it), generated with ``generate_scored`` and decoded incrementally (whole UTF-8
characters, stop strings cut) for streaming. Special ids (the end-of-sequence that stops a row,
the padding) are the tokenizer's own (``SpecialTokens``), wherever it keeps them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn

from minillm.generation.generate import GenerationConfig, generate_scored
from minillm.generation.seq2seq import encode_sources
from minillm.special_tokens import SpecialTokens


class TextStream:
    """Incremental detokenizer of one row, with stop strings.

    Text is released only once its bytes form whole characters (a multibyte character split
    across tokens prints correctly) and, with stop strings, only once it cannot be the start
    of a stop string, so nothing printed ever needs taking back.
    """

    def __init__(
        self, tokenizer: Any, stop: Sequence[str] = (), on_text: Callable[[str], None] | None = None
    ) -> None:
        self.tokenizer, self.stop, self.on_text = tokenizer, [s for s in stop if s], on_text
        self.text = ""  # decoded so far (cut at a stop string once one appears)
        self.emitted = 0  # characters of ``text`` handed to ``on_text``
        self.stopped = False
        self._prefix = self._read = 0  # token offsets: decode context start, decoded end

    def push(self, tokens: list[int], final: bool = False) -> bool:
        """Take the row's tokens so far; True when a stop string appeared."""
        before = self.tokenizer.decode(tokens[self._prefix : self._read])
        now = self.tokenizer.decode(tokens[self._prefix :])
        if now.endswith("\ufffd") and not final:  # an incomplete UTF-8 character: wait
            return False
        self.text += now[len(before) :]
        self._prefix, self._read = self._read, len(tokens)
        longest = max((len(s) for s in self.stop), default=0)
        tail = max(0, len(self.text) - len(now) + len(before) - longest)
        hits = [i for i in (self.text.find(s, tail) for s in self.stop) if i >= 0]
        if hits:
            self.text, self.stopped = self.text[: min(hits)], True
        self._emit(len(self.text) if self.stopped else self._safe_end())
        return self.stopped

    def finish(self, tokens: list[int]) -> str:
        """The completion's text; flushes whatever was held back."""
        if not self.stopped:
            self.push(tokens, final=True)
        self._emit(len(self.text))
        return self.text

    def _safe_end(self) -> int:
        """End of the text that cannot be the beginning of a stop string."""
        held = [
            k
            for s in self.stop
            for k in range(1, min(len(s), len(self.text) + 1))
            if self.text.endswith(s[:k])
        ]
        return len(self.text) - max(held, default=0)

    def _emit(self, end: int) -> None:
        end = min(end, len(self.text))
        if self.on_text is not None and end > self.emitted:
            self.on_text(self.text[self.emitted : end])
        self.emitted = max(self.emitted, end)


@dataclass
class Completion:
    text: str  # the new text only, cut before a stop string
    token_ids: list[int]  # the new tokens (sampling: up to the one that hit a stop string)
    score: float | None = None  # beam search: log-prob / length ** length_penalty


def continuation_inputs(tokenizer: Any, prompts: list[str]) -> dict[str, Any]:
    """Decoder-only: the prompt is what the model continues; empty starts from ``<eos>``
    (a document boundary, as in training)."""
    eos_id = SpecialTokens.from_tokenizer(tokenizer).eos
    encoded = [tokenizer.encode(p, add_special_tokens=False).ids or [eos_id] for p in prompts]
    return {"prompts": encoded, "sources": None}


def translation_inputs(tokenizer: Any, prompts: list[str]) -> dict[str, Any]:
    """Encoder-decoder: the prompt is the source; the decoder starts from ``<bos>``."""
    bos_id = SpecialTokens.from_tokenizer(tokenizer).bos
    return {"prompts": [[bos_id]] * len(prompts), "sources": encode_sources(tokenizer, prompts)}


# model.cfg.arch -> how text prompts become the model's inputs
PROMPT_INPUTS: dict[str, Callable[[Any, list[str]], dict[str, Any]]] = {
    "decoder": continuation_inputs,
    "encoder_decoder": translation_inputs,
}


def complete(
    model: nn.Module,
    tokenizer: Any,
    prompts: str | Sequence[str],
    *,
    on_text: Callable[[int, str], None] | None = None,
    draft_model: nn.Module | None = None,
    **options: Any,
) -> list[Completion]:
    """Text in, completions out, for either architecture: ``num_samples`` (sampling) or
    ``n_best`` (beam search) rows per prompt, prompt-major, prompt excluded.

    ``options`` are ``GenerationConfig`` fields. ``on_text(row, piece)`` streams each row's
    text as it is produced (beam search: the whole text once it is chosen). Stops at
    ``<eos>``, a stop string (cut from the text) or max_new_tokens. ``draft_model`` (same
    tokenizer, greedy only): speculative decoding, ``draft_k`` proposals a round, same text.
    """
    cfg = GenerationConfig.from_options(options)
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    inputs = PROMPT_INPUTS[model.cfg.arch](tokenizer, prompts)
    special = SpecialTokens.from_tokenizer(tokenizer)
    n_rows = len(prompts) * cfg.outputs_per_prompt
    streams = [
        TextStream(tokenizer, cfg.stop, None if on_text is None else _bind(on_text, row))
        for row in range(n_rows)
    ]
    hook = (lambda row, toks: streams[row].push(toks)) if cfg.stop or on_text else None
    tokens, scores = generate_scored(
        model, cfg=cfg, eos_id=special.eos, pad_id=special.pad, on_token=hook,
        draft_model=draft_model,
        **inputs,
    )  # fmt: skip
    return [
        Completion(s.finish(t), t, score)
        for s, t, score in zip(streams, tokens, scores, strict=True)
    ]


def generate(
    model: nn.Module, tokenizer: Any, prompts: str | Sequence[str], **kwargs: Any
) -> list[str]:
    """The completions' texts; see ``complete`` (same arguments)."""
    return [c.text for c in complete(model, tokenizer, prompts, **kwargs)]


def _bind(on_text: Callable[[int, str], None], row: int) -> Callable[[str], None]:
    return lambda piece: on_text(row, piece)
