"""Twins of the recurrent kinds: linear, gated_linear, performer, delta_net, gated_delta_net,
step by step over the tokens with an explicit state."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from minillm.attention.delta_net import DeltaNetAttention
from minillm.attention.gated_delta_net import GatedDeltaNetAttention
from minillm.attention.gated_linear import GatedLinearAttention
from minillm.attention.linear import LinearAttention
from minillm.attention.performer import PerformerAttention
from minillm.attention.reference.common import project, split_heads


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

    q = phi(split_heads(project(attn.q_proj, x), attn.n_heads))  # (B, H, T, D)
    k = phi(split_heads(project(attn.k_proj, src), attn.n_heads))  # (B, H, S, D)
    v = split_heads(project(attn.v_proj, src), attn.n_heads)
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
    return project(attn.o_proj, out.transpose(1, 2).reshape(b, t, attn.dim))


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
    q = split_heads(project(attn.q_proj, x), h) / math.sqrt(dk)  # (B, H, T, D_k)
    k = split_heads(project(attn.k_proj, x), h)
    v = split_heads(project(attn.v_proj, x), h)  # (B, H, T, D_v)
    logits = project(attn.gate_up, project(attn.gate_down, x))
    alpha = split_heads(torch.sigmoid(logits) ** (1 / attn.cfg.gate_logit_normalizer), h)
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
    gate = project(attn.g_proj, x)
    return project(attn.o_proj, out * gate * torch.sigmoid(gate))


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

    q = unit(split_heads(silu(conv(project(attn.q_proj, x), 0)), h))
    q = q / math.sqrt(attn.head_k)
    k = unit(split_heads(silu(conv(project(attn.k_proj, x), 1)), h))  # (B, H, T, D_k)
    v = split_heads(silu(conv(project(attn.v_proj, x), 2)), h)  # (B, H, T, D_v)
    beta = torch.sigmoid(project(attn.b_proj, x)).transpose(1, 2)  # (B, H, T)
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
    return project(attn.o_proj, _rms_heads(attn, _delta_heads(attn, x, mask)))


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
    dt = torch.log1p(torch.exp(project(attn.a_proj, x) + attn.dt_bias))  # softplus
    log_alpha = (-torch.exp(attn.A_log) * dt).transpose(1, 2)  # (B, H, T)
    gate = project(attn.g_proj, x)
    out = _rms_heads(attn, _delta_heads(attn, x, mask, log_alpha)) * gate * torch.sigmoid(gate)
    return project(attn.o_proj, out)


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

    q = split_heads(project(attn.q_proj, x), attn.n_heads)  # (B, H, T, D)
    k = split_heads(project(attn.k_proj, src), attn.n_heads)  # (B, H, S, D)
    v = split_heads(project(attn.v_proj, src), attn.n_heads)
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
    return project(attn.o_proj, out.transpose(1, 2).reshape(b, t, attn.dim))
