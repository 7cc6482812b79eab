"""Slow, obvious twins of the attention kinds, used only by tests.

Each twin recomputes a module's output from its own weights with explicit per-query loops and
no fused kernels, so the fast path (SDPA, chunked forms, caches) can be checked against it,
outputs and gradients. ``REFERENCES`` maps a kind's class to its twin.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from minillm.attention.additive import AdditiveAttention
from minillm.attention.base import Attention
from minillm.attention.delta_net import DeltaNetAttention
from minillm.attention.gated_delta_net import GatedDeltaNetAttention
from minillm.attention.gated_linear import GatedLinearAttention
from minillm.attention.linear import LinearAttention
from minillm.attention.linformer import LinformerAttention
from minillm.attention.local import LocalAttention
from minillm.attention.mha import MultiHeadAttention
from minillm.attention.performer import PerformerAttention
from minillm.attention.sparse import SparseAttention, random_key_blocks
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


def mha_reference(
    attn: MultiHeadAttention,
    x: Tensor,
    *,
    positions: Tensor,
    memory: Tensor | None = None,
    mask: Tensor | None = None,
) -> Tensor:
    b, t, _ = x.shape
    src = memory if attn.role == "cross" else x
    s = src.shape[1]
    q = _split_heads(_project(attn.q_proj, x), attn.n_heads)  # (B, H, T, D)
    k = _split_heads(_project(attn.k_proj, src), attn.n_kv_heads)  # (B, H_kv, S, D)
    v = _split_heads(_project(attn.v_proj, src), attn.n_kv_heads)
    bias = None  # cross-attention has no positions
    if attn.role != "cross":
        q = rotary_reference(attn.pos_encoding, q, positions)
        k = rotary_reference(attn.pos_encoding, k, positions)
        bias = bias_reference(attn.pos_encoding, positions)
    group = attn.n_heads // attn.n_kv_heads
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    valid = mask if mask is not None else torch.ones(b, s, dtype=torch.bool)

    def allowed(row: int, query: int) -> list[int]:
        if not attn.causal:
            return [j for j in range(s) if valid[row, j]]
        # a causal query always sees itself, so a left-pad query gets a finite output
        return [j for j in range(query + 1) if valid[row, j] or j == query]

    y = softmax_reference(q, k, v, allowed, bias)
    return _project(attn.o_proj, y.transpose(1, 2).reshape(b, t, attn.dim))


def _project(layer: torch.nn.Linear, inp: Tensor) -> Tensor:
    out = inp @ layer.weight.T
    return out if layer.bias is None else out + layer.bias


def _split_heads(y: Tensor, n: int) -> Tensor:
    b, t, _ = y.shape
    return y.view(b, t, n, -1).transpose(1, 2)  # (B, n, T, d)


def local_reference(
    attn: LocalAttention,
    x: Tensor,
    *,
    positions: Tensor,
    memory: Tensor | None = None,
    mask: Tensor | None = None,
) -> Tensor:
    """Full softmax per query over the keys of its window: causal t - window < s <= t,
    bidirectional |t - s| <= window // 2; a query always sees itself (finite pad outputs)."""
    b, t, _ = x.shape
    pos = attn.pos_encoding
    q = rotary_reference(pos, _split_heads(_project(attn.q_proj, x), attn.n_heads), positions)
    k = rotary_reference(pos, _split_heads(_project(attn.k_proj, x), attn.n_kv_heads), positions)
    v = _split_heads(_project(attn.v_proj, x), attn.n_kv_heads)
    group = attn.n_heads // attn.n_kv_heads
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    valid = mask if mask is not None else torch.ones(b, t, dtype=torch.bool)
    window = attn.cfg.window
    before, after = (window - 1, 0) if attn.causal else (window // 2, window // 2)

    def allowed(row: int, query: int) -> list[int]:
        near = range(max(0, query - before), min(t, query + after + 1))
        return [j for j in near if valid[row, j] or j == query]

    y = softmax_reference(q, k, v, allowed, bias_reference(pos, positions))
    return _project(attn.o_proj, y.transpose(1, 2).reshape(b, t, attn.dim))


def linear_reference(
    attn: LinearAttention,
    x: Tensor,
    *,
    positions: Tensor,
    memory: Tensor | None = None,
    mask: Tensor | None = None,
) -> Tensor:
    """Katharopoulos linear attention, one query at a time with explicit running sums."""
    b, t, _ = x.shape
    src = memory if attn.role == "cross" else x
    s_len = src.shape[1]

    def phi(y: Tensor) -> Tensor:  # elu(y) + 1
        return torch.where(y > 0, y + 1, y.exp())

    q = phi(_split_heads(_project(attn.q_proj, x), attn.n_heads))  # (B, H, T, D)
    k = phi(_split_heads(_project(attn.k_proj, src), attn.n_heads))  # (B, H, S, D)
    v = _split_heads(_project(attn.v_proj, src), attn.n_heads)
    valid = mask if mask is not None else torch.ones(b, s_len, dtype=torch.bool)
    out = torch.zeros_like(q)
    for row in range(b):
        s = torch.zeros(attn.n_heads, attn.head_dim, attn.head_dim, dtype=x.dtype)
        z = torch.zeros(attn.n_heads, attn.head_dim, dtype=x.dtype)
        if not attn.causal:  # bidirectional / cross: global sums over the real keys
            for j in range(s_len):
                if valid[row, j]:
                    s = s + k[row, :, j, :, None] * v[row, :, j, None, :]
                    z = z + k[row, :, j]
        for i in range(t):
            if attn.causal and valid[row, i]:
                s = s + k[row, :, i, :, None] * v[row, :, i, None, :]
                z = z + k[row, :, i]
            num = (q[row, :, i, :, None] * s).sum(1)  # (H, D)
            den = (q[row, :, i] * z).sum(-1, keepdim=True) + attn.cfg.eps  # (H, 1)
            out[row, :, i] = num / den
    return _project(attn.o_proj, out.transpose(1, 2).reshape(b, t, attn.dim))


def gated_linear_reference(
    attn: GatedLinearAttention,
    x: Tensor,
    *,
    positions: Tensor,
    memory: Tensor | None = None,
    mask: Tensor | None = None,
) -> Tensor:
    """GLA step by step: S_t = diag(alpha_t) S_{t-1} + k_t^T v_t, o_t = q_t S_t, then per-head
    RMSNorm, swish output gate and o_proj. Padding steps: alpha = 1, k = 0."""
    b, t, _ = x.shape
    h, dk, dv = attn.n_heads, attn.head_k, attn.head_v
    q = _split_heads(_project(attn.q_proj, x), h) / math.sqrt(dk)  # (B, H, T, D_k)
    k = _split_heads(_project(attn.k_proj, x), h)
    v = _split_heads(_project(attn.v_proj, x), h)  # (B, H, T, D_v)
    logits = _project(attn.gate_up, _project(attn.gate_down, x))
    alpha = _split_heads(torch.sigmoid(logits) ** (1 / attn.cfg.gate_logit_normalizer), h)
    valid = mask if mask is not None else torch.ones(b, t, dtype=torch.bool)
    out = torch.zeros(b, h, t, dv, dtype=x.dtype)
    for row in range(b):
        s = torch.zeros(h, dk, dv, dtype=x.dtype)
        for i in range(t):
            if valid[row, i]:
                s = alpha[row, :, i, :, None] * s + k[row, :, i, :, None] * v[row, :, i, None, :]
            out[row, :, i] = (q[row, :, i, :, None] * s).sum(1)
    rms = (out.pow(2).mean(-1, keepdim=True) + attn.cfg.norm_eps).rsqrt()
    out = (out * rms * attn.o_norm.weight).transpose(1, 2).reshape(b, t, attn.value_dim)
    gate = _project(attn.g_proj, x)
    return _project(attn.o_proj, out * gate * torch.sigmoid(gate))


def additive_reference(
    attn: AdditiveAttention,
    x: Tensor,
    *,
    positions: Tensor,
    memory: Tensor | None = None,
    mask: Tensor | None = None,
) -> Tensor:
    """w_h^T tanh(W_q q + W_k k) for one query at a time over the keys mha's masks allow
    (a causal query always sees itself), softmax, sum of values; no RoPE."""
    b, t, _ = x.shape
    src = memory if attn.role == "cross" else x
    s = src.shape[1]
    a = _split_heads(_project(attn.q_proj, x), attn.n_heads)  # (B, H, T, A)
    k = _split_heads(_project(attn.k_proj, src), attn.n_heads)  # (B, H, S, A)
    v = _split_heads(_project(attn.v_proj, src), attn.n_heads)  # (B, H, S, D)
    valid = mask if mask is not None else torch.ones(b, s, dtype=torch.bool)
    out = torch.zeros(b, attn.n_heads, t, attn.head_dim, dtype=x.dtype)
    for row in range(b):
        for i in range(t):
            if attn.causal:
                keys = [j for j in range(i + 1) if valid[row, j] or j == i]
            else:
                keys = [j for j in range(s) if valid[row, j]]
            z = torch.tanh(a[row, :, i, None, :] + k[row][:, keys])  # (H, n, A)
            scores = (z * attn.score[:, None, :]).sum(-1)  # (H, n)
            out[row, :, i] = (scores.softmax(-1)[..., None] * v[row][:, keys]).sum(1)
    return _project(attn.o_proj, out.transpose(1, 2).reshape(b, t, attn.dim))


def linformer_reference(
    attn: LinformerAttention,
    x: Tensor,
    *,
    positions: Tensor,
    memory: Tensor | None = None,
    mask: Tensor | None = None,
) -> Tensor:
    """Keys and values summed along the sequence one real token at a time (the r-th real
    token weighted by column r of E, F), then a full softmax per query over the k rows."""
    b, t, _ = x.shape
    src = memory if attn.role == "cross" else x
    s, h, d = src.shape[1], attn.n_heads, attn.head_dim
    q = _split_heads(_project(attn.q_proj, x), h)  # (B, H, T, D)
    k = _split_heads(_project(attn.k_proj, src), h)  # (B, H, S, D)
    v = _split_heads(_project(attn.v_proj, src), h)
    e = attn.e_proj.expand(h, -1, -1)  # (H, k, max_len), shared or per head
    f = (attn.e_proj if attn.f_proj is None else attn.f_proj).expand(h, -1, -1)
    valid = mask if mask is not None else torch.ones(b, s, dtype=torch.bool)
    out = torch.zeros_like(q)
    for row in range(b):
        k_rows = torch.zeros(h, attn.cfg.k, d, dtype=x.dtype)
        v_rows = torch.zeros(h, attn.cfg.k, d, dtype=x.dtype)
        real = 0
        for j in range(s):
            if valid[row, j]:
                k_rows = k_rows + e[:, :, real, None] * k[row, :, j, None, :]
                v_rows = v_rows + f[:, :, real, None] * v[row, :, j, None, :]
                real += 1
        for i in range(t):
            scores = (k_rows @ q[row, :, i, :, None]).squeeze(-1) / math.sqrt(d)  # (H, k)
            out[row, :, i] = (scores.softmax(-1)[..., None] * v_rows).sum(1)
    return _project(attn.o_proj, out.transpose(1, 2).reshape(b, t, attn.dim))


def delta_rule_reference(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    beta: Tensor,
    log_alpha: Tensor | None = None,
    valid: Tensor | None = None,
    state: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """(Gated) delta rule one row and one token at a time, exactly as written:
    S <- alpha (I - beta k k^T) S + beta k v^T, o = q S, with S (D_k, D_v) per head. q, k
    (B, H, T, D_k), v (B, H, T, D_v), beta and log_alpha (B, H, T) (None: alpha = 1), valid
    (B, T) (padding steps leave S as it is), state S_0 (B, H, D_k, D_v). Returns o, S_T."""
    b, h, t, dk = k.shape
    eye = torch.eye(dk, dtype=k.dtype)
    outs, finals = [], []
    for row in range(b):
        s = torch.zeros(h, dk, v.shape[-1], dtype=v.dtype) if state is None else state[row]
        o_row = []
        for i in range(t):
            if valid is None or valid[row, i]:
                k_i, v_i, beta_i = k[row, :, i], v[row, :, i], beta[row, :, i, None, None]
                alpha = 1.0 if log_alpha is None else log_alpha[row, :, i, None, None].exp()
                erase = eye - beta_i * k_i[:, :, None] * k_i[:, None, :]  # (H, D_k, D_k)
                s = alpha * (erase @ s) + beta_i * k_i[:, :, None] * v_i[:, None, :]
            o_row.append((q[row, :, i, :, None] * s).sum(1))  # (H, D_v)
        outs.append(torch.stack(o_row, 1))
        finals.append(s)
    return torch.stack(outs), torch.stack(finals)


def _delta_heads(
    attn: DeltaNetAttention, x: Tensor, mask: Tensor | None, log_alpha: Tensor | None = None
) -> Tensor:
    """The head outputs (B, H, T, D_v) of a (gated) DeltaNet module, before its o_norm."""
    h = attn.n_heads

    def unit(y: Tensor) -> Tensor:  # fla's l2norm
        return y / torch.sqrt((y * y).sum(-1, keepdim=True) + 1e-6)

    def silu(y: Tensor) -> Tensor:
        return y * torch.sigmoid(y)

    def conv(y: Tensor, i: int) -> Tensor:  # short causal depthwise conv i; padding reads 0
        size = attn.cfg.conv_size
        if not size:
            return y
        w = attn.short_convs()[i].weight[:, 0]  # (C, K): tap j weighs token t - (K - 1) + j
        y = y if mask is None else y * mask[:, :, None]
        out = []
        for t in range(y.shape[1]):
            taps = [w[:, j] * y[:, t - size + 1 + j] for j in range(size) if t - size + 1 + j >= 0]
            out.append(sum(taps))
        return torch.stack(out, 1)  # (B, T, C)

    q = unit(_split_heads(silu(conv(_project(attn.q_proj, x), 0)), h))
    q = q / math.sqrt(attn.head_k)
    k = unit(_split_heads(silu(conv(_project(attn.k_proj, x), 1)), h))  # (B, H, T, D_k)
    v = _split_heads(silu(conv(_project(attn.v_proj, x), 2)), h)  # (B, H, T, D_v)
    beta = torch.sigmoid(_project(attn.b_proj, x)).transpose(1, 2)  # (B, H, T)
    return delta_rule_reference(q, k, v, beta, log_alpha, mask)[0]


def _rms_heads(attn: DeltaNetAttention, y: Tensor) -> Tensor:
    """Per-head RMSNorm of (B, H, T, D_v) -> (B, T, value_dim)."""
    b, _, t, _ = y.shape
    rms = (y.pow(2).mean(-1, keepdim=True) + attn.cfg.norm_eps).rsqrt()
    return (y * rms * attn.o_norm.weight).transpose(1, 2).reshape(b, t, attn.value_dim)


def delta_net_reference(
    attn: DeltaNetAttention,
    x: Tensor,
    *,
    positions: Tensor,
    memory: Tensor | None = None,
    mask: Tensor | None = None,
) -> Tensor:
    """DeltaNet token by token, then per-head RMSNorm and o_proj."""
    return _project(attn.o_proj, _rms_heads(attn, _delta_heads(attn, x, mask)))


def gated_delta_net_reference(
    attn: GatedDeltaNetAttention,
    x: Tensor,
    *,
    positions: Tensor,
    memory: Tensor | None = None,
    mask: Tensor | None = None,
) -> Tensor:
    """Gated DeltaNet token by token (alpha = exp(-exp(A_log) softplus(x W_a + dt_bias))),
    then per-head RMSNorm, swish output gate and o_proj."""
    dt = torch.log1p(torch.exp(_project(attn.a_proj, x) + attn.dt_bias))  # softplus
    log_alpha = (-torch.exp(attn.A_log) * dt).transpose(1, 2)  # (B, H, T)
    gate = _project(attn.g_proj, x)
    out = _rms_heads(attn, _delta_heads(attn, x, mask, log_alpha)) * gate * torch.sigmoid(gate)
    return _project(attn.o_proj, out)


def sparse_reference(
    attn: SparseAttention,
    x: Tensor,
    *,
    positions: Tensor,
    memory: Tensor | None = None,
    mask: Tensor | None = None,
) -> Tensor:
    """Full softmax per query over the keys its pattern names, by positions: causal s in (p -
    local, p] or a global s < n_global with s <= p; bidirectional |p - s| <= local // 2, a global
    key or query, or a key in one of the query block's random blocks. Padding queries see
    only themselves."""
    b, t, _ = x.shape
    pos = attn.pos_encoding
    q = rotary_reference(pos, _split_heads(_project(attn.q_proj, x), attn.n_heads), positions)
    k = rotary_reference(pos, _split_heads(_project(attn.k_proj, x), attn.n_kv_heads), positions)
    v = _split_heads(_project(attn.v_proj, x), attn.n_kv_heads)
    group = attn.n_heads // attn.n_kv_heads
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    valid = mask if mask is not None else torch.ones(b, t, dtype=torch.bool)
    g, bs, local = attn.cfg.n_global, attn.cfg.block_size, attn.local
    lengths = valid.sum(1)
    row_blocks = -(-lengths // bs)
    n = int(row_blocks.max())
    blocks = random_key_blocks(attn.random_seed, row_blocks, n, attn.cfg.random_blocks)

    def allowed(row: int, query: int) -> list[int]:
        if not valid[row, query]:
            return [query]
        p = int(positions[row, query])
        keys = []
        for j in range(t):
            s = int(positions[row, j])
            if not valid[row, j]:
                continue
            if attn.causal:
                seen = p - local < s <= p or s < g and s <= p
            else:
                random = attn.cfg.random_blocks and s // bs in blocks[row, p // bs].tolist()
                seen = abs(p - s) <= local // 2 or s < g or p < g or bool(random)
            if seen:
                keys.append(j)
        return keys

    y = softmax_reference(q, k, v, allowed)
    return _project(attn.o_proj, y.transpose(1, 2).reshape(b, t, attn.dim))


def performer_reference(
    attn: PerformerAttention,
    x: Tensor,
    *,
    positions: Tensor,
    memory: Tensor | None = None,
    mask: Tensor | None = None,
) -> Tensor:
    """FAVOR+ with the module's own features, one token at a time with explicit running sums:
    phi(u) = exp(w_i . u' - |u'|^2 / 2) / sqrt(m), u' = u D^-1/4, a query's exponents shifted
    by their max."""
    b, t, _ = x.shape
    src = memory if attn.role == "cross" else x
    s_len, d = src.shape[1], attn.head_dim
    w = attn.features

    def phi(u: Tensor, is_query: bool) -> Tensor:  # u (D,) -> (m,)
        u = u / d**0.25
        z = torch.stack([w_i @ u for w_i in w]) - (u * u).sum() / 2
        if is_query:
            z = z - z.max()
        return z.exp() / math.sqrt(w.shape[0])

    q = _split_heads(_project(attn.q_proj, x), attn.n_heads)  # (B, H, T, D)
    k = _split_heads(_project(attn.k_proj, src), attn.n_heads)  # (B, H, S, D)
    v = _split_heads(_project(attn.v_proj, src), attn.n_heads)
    valid = mask if mask is not None else torch.ones(b, s_len, dtype=torch.bool)
    out = torch.zeros_like(q)
    for row in range(b):
        for h in range(attn.n_heads):
            s = torch.zeros(w.shape[0], d, dtype=x.dtype)
            z = torch.zeros(w.shape[0], dtype=x.dtype)
            if not attn.causal:  # bidirectional / cross: global sums over the real keys
                for j in range(s_len):
                    if valid[row, j]:
                        f = phi(k[row, h, j], False)
                        s, z = s + f[:, None] * v[row, h, j], z + f
            for i in range(t):
                if attn.causal and valid[row, i]:
                    f = phi(k[row, h, i], False)
                    s, z = s + f[:, None] * v[row, h, i], z + f
                f_q = phi(q[row, h, i], True)
                out[row, h, i] = (f_q @ s) / (f_q @ z + attn.cfg.eps)
    return _project(attn.o_proj, out.transpose(1, 2).reshape(b, t, attn.dim))


REFERENCES: dict[type[Attention], Callable[..., Tensor]] = {
    MultiHeadAttention: mha_reference,
    LocalAttention: local_reference,
    LinearAttention: linear_reference,
    GatedLinearAttention: gated_linear_reference,
    DeltaNetAttention: delta_net_reference,
    GatedDeltaNetAttention: gated_delta_net_reference,
    AdditiveAttention: additive_reference,
    LinformerAttention: linformer_reference,
    SparseAttention: sparse_reference,
    PerformerAttention: performer_reference,
}
