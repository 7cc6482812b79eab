"""DeltaNet and Gated DeltaNet beyond the registry tests (tests/test_attention.py already holds
both modules to their twins, padded, cached, rolled back and chunked): the chunkwise op against
the token loop with gradients of every input, chunk-size invariance down to one token per
chunk, the delta rule's overwrite, long sequences and extreme decays, knob errors, and the
short convolution: conv_size=0 is the plain silu(x W) path, the conv reads only the last
conv_size tokens, and other kernel sizes still match the twin and decode exactly."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from minillm.attention import RecurrentState, build_attention
from minillm.attention.delta_net import ConvRecurrentState, l2_normalize
from minillm.attention.linear_ops import chunk_delta_rule, delta_rule_step
from minillm.attention.reference import REFERENCES, delta_rule_reference

DIM, HEADS = 32, 4
KINDS = ["delta_net", "gated_delta_net"]


def op_inputs(t: int, gated: bool, b: int = 2, h: int = 3, dk: int = 8, dv: int = 6) -> dict:
    """float64 leaves: q, unit-norm k, v, beta in (0, 1), log_alpha in (-2, 0], state S_0."""
    torch.manual_seed(0)
    leaves = {
        "q": torch.randn(b, h, t, dk),
        "k": F.normalize(torch.randn(b, h, t, dk), dim=-1),
        "v": torch.randn(b, h, t, dv),
        "beta": torch.rand(b, h, t),
        "log_alpha": -2 * torch.rand(b, h, t) if gated else None,
        "state": torch.randn(b, h, dk, dv),
    }
    return {n: x if x is None else x.double().requires_grad_() for n, x in leaves.items()}


def rel_err(a: Tensor, b: Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


@pytest.mark.parametrize("gated", [False, True], ids=["delta", "gated"])
def test_chunk_op_matches_token_loop_outputs_and_gradients(gated: bool) -> None:
    """T = 37 over chunks of 8 (a ragged last chunk), from a nonzero S_0: o and S_T, and the
    gradients of q, k, v, beta, log alpha and S_0, equal the loop's to float64 precision."""
    inp = op_inputs(37, gated)
    leaves = [x for x in inp.values() if x is not None]
    torch.manual_seed(1)
    w_o, w_s = torch.randn(2, 3, 37, 6).double(), torch.randn(2, 3, 8, 6).double()
    results = []
    for fn in (lambda **a: chunk_delta_rule(**a, chunk_size=8), delta_rule_reference):
        o, s = fn(**inp)
        grads = torch.autograd.grad((o * w_o).sum() + (s * w_s).sum(), leaves)
        results.append((o, s, grads))
    (o, s, grads), (o_ref, s_ref, grads_ref) = results
    assert rel_err(o, o_ref) < 1e-10 and rel_err(s, s_ref) < 1e-10
    for g, g_ref in zip(grads, grads_ref, strict=True):
        assert rel_err(g, g_ref) < 1e-10


@pytest.mark.parametrize("gated", [False, True], ids=["delta", "gated"])
def test_chunk_size_does_not_change_op_results(gated: bool) -> None:
    """One token per chunk (the pure recurrence) up to one chunk for everything."""
    inp = op_inputs(37, gated)
    with torch.no_grad():
        o_ref, s_ref = chunk_delta_rule(**inp, chunk_size=1)
        for c in (2, 4, 16, 64):
            o, s = chunk_delta_rule(**inp, chunk_size=c)
            assert rel_err(o, o_ref) < 1e-12 and rel_err(s, s_ref) < 1e-12


@pytest.mark.parametrize("gated", [False, True], ids=["delta", "gated"])
def test_decode_step_token_by_token_equals_the_loop(gated: bool) -> None:
    """The decode op, fed one token at a time from S_0, gives the loop's outputs and S_T."""
    inp = op_inputs(9, gated)
    with torch.no_grad():
        o_ref, s_ref = delta_rule_reference(**inp)
        state, outs = inp["state"], []
        for i in range(9):
            one = {n: inp[n][:, :, i : i + 1] for n in ("q", "k", "v", "beta")}
            alpha = None if inp["log_alpha"] is None else inp["log_alpha"][:, :, i : i + 1]
            o, state = delta_rule_step(**one, log_alpha=alpha, state=state)
            outs.append(o)
    assert rel_err(torch.cat(outs, 2), o_ref) < 1e-12 and rel_err(state, s_ref) < 1e-12


@pytest.mark.parametrize("chunk_size", [1, 4])
def test_a_key_written_twice_reads_back_its_latest_value(chunk_size: int) -> None:
    """beta = 1: writing v2 at the key that holds v1 replaces it (linear attention would return
    v1 + v2), and a value at an orthogonal key is untouched by either write."""
    e = torch.eye(4)
    k = torch.stack((e[0], e[1], e[0]))[None, None]  # (1, 1, 3, 4) keys a, b, a
    v = torch.tensor([[1.0, 2.0], [5.0, 7.0], [-3.0, 4.0]])[None, None]  # (1, 1, 3, 2)
    beta = torch.ones(1, 1, 3)
    _, state = chunk_delta_rule(k, k, v, beta, None, torch.zeros(1, 1, 4, 2), chunk_size)
    torch.testing.assert_close(e[0] @ state[0, 0], v[0, 0, 2])  # latest value at key a
    torch.testing.assert_close(e[1] @ state[0, 0], v[0, 0, 1])  # key b keeps its value
    torch.testing.assert_close(e[2] @ state[0, 0], torch.zeros(2))  # nothing else written


