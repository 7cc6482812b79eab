"""Vision Transformer (Dosovitskiy et al. 2021) from the one ``Block``: images -> class logits.

Patches of ``patch_size`` x ``patch_size`` pixels are embedded by one strided convolution (a
linear map of each flattened patch), given learned 2-D positions (a row table plus a column
table, ``2 * grid * dim`` parameters instead of ``grid**2 * dim``), and run through
bidirectional ``Block``s with ``cfg.attn``: any kind of ``kinds_for_role("bidirectional")``
(``mha``, ``linear``, ``local`` ...). Tokens are in raster order, row by row, and each kind
also sees their 1-D index as ``positions`` (the RoPE kinds rotate by it); ``local`` with
``window = 2 * grid + 1`` sees the patch row above and below. The sequence is pooled by the
mean over patches (``pool="mean"``) or by a learned class token in front (``pool="cls"``), then
RMSNorm and a linear head of ``n_classes`` (``vocab_size`` when ``n_classes`` is None).

Training goes through the language-model loss unchanged: ``hidden_states`` is the pooled state
as a length-1 sequence (B, 1, dim) and ``lm_head`` the classifier, so with labels (B, 1)
``linear_cross_entropy(hidden_states, lm_head.weight, labels)`` is the classification
cross-entropy. The head has no bias for that reason (the fused loss reads the weight only).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from minillm.models.block import Block, build_norm, dropout, init_block_weights
from minillm.models.config import ModelConfig


class ViT(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        n_classes = cfg.n_classes or cfg.vocab_size
        if not n_classes:
            raise ValueError("model.n_classes=None: set it, or model.vocab_size, for arch=vit")
        self.cfg = cfg
        self.grid = cfg.image_size // cfg.patch_size  # patches a side
        p = cfg.patch_size
        self.patch_emb = nn.Conv2d(cfg.channels, cfg.dim, kernel_size=p, stride=p)
        self.row_emb = nn.Parameter(torch.zeros(self.grid, cfg.dim))
        self.col_emb = nn.Parameter(torch.zeros(self.grid, cfg.dim))
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.dim)) if cfg.pool == "cls" else None
        self.dropout = dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg, attn, "bidirectional") for attn in cfg.layer_attns())
        self.norm = build_norm(cfg)
        self.lm_head = nn.Linear(cfg.dim, n_classes, bias=False)  # the classifier
        for table in (self.row_emb, self.col_emb, self.cls_token, self.lm_head.weight):
            if table is not None:
                nn.init.normal_(table, 0.0, cfg.init_std)
        init_block_weights(self.blocks, cfg.init_std, cfg.n_layers)

    @property
    def n_tokens(self) -> int:
        """Sequence length the blocks see: the patches, plus the class token if any."""
        return self.grid**2 + (self.cls_token is not None)

    def embed(self, pixels: Tensor) -> Tensor:
        """pixels (B, C, H, W) -> tokens (B, N, dim) with positions (class token first)."""
        cfg = self.cfg
        if pixels.shape[1:] != (cfg.channels, cfg.image_size, cfg.image_size):
            raise ValueError(
                f"pixels of shape {tuple(pixels.shape[1:])} do not fit model.channels="
                f"{cfg.channels}, model.image_size={cfg.image_size}"
            )
        x = self.patch_emb(pixels)  # (B, dim, g, g)
        x = x.flatten(2).transpose(1, 2)  # (B, g*g, dim), raster order
        pos = self.row_emb[:, None, :] + self.col_emb[None, :, :]  # (g, g, dim)
        x = x + pos.flatten(0, 1)  # (B, g*g, dim)
        if self.cls_token is not None:
            x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1)  # (B, N, dim)
        return self.dropout(x)

    def hidden_states(self, pixels: Tensor) -> Tensor:
        """pixels (B, C, H, W) -> pooled features (B, 1, dim) after the final norm."""
        x = self.embed(pixels)  # (B, N, dim)
        b, n, _ = x.shape
        positions = torch.arange(n, device=x.device).expand(b, n)  # (B, N)
        for block in self.blocks:
            x = block(x, positions=positions)
        if self.cls_token is not None:
            pooled = x[:, :1]  # (B, 1, dim)
        else:
            pooled = x.mean(dim=1, keepdim=True)  # (B, 1, dim)
        return self.norm(pooled)

    def forward(self, pixels: Tensor) -> Tensor:
        """pixels (B, C, H, W) -> logits (B, n_classes)."""
        return self.lm_head(self.hidden_states(pixels)[:, 0])

    def num_params(self, non_embedding: bool = False) -> int:
        """Parameters; ``non_embedding`` leaves out the position tables (as the LMs do)."""
        n = sum(p.numel() for p in self.parameters())
        return n - (self.row_emb.numel() + self.col_emb.numel() if non_embedding else 0)
