"""Performer attention (``performer``), Choromanski et al. 2020, "Rethinking Attention with
Performers": FAVOR+ positive orthogonal random features.

exp(q . k / sqrt(D)) = E_w[phi(q) . phi(k)] with phi(x) = exp(w^T x - |x|^2 / 2) / sqrt(m) for
Gaussian w and q, k scaled by D^-1/4; ``n_features`` = m draws in orthogonal blocks (rows of
random rotations, each rescaled to a Gaussian vector's length) lower the estimate's variance.
Then o_t = phi(q_t) S / (phi(q_t) . z + eps) as in ``linear``: causal in the chunkwise form of
``linear_ops`` (O(T m D)), bidirectional with global sums, cross with a source summary
computed once. Padding keys are zeroed after the feature map, so they add nothing.

Stabiliser: a query's exponents are shifted by their max (a per-query factor, which cancels
between numerator and denominator); keys need none, since w^T k - |k|^2 / 2 <= |w|^2 / 2, and
a data-dependent key shift would differ between a full forward and a cache's pieces.

``features`` (m, D) is a buffer saved with the weights, so a checkpoint generates the same
text. In training mode it is redrawn every ``redraw_interval`` forward calls (0: never) from a
generator seeded by ``feature_seed`` + the redraw count (the same draw on every DDP rank; the
counts travel in the state dict as ``redraw_count``, so a resume keeps the schedule);
never in eval. No RoPE (as ``linear``: rotation would break the features' positivity).
Caches are ``RecurrentState`` (S (B, H, m, D), z (B, H, m)), fixed size whatever the length.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from minillm.attention.base import Attention
from minillm.attention.bounded_cache import RecurrentState
from minillm.attention.linear_ops import (
    chunk_linear_attention,
    linear_attention_readout,
    linear_attention_summary,
)

SEGMENT = 4096  # tokens per call of the causal chunkwise form (rounded to whole chunks)


def orthogonal_gaussian(m: int, d: int, generator: torch.Generator | None = None) -> Tensor:
    """(m, d): blocks of d orthonormal rows (QR of a Gaussian matrix), each row rescaled to
    the length of an independent Gaussian vector, so every row is marginally N(0, I)."""
    blocks = []
    for _ in range(-(-m // d)):
        q, r = torch.linalg.qr(torch.randn(d, d, generator=generator))
        q = q * r.diagonal().sign()  # Householder QR fixes signs; this makes Q Haar-uniform
        blocks.append(q.T)  # (d, d) orthonormal rows
    norms = torch.randn(m, d, generator=generator).norm(dim=1)  # (m,) chi(d)
    return torch.cat(blocks)[:m] * norms[:, None]


def favor_features(x: Tensor, w: Tensor, is_query: bool) -> Tensor:
    """Positive random features of x (B, H, T, D): (B, H, T, m) in at least fp32, x scaled by
    D^-1/4.

    Every per-token term (|x|^2 / 2, the query shift, log sqrt(m)) is one (B, H, T, 1) offset,
    so the (B, H, T, m) tensor is written by the matmul and updated twice in place (these
    memory-bound passes, not the matmul, dominate at long T). For a query the max of
    w^T x - |x|^2 / 2 is max(w^T x) - |x|^2 / 2, so its |x|^2 term cancels.
    """
    x = x.to(torch.promote_types(x.dtype, torch.float32)) * x.shape[-1] ** -0.25
    z = x @ w.to(x.dtype).T  # (B, H, T, m)
    if is_query:  # per-query shift: cancels in phi(q) S / phi(q) . z
        offset = z.amax(-1, keepdim=True)
    else:
        offset = x.square().sum(-1, keepdim=True) / 2  # (B, H, T, 1)
    return (z - (offset + 0.5 * math.log(w.shape[0]))).exp_()


class PerformerAttention(Attention):
    roles = ("causal", "bidirectional", "cross")

    @dataclass
    class Config:
        n_features: int = 128  # random features m; the estimate's variance falls as 1/m
        redraw_interval: int = 1000  # training forward calls between redraws; 0: never
        chunk_size: int = 64  # tokens per chunk of the causal form; does not change results
        eps: float = 1e-6  # added to the normaliser phi(q) . z
        bias: bool = False

    def __init__(self, cfg: Config, dim: int, n_heads: int, role: str) -> None:
        super().__init__(cfg, dim, n_heads, role)
        if cfg.n_features < 1 or cfg.chunk_size < 1 or cfg.redraw_interval < 0:
            raise ValueError(
                f"performer needs n_features >= 1, chunk_size >= 1 and redraw_interval >= 0, got "
                f"{cfg.n_features}, {cfg.chunk_size}, {cfg.redraw_interval}"
            )
        self.q_proj = nn.Linear(dim, dim, bias=cfg.bias)
        self.k_proj = nn.Linear(dim, dim, bias=cfg.bias)
        self.v_proj = nn.Linear(dim, dim, bias=cfg.bias)
        self.o_proj = nn.Linear(dim, dim, bias=cfg.bias)
        self.register_buffer("feature_seed", torch.randint(1 << 31, ()))  # from torch's RNG
        self.register_buffer("features", orthogonal_gaussian(cfg.n_features, self.head_dim))
        self.training_calls = 0  # training forwards since construction
        self.redraws = 0

    def _save_to_state_dict(self, destination: dict, prefix: str, keep_vars: bool) -> None:
        """Also ``<prefix>redraw_count`` = [training calls, redraws]: a resumed run redraws on
        the same schedule and draws what the uninterrupted run would have drawn. The counts
        stay Python ints in the module (a tensor counter would cost a host sync a step)."""
        super()._save_to_state_dict(destination, prefix, keep_vars)
        destination[prefix + "redraw_count"] = torch.tensor([self.training_calls, self.redraws])

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args: object) -> None:
        counts = state_dict.pop(prefix + "redraw_count", None)  # absent in older checkpoints
        if counts is not None:
            self.training_calls, self.redraws = (int(n) for n in counts)
        super()._load_from_state_dict(state_dict, prefix, *args)

    def redraw_features(self) -> None:
        """New orthogonal features, drawn from ``feature_seed`` + the number of redraws."""
        self.redraws += 1
        generator = torch.Generator().manual_seed(int(self.feature_seed) + self.redraws)
        w = orthogonal_gaussian(self.cfg.n_features, self.head_dim, generator)
        self.features.copy_(w)

    def init_cache(
        self,
        batch_size: int,
        max_len: int,
        device: torch.device | str,
        dtype: torch.dtype,
        lookahead: int = 0,
    ) -> RecurrentState:
        """State (B, H, m, D) and normaliser (B, H, m) in at least fp32; ``max_len`` unused."""
        shape = (batch_size, self.n_heads, self.cfg.n_features)
        dtype = torch.promote_types(dtype, torch.float32)
        state = torch.zeros(*shape, self.head_dim, device=device, dtype=dtype)
        normalizer = torch.zeros(shape, device=device, dtype=dtype)
        return RecurrentState(state, normalizer, lookahead=lookahead)

    def _heads(self, proj: nn.Linear, x: Tensor) -> Tensor:
        b, t, _ = x.shape
        return proj(x).view(b, t, self.n_heads, self.head_dim).transpose(1, 2)  # (B, H, T, D)

    def _keys_values(self, src: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor]:
        k = favor_features(self._heads(self.k_proj, src), self.features, False)  # (B, H, S, m)
        if mask is not None:
            k = k * mask[:, None, :, None].to(k.dtype)  # padding keys contribute nothing
        return k, self._heads(self.v_proj, src)

    def flops_per_token(self, context: int) -> float:
        """Projections, the q and k feature maps (m x D each), then as ``linear`` with m-wide
        keys: the causal form's state read/update (v carries a ones column, hence D + 1) and
        intra-chunk products, or the global form's summary and readout."""
        d, m = self.head_dim, self.cfg.n_features
        features = 2 * (2 * m * d)
        if not self.causal:
            return self.projection_flops() + self.n_heads * (features + 4 * m * d + 2 * m)
        c = min(self.cfg.chunk_size, context)
        mixing = 4 * m * (d + 1) + 2 * c * (m + d + 1)
        return self.projection_flops() + self.n_heads * (features + mixing)

    def forward(
        self,
        x: Tensor,
        *,
        positions: Tensor,
        cache: RecurrentState | None = None,
        memory: Tensor | None = None,
        mask: Tensor | None = None,
    ) -> Tensor:
        if self.training and self.cfg.redraw_interval:
            self.training_calls += 1
            if self.training_calls % self.cfg.redraw_interval == 0:
                self.redraw_features()
        b, t, _ = x.shape
        if self.causal:
            y = self._causal(x, cache, mask)
        else:
            q = favor_features(self._heads(self.q_proj, x), self.features, True)  # (B, H, T, m)
            if self.role == "cross" and memory is None:
                s, z = cache.state, cache.normalizer  # source summary, written at the first call
            else:
                k, v = self._keys_values(memory if self.role == "cross" else x, mask)
                s, z = linear_attention_summary(k, v)  # (B, H, m, D), (B, H, m)
                if cache is not None:
                    cache.update(k.shape[2], s, z)
            y = linear_attention_readout(q, s, z, self.cfg.eps)  # (B, H, T, D)
        return self.o_proj(y.to(x.dtype).transpose(1, 2).reshape(b, t, self.dim))

    def _causal(self, x: Tensor, cache: RecurrentState | None, mask: Tensor | None) -> Tensor:
        """Chunkwise causal form, fed ``SEGMENT`` tokens at a time (whole chunks, so results do
        not change) with the state carried over: the (T, m) feature temporaries stay small.
        Split, not sliced, so backward stays linear in T."""
        q = self._heads(self.q_proj, x)  # (B, H, T, D)
        k, v = self._heads(self.k_proj, x), self._heads(self.v_proj, x)
        if cache is None:
            dtype = torch.promote_types(q.dtype, torch.float32)
            s = q.new_zeros(*q.shape[:2], self.cfg.n_features, self.head_dim, dtype=dtype)
            z = q.new_zeros(*q.shape[:2], self.cfg.n_features, dtype=dtype)
        else:
            s, z = cache.state, cache.normalizer
        segment = self.cfg.chunk_size * max(1, SEGMENT // self.cfg.chunk_size)
        masks = [None] * -(-x.shape[1] // segment) if mask is None else mask.split(segment, 1)
        ys = []
        for q_i, k_i, v_i, m_i in zip(
            *(u.split(segment, 2) for u in (q, k, v)), masks, strict=True
        ):
            k_i = favor_features(k_i, self.features, False)  # (B, H, seg, m)
            if m_i is not None:
                k_i = k_i * m_i[:, None, :, None].to(k_i.dtype)  # padding keys add nothing
            q_i = favor_features(q_i, self.features, True)
            y, s, z = chunk_linear_attention(q_i, k_i, v_i, s, z, self.cfg.chunk_size, self.cfg.eps)
            ys.append(y)  # (B, H, seg, D)
        if cache is not None:
            cache.update(x.shape[1], s, z)
        return torch.cat(ys, 2)  # (B, H, T, D)

    def attention_weights(self, x: Tensor, *, positions: Tensor) -> Tensor:
        """phi(q_t) . phi(k_s) over the keys query t sees, divided by their sum (+ eps):
        (B, H, T, T), non-negative, rows summing to ~1; ``weights @ v`` is the output before
        ``o_proj``."""
        if self.role == "cross":
            raise NotImplementedError("attention_weights covers the self-attention roles")
        q = favor_features(self._heads(self.q_proj, x), self.features, True)  # (B, H, T, m)
        k = favor_features(self._heads(self.k_proj, x), self.features, False)
        scores = q @ k.transpose(-1, -2)  # (B, H, T, T)
        if self.causal:
            scores = scores.tril()
        return scores / (scores.sum(-1, keepdim=True) + self.cfg.eps)
