"""Greedy speculative decoding (Leviathan et al. 2023; Chen et al. 2023) over the two calls.

A small draft model proposes ``k`` tokens one at a time; the target checks them all in one
``step`` of ``k + 1`` tokens (the last accepted token, then the proposals) and keeps the
longest prefix it agrees with, plus its own next token. Both states then ``rollback`` what
was rejected: a KV cache by its length, a rolling window by its spare ``lookahead`` slots, a
recurrent state by returning to a saved point and re-feeding the tokens it kept. Every kept
token is the target's greedy choice, so the output equals the target's greedy decoding.

Rows advance together: a round keeps the shortest agreeing prefix of the live rows (a row
that agreed further gets the target's own token there, which is the same token), so the
batch keeps one length and no row's output changes.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from minillm.generation.sampling import Sampler


def speculative_decode(
    target: nn.Module,
    draft: nn.Module,
    first: tuple[Tensor, Any],
    draft_state: Any,
    recorder: Sampler,
    k: int,
) -> tuple[int, int]:
    """Run until ``recorder`` (EOS, caps, stop hooks) is done. ``first`` is the target's
    ``start`` result, ``draft_state`` the draft's; both were started with ``lookahead >= k``.
    Returns (draft tokens proposed, accepted) over the live rows."""
    logits, state = first
    token = logits.argmax(-1)  # (N,) the target's next token
    recorder.record(token.tolist())
    pending = token[:, None]  # tokens the draft has not read yet (N, 1 or 2)
    proposed = accepted = 0
    while not recorder.done:
        proposal = _propose(draft, pending, draft_state, k)  # (N, k)
        verify = torch.cat((token[:, None], proposal), dim=1)  # (N, k + 1)
        choice = target.step(verify, state).argmax(-1)  # (N, k + 1) target's greedy tokens
        agree = (proposal == choice[:, :k]).long().cumprod(1).sum(1).tolist()  # (N,)
        live = recorder.live
        a = min(agree[r] for r in live)
        proposed, accepted = proposed + k * len(live), accepted + sum(agree[r] for r in live)
        for column in torch.cat((proposal[:, :a], choice[:, a : a + 1]), dim=1).T.tolist():
            recorder.record(column)
            if recorder.done:
                return proposed, accepted
        _rewind(target, state, k - a, verify[:, : a + 1])
        keep = min(a, k - 1)  # the draft read pending and proposals 1..k-1
        _rewind(draft, draft_state, k - 1 - keep, torch.cat((pending, proposal[:, :keep]), 1))
        pending = torch.cat((proposal[:, keep:a], choice[:, a : a + 1]), dim=1)
        token = choice[:, a]
    return proposed, accepted


def _propose(draft: nn.Module, pending: Tensor, state: Any, k: int) -> Tensor:
    """k greedy draft tokens (N, k); the draft reads ``pending`` and the first k - 1 of them."""
    tokens, inputs = [], pending
    for _ in range(k):
        tokens.append(draft.step(inputs, state)[:, -1].argmax(-1))  # (N,)
        inputs = tokens[-1][:, None]
    return torch.stack(tokens, dim=1)


def _rewind(model: nn.Module, state: Any, n: int, kept: Tensor) -> None:
    """Forget the last ``n`` tokens read; re-feed the end of ``kept`` (the tokens read just
    before them) that a recurrent state had to forget too."""
    extra = state.rollback(n)
    if extra:
        model.step(kept[:, -extra:], state)
