"""Additive (Bahdanau) attention (``additive``), Bahdanau et al. 2015, "Neural Machine
Translation by Jointly Learning to Align and Translate", in multi-head form.

Per head h: score(q, k) = w_h^T tanh(W_q q + W_k k), softmax over the keys, output = weights @ V,
then ``o_proj``. ``q_proj`` / ``k_proj`` map tokens straight to ``d_att`` features per head (a
per-head query/key projection followed by Bahdanau's W_q / W_k is one linear map, so it is
folded into one); ``score`` holds w (H, d_att). Scores are not scaled: w learns the scale.

The tanh sits between the query and the key, so scores are no matmul: every (query, key)
pair costs ~4 * d_att elementwise FLOPs per head where ``mha`` does 2 * head_dim inside a GEMM,
and all pairs' pre-activations (B, H, T, S, d_att) are d_att times mha's score matrix. They
are never built at once:
queries go by blocks of ``chunk_size`` (default: as many as keep a block's tensor under
``BLOCK_ELEMENTS``), and in training each block is recomputed in the backward
(``torch.utils.checkpoint``), so memory is O(block * S * d_att) in both passes.

No RoPE: the score is not a dot product, so a rotation has nothing to preserve; like the
original (which ran on RNN states), order must come from causality and the rest of the
network. Masks are ``mha``'s (a left-pad query sees itself). The cache is a ``KVCache`` whose
keys are W_k k (d_att per head), so decoding recomputes no key projection; the cross role
projects the memory once and reads it back.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from minillm.attention.base import Attention
from minillm.attention.cache import KVCache, new_buffer
from minillm.attention.mha import softmax_attention_mask

BLOCK_ELEMENTS = 2**22  # default query block: its (B, H, block, S, d_att) tensor stays below this


class AdditiveKVCache(KVCache):
    """``KVCache`` holding projected keys W_k k (B, H, max_len, d_att) beside values
    (B, H, max_len, D); every read, write, reorder and rollback is ``KVCache``'s."""

    def __init__(
        self,
        batch_size: int,
        n_heads: int,
        max_len: int,
        key_dim: int,
        value_dim: int,
        device: torch.device | str,
        dtype: torch.dtype,
    ) -> None:
        super().__init__(batch_size, n_heads, max_len, value_dim, device, dtype)
        if key_dim != value_dim:
            self.k = new_buffer((batch_size, n_heads, max_len, key_dim), device, dtype)


