"""Beam search as a ``Search``: for any architecture and any attention kind's caches.

Rows are prompt-major: row ``i * K + j`` is beam ``j`` of prompt ``i`` (``K = num_beams``),
expanded from the prefilled prompts at the first choice. Each step scores the ``2K`` best
continuations of every prompt, moves finished ones (EOS) to that prompt's hypotheses and keeps
the ``K`` best unfinished ones; the state follows its beams with ``reorder`` (beams never move
across prompts, so an encoder-decoder's cross caches, filled once, stay valid). Scores are
summed log-probabilities (after the repetition penalty; temperature, top-k and top-p do not
apply) divided by ``length ** length_penalty`` (length counts the EOS), as in fairseq. A
prompt whose beams reach its cap (``max_new_tokens`` or the context) without EOS ranks them
as they are. One host sync per step (the 2K candidates) drives the bookkeeping.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from minillm.generation.sampling import SamplingConfig, apply_repetition_penalty


@dataclass
class Hypotheses:
    """The ``num_beams`` best finished hypotheses of one prompt, best first."""

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


class BeamSearch:
    """``num_beams`` beams per prompt; ``results`` gives each prompt's ``n_best``."""

    def __init__(
        self,
        caps: list[int],
        num_beams: int,
        *,
        length_penalty: float = 1.0,
        early_stopping: bool = True,
        eos_id: int | None = None,
        sampling: SamplingConfig | None = None,
        seen: Tensor | None = None,
    ) -> None:
        self.caps, self.k, self.eos_id = caps, num_beams, eos_id
        self.penalty = sampling.repetition_penalty if sampling is not None else 1.0
        self.seen = seen  # (P, V) tokens in each prompt, for the repetition penalty
        self.hyps = [Hypotheses(num_beams, length_penalty, early_stopping) for _ in caps]
        self.finished = [False] * len(caps)
        self.done = False
        self.scores: Tensor | None = None  # (P, K) summed log-probs of the live beams
        self.history: Tensor | None = None  # (P * K, t) tokens of the live beams
        self.length = 0

    def choose(self, logits: Tensor) -> tuple[Tensor, Tensor]:
        p, k = len(self.caps), self.k
        first = self.scores is None
        if first:  # (P, V) prompts -> (P * K, V) beams, all equal: expand from beam 0 only
            logits = logits.repeat_interleave(k, 0)
            self.seen = None if self.seen is None else self.seen.repeat_interleave(k, 0)
            self.scores = torch.zeros(p, k, device=logits.device)
            self.scores[:, 1:] = float("-inf")
            self.history = torch.zeros(p * k, 0, dtype=torch.long, device=logits.device)
        logits = logits.float()
        if self.seen is not None:
            logits = apply_repetition_penalty(logits, self.seen, self.penalty)
        logp = logits.log_softmax(-1)  # (P * K, V)
        vocab = logp.shape[-1]
        cand = (self.scores.view(-1, 1) + logp).view(p, k * vocab)  # (P, K * V)
        top, idx = cand.topk(2 * k, dim=-1)  # (P, 2K)
        self.length += 1
        top_l, idx_l = top.tolist(), idx.tolist()  # the one host sync per step
        keep = self._select(top_l, idx_l, vocab)  # (P, K) ranks among the 2K
        old = [i * k + idx_l[i][r] // vocab for i in range(p) for r in keep[i]]  # (P * K,)
        rows = torch.tensor(old, device=logits.device)  # old beam of each new one
        keep_t = torch.tensor(keep, device=logits.device)  # (P, K)
        self.scores = top.gather(1, keep_t)  # (P, K)
        tokens = (idx.gather(1, keep_t) % vocab).flatten()  # (P * K,)
        self.history = torch.cat((self.history[rows], tokens[:, None]), dim=1)
        if self.seen is not None:
            self.seen = self.seen[rows].scatter_(-1, tokens[:, None], True)
        self._close_capped()
        self.done = all(self.finished)
        if first:
            return tokens, rows // k  # rows of the prefilled prompts
        return tokens, None if old == list(range(p * k)) else rows  # None: beams kept their rows

    def _select(self, top: list[list[float]], idx: list[list[int]], vocab: int) -> list[list[int]]:
        """Move EOS candidates among each prompt's best K into its hypotheses; pick the K best
        live ones. top, idx (P, 2K) host lists of candidate scores and beam * vocab + token ->
        ranks into the 2K candidates (P, K). A finished prompt keeps its first K (ignored)."""
        k = self.k
        keep = []
        for i, hyps in enumerate(self.hyps):
            if self.finished[i]:
                keep.append(list(range(k)))
                continue
            live = []
            for rank in range(2 * k):
                if idx[i][rank] % vocab != self.eos_id:
                    live.append(rank)
                elif rank < k:  # an EOS among the K best: a finished hypothesis
                    prefix = self.history[i * k + idx[i][rank] // vocab].tolist()
                    hyps.add(prefix, top[i][rank], self.length)
                if len(live) == k:
                    break
            keep.append(live)
            self.finished[i] = hyps.done(top[i][live[0]], self.length)
        return keep

    def _close_capped(self) -> None:
        """Prompts that reached their cap: their live beams compete as they are."""
        for i, cap in enumerate(self.caps):
            if not self.finished[i] and self.length >= cap:
                for j in range(self.k):
                    row = i * self.k + j
                    logprob = float(self.scores[i, j])
                    self.hyps[i].add(self.history[row].tolist(), logprob, self.length)
                self.finished[i] = True

    def results(self, n_best: int) -> list[list[tuple[float, list[int]]]]:
        """Each prompt's ``n_best`` (score, tokens without EOS), best first."""
        return [hyps.items[:n_best] for hyps in self.hyps]
