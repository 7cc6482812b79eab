"""Beam search for the encoder-decoder model, over any attention kind's caches.

Rows are source-major: row ``i * K + j`` is beam ``j`` of source ``i`` (``K = num_beams``).
Each step scores the ``2K`` best continuations of every source, moves finished ones (EOS) to
that source's hypothesis list and keeps the ``K`` best unfinished ones; the self-attention
caches follow their beams with ``reorder``. Beams never move across sources, so the
cross-attention caches (keys/values of the memory, or a linear kind's summary) are filled
once, on the first step, and never touched again. Scores are summed log-probabilities
divided by ``length ** length_penalty`` (length counts the EOS), as in fairseq.

``use_cache=False`` reruns the decoder over the whole prefix every step: the slow twin the
tests compare against. One host sync per step (the 2K candidates) drives the bookkeeping.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn


class DecodeState:
    """The encoder memory of a batch and one decoder step over caches (or the slow twin).

    ``rows_per_source`` copies of each source's memory sit next to each other (source-major),
    so a step sees (B * rows_per_source) rows. The memory is expanded before the cross caches
    are filled, so every row of a source holds the same cross cache.
    """

    def __init__(
        self,
        model: nn.Module,
        src_ids: Tensor,
        src_mask: Tensor | None,
        rows_per_source: int,
        max_new_tokens: int,
        use_cache: bool = True,
    ) -> None:
        self.model = model
        memory = model.encode(src_ids, src_mask)  # (B, S, dim)
        self.memory = memory.repeat_interleave(rows_per_source, 0)  # (B * R, S, dim)
        self.memory_mask = None
        if src_mask is not None:
            self.memory_mask = src_mask.repeat_interleave(rows_per_source, 0)  # (B * R, S)
        self.caches = None
        if use_cache:
            self.caches = model.init_caches(
                self.memory.shape[0], max_new_tokens + 1, memory_len=memory.shape[1]
            )
        self.length = 0  # decoder tokens already in the caches

    def logits(self, history: Tensor) -> Tensor:
        """history (N, t) of decoder inputs (BOS first) -> next-token logits (N, V)."""
        if self.caches is None:
            return self.model.decode(history, self.memory, memory_mask=self.memory_mask)[:, -1]
        n, t = history.shape
        positions = torch.arange(self.length, t, device=history.device).expand(n, -1)
        logits = self.model.decode(
            history[:, self.length :],
            self.memory,
            memory_mask=self.memory_mask,
            positions=positions,
            caches=self.caches,
        )  # (N, t - length, V)
        self.length = t
        return logits[:, -1]

    def reorder(self, rows: Tensor) -> None:
        """Row i of the self-attention caches becomes old row ``rows[i]`` (same source)."""
        for self_cache, _ in self.caches or ():
            self_cache.reorder(rows)


@dataclass
class Hypotheses:
    """The ``num_beams`` best finished hypotheses of one source."""

    num_beams: int
    length_penalty: float
    early_stopping: bool
    items: list[tuple[float, list[int]]] = field(default_factory=list)  # (score, tokens)

    def score(self, logprob: float, length: int) -> float:
        return logprob / max(length, 1) ** self.length_penalty

    def add(self, tokens: list[int], logprob: float, length: int) -> None:
        self.items.append((self.score(logprob, length), tokens))
        self.items.sort(key=lambda item: -item[0])
        del self.items[self.num_beams :]

    def done(self, best_live_logprob: float, length: int) -> bool:
        """Full and, unless ``early_stopping``, the best live beam scored at its current length
        does not beat the worst kept hypothesis (HF's heuristic: it ignores later growth)."""
        if len(self.items) < self.num_beams:
            return False
        return self.early_stopping or self.items[-1][0] >= self.score(best_live_logprob, length)

    def best(self) -> list[int]:
        return self.items[0][1]


@torch.inference_mode()
def beam_search(
    model: nn.Module,
    src_ids: Tensor,
    src_mask: Tensor | None = None,
    *,
    num_beams: int = 5,
    length_penalty: float = 1.0,
    early_stopping: bool = True,
    max_new_tokens: int = 64,
    bos_id: int = 1,
    eos_id: int = 2,
    use_cache: bool = True,
) -> list[list[int]]:
    """Best hypothesis per source: src_ids (B, S), right-padded with ``src_mask`` (B, S).

    Returns token lists without BOS and EOS. ``num_beams=1`` gives exactly greedy decoding.
    """
    if num_beams < 1 or max_new_tokens < 1:
        raise ValueError(
            f"need num_beams >= 1 and max_new_tokens >= 1, got {num_beams}, {max_new_tokens}"
        )
    b, k = src_ids.shape[0], num_beams
    state = DecodeState(model, src_ids, src_mask, k, max_new_tokens, use_cache)
    history = torch.full((b * k, 1), bos_id, dtype=torch.long, device=src_ids.device)
    scores = torch.zeros(b, k, device=src_ids.device)  # (B, K) summed log-probs
    scores[:, 1:] = float("-inf")  # all beams start equal: expand from beam 0 only
    finished = [Hypotheses(k, length_penalty, early_stopping) for _ in range(b)]
    done = [False] * b
    for step in range(max_new_tokens):
        logp = state.logits(history).float().log_softmax(-1)  # (B * K, V)
        vocab = logp.shape[-1]
        cand = (scores.view(-1, 1) + logp).view(b, k * vocab)  # (B, K * V)
        top, idx = cand.topk(2 * k, dim=-1)  # (B, 2K)
        beam, token = idx // vocab, idx % vocab  # (B, 2K) each
        keep = _select(history, top, beam, token, finished, done, eos_id, step + 1)  # (B, K)
        scores = top.gather(1, keep)  # (B, K)
        source_row = torch.arange(b, device=idx.device)[:, None] * k  # (B, 1)
        rows = (source_row + beam.gather(1, keep)).flatten()  # (B * K,) old row of each beam
        next_tokens = token.gather(1, keep).flatten()  # (B * K,)
        history = torch.cat((history[rows], next_tokens[:, None]), dim=1)  # (B * K, t + 1)
        state.reorder(rows)
        if all(done):
            break
    for i, hyps in enumerate(finished):  # sources still open: their live beams compete too
        if not done[i]:
            for j in range(k):
                hyps.add(history[i * k + j, 1:].tolist(), float(scores[i, j]), max_new_tokens)
    return [hyps.best() for hyps in finished]


def _select(
    history: Tensor,
    top: Tensor,
    beam: Tensor,
    token: Tensor,
    finished: list[Hypotheses],
    done: list[bool],
    eos_id: int,
    length: int,
) -> Tensor:
    """Move EOS candidates among each source's best K into its hypotheses; pick live beams.

    top, beam, token (B, 2K). Returns the index into the 2K candidates of each kept beam
    (B, K). A finished source keeps its first K candidates (ignored from then on).
    """
    b, two_k = top.shape
    k = two_k // 2
    top_l, beam_l, token_l = top.tolist(), beam.tolist(), token.tolist()  # one host sync
    keep = []
    for i in range(b):
        if done[i]:
            keep.append(list(range(k)))
            continue
        live = []
        for rank in range(two_k):
            if token_l[i][rank] != eos_id:
                live.append(rank)
            elif rank < k:  # an EOS among the K best: a finished hypothesis
                prefix = history[i * k + beam_l[i][rank], 1:].tolist()
                finished[i].add(prefix, top_l[i][rank], length)
            if len(live) == k:
                break
        keep.append(live)
        done[i] = finished[i].done(top_l[i][live[0]], length)
    return torch.tensor(keep, device=top.device)
