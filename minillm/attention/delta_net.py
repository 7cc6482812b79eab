"""DeltaNet (``delta_net``), Yang et al. 2024, "Parallelizing Linear Transformers with the Delta
Rule over Sequence Length".

Per head, S_t = (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T and o_t = q_t S_t (S is
(D_k, D_v), as in the other linear kinds): each token first erases what S held at its key, by
a fraction beta_t = sigmoid(x_t W_beta), then writes its value there, so a key written twice
reads back its latest value (plain linear attention only ever adds). Projections follow fla's
layer: q, k, v = silu(conv(x W)), with conv a short causal depthwise convolution over the last
``conv_size`` tokens of each projection (fla's ``use_short_conv=True``, kernel 4, no bias;
``conv_size=0`` drops it: silu(x W)). The conv lets a token's key and value carry its
neighbours', which is what binds a key to the value next to it (MQAR recall). Then q and k are
L2-normalised per head (which keeps every transition contractive) and q is scaled by
D_k^-1/2. The head outputs are RMS-normalised per head and projected back. Training runs the
chunkwise WY form of ``linear_ops.chunk_delta_rule``; decoding carries S, and the last
``conv_size - 1`` projections, in a ``ConvRecurrentState``, and steps one token with
``linear_ops.delta_rule_step``. No RoPE.

Causal only: the state is a sequential read-write memory. Left-padding steps get beta = 0
(and, gated, alpha = 1), so they leave the state untouched, and their projections are zeroed
before the conv (as the zeros before a row's first token), so a padded row equals its
unpadded self.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from minillm.attention.base import Attention
from minillm.attention.bounded_cache import RecurrentState
from minillm.attention.cache import static_address
from minillm.attention.linear_backends import chunk_delta_rule
from minillm.attention.linear_ops import delta_rule_step

L2_EPS = 1e-6  # x / sqrt(|x|^2 + eps), as fla's l2norm
CONV_INITS = ("default", "identity")


def l2_normalize(x: Tensor) -> Tensor:
    return x * torch.rsqrt(x.square().sum(-1, keepdim=True) + L2_EPS)


class ConvRecurrentState(RecurrentState):
    """``RecurrentState`` plus ``window`` (B, conv_size - 1, C): the last projections (q, k, v
    concatenated, C = 2 D_k H + D_v H) the short conv reads before the next token. O(1) in
    the sequence length. With ``lookahead > 0`` each ``update`` also saves the window it
    replaces, so ``rollback`` returns both to the same saved point.
    """

    _tensors = ("state", "normalizer", "window")

    def __init__(self, state: Tensor, window: Tensor, lookahead: int = 0) -> None:
        super().__init__(state, lookahead=lookahead)
        self.window = static_address(window)
        self.saved_windows: list[tuple[int, Tensor]] = []  # (length, window), as ``saved``

    def update(self, t: int, state: Tensor, window: Tensor) -> None:
        """The state and the window after ``t`` more tokens."""
        if self.lookahead:
            point = (self.length, self.window.clone())
            self.saved_windows = [*self.saved_windows[-self.lookahead :], point]
        self.window.copy_(window)
        super().update(t, state)

    def rollback(self, n: int) -> int:
        back = super().rollback(n)
        if back:
            while self.saved_windows[-1][0] > self.length:
                self.saved_windows.pop()
            self.window.copy_(self.saved_windows.pop()[1])
        return back

    def reorder(self, rows: Tensor) -> None:
        super().reorder(rows)
        self.saved_windows = [(n, w.index_select(0, rows)) for n, w in self.saved_windows]

    @property
    def nbytes(self) -> int:
        held = sum(w.numel() * w.element_size() for _, w in self.saved_windows)
        return super().nbytes + held


class DeltaNetAttention(Attention):
    roles = ("causal",)
    registry_key: ClassVar[str] = "delta_net"  # for messages raised before build sets kind

    @dataclass
    class Config:
        chunk_size: int = 64  # power of two; does not change results
        expand_k: float = 1.0  # key (and query) features = expand_k * dim
        expand_v: float = 1.0  # value features = expand_v * dim
        norm_eps: float = 1e-5
        conv_size: int = 4  # short causal conv on q, k, v over this many tokens; 0 = none
        conv_init: str = "default"  # nn.Conv1d's uniform draw, or "identity": taps (0,..,0,1)

    def __init__(self, cfg: Config, dim: int, n_heads: int, role: str) -> None:
        super().__init__(cfg, dim, n_heads, role)
        if cfg.chunk_size < 1 or cfg.chunk_size & (cfg.chunk_size - 1):
            raise ValueError(
                f"{self.registry_key} needs a power-of-two chunk_size, got {cfg.chunk_size}; try 64"
            )
        if cfg.conv_size < 0:
            raise ValueError(
                f"{self.registry_key} needs conv_size >= 0 (0 = no short conv), got "
                f"{cfg.conv_size}; try 4"
            )
        if cfg.conv_init not in CONV_INITS:
            raise ValueError(
                f"{self.registry_key}: conv_init={cfg.conv_init!r}; choose one of "
                f"{', '.join(CONV_INITS)}"
            )
        key_dim, value_dim = int(dim * cfg.expand_k), int(dim * cfg.expand_v)
        if key_dim % n_heads or value_dim % n_heads or not key_dim or not value_dim:
            raise ValueError(
                f"{self.registry_key}: key dim {key_dim} and value dim {value_dim} (expand_k, "
                f"expand_v times dim={dim}) must be positive multiples of n_heads={n_heads}"
            )
        self.key_dim, self.value_dim = key_dim, value_dim
        self.head_k, self.head_v = key_dim // n_heads, value_dim // n_heads
        self.q_proj = nn.Linear(dim, key_dim, bias=False)
        self.k_proj = nn.Linear(dim, key_dim, bias=False)
        self.v_proj = nn.Linear(dim, value_dim, bias=False)
        self.b_proj = nn.Linear(dim, n_heads, bias=False)  # beta, one per head
        if cfg.conv_size:  # depthwise, weight (C_i, 1, conv_size), as fla's ShortConvolution
            self.q_conv1d, self.k_conv1d, self.v_conv1d = (
                nn.Conv1d(c, c, cfg.conv_size, groups=c, bias=False)
                for c in (key_dim, key_dim, value_dim)
            )
        self._init_convs(redraw=False)  # built as initialised (the RNG stream as before)
        self.o_norm = nn.RMSNorm(self.head_v, eps=cfg.norm_eps)  # per head, shared weight
        self.o_proj = nn.Linear(value_dim, dim, bias=False)

    def init_weights(self, std: float, out_std: float) -> None:
        """Linear maps as the base class; the convs keep nn.Conv1d's default (as Mamba; fla's
        HF init draws N(0, std)), so a conv starts near unit gain and q, k, v keep their
        scale; ``conv_init="identity"`` starts each conv as the identity (the last tap 1), so
        the layer starts as its ``conv_size=0`` self and learns what to mix."""
        super().init_weights(std, out_std)
        self.o_norm.reset_parameters()
        self._init_convs(redraw=True)

    def _init_convs(self, redraw: bool) -> None:
        """Taps (0, ..., 0, 1) under conv_init="identity"; else nn.Conv1d's draw, drawn
        again if ``redraw``."""
        for conv in self.short_convs():
            if self.cfg.conv_init == "identity":
                with torch.no_grad():
                    conv.weight.zero_()[:, :, -1] = 1.0
            elif redraw:
                conv.reset_parameters()

    def short_convs(self) -> tuple[nn.Conv1d, ...]:
        return (self.q_conv1d, self.k_conv1d, self.v_conv1d) if self.cfg.conv_size else ()

    def init_cache(
        self,
        batch_size: int,
        max_len: int,
        device: torch.device | str,
        dtype: torch.dtype,
        lookahead: int = 0,
    ) -> RecurrentState:
        """State (B, H, D_k, D_v) kept in at least fp32, and with a conv the last conv_size - 1
        projections (B, conv_size - 1, C) in ``dtype``; ``max_len`` does not matter."""
        shape = (batch_size, self.n_heads, self.head_k, self.head_v)
        state = torch.zeros(shape, device=device, dtype=torch.promote_types(dtype, torch.float32))
        if not self.cfg.conv_size:
            return RecurrentState(state, lookahead=lookahead)
        shape = (batch_size, self.cfg.conv_size - 1, 2 * self.key_dim + self.value_dim)
        window = torch.zeros(shape, device=device, dtype=dtype)
        return ConvRecurrentState(state, window, lookahead=lookahead)

    def _heads(self, y: Tensor, d: int) -> Tensor:
        b, t, _ = y.shape
        return y.view(b, t, self.n_heads, d).transpose(1, 2)  # (B, H, T, d)

    def qkv(
        self, x: Tensor, mask: Tensor | None, window: Tensor | None
    ) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
        """silu(conv(x W)) for q, k, v (B, T, C_i), and the window to carry on (B, K - 1, C).

        ``window`` holds the projections of the K - 1 tokens before x (None: zeros, the
        start of a sequence). Padding projections are zeroed first, so a real token reads
        the same zeros before its row's first real token as it would unpadded.
        """
        u = torch.cat((self.q_proj(x), self.k_proj(x), self.v_proj(x)), -1)  # (B, T, C)
        sizes = (self.key_dim, self.key_dim, self.value_dim)
        if not self.cfg.conv_size:
            return (*F.silu(u).split(sizes, -1), None)
        b, t, c = u.shape
        if mask is not None:
            u = u * mask[:, :, None].to(u.dtype)
        if window is None:
            window = u.new_zeros(b, self.cfg.conv_size - 1, c)
        full = torch.cat((window.to(u.dtype), u), 1)  # (B, K - 1 + T, C)
        weight = torch.cat([conv.weight for conv in self.short_convs()]).to(u.dtype)  # (C, 1, K)
        if t == 1:  # a decode step: one weighted sum, no convolution call's overhead
            y = (full * weight[:, 0].t()).sum(1, keepdim=True)  # (B, 1, C)
        else:
            y = F.conv1d(full.transpose(1, 2), weight, groups=c).transpose(1, 2)  # (B, T, C)
        return (*F.silu(y).split(sizes, -1), full[:, t:])

    def log_decay(self, x: Tensor) -> Tensor | None:
        """log alpha (B, H, T) <= 0; None here: DeltaNet does not decay its state."""
        return None

    def output(self, y: Tensor, x: Tensor) -> Tensor:
        """y (B, H, T, D_v) head outputs -> per-head RMSNorm -> o_proj: (B, T, dim)."""
        b, _, t, _ = y.shape
        return self.o_proj(self.o_norm(y.transpose(1, 2)).reshape(b, t, self.value_dim))

    def flops_per_token(self, context: int) -> float:
        """Projections plus, per head and chunk of c tokens, per token: the k k^T and q k^T
        scores, the unit-triangular solve for [U~, W] (~ c/2 multiply-adds per column), the
        intra-chunk mixing, and the state read, correction and update (three D_k x D_v)."""
        c = min(self.cfg.chunk_size, 1 << (context - 1).bit_length())
        dk, dv = self.head_k, self.head_v
        per_head = 4 * c * dk + c * (dk + dv) + 2 * c * dv + 6 * dk * dv
        conv = 2 * self.cfg.conv_size * (2 * self.key_dim + self.value_dim)
        return self.projection_flops() + conv + self.n_heads * per_head

    def forward(
        self,
        x: Tensor,
        *,
        positions: Tensor,
        cache: RecurrentState | None = None,
        memory: Tensor | None = None,
        mask: Tensor | None = None,
    ) -> Tensor:
        b, t, _ = x.shape
        window = cache.window if cache is not None and self.cfg.conv_size else None
        q, k, v, window = self.qkv(x, mask, window)
        q = l2_normalize(self._heads(q, self.head_k)) * self.head_k**-0.5
        k = l2_normalize(self._heads(k, self.head_k))  # (B, H, T, D_k)
        v = self._heads(v, self.head_v)  # (B, H, T, D_v)
        beta = torch.sigmoid(self.b_proj(x)).transpose(1, 2)  # (B, H, T)
        log_alpha = self.log_decay(x)  # (B, H, T) or None
        if mask is not None:  # padding: beta = 0 and alpha = 1, the state passes unchanged
            real = mask[:, None, :].to(beta.dtype)  # (B, 1, T)
            beta = beta * real
            log_alpha = None if log_alpha is None else log_alpha * real
        if cache is None:
            state = k.new_zeros(b, self.n_heads, self.head_k, self.head_v)
        else:
            state = cache.state
        if t == 1 and cache is not None:  # a decode step: the recurrence itself
            y, state = delta_rule_step(q, k, v, beta, log_alpha, state)
        else:
            y, state = chunk_delta_rule(q, k, v, beta, log_alpha, state, self.cfg.chunk_size)
        if window is not None and cache is not None:
            cache.update(t, state, window)
        elif cache is not None:
            cache.update(t, state)
        return self.output(y, x)  # (B, T, dim)
