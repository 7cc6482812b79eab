"""Sparse attention (``sparse``): Longformer's sliding window + global tokens, with BigBird's
optional random blocks. O(T * window) time and memory; no T x T mask is ever built.

``window`` is what a query reads: its ``n_global`` global tokens and ``local = window -
n_global`` neighbours. The global tokens are the first ``n_global`` real tokens of each row
(positions 0 .. n_global - 1, so left padding is invisible). Causal: query p sees keys p -
local < s <= p and the global tokens s < n_global with s <= p (a global token sees only its
past, which window and globals cover). Bidirectional: |p - s| <= local // 2, every global key,
and a global query sees every key; with ``random_blocks`` = r > 0, each block of
``block_size`` queries also reads r key blocks (BigBird) chosen by a hash of a per-layer seed
(the ``random_seed`` buffer, saved with the weights) and the block numbers, among the row's
blocks: reproducible, and the same for a row whatever its padding. Random blocks need the
whole past, which no bounded cache holds, so they are bidirectional only. A padding query sees
only itself. Keys are rotated as ``model.positions`` says (RoPE by default), as in ``local``.

Computed by query blocks: each block reads its band plus the global keys (and its random
blocks) in one batched SDPA call under a (block, band + extras) mask; global queries read all
keys in a separate (n_global, T) call. The causal cache (``SparseKVCache``) holds the global
tokens and a ring of ``local`` slots: O(window) whatever the length. No ``cross`` role: the
window has no meaning between unaligned query and memory positions.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from minillm.attention.base import Attention
from minillm.attention.bounded_cache import SparseKVCache
from minillm.attention.sparse_ops import random_key_blocks, sparse_attention, take_rows


class SparseAttention(Attention):
    roles = ("causal", "bidirectional")
    # rotations (RoPE, the default), or positions outside attention; a score bias would have
    # to follow the pattern's gathered keys, which is not wired (alibi, t5: the build error)
    positions_accepted = ("rotary", "absolute", "none")

    @dataclass
    class Config:
        window: int = 256  # keys a query reads: its n_global global tokens + its neighbours
        n_global: int = 2  # first tokens of each row that see and are seen by all
        random_blocks: int = 0  # BigBird random key blocks per query block (bidirectional)
        block_size: int = 64  # query block of the computation and size of a random block
        n_kv_heads: int | None = None  # None: one KV head per query head
        dropout: float = 0.0
        bias: bool = False

    def __init__(self, cfg: Config, dim: int, n_heads: int, role: str) -> None:
        super().__init__(cfg, dim, n_heads, role)
        if not 0 <= cfg.n_global < cfg.window:
            raise ValueError(
                f"sparse attention needs 0 <= n_global < window, got n_global={cfg.n_global}, "
                f"window={cfg.window}; window counts the global tokens, so raise it"
            )
        if cfg.block_size < 1 or cfg.random_blocks < 0:
            raise ValueError(
                f"sparse attention needs block_size >= 1 and random_blocks >= 0, got "
                f"block_size={cfg.block_size}, random_blocks={cfg.random_blocks}"
            )
        if cfg.random_blocks and self.causal:
            raise ValueError(
                f"random_blocks={cfg.random_blocks}: random blocks need the whole past, which "
                "the causal cache does not keep; set random_blocks=0 for causal attention"
            )
        self.grouped_kv_projections(cfg.n_kv_heads, cfg.bias)
        self.local = cfg.window - cfg.n_global  # neighbours a query reads, itself included
        self.before = self.local - 1 if self.causal else self.local // 2
        self.after = 0 if self.causal else self.local // 2
        # per-layer seed of the random blocks, saved in checkpoints (drawn from torch's RNG)
        self.register_buffer("random_seed", torch.randint(1 << 31, ()))

    def init_cache(
        self,
        batch_size: int,
        max_len: int,
        device: torch.device | str,
        dtype: torch.dtype,
        lookahead: int = 0,
    ) -> SparseKVCache:
        """``window`` (+ ``lookahead``) slots whatever ``max_len``: memory O(window)."""
        shape = (batch_size, self.n_kv_heads, self.cfg.n_global, self.local, self.head_dim)
        return SparseKVCache(*shape, device, dtype, lookahead=lookahead)

    def _heads(self, proj: nn.Linear, x: Tensor, n: int) -> Tensor:
        b, t, _ = x.shape
        return proj(x).view(b, t, n, self.head_dim)  # (B, T, n, D)

    def flops_per_token(self, context: int) -> float:
        """Projections plus QK^T and AV over the keys a query reads (window, random blocks);
        bidirectional global queries read all ``context`` keys: n_global more per token."""
        keys = min(self.before + self.after + 1 + self.cfg.n_global, context)
        if not self.causal:
            random = self.cfg.random_blocks * self.cfg.block_size
            keys = min(keys + random, context) + self.cfg.n_global
        return self.projection_flops() + 4 * self.n_heads * self.head_dim * keys

    def forward(
        self,
        x: Tensor,
        *,
        positions: Tensor,
        cache: SparseKVCache | None = None,
        memory: Tensor | None = None,
        mask: Tensor | None = None,
    ) -> Tensor:
        b, t, _ = x.shape
        q = self._heads(self.q_proj, x, self.n_heads)  # (B, T, H, D)
        k = self._heads(self.k_proj, x, self.n_kv_heads)  # (B, T, H_kv, D)
        v = self._heads(self.v_proj, x, self.n_kv_heads)
        q, k = self.pos_encoding.rotate(q, k, positions, seq_dim=1)  # RoPE unless told
        dropout = self.cfg.dropout if self.training else 0.0
        if cache is None:
            y = self._parallel(q, k, v, mask, dropout)
        elif not self.causal:
            raise ValueError("bidirectional sparse attention runs once; it takes no cache")
        else:
            k, v, valid, gk, gv, g_valid = cache.update(
                k.transpose(1, 2), v.transpose(1, 2), mask, positions
            )  # (B, H_kv, P + T, D), (B, H_kv, n_global, D)
            g = torch.arange(self.cfg.n_global, device=x.device)
            g_allowed = g_valid[:, None, :] & (g < positions[:, :, None] - self.before)  # (B,T,g)
            if t == 1:  # a decode step: one SDPA call over the globals and the ring
                y = self._step(
                    q, torch.cat((gk, k), 2), torch.cat((gv, v), 2), g_allowed, valid, mask
                )
                return self.o_proj(y.reshape(b, t, self.dim))
            extra = (gk.transpose(1, 2)[:, None], gv.transpose(1, 2)[:, None], g_allowed)
            k, v = k.transpose(1, 2), v.transpose(1, 2)  # (B, P + T, H_kv, D)
            y = sparse_attention(
                q, k, v, valid, mask, self.before, 0, extra, self.cfg.block_size, dropout
            )
        return self.o_proj(y.reshape(b, t, self.dim))

    def _step(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        g_allowed: Tensor,
        valid: Tensor | None,
        mask: Tensor | None,
    ) -> Tensor:
        """One query (B, 1, H, D) over k, v (B, H_kv, g + P + 1, D): the globals outside its
        band (``g_allowed`` (B, 1, g)), then the ring and itself (``valid`` (B, P + 1) or None:
        all held). As ``sparse_attention``: a padding query sees only itself. (B, 1, H, D)."""
        b, n = q.shape[0], k.shape[2]
        ring = g_allowed.new_ones(b, n - g_allowed.shape[-1]) if valid is None else valid
        allowed = torch.cat((g_allowed[:, 0], ring), -1)  # (B, g + P + 1)
        if mask is not None:
            allowed = allowed & mask
        allowed[:, -1] = True  # its own key
        y = F.scaled_dot_product_attention(
            q.transpose(1, 2),
            k,
            v,
            attn_mask=allowed[:, None, None],
            enable_gqa=self.n_heads != k.shape[1],
        )  # (B, H, 1, D)
        return y.transpose(1, 2)

    def _parallel(
        self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, dropout: float
    ) -> Tensor:
        """Whole sequences. Rows are first rotated so each starts at its first real token
        (index = position for real tokens; left padding moves to the end), then back."""
        b, t, h, d = q.shape
        if mask is not None:
            shift = (~mask).long().cumprod(1).sum(1)  # (B,) leading padding tokens
            idx = (torch.arange(t, device=q.device) + shift[:, None]) % t  # (B, T)
            q, k, v, mask = (take_rows(x, idx) for x in (q, k, v, mask))
        g = self.cfg.n_global
        pos = torch.arange(t, device=q.device)[:, None]  # (T, 1)
        key_valid = torch.ones(b, t, dtype=torch.bool, device=q.device) if mask is None else mask
        gs = torch.arange(min(g, t), device=q.device)  # (g,)
        seen = gs < pos - self.before
        if not self.causal:
            seen = seen | (gs > pos + self.after)  # (T, g)
        extra = (k[:, None, : len(gs)], v[:, None, : len(gs)], key_valid[:, None, : len(gs)] & seen)
        if self.cfg.random_blocks and not self.causal:
            extra = self._with_random_blocks(k, v, key_valid, extra)
        y = sparse_attention(
            q, k, v, mask, mask, self.before, self.after, extra, self.cfg.block_size, dropout
        )  # (B, T, H, D)
        if g and not self.causal:  # global queries read every key
            qg = q[:, :g].transpose(1, 2)  # (B, H, g, D)
            own = torch.arange(t, device=q.device) == gs[:, None]  # (g, T)
            q_ok = key_valid[:, : len(gs), None]  # (B, g, 1)
            allowed = ((key_valid[:, None, :] & q_ok) | own)[:, None]  # (B, 1, g, T)
            yg = F.scaled_dot_product_attention(
                qg,
                k.transpose(1, 2),
                v.transpose(1, 2),
                attn_mask=allowed,
                dropout_p=dropout,
                enable_gqa=h != k.shape[2],
            )  # (B, H, g, D)
            y = torch.cat((yg.transpose(1, 2), y[:, g:]), 1)
        if mask is not None:
            y = take_rows(y, (torch.arange(t, device=q.device) - shift[:, None]) % t)
        return y

    def _with_random_blocks(
        self, k: Tensor, v: Tensor, key_valid: Tensor, extra: tuple[Tensor, Tensor, Tensor]
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Append each query block's random key blocks to its extra keys (position space)."""
        b, t = key_valid.shape
        bs = self.cfg.block_size
        n = -(-t // bs)
        row_blocks = -(-key_valid.sum(1) // bs)  # (B,) blocks holding real tokens
        blocks = random_key_blocks(self.random_seed, row_blocks, n, self.cfg.random_blocks)
        keys = (blocks[..., None] * bs + torch.arange(bs, device=k.device)).flatten(2)  # (B,n,E)
        ok = keys < t
        keys = keys.clamp(max=t - 1)
        ok = ok & key_valid.gather(1, keys.flatten(1)).view(keys.shape)  # (B, n, E)
        rows = torch.arange(b, device=k.device)[:, None, None]
        rk, rv = k[rows, keys], v[rows, keys]  # (B, n, E, H_kv, D)
        pos = torch.arange(n * bs, device=k.device).view(1, n, bs, 1)  # (1, n, block, 1)
        far = (keys[:, :, None] < pos - self.before) | (keys[:, :, None] > pos + self.after)
        allowed = (ok[:, :, None] & far & (keys[:, :, None] >= self.cfg.n_global)).flatten(1, 2)
        gk, gv, g_allowed = extra
        return (
            torch.cat((gk.expand(b, n, *gk.shape[2:]), rk), 2),
            torch.cat((gv.expand(b, n, *gv.shape[2:]), rv), 2),
            torch.cat((g_allowed, allowed[:, :t]), -1),
        )

    def pattern(self, t: int) -> Tensor:
        """(T, T) bool: query i reads key j, for a row of T real tokens."""
        i = torch.arange(t, device=self.random_seed.device)
        rel = i[None, :] - i[:, None]  # key index minus query index
        seen = (rel >= -self.before) & (rel <= self.after) | (i[None, :] < self.cfg.n_global)
        if self.causal:
            return seen & (rel <= 0)
        seen = seen | (i[:, None] < self.cfg.n_global)
        if self.cfg.random_blocks:
            bs = self.cfg.block_size
            n = -(-t // bs)
            row_blocks = torch.tensor([n], device=i.device)
            blocks = random_key_blocks(self.random_seed, row_blocks, n, self.cfg.random_blocks)
            linked = torch.zeros(n, n, dtype=torch.bool, device=i.device)
            linked = linked.scatter_(1, blocks[0], True)  # (n, n) query block -> key block
            seen = seen | linked[i // bs][:, i // bs]
        return seen

    def attention_weights(self, x: Tensor, *, positions: Tensor) -> Tensor:
        """Softmax weights (B, H, T, T) over each query's keys (``pattern``), zero elsewhere;
        with V's KV heads repeated, ``weights @ v`` is the output before ``o_proj``."""
        q = self._heads(self.q_proj, x, self.n_heads).transpose(1, 2)  # (B, H, T, D)
        k = self._heads(self.k_proj, x, self.n_kv_heads).transpose(1, 2)  # (B, H_kv, T, D)
        q, k = self.pos_encoding.rotate(q, k, positions)
        k = k.repeat_interleave(self.n_heads // self.n_kv_heads, dim=1)  # (B, H, T, D)
        scores = q @ k.transpose(-1, -2) * self.head_dim**-0.5  # (B, H, T, T)
        return scores.masked_fill(~self.pattern(x.shape[1]), float("-inf")).softmax(-1)
