"""Decoder-only language model: embeddings -> causal blocks -> RMSNorm -> tied LM head."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from minillm.models.block import Block, init_block_weights, positions_from_mask
from minillm.models.config import ModelConfig


class DecoderLM(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.dropout = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg, cfg.attn, "causal") for _ in range(cfg.n_layers))
        self.norm = nn.RMSNorm(cfg.dim, eps=cfg.norm_eps)
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
        x = self.dropout(self.tok_emb(input_ids))  # (B, T, dim)
        for i, block in enumerate(self.blocks):
            cache = caches[i] if caches is not None else None
            x = block(x, positions=positions, mask=mask, cache=cache)
        return self.norm(x)  # (B, T, dim)

    def init_caches(
        self,
        batch_size: int,
        max_len: int | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> list[Any]:
        """One cache per block, each of its attention kind's own type."""
        param = self.tok_emb.weight
        return [
            block.init_cache(
                batch_size,
                max_len or self.cfg.max_len,
                device or param.device,
                dtype or param.dtype,
            )
            for block in self.blocks
        ]

    def num_params(self, non_embedding: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())
        return n - self.tok_emb.weight.numel() if non_embedding else n
