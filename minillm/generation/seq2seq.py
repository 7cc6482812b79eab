"""Translation with an encoder-decoder: ``translate`` (text in, text out), a thin wrapper over
``generate_ids`` (the decoder starts from ``<bos>``, the source is encoded once).

Sources are encoded as in training (``tokens + <eos>``) and right-padded; outputs stop at
``<eos>``. ``translate`` sorts sources by length so a batch holds similar lengths, and returns
the translations in the input order. The special ids are the tokenizer's (``SpecialTokens``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import nn
from tqdm.auto import tqdm

from minillm.generation.generate import generate_ids, pad_right
from minillm.special_tokens import SpecialTokens

__all__ = ["default_max_new_tokens", "encode_sources", "pad_right", "translate"]


def encode_sources(tokenizer: Any, sources: Sequence[str]) -> list[list[int]]:
    """Source token ids as the model saw them in training: ``tokens + <eos>``."""
    eos_id = SpecialTokens.from_tokenizer(tokenizer).eos
    encoded = tokenizer.encode_batch(list(sources), add_special_tokens=False)
    return [enc.ids + [eos_id] for enc in encoded]


def default_max_new_tokens(src_len: int) -> int:
    """Room for a translation of a ``src_len``-token source: 1.5 x + 10."""
    return int(1.5 * src_len) + 10


def translate(
    model: nn.Module,
    tokenizer: Any,
    sources: Sequence[str],
    *,
    num_beams: int = 5,
    length_penalty: float = 1.0,
    early_stopping: bool = True,
    max_new_tokens: int | None = None,
    batch_size: int = 32,
    use_cache: bool = True,
    progress: bool = False,
) -> list[str]:
    """Translate ``sources`` with beam search (greedy when ``num_beams=1``), in input order.

    ``batch_size`` counts sources (each runs ``num_beams`` rows). ``max_new_tokens=None``
    allows ``default_max_new_tokens`` of each batch's longest source.
    """
    ids = encode_sources(tokenizer, sources)
    special = SpecialTokens.from_tokenizer(tokenizer)
    options = dict(temperature=0, num_beams=num_beams, length_penalty=length_penalty,
                   early_stopping=early_stopping, use_cache=use_cache,
                   batch_size=batch_size * num_beams)  # fmt: skip
    order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))  # longest first
    out: list[str] = [""] * len(ids)
    with tqdm(total=len(ids), desc="Translating", unit="sent", disable=not progress) as bar:
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            limit = max_new_tokens or default_max_new_tokens(len(ids[chunk[0]]))
            hyps = generate_ids(
                model, [[special.bos]] * len(chunk), sources=[ids[i] for i in chunk],
                eos_id=special.eos, pad_id=special.pad, max_new_tokens=limit, **options,
            )  # fmt: skip
            for i, tokens in zip(chunk, hyps, strict=True):
                out[i] = tokenizer.decode(tokens).strip()
            bar.update(len(chunk))
    return out
