"""Token-level perplexity and bits per byte of a decoder over whole documents.

Each document is scored as ``<eos> + tokens + <eos>``, as ``LMDataModule`` trains on it (the
tokens without the tokenizer's template, <eos> being the tokenizer's own end-of-sequence id,
``SpecialTokens``): the leading <eos> is the separator a document follows in training (so its
first token is scored too), the trailing one scores the prediction that the document ends.
``bits_per_byte`` divides the summed negative log-likelihood (in bits) by the documents' UTF-8
bytes, so models with different tokenizers compare.

Two ways to give each token its context, for every attention kind:

- ``mode="window"`` (default): a sliding window of ``window`` tokens (default the model's
  ``max_len``, its training context) advancing ``stride`` tokens (default ``window // 2``).
  Every token is scored exactly once: the first window scores all its tokens, each later
  one only its last ``stride`` (those no earlier window scored). A token thus sees at least
  ``window - stride`` earlier tokens (all of them while the document fits one window).
  ``stride=window`` is fastest; ``stride=1`` gives the most context.
- ``mode="recurrent"``: one pass per document through the model's generation caches,
  ``stride`` tokens per call. Each token sees as much of the document as its kind can hold:
  all of it for ``linear``/``gated_linear`` (their O(1) recurrent state) and for softmax
  kinds (a KV cache as long as the document, which for documents longer than ``max_len``
  asks RoPE for positions it never trained on); the last ``window`` tokens for ``local``.
- ``mode="memory"``: Transformer-XL, for a model trained with ``model.memory_len``: each
  document as consecutive segments of ``window`` tokens, each segment attending over the
  memory of the ones before (``DecoderLM.hidden_states_with_memory``); every token is scored
  once (``stride`` is unused). A token's context reaches back about ``n_layers x memory_len``
  tokens (each layer's memory holds states that saw the memory before them), though only
  ``memory_len`` + its segment position directly. ``batch_size`` documents go together.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from tokenizers import Tokenizer
from torch import Tensor

from minillm.models import DecoderLM
from minillm.special_tokens import SpecialTokens


@dataclass
class PerplexityResult:
    nll: float  # summed negative log-likelihood of the scored tokens, in nats
    tokens: int  # scored tokens (each document's tokens and its closing <eos>)
    bytes: int  # UTF-8 bytes of the documents
    documents: int

    @property
    def loss(self) -> float:
        return self.nll / max(self.tokens, 1)

    @property
    def ppl(self) -> float:
        return math.exp(self.loss)

    @property
    def bits_per_byte(self) -> float:
        return self.nll / math.log(2) / max(self.bytes, 1)

    def to_dict(self) -> dict[str, float | int]:
        derived = {"loss": self.loss, "ppl": self.ppl, "bits_per_byte": self.bits_per_byte}
        return {**asdict(self), **derived}


def spans(n_inputs: int, window: int, stride: int) -> list[tuple[int, int, int]]:
    """(start, end, scored) input spans over positions [0, n_inputs): span [start, end)
    predicts tokens start+1 .. end and scores its last ``scored`` predictions."""
    if not 1 <= stride <= window:
        raise ValueError(f"stride must be in [1, window={window}], got {stride}")
    end = min(window, n_inputs)
    out = [(0, end, end)]
    while end < n_inputs:
        new_end = min(end + stride, n_inputs)
        out.append((new_end - window, new_end, new_end - end))
        end = new_end
    return out


@torch.no_grad()
def perplexity(
    model: DecoderLM,
    tokenizer: Tokenizer,
    documents: Iterable[str],
    *,
    mode: str = "window",
    window: int | None = None,
    stride: int | None = None,
    batch_size: int = 8,
) -> PerplexityResult:
    """Score ``documents`` (see the module docstring for ``mode``, ``window``, ``stride``)."""
    if not isinstance(model, DecoderLM):
        raise ValueError(f"perplexity needs a decoder-only model, not {type(model).__name__}")
    if mode not in SCORERS:
        raise ValueError(f"unknown mode {mode!r}; choose one of {sorted(SCORERS)}")
    window = window or model.cfg.max_len
    stride = stride or max(1, window // 2)
    model.eval()
    special = SpecialTokens.from_tokenizer(tokenizer)
    texts = list(documents)
    ids = [
        torch.tensor([special.eos, *enc.ids, special.eos])
        for enc in tokenizer.encode_batch(texts, add_special_tokens=False)
    ]
    nll = SCORERS[mode](model, ids, window, stride, batch_size, special.pad)
    return PerplexityResult(
        nll=nll,
        tokens=sum(len(x) - 1 for x in ids),
        bytes=sum(len(t.encode("utf-8")) for t in texts),
        documents=len(texts),
    )


def _window_nll(
    model: DecoderLM, docs: list[Tensor], window: int, stride: int, batch_size: int, pad_id: int
) -> float:
    """Summed NLL of every window span of every document, ``batch_size`` spans a call."""
    total = 0.0
    for inputs, labels in _batches(docs, window, stride, batch_size, pad_id):
        device = model.tok_emb.weight.device
        logits = model(inputs.to(device))  # (B, T, V)
        total += F.cross_entropy(
            logits.flatten(0, 1).float(), labels.to(device).flatten(), reduction="sum"
        ).item()
    return total


def _batches(
    docs: list[Tensor], window: int, stride: int, batch_size: int, pad_id: int
) -> Iterator[tuple[Tensor, Tensor]]:
    """Right-padded (B, T) inputs and labels; labels -100 where not scored or padding."""
    pending = [
        (doc[a:b], doc[a + 1 : b + 1], scored)
        for doc in docs
        for a, b, scored in spans(len(doc) - 1, window, stride)
    ]
    for i in range(0, len(pending), batch_size):
        chunk = pending[i : i + batch_size]
        t = max(len(x) for x, _, _ in chunk)
        inputs = torch.full((len(chunk), t), pad_id, dtype=torch.long)
        labels = torch.full((len(chunk), t), -100, dtype=torch.long)
        for row, (x, y, scored) in enumerate(chunk):
            inputs[row, : len(x)] = x
            labels[row, len(x) - scored : len(x)] = y[len(x) - scored :]
        yield inputs, labels  # right padding: causal attention never looks at it


def _recurrent_nll(
    model: DecoderLM, docs: list[Tensor], window: int, stride: int, batch_size: int, pad_id: int
) -> float:
    """One pass a document through the caches, ``stride`` tokens a forward call (no padding:
    ``batch_size`` and ``pad_id`` are unused)."""
    device = model.tok_emb.weight.device
    total = 0.0
    for doc in docs:
        doc = doc.to(device)
        n = len(doc) - 1
        caches = model.init_caches(1, max_len=n)
        for a in range(0, n, stride):
            b = min(a + stride, n)
            positions = torch.arange(a, b, device=device)[None]  # (1, T)
            logits = model(doc[None, a:b], positions=positions, caches=caches)  # (1, T, V)
            total += F.cross_entropy(logits[0].float(), doc[a + 1 : b + 1], reduction="sum").item()
    return total


def _memory_nll(
    model: DecoderLM, docs: list[Tensor], window: int, stride: int, batch_size: int, pad_id: int
) -> float:
    """``batch_size`` documents at a time as streams of ``window``-token segments carrying the
    XL memory (``stride`` unused). Rows are right-padded: a document's padding only follows its
    last real token, so no real token ever sees it (its memory is read by no later segment)."""
    if not model.cfg.memory_len:
        raise ValueError(
            "mode=memory needs a model trained with model.memory_len > 0 (this one has 0); "
            "use mode=window or mode=recurrent"
        )
    device = model.tok_emb.weight.device
    total = torch.zeros((), device=device)
    docs = sorted(docs, key=len, reverse=True)  # alike lengths together: less padding
    for i in range(0, len(docs), batch_size):
        chunk = docs[i : i + batch_size]
        n = len(chunk[0]) - 1
        inputs = torch.full((len(chunk), n), pad_id, dtype=torch.long)
        labels = torch.full((len(chunk), n), -100, dtype=torch.long)
        for row, doc in enumerate(chunk):
            inputs[row, : len(doc) - 1], labels[row, : len(doc) - 1] = doc[:-1], doc[1:]
        inputs, labels, memory = inputs.to(device), labels.to(device), None
        for a in range(0, n, window):
            h, memory = model.hidden_states_with_memory(inputs[:, a : a + window], memory)
            logits = model.lm_head(h)  # (B, T, V)
            y = labels[:, a : a + window]
            total += F.cross_entropy(logits.flatten(0, 1).float(), y.flatten(), reduction="sum")
    return total.item()


SCORERS = {"window": _window_nll, "recurrent": _recurrent_nll, "memory": _memory_nll}
