"""Text in, translations out: greedy decoding and ``translate`` for the encoder-decoder model.

Sources are encoded as in training (``tokens + <eos>``), right-padded, and decoded from
``<bos>``; the decoder's outputs stop at ``<eos>``. ``translate`` sorts sources by length so a
batch holds similar lengths, and returns the translations in the input order.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from minillm.generation.beam import DecodeState, beam_search


@torch.inference_mode()
def greedy_search(
    model: nn.Module,
    src_ids: Tensor,
    src_mask: Tensor | None = None,
    *,
    max_new_tokens: int = 64,
    bos_id: int = 1,
    eos_id: int = 2,
    use_cache: bool = True,
) -> list[list[int]]:
    """The most likely next token at every step: src_ids (B, S) -> token lists (no BOS/EOS)."""
    b = src_ids.shape[0]
    state = DecodeState(model, src_ids, src_mask, 1, max_new_tokens, use_cache)
    history = torch.full((b, 1), bos_id, dtype=torch.long, device=src_ids.device)
    ended = torch.zeros(b, dtype=torch.bool, device=src_ids.device)
    for _ in range(max_new_tokens):
        token = state.logits(history).argmax(-1)  # (B,)
        history = torch.cat((history, token[:, None]), dim=1)  # (B, t + 1)
        ended |= token == eos_id
        if bool(ended.all()):  # the one host sync per step
            break
    return [_until_eos(row, eos_id) for row in history[:, 1:].tolist()]


def _until_eos(tokens: list[int], eos_id: int) -> list[int]:
    return tokens[: tokens.index(eos_id)] if eos_id in tokens else tokens


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


def encode_sources(tokenizer: Any, sources: Sequence[str]) -> list[list[int]]:
    """Source token ids as the model saw them in training: ``tokens + <eos>``."""
    eos_id = tokenizer.token_to_id("<eos>")
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

    ``max_new_tokens=None`` allows ``default_max_new_tokens`` of each batch's longest source.
    """
    ids = encode_sources(tokenizer, sources)
    pad_id, bos_id, eos_id = (tokenizer.token_to_id(t) for t in ("<pad>", "<bos>", "<eos>"))
    options: dict[str, Any] = {"bos_id": bos_id, "eos_id": eos_id, "use_cache": use_cache}
    if num_beams > 1:
        search = beam_search
        options |= {"num_beams": num_beams, "length_penalty": length_penalty}
        options["early_stopping"] = early_stopping
    else:
        search = greedy_search
    device = next(model.parameters()).device
    order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))  # longest first
    out: list[str] = [""] * len(ids)
    was_training = model.training
    model.eval()
    try:
        with tqdm(total=len(ids), desc="Translating", unit="sent", disable=not progress) as bar:
            for start in range(0, len(order), batch_size):
                chunk = order[start : start + batch_size]
                src_ids, src_mask = pad_right([ids[i] for i in chunk], pad_id, device)
                limit = max_new_tokens or default_max_new_tokens(src_ids.shape[1])
                hyps = search(model, src_ids, src_mask, max_new_tokens=limit, **options)
                for i, tokens in zip(chunk, hyps, strict=True):
                    out[i] = tokenizer.decode(tokens).strip()
                bar.update(len(chunk))
    finally:
        model.train(was_training)
    return out
