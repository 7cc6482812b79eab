"""Encoder-decoder model from the one ``Block``: bidirectional encoder, causal decoder with
cross-attention, tied output head.

Encoder blocks use ``cfg.encoder_attn`` in the ``bidirectional`` role; decoder blocks use
``cfg.attn`` (causal) plus ``cfg.cross_attn`` (cross). Each is a registry key or
``{"kind": key, **knobs}``; a kind that cannot fill its role fails at build time, naming the
kinds that can. ``share_embeddings`` uses one table for source and target tokens (one joint
tokenizer); the output head is tied to the target table when ``tie_embeddings``.

Generation goes through ``start`` (encoder pass, cross caches filled once, decoder prompt
prefilled) and ``step`` (new decoder tokens), as for ``DecoderLM``.
"""

from __future__ import annotations

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


class EncoderDecoderLM(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        n_encoder = cfg.n_layers if cfg.n_encoder_layers is None else cfg.n_encoder_layers
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.dim)  # target (and shared source)
        self.src_emb = None if cfg.share_embeddings else nn.Embedding(cfg.vocab_size, cfg.dim)
        self.dropout = dropout(cfg.dropout)
        self.encoder = nn.ModuleList(
            Block(cfg, cfg.encoder_attn, "bidirectional") for _ in range(n_encoder)
        )
        # each stack its own positions (T5: its own table; the encoder's bidirectional)
        self.encoder_pos_encoding = stack_positions(cfg, self.encoder, causal=False)
        self.encoder_norm = build_norm(cfg)
        self.decoder = nn.ModuleList(
            Block(cfg, attn, "causal", cross_attn=cfg.cross_attn) for attn in cfg.layer_attns()
        )
        self.pos_encoding = stack_positions(cfg, self.decoder, causal=True)
        self.norm = build_norm(cfg)
        self.lm_head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        for emb in (self.tok_emb, self.src_emb):
            if emb is not None:
                nn.init.normal_(emb.weight, 0.0, cfg.init_std)
        init_block_weights(self.encoder, cfg.init_std, max(n_encoder, 1))
        init_block_weights(self.decoder, cfg.init_std, cfg.n_layers)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight
        else:
            nn.init.normal_(self.lm_head.weight, 0.0, cfg.init_std)

    def encode(self, src_ids: Tensor, src_mask: Tensor | None = None) -> Tensor:
        """src_ids (B, S) -> memory (B, S, dim). ``src_mask`` (B, S) True for real tokens.

        Rows at padding positions hold finite junk; every consumer masks them out.
        """
        b, s = src_ids.shape
        positions = positions_from_mask(src_mask, b, s, src_ids.device)  # (B, S)
        emb = self.src_emb if self.src_emb is not None else self.tok_emb
        x = self.dropout(embed_positions(emb(src_ids), self.encoder_pos_encoding, positions))
        for block in self.encoder:
            x = block(x, positions=positions, mask=src_mask)
        return self.encoder_norm(x)

    def decode(
        self,
        input_ids: Tensor,
        memory: Tensor | None,
        *,
        memory_mask: Tensor | None = None,
        mask: Tensor | None = None,
        positions: Tensor | None = None,
        caches: list[Any] | None = None,
    ) -> Tensor:
        """input_ids (B, T) -> logits (B, T, vocab), attending to ``memory`` (B, S, dim).

        ``caches`` from ``init_caches``: the call appends to the self-attention caches; a call
        given ``memory`` writes the cross-attention caches from it, a call with ``memory=None``
        reads them. With caches, pass ``positions`` after the first call.
        """
        return self.lm_head(
            self.decode_hidden(
                input_ids,
                memory,
                memory_mask=memory_mask,
                mask=mask,
                positions=positions,
                caches=caches,
            )
        )

    def decode_hidden(
        self,
        input_ids: Tensor,
        memory: Tensor | None,
        *,
        memory_mask: Tensor | None = None,
        mask: Tensor | None = None,
        positions: Tensor | None = None,
        caches: list[Any] | None = None,
    ) -> Tensor:
        """What ``lm_head`` reads in ``decode``: (B, T, dim), after the final norm."""
        b, t = input_ids.shape
        if positions is None:
            positions = positions_from_mask(mask, b, t, input_ids.device)  # (B, T)
        x = embed_positions(self.tok_emb(input_ids), self.pos_encoding, positions)
        x = self.dropout(x)  # (B, T, dim)
        for i, block in enumerate(self.decoder):
            cache = caches[i] if caches is not None else None
            x = block(
                x,
                positions=positions,
                mask=mask,
                cache=cache,
                memory=memory,
                memory_mask=memory_mask,
            )
        return self.norm(x)  # (B, T, dim)

    def forward(
        self,
        src_ids: Tensor | None,
        input_ids: Tensor,
        *,
        src_mask: Tensor | None = None,
        mask: Tensor | None = None,
        positions: Tensor | None = None,
        caches: list[Any] | None = None,
        memory: Tensor | None = None,
    ) -> Tensor:
        """Teacher-forced logits (B, T, vocab) of target inputs given the source.

        ``memory`` from ``encode`` skips the encoder (``src_ids`` may then be None).
        ``mask`` (B, T) marks real target tokens; right padding after the last real token
        needs no mask (the decoder is causal).
        """
        return self.lm_head(
            self.hidden_states(
                src_ids,
                input_ids,
                src_mask=src_mask,
                mask=mask,
                positions=positions,
                caches=caches,
                memory=memory,
            )
        )

    def hidden_states(
        self,
        src_ids: Tensor | None,
        input_ids: Tensor,
        *,
        src_mask: Tensor | None = None,
        mask: Tensor | None = None,
        positions: Tensor | None = None,
        caches: list[Any] | None = None,
        memory: Tensor | None = None,
    ) -> Tensor:
        """``forward`` before the LM head: (B, T, dim) (``linear_cross_entropy`` reads it)."""
        if memory is None:
            memory = self.encode(src_ids, src_mask)  # (B, S, dim)
        return self.decode_hidden(
            input_ids,
            memory,
            memory_mask=src_mask,
            mask=mask,
            positions=positions,
            caches=caches,
        )

    def init_caches(
        self,
        batch_size: int,
        max_len: int | None = None,
        memory_len: int = 1,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        lookahead: int = 0,
    ) -> list[tuple[Cache, Cache]]:
        """One (self cache, cross cache) pair per decoder block, each of its kind's own type.

        ``max_len`` target tokens (default ``cfg.max_len``; ``lookahead`` more may be written
        and rolled back), ``memory_len`` source tokens.
        """
        param = self.tok_emb.weight
        return [
            block.init_cache(
                batch_size,
                max_len or self.cfg.max_len,
                device or param.device,
                dtype or param.dtype,
                memory_len=memory_len,
                lookahead=lookahead,
            )
            for block in self.decoder
        ]

    def start(
        self,
        input_ids: Tensor,
        *,
        src_ids: Tensor,
        src_mask: Tensor | None = None,
        mask: Tensor | None = None,
        max_new_tokens: int = 0,
        use_cache: bool = True,
        lookahead: int = 0,
    ) -> tuple[Tensor, DecodeState]:
        """Encode the sources (B, S) and prefill the decoder prompts (B, T) (``<bos>``, and any
        forced prefix; left-padded with ``mask``). Returns the logits (B, vocab) of each row's
        next token and the state ``step`` takes; see ``DecoderLM.start`` (``lookahead``
        included)."""
        memory = self.encode(src_ids, src_mask)  # (B, S, dim)
        b, t = input_ids.shape
        positions = positions_from_mask(mask, b, t, input_ids.device)  # (B, T)
        if not use_cache:
            capacity = decode_capacity(self.init_caches(1, 1), self.cfg.max_len, self.pos_encoding)
            state = DecodeState(
                positions[:, -1:] + 1, capacity, None, input_ids, mask, memory, src_mask
            )
            h = self.decode_hidden(input_ids, memory, memory_mask=src_mask, mask=mask)
            return self.lm_head(h[:, -1]), state
        max_len = t + min(max_new_tokens, self.cfg.max_len)
        caches = self.init_caches(b, max_len, memory_len=memory.shape[1], lookahead=lookahead)
        h = self.decode_hidden(
            input_ids, memory, memory_mask=src_mask, mask=mask, positions=positions, caches=caches
        )  # (B, T, dim); fills the cross caches from the memory, once
        capacity = decode_capacity(caches, self.cfg.max_len, self.pos_encoding)
        state = DecodeState(positions[:, -1:] + 1, capacity, caches=caches)
        return self.lm_head(h[:, -1]), state  # (B, vocab)

    def step(self, tokens: Tensor, state: DecodeState) -> Tensor:
        """tokens (B, T) following the state's -> logits (B, T, vocab); advances the state."""
        t = tokens.shape[1]
        if state.caches is None:
            state.extend(tokens)
            h = self.decode_hidden(
                state.tokens, state.memory, memory_mask=state.memory_mask, mask=state.mask
            )
            return self.lm_head(h[:, -t:])
        positions = state.next_positions(t)  # (B, T)
        h = self.decode_hidden(tokens, None, positions=positions, caches=state.caches)
        return self.lm_head(h)  # (B, T, vocab)

    def num_params(self, non_embedding: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())
        if not non_embedding:
            return n
        tables = [self.tok_emb, self.src_emb]
        return n - sum(e.weight.numel() for e in tables if e is not None)