def forced_decay(attn: torch.nn.Module, decay: str) -> None:
    """strong: log alpha ~ -exp(10) * 30 per token (the state forgets everything at once);
    near_one: log alpha ~ -1e-13 (nothing is ever forgotten)."""
    with torch.no_grad():
        attn.A_log.fill_(10.0 if decay == "strong" else -30.0)
        attn.dt_bias.fill_(30.0)


@pytest.mark.parametrize(
    "kind, decay",
    [
        ("delta_net", None),
        ("gated_delta_net", None),
        ("gated_delta_net", "strong"),
        ("gated_delta_net", "near_one"),
    ],
)
def test_long_sequences_stay_finite(kind: str, decay: str | None) -> None:
    """T = 4096 (64 chunks): finite outputs, input and weight gradients; forced decays still
    match the twin on a short input."""
    torch.manual_seed(0)
    attn = build_attention({"kind": kind}, DIM, HEADS, "causal")
    if decay is not None:
        forced_decay(attn, decay)
        x, pos = torch.randn(1, 40, DIM), torch.arange(40)[None]
        with torch.no_grad():
            y, y_ref = attn(x, positions=pos), REFERENCES[type(attn)](attn, x, positions=pos)
        assert rel_err(y, y_ref) <= 1e-4
    x = torch.randn(1, 4096, DIM, requires_grad=True)
    y = attn(x, positions=torch.arange(4096)[None])
    y.square().mean().backward()
    assert torch.isfinite(y).all() and torch.isfinite(x.grad).all()
    for name, p in attn.named_parameters():
        assert torch.isfinite(p.grad).all(), name


def test_gated_decay_is_mamba2_style_and_never_above_one() -> None:
    """g = -exp(A_log) softplus(x W_a + dt_bias) <= 0 per head, from fla's initial ranges."""
    attn = build_attention("gated_delta_net", DIM, HEADS, "causal")
    attn.init_weights(0.02, 0.02)
    assert ((attn.A_log.exp() >= 0) & (attn.A_log.exp() <= 16)).all()
    dt = F.softplus(attn.dt_bias)
    assert ((dt > 0.9e-3) & (dt < 0.11)).all()
    x = 10 * torch.randn(2, 9, DIM)
    g = attn.log_decay(x)  # (B, H, T)
    assert g.shape == (2, HEADS, 9) and (g <= 0).all()
    expect = -attn.A_log.exp()[:, None] * F.softplus(attn.a_proj(x) + attn.dt_bias).mT
    torch.testing.assert_close(g, expect)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(
    "knobs, words",
    [
        ({"chunk_size": 48}, "chunk_size, got 48"),
        ({"expand_k": 0.3}, "n_heads=4"),
        ({"conv_size": -1}, "conv_size >= 0"),
        ({"conv_init": "dirac"}, "conv_init='dirac'; choose one of default, identity"),
    ],
)
def test_bad_knobs_say_what_and_how(kind: str, knobs: dict, words: str) -> None:
    with pytest.raises(ValueError, match=words) as err:
        build_attention({"kind": kind, **knobs}, DIM, HEADS, "causal")
    assert kind in str(err.value)


@pytest.mark.parametrize("kind", KINDS)
def test_bf16_autocast_trains_and_stays_near_fp32(kind: str) -> None:
    """Mixed precision (autocast bf16, as bf16-mixed training): forward and backward run (the
    op turns autocast off; CPU has no bf16 triangular solve) within bf16 rounding of fp32."""
    torch.manual_seed(0)
    attn = build_attention({"kind": kind}, DIM, HEADS, "causal")
    x, pos = torch.randn(2, 50, DIM, requires_grad=True), torch.arange(50)[None]
    y32 = attn(x, positions=pos)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = attn(x, positions=pos)
    y.float().square().mean().backward()
    assert y.dtype == torch.bfloat16 and rel_err(y.float(), y32) < 0.03
    assert torch.isfinite(x.grad).all()


def heads(y: Tensor, h: int = HEADS) -> Tensor:
    b, t, _ = y.shape
    return y.view(b, t, h, -1).transpose(1, 2)  # (B, H, T, d)


