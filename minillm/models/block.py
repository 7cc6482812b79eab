"""The one block class both models are built from (pre-norm, RMSNorm, SwiGLU).

Decoder-only: causal self-attention. Encoder: bidirectional self-attention. Encoder-decoder's
decoder: causal self-attention plus cross-attention over the encoder memory.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from minillm.attention import build_attention
from minillm.models.config import ModelConfig
from minillm.models.mlp import SwiGLU


class Block(nn.Module):
    def __init__(
        self, cfg: ModelConfig, attn: Any, role: str, cross_attn: Any | None = None
    ) -> None:
        super().__init__()
        self.attn_norm = nn.RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.attn = build_attention(attn, cfg.dim, cfg.n_heads, role)
        self.cross_norm = self.cross_attn = None
        if cross_attn is not None:
            self.cross_norm = nn.RMSNorm(cfg.dim, eps=cfg.norm_eps)
            self.cross_attn = build_attention(cross_attn, cfg.dim, cfg.n_heads, "cross")
        self.mlp_norm = nn.RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.mlp = SwiGLU(cfg.dim, cfg.hidden)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(
        self,
        x: Tensor,
        *,
        positions: Tensor,
        mask: Tensor | None = None,
        cache: tuple[Any, Any] | None = None,
        memory: Tensor | None = None,
        memory_mask: Tensor | None = None,
    ) -> Tensor:
        """x (B, T, dim) -> (B, T, dim). ``cache`` is (self cache, cross cache or None)."""
        self_cache, cross_cache = cache if cache is not None else (None, None)
        h = self.attn(self.attn_norm(x), positions=positions, cache=self_cache, mask=mask)
        x = x + self.dropout(h)
        if self.cross_attn is not None:
            h = self.cross_attn(
                self.cross_norm(x),
                positions=positions,
                cache=cross_cache,
                memory=memory,
                mask=memory_mask,
            )
            x = x + self.dropout(h)
        return x + self.dropout(self.mlp(self.mlp_norm(x)))

    def init_cache(
        self,
        batch_size: int,
        max_len: int,
        device: torch.device | str,
        dtype: torch.dtype,
        memory_len: int | None = None,
    ) -> tuple[Any, Any]:
        self_cache = self.attn.init_cache(batch_size, max_len, device, dtype)
        cross_cache = None
        if self.cross_attn is not None:
            if memory_len is None:
                raise ValueError("a block with cross-attention needs memory_len for its cache")
            cross_cache = self.cross_attn.init_cache(batch_size, memory_len, device, dtype)
        return self_cache, cross_cache


def init_block_weights(blocks: nn.ModuleList, std: float, n_layers: int) -> None:
    """GPT-2 init: N(0, std), output projections scaled by 1/sqrt(2 * n_layers)."""
    out_std = std / (2 * n_layers) ** 0.5
    for block in blocks:
        for attn in (block.attn, block.cross_attn):
            if attn is not None:
                attn.init_weights(std, out_std)
        nn.init.normal_(block.mlp.gate_proj.weight, 0.0, std)
        nn.init.normal_(block.mlp.up_proj.weight, 0.0, std)
        nn.init.normal_(block.mlp.down_proj.weight, 0.0, out_std)


def positions_from_mask(
    mask: Tensor | None, batch_size: int, t: int, device: torch.device
) -> Tensor:
    """(B, T) positions: 0, 1, ... from each row's first real token (left padding -> 0)."""
    if mask is None:
        return torch.arange(t, device=device).expand(batch_size, t)
    return (mask.long().cumsum(-1) - 1).clamp(min=0)
