"""Decoder-only language model: embeddings -> causal blocks -> norm -> tied LM head.

Generation goes through two calls (``minillm.generation`` runs every search over them):
``start`` prefills a left-padded prompt batch and returns the last position's logits and a
``DecodeState``; ``step`` feeds new tokens and returns their logits.

Transformer-XL segment recurrence (``model.memory_len``) is a training and evaluation path of
its own, ``hidden_states_with_memory``; generation keeps using the caches (a KV cache already
holds every earlier token).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from minillm.attention import Cache
from minillm.models.block import (
    Block,
    DecodeState,
    build_norm,
    decode_capacity,
    dropout,
    embed_positions,
    init_block_weights,
    positions_from_mask,
    stack_positions,
)
from minillm.models.config import ModelConfig


@dataclass
class SegmentMemory:
    """Transformer-XL memory of B streams: for each block the last M hidden states that entered
    it in earlier segments (B, M, dim), detached, and which of the M slots hold a token."""

    states: list[Tensor]  # one (B, M, dim) per block
    mask: Tensor  # (B, M) bool; False: no token yet (a stream's start), right-aligned

    def clear(self, rows: Tensor) -> SegmentMemory:
        """The memory with the rows where ``rows`` (B,) is True emptied (their streams start
        anew); a mask op, no host sync."""
        return SegmentMemory(self.states, self.mask & ~rows[:, None])

    def to(self, device: torch.device | str) -> SegmentMemory:
        return SegmentMemory([s.to(device) for s in self.states], self.mask.to(device))


class DecoderLM(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.dropout = dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg, attn, "causal") for attn in cfg.layer_attns())
        self.pos_encoding = stack_positions(cfg, self.blocks, causal=True)  # None: kinds' own
        self.norm = build_norm(cfg)
        self.lm_head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        nn.init.normal_(self.tok_emb.weight, 0.0, cfg.init_std)
        init_block_weights(self.blocks, cfg.init_std, cfg.n_layers)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight
        else:
            nn.init.normal_(self.lm_head.weight, 0.0, cfg.init_std)

    def forward(
        self,
        input_ids: Tensor,
        *,
        positions: Tensor | None = None,
        mask: Tensor | None = None,
        caches: list[Any] | None = None,
    ) -> Tensor:
        """input_ids (B, T) -> logits (B, T, vocab).

        ``mask`` (B, T) True for real tokens (left padding). ``caches`` from ``init_caches``:
        the call appends to them; after the first call pass ``positions`` explicitly.
        """
        return self.lm_head(
            self.hidden_states(input_ids, positions=positions, mask=mask, caches=caches)
        )

    def hidden_states(
        self,
        input_ids: Tensor,
        *,
        positions: Tensor | None = None,
        mask: Tensor | None = None,
        caches: list[Any] | None = None,
    ) -> Tensor:
        """What ``lm_head`` reads: (B, T, dim), after the final norm. ``linear_cross_entropy``
        takes it to compute the loss without materialising (B, T, vocab) logits (not yet
        used by ``LMModule``, which still goes through ``forward``)."""
        b, t = input_ids.shape
        if positions is None:
            positions = positions_from_mask(mask, b, t, input_ids.device)
        x = embed_positions(self.tok_emb(input_ids), self.pos_encoding, positions)
        x = self.dropout(x)  # (B, T, dim)
        for i, block in enumerate(self.blocks):
            cache = caches[i] if caches is not None else None
            x = block(x, positions=positions, mask=mask, cache=cache)
        return self.norm(x)  # (B, T, dim)

    def init_memory(self, batch_size: int) -> SegmentMemory:
        """An empty XL memory (every slot False) of ``model.memory_len`` slots."""
        p, m = self.tok_emb.weight, self.cfg.memory_len
        states = [p.new_zeros(batch_size, m, self.cfg.dim) for _ in self.blocks]
        return SegmentMemory(states, torch.zeros(batch_size, m, dtype=torch.bool, device=p.device))

    def hidden_states_with_memory(
        self, input_ids: Tensor, memory: SegmentMemory | None = None
    ) -> tuple[Tensor, SegmentMemory]:
        """Transformer-XL: the next segment (B, T) of B streams -> (hidden (B, T, dim), memory
        for the segment after it). ``memory`` None: every stream starts here.

        Block i attends over its memory (the M hidden states that entered it before, left of
        the segment like left padding, at the positions just before the segment's) and the
        segment causally; no gradient flows into the memory. Needs ``model.memory_len`` > 0.
        """
        if not self.cfg.memory_len:
            raise ValueError("hidden_states_with_memory needs model.memory_len > 0")
        b, t = input_ids.shape
        memory = self.init_memory(b) if memory is None else memory
        m = memory.mask.shape[1]
        mask = torch.cat((memory.mask, memory.mask.new_ones(b, t)), dim=1)  # (B, M + T)
        positions = positions_from_mask(mask, b, m + t, input_ids.device)  # (B, M + T)
        x = embed_positions(self.tok_emb(input_ids), self.pos_encoding, positions[:, m:])
        x = self.dropout(x)  # (B, T, dim)
        states = []
        for past, block in zip(memory.states, self.blocks, strict=True):
            states.append(torch.cat((past, x.detach()), dim=1)[:, -m:])  # (B, M, dim)
            x = block(x, positions=positions, mask=mask, past=past)
        return self.norm(x), SegmentMemory(states, mask[:, -m:])

    def init_caches(
        self,
        batch_size: int,
        max_len: int | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        lookahead: int = 0,
    ) -> list[tuple[Cache, None]]:
        """One (cache, None) pair per block, each cache of its attention kind's own type;
        ``lookahead`` tokens may be written past ``max_len`` and rolled back."""
        param = self.tok_emb.weight
        return [
            block.init_cache(
                batch_size,
                max_len or self.cfg.max_len,
                device or param.device,
                dtype or param.dtype,
                lookahead=lookahead,
            )
            for block in self.blocks
        ]

    def start(
        self,
        input_ids: Tensor,
        *,
        mask: Tensor | None = None,
        max_new_tokens: int = 0,
        use_cache: bool = True,
        lookahead: int = 0,
    ) -> tuple[Tensor, DecodeState]:
        """Prefill the prompts (B, T), left-padded with ``mask`` (B, T) True for real tokens.

        Returns the logits (B, vocab) of each row's next token and the state ``step`` takes.
        Caches hold T + ``max_new_tokens`` tokens (at most T + ``max_len``: no row may go
        past its context), plus ``lookahead`` tokens a step may write and ``rollback``
        (speculative decoding). ``use_cache=False`` keeps the inputs instead: every step reruns
        the full forward (the slow twin).
        """
        b, t = input_ids.shape
        positions = positions_from_mask(mask, b, t, input_ids.device)  # (B, T)
        if not use_cache:
            capacity = decode_capacity(self.init_caches(1, 1), self.cfg.max_len, self.pos_encoding)
            state = DecodeState(positions[:, -1:] + 1, capacity, tokens=input_ids, mask=mask)
            return self.lm_head(self.hidden_states(input_ids, mask=mask)[:, -1]), state
        caches = self.init_caches(b, t + min(max_new_tokens, self.cfg.max_len), lookahead=lookahead)
        h = self.hidden_states(input_ids, positions=positions, mask=mask, caches=caches)
        capacity = decode_capacity(caches, self.cfg.max_len, self.pos_encoding)
        state = DecodeState(positions[:, -1:] + 1, capacity, caches=caches)
        return self.lm_head(h[:, -1]), state  # (B, vocab)

    def step(self, tokens: Tensor, state: DecodeState) -> Tensor:
        """tokens (B, T) following the state's -> logits (B, T, vocab); advances the state."""
        t = tokens.shape[1]
        if state.caches is None:
            state.extend(tokens)
            return self.lm_head(self.hidden_states(state.tokens, mask=state.mask)[:, -t:])
        positions = state.next_positions(t)  # (B, T)
        return self.lm_head(self.hidden_states(tokens, positions=positions, caches=state.caches))

    def num_params(self, non_embedding: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())
        return n - self.tok_emb.weight.numel() if non_embedding else n