def test_conv_size_zero_is_the_plain_silu_projection_path() -> None:
    """conv_size=0: no conv weights, a plain RecurrentState, and outputs (left-padded rows
    included) of q, k, v = silu(x W) through the delta rule, as before the conv existed."""
    torch.manual_seed(0)
    attn = build_attention({"kind": "delta_net", "conv_size": 0}, DIM, HEADS, "causal")
    assert not any("conv" in name for name, _ in attn.named_parameters())
    assert type(attn.init_cache(2, 16, "cpu", torch.float32)) is RecurrentState
    x, mask = torch.randn(2, 13, DIM), torch.ones(2, 13, dtype=torch.bool)
    mask[1, :4] = False
    with torch.no_grad():
        q = l2_normalize(heads(F.silu(attn.q_proj(x)))) * attn.head_k**-0.5
        k = l2_normalize(heads(F.silu(attn.k_proj(x))))
        v = heads(F.silu(attn.v_proj(x)))
        beta = torch.sigmoid(attn.b_proj(x)).transpose(1, 2)
        o, _ = delta_rule_reference(q, k, v, beta, None, mask)
        expect = attn.o_proj(attn.o_norm(o.transpose(1, 2)).reshape(2, 13, DIM))
        y = attn(x, positions=torch.arange(13)[None], mask=mask)
    torch.testing.assert_close(y[0], expect[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(y[1, 4:], expect[1, 4:], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("built", ["taps_set", "conv_init", "init_weights"])
@pytest.mark.parametrize("kind", KINDS)
def test_an_identity_kernel_gives_the_no_conv_module(kind: str, built: str) -> None:
    """Taps (0, ..., 0, 1) make the conv the identity: the module then equals a conv_size=0
    one with the same other weights, in the full forward and while decoding. conv_init=
    "identity" starts there, built directly or re-initialised as models do."""
    torch.manual_seed(0)
    knobs = {} if built == "taps_set" else {"conv_init": "identity"}
    conv = build_attention({"kind": kind, **knobs}, DIM, HEADS, "causal")
    if built == "init_weights":
        conv.init_weights(0.02, 0.01)
    plain = build_attention({"kind": kind, "conv_size": 0}, DIM, HEADS, "causal")
    plain.load_state_dict({n: p for n, p in conv.state_dict().items() if "conv" not in n})
    if built == "taps_set":
        with torch.no_grad():
            for c in conv.short_convs():
                c.weight.zero_()[:, :, -1] = 1.0
    x, pos = torch.randn(2, 10, DIM), torch.arange(10)[None]
    cache = conv.init_cache(2, 10, "cpu", torch.float32)
    with torch.no_grad():
        expect = plain(x, positions=pos)
        y = conv(x, positions=pos)
        steps = [conv(x[:, :6], positions=pos[:, :6], cache=cache)]
        for i in range(6, 10):
            steps.append(conv(x[:, i : i + 1], positions=pos[:, i : i + 1], cache=cache))
    torch.testing.assert_close(y, expect, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.cat(steps, 1), expect, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("conv_size", [1, 2, 4])
def test_conv_reads_only_this_and_the_last_conv_size_minus_one_tokens(conv_size: int) -> None:
    """Changing token 9 changes q, k, v at tokens 9 .. 9 + conv_size - 1 only: the conv never
    looks ahead (causality) and forgets a token after conv_size steps."""
    torch.manual_seed(0)
    attn = build_attention({"kind": "delta_net", "conv_size": conv_size}, DIM, HEADS, "causal")
    x = torch.randn(1, 20, DIM)
    changed = x.clone()
    changed[:, 9] += 1.0
    with torch.no_grad():
        before = torch.cat(attn.qkv(x, None, None)[:3], -1)  # (1, T, C)
        after = torch.cat(attn.qkv(changed, None, None)[:3], -1)
    moved = (after - before).abs().amax(-1)[0] > 1e-6  # (T,)
    assert moved.tolist() == [9 <= t < 9 + conv_size for t in range(20)]


@pytest.mark.parametrize("conv_size", [1, 3, 5])
@pytest.mark.parametrize("kind", KINDS)
def test_other_kernel_sizes_match_the_twin_and_decode_exactly(kind: str, conv_size: int) -> None:
    """Kernels other than the default: fast path = twin on a left-padded batch, and a padded
    prefill then one token at a time (with 2 rejected drafts rolled back) = full forward."""
    torch.manual_seed(0)
    attn = build_attention({"kind": kind, "conv_size": conv_size}, DIM, HEADS, "causal")
    x, mask = torch.randn(2, 15, DIM), torch.ones(2, 15, dtype=torch.bool)
    mask[1, :4] = False
    pos = (mask.cumsum(1) - 1).clamp_min(0)
    cache = attn.init_cache(2, 15, "cpu", torch.float32, lookahead=2)
    assert isinstance(cache, ConvRecurrentState)
    with torch.no_grad():
        y = attn(x, positions=pos, mask=mask)
        y_ref = REFERENCES[type(attn)](attn, x, positions=pos, mask=mask)
        steps = [attn(x[:, :7], positions=pos[:, :7], mask=mask[:, :7], cache=cache)]
        for i in (7, 8):  # two drafted tokens, then rejected
            attn(x[:, i : i + 1] + 1.0, positions=pos[:, i : i + 1], cache=cache)
        assert cache.rollback(2) == 2
        for i in range(7, 15):
            steps.append(attn(x[:, i : i + 1], positions=pos[:, i : i + 1], cache=cache))
    real = mask[:, :, None]
    torch.testing.assert_close(y * real, y_ref * real, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(torch.cat(steps, 1) * real, y * real, rtol=1e-5, atol=1e-5)
