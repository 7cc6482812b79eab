"""What the twins share: the per-query softmax, RoPE as complex rotation, the positions' twins,
and projections written out."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from minillm.positions import Positions, alibi_slopes, relative_bucket
from minillm.positions.alibi import ALiBiPositions
from minillm.positions.rope import RotaryPositions
from minillm.positions.t5 import T5Positions


def rope_reference(x: Tensor, positions: Tensor, base: float) -> Tensor:
    """RoPE as complex rotation of pairs (i, i + D/2): x (B, H, T, D), positions (B, T)."""
    half = x.shape[-1] // 2
    z = torch.complex(x[..., :half].double(), x[..., half:].double())
    freqs = base ** (-torch.arange(half, dtype=torch.float64) * 2 / x.shape[-1])
    angle = positions.double()[:, None, :, None] * freqs  # (B, 1, T, D/2)
    z = z * torch.polar(torch.ones_like(angle), angle)
    return torch.cat((z.real, z.imag), dim=-1).to(x.dtype)


def softmax_reference(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    allowed: Callable[[int, int], bool],
    bias: Callable[[int, int, int], Tensor] | None = None,
) -> Tensor:
    """q (B, H, T, D), k/v (B, H, S, D) with KV heads already repeated; one query at a time.

    ``allowed(b, t)`` returns the list of key indices query t of row b may see; ``bias(b, t,
    j)`` the (H,) positions bias added to the scores of query t and key j of row b.
    """
    b_size, _, t_size, d = q.shape
    out = torch.zeros_like(q)
    for b in range(b_size):
        for t in range(t_size):
            keys = allowed(b, t)
            scores = (k[b][:, keys] @ q[b, :, t, :, None]).squeeze(-1) / math.sqrt(d)  # (H, n)
            if bias is not None:
                scores = scores + torch.stack([bias(b, t, j) for j in keys], dim=-1)
            out[b, :, t] = (scores.softmax(-1)[..., None] * v[b][:, keys]).sum(1)
    return out


def rotary_reference(module: Positions, x: Tensor, positions: Tensor) -> Tensor:
    """x (B, H, T, D) rotated as ``module`` says (``POSITION_TWINS``), or as is."""
    twin = POSITION_TWINS.get(type(module))
    return x if twin is None or module.mechanism != "rotary" else twin(module, x, positions)


def bias_reference(
    module: Positions, positions: Tensor
) -> Callable[[int, int, int], Tensor] | None:
    """``softmax_reference``'s ``bias`` for self-attention at ``positions`` (B, T), from the
    module's twin (``POSITION_TWINS``); None for kinds that add no bias."""
    twin = POSITION_TWINS.get(type(module))
    return None if twin is None or module.mechanism != "bias" else twin(module, positions)


def rope_twin(module: RotaryPositions, x: Tensor, positions: Tensor) -> Tensor:
    """RoPE at its base, NTK-scaled: base * ntk_factor ** (D / (D - 2))."""
    d = x.shape[-1]
    return rope_reference(x, positions, module.cfg.base * module.cfg.ntk_factor ** (d / (d - 2)))


def alibi_twin(module: ALiBiPositions, positions: Tensor) -> Callable[[int, int, int], Tensor]:
    """-slope_h * |position of query t - position of key j| for each head h."""
    slopes = torch.tensor(alibi_slopes(module.n_heads))
    return lambda b, t, j: -slopes * abs(int(positions[b, t]) - int(positions[b, j]))


def t5_twin(module: T5Positions, positions: Tensor) -> Callable[[int, int, int], Tensor]:
    """The table's (H,) row of the bucket of key j's position minus query t's."""
    n, far = module.cfg.n_buckets, module.cfg.max_distance

    def bias(b: int, t: int, j: int) -> Tensor:
        rel = torch.tensor(int(positions[b, j]) - int(positions[b, t]))
        return module.table.weight[relative_bucket(rel, not module.causal, n, far)]

    return bias


# positions kind -> its twin: a rotation (module, x, positions) -> x, or a bias maker
# (module, positions) -> bias(b, t, j). Kinds with neither (learned, none) leave attention alone.


POSITION_TWINS: dict[type[Positions], Callable[..., object]] = {
    RotaryPositions: rope_twin,
    ALiBiPositions: alibi_twin,
    T5Positions: t5_twin,
}


def project(layer: torch.nn.Linear, inp: Tensor) -> Tensor:
    out = inp @ layer.weight.T
    return out if layer.bias is None else out + layer.bias


def split_heads(y: Tensor, n: int) -> Tensor:
    b, t, _ = y.shape
    return y.view(b, t, n, -1).transpose(1, 2)  # (B, n, T, d)


def grouped_qkv(
    attn: torch.nn.Module, x: Tensor, src: Tensor, positions: Tensor | None
) -> tuple[Tensor, Tensor, Tensor]:
    """q from x, k and v from src, (B, H, *, D) each: rotated at ``positions`` as the kind's
    positions module says (None: not rotated, as cross-attention), K/V heads repeated."""
    q = split_heads(project(attn.q_proj, x), attn.n_heads)  # (B, H, T, D)
    k = split_heads(project(attn.k_proj, src), attn.n_kv_heads)  # (B, H_kv, S, D)
    v = split_heads(project(attn.v_proj, src), attn.n_kv_heads)
    if positions is not None:
        q = rotary_reference(attn.pos_encoding, q, positions)
        k = rotary_reference(attn.pos_encoding, k, positions)
    group = attn.n_heads // attn.n_kv_heads
    return q, k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