class AdditiveAttention(Attention):
    roles = ("causal", "bidirectional", "cross")

    @dataclass
    class Config:
        d_att: int | None = None  # score MLP width per head; None: head_dim
        chunk_size: int | None = None  # queries per block (None: BLOCK_ELEMENTS); same results
        bias: bool = False

    def __init__(self, cfg: Config, dim: int, n_heads: int, role: str) -> None:
        super().__init__(cfg, dim, n_heads, role)
        self.d_att = cfg.d_att or self.head_dim
        if self.d_att < 1 or (cfg.chunk_size is not None and cfg.chunk_size < 1):
            raise ValueError(
                f"additive attention needs d_att >= 1 and chunk_size >= 1 (or None), got "
                f"d_att={cfg.d_att}, chunk_size={cfg.chunk_size}"
            )
        self.q_proj = nn.Linear(dim, n_heads * self.d_att, bias=cfg.bias)  # W_q, all heads
        self.k_proj = nn.Linear(dim, n_heads * self.d_att, bias=cfg.bias)  # W_k, all heads
        self.v_proj = nn.Linear(dim, dim, bias=cfg.bias)
        self.o_proj = nn.Linear(dim, dim, bias=cfg.bias)
        self.score = nn.Parameter(torch.empty(n_heads, self.d_att))  # w per head
        nn.init.normal_(self.score, 0.0, self.d_att**-0.5)

    def init_weights(self, std: float, out_std: float) -> None:
        """Linear maps as the base class; w ~ N(0, 1/d_att), so scores start O(1)."""
        super().init_weights(std, out_std)
        nn.init.normal_(self.score, 0.0, self.d_att**-0.5)

    def init_cache(
        self,
        batch_size: int,
        max_len: int,
        device: torch.device | str,
        dtype: torch.dtype,
        lookahead: int = 0,
    ) -> AdditiveKVCache:
        """W_k k and v for ``max_len`` + ``lookahead`` tokens (cross: ``max_len`` = source)."""
        n = max_len + lookahead
        return AdditiveKVCache(
            batch_size, self.n_heads, n, self.d_att, self.head_dim, device, dtype
        )

    def flops_per_token(self, context: int) -> float:
        """Projections plus, per head and key: the add W_q q + W_k k and the tanh (d_att each,
        one FLOP per element: a floor), w^T (2 * d_att) and the value sum (2 * head_dim).

        Unlike the softmax convention this counts elementwise work, because here it is most of
        the work: with d_att = head_dim it is 6 * head_dim per key against mha's 4 * head_dim,
        and it runs elementwise, far from matmul speed. Causal queries count all ``context``
        keys, as ``mha`` does.
        """
        per_key = 4 * self.d_att + 2 * self.head_dim
        return self.projection_flops() + self.n_heads * per_key * context

    def _heads(self, proj: nn.Linear, x: Tensor) -> Tensor:
        b, t, _ = x.shape
        return proj(x).view(b, t, self.n_heads, -1).transpose(1, 2)  # (B, H, T, d)

    def forward(
        self,
        x: Tensor,
        *,
        positions: Tensor,
        cache: AdditiveKVCache | None = None,
        memory: Tensor | None = None,
        mask: Tensor | None = None,
    ) -> Tensor:
        b, t, _ = x.shape
        a = self._heads(self.q_proj, x)  # (B, H, T, A) W_q q
        allowed, key_valid = None, None
        if self.role == "cross":
            if memory is None:
                keys, v, key_valid = cache.read()  # (B, H, S, A), (B, H, S, D)
            else:
                keys = self._heads(self.k_proj, memory)  # (B, H, S, A)
                v, key_valid = self._heads(self.v_proj, memory), mask  # (B, H, S, D)
                if cache is not None:
                    cache.update(keys, v, mask)
        else:
            keys, v = self._heads(self.k_proj, x), self._heads(self.v_proj, x)  # (B, H, T, *)
            if cache is not None:
                keys, v, allowed = cache.update(keys, v, mask)  # (B, H, S, *)
            else:
                key_valid = mask
        y = self._mix(a, keys, v, allowed, key_valid, weights_only=False)  # (B, H, T, D)
        return self.o_proj(y.transpose(1, 2).reshape(b, t, self.dim))

    def _mix(
        self,
        a: Tensor,
        keys: Tensor,
        v: Tensor,
        allowed: Tensor | None,
        key_valid: Tensor | None,
        weights_only: bool,
    ) -> Tensor:
        """Query block by query block: outputs (B, H, T, D), or the weights (B, H, T, S).

        ``allowed`` (B | 1, 1, T, S) from a cache, else each block's mask is built from
        ``key_valid`` (B, S) and causality, the queries being the last T of the S keys.
        """
        b, h, t, _ = a.shape
        s = keys.shape[2]
        block = self.cfg.chunk_size or max(1, BLOCK_ELEMENTS // (b * h * s * self.d_att))
        recompute = torch.is_grad_enabled() and not weights_only
        outs = []
        for lo in range(0, t, block):
            hi = min(lo + block, t)
            blk_keys, blk_v = keys, v
            if allowed is not None:
                blk_mask = allowed[:, :, lo:hi]  # (B | 1, 1, c, S)
            else:
                off = s - t + lo
                n = off + hi - lo if self.causal else s  # causal: no key after the block's last
                valid = None if key_valid is None else key_valid[:, :n]
                blk_mask = softmax_attention_mask(hi - lo, n, off, self.causal, valid, a.device)
                blk_keys, blk_v = keys[:, :, :n], v[:, :, :n]
            fn = self._weights if weights_only else self._block
            args = (a[:, :, lo:hi], blk_keys, blk_v, blk_mask)
            outs.append(checkpoint(fn, *args, use_reentrant=False) if recompute else fn(*args))
        if weights_only and self.causal and allowed is None:  # blocks saw fewer keys: pad with 0
            outs = [F.pad(o, (0, s - o.shape[-1])) for o in outs]
        return torch.cat(outs, dim=2)

    def _weights(self, a: Tensor, keys: Tensor, v: Tensor, allowed: Tensor | None) -> Tensor:
        """a (B, H, c, A), keys (B, H, S, A), allowed (B | 1, 1, c, S) -> softmax (B, H, c, S)."""
        b, h, c, n = *a.shape[:3], keys.shape[2]
        a, keys = a.contiguous(), keys.contiguous()  # so z is laid out (B, H, c, S, A) too
        z = (a[:, :, :, None, :] + keys[:, :, None, :, :]).tanh_()  # (B, H, c, S, A)
        scores = z.reshape(b, h, c * n, -1) @ self.score[:, :, None]  # (B, H, c * S, 1)
        scores = scores.view(b, h, c, n)  # (B, H, c, S)
        if allowed is not None:
            scores = scores.masked_fill(~allowed, float("-inf"))
        return scores.softmax(-1)

    def _block(self, a: Tensor, keys: Tensor, v: Tensor, allowed: Tensor | None) -> Tensor:
        return self._weights(a, keys, v, allowed) @ v  # (B, H, c, D)

    def attention_weights(self, x: Tensor, *, positions: Tensor) -> Tensor:
        """Softmax weights (B, H, T, T), rows summing to 1 (zero above the diagonal when
        causal); ``weights @ v`` is the output before ``o_proj``."""
        if self.role == "cross":
            raise NotImplementedError("attention_weights covers the self-attention roles")
        a, keys = self._heads(self.q_proj, x), self._heads(self.k_proj, x)  # (B, H, T, A)
        return self._mix(a, keys, keys, None, None, weights_only=True)
