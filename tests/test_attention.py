"""Every attention kind in every role it serves, parametrized over the registry.

Tiny (dim 32, 4 heads), CPU, fp32. Windows and chunks are shrunk (by Config field name, so a
new kind is covered as soon as it is registered) so that short sequences cross their edges.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

from minillm.attention import (
    ATTENTION,
    ROLES,
    Cache,
    build_attention,
    fixed_shape_decoding,
    kinds_for_role,
)
from minillm.attention.reference import REFERENCES
from minillm.models.block import positions_from_mask

DIM, HEADS, SMALL = 32, 4, 8  # SMALL: window / chunk size in tests
CONF = Path(__file__).resolve().parents[1] / "conf"


def _fields(cls: type) -> set[str]:
    return {f.name for f in dataclasses.fields(cls.Config)}


KIND_ROLES = [(k, r) for k, (cls, _) in ATTENTION.items() for r in cls.roles]
MISSING_ROLES = [(k, r) for k, (cls, _) in ATTENTION.items() for r in ROLES if r not in cls.roles]
CAUSAL = [k for k, r in KIND_ROLES if r == "causal"]
DECODING = [(k, r) for k, r in KIND_ROLES if r != "bidirectional"]
CHUNKED = [k for k, (cls, _) in ATTENTION.items() if "chunk_size" in _fields(cls)]


def make(kind: str, role: str, **knobs: object) -> nn.Module:
    """A tiny module of ``kind`` with weights large enough that mixing is far from uniform."""
    names = _fields(ATTENTION[kind][0])
    cfg = {"kind": kind, **{n: SMALL for n in ("window", "chunk_size") if n in names}, **knobs}
    torch.manual_seed(0)
    attn = build_attention(cfg, DIM, HEADS, role)
    with torch.no_grad():
        for p in attn.parameters():
            p.normal_(0.0, 0.3)
    return attn


def inputs(role: str, b: int, t: int, pads: tuple[int, ...] = (), s: int = 11) -> dict:
    """x (B, T, dim), key mask with ``pads[i]`` left-padding keys in row i, positions, memory."""
    torch.manual_seed(1)
    keys = s if role == "cross" else t
    mask = torch.ones(b, keys, dtype=torch.bool)
    for row, n in enumerate(pads):
        mask[row, :n] = False
    self_mask = None if role == "cross" else mask
    return {
        "x": torch.randn(b, t, DIM),
        "positions": positions_from_mask(self_mask, b, t, torch.device("cpu")),
        "memory": torch.randn(b, s, DIM) if role == "cross" else None,
        "mask": mask if pads else None,
    }


def rel_err(a: Tensor, b: Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp_min(1e-12)).item()


@pytest.mark.parametrize("padded", [False, True], ids=["nopad", "leftpad"])
@pytest.mark.parametrize("t", [5, 16, 21])
@pytest.mark.parametrize("kind, role", KIND_ROLES)
def test_matches_reference(kind: str, role: str, t: int, padded: bool) -> None:
    """Fast path = slow twin, outputs and gradients (inputs and weights), T <, =, not | chunk."""
    attn = make(kind, role)
    inp = inputs(role, 2, t, pads=(0, 3) if padded else ())
    leaves = [inp["x"]] + ([inp["memory"]] if role == "cross" else [])
    for leaf in leaves:
        leaf.requires_grad_(True)
    weight = torch.randn(2, t, DIM)
    results = []
    for fn in (attn, functools.partial(REFERENCES[type(attn)], attn)):
        y = fn(**inp)
        grads = torch.autograd.grad((y * weight).sum(), leaves + list(attn.parameters()))
        results.append((y, grads))
    (y, grads), (y_ref, grads_ref) = results
    assert rel_err(y, y_ref) <= 1e-4
    for g, g_ref in zip(grads, grads_ref, strict=True):
        assert rel_err(g, g_ref) <= 1e-4


@pytest.mark.parametrize(
    "kind", [k for k, (c, _) in ATTENTION.items() if "n_kv_heads" in _fields(c)]
)
def test_grouped_kv_heads_match_reference(kind: str) -> None:
    """n_kv_heads as a knob (not only through a preset) still matches the twin."""
    attn = make(kind, "causal", n_kv_heads=2)
    inp = inputs("causal", 2, 21, pads=(0, 3))
    with torch.no_grad():
        y, y_ref = attn(**inp), REFERENCES[type(attn)](attn, **inp)
    assert rel_err(y, y_ref) <= 1e-4


@pytest.mark.parametrize("kind, role", KIND_ROLES)
def test_left_padding_is_invisible(kind: str, role: str) -> None:
    """A left-padded row gives its unpadded self's outputs at the real tokens."""
    attn, n = make(kind, role), 5
    padded = inputs(role, 1, 21, pads=(n,))
    with torch.no_grad():
        y = attn(**padded)
        if role == "cross":
            y_ref = attn(padded["x"], positions=padded["positions"], memory=padded["memory"][:, n:])
        else:
            y_ref = attn(padded["x"][:, n:], positions=padded["positions"][:, n:])
            y = y[:, n:]
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", CAUSAL)
def test_causality(kind: str) -> None:
    attn = make(kind, "causal")
    inp = inputs("causal", 2, 21, pads=(0, 3))
    with torch.no_grad():
        y = attn(**inp)
        for t in (0, 7, 8, 15):
            changed = inp["x"].clone()
            changed[:, t + 1 :] += torch.randn_like(changed[:, t + 1 :])
            y2 = attn(**{**inp, "x": changed})
            torch.testing.assert_close(y2[:, : t + 1], y[:, : t + 1], rtol=1e-5, atol=1e-5)
            assert not torch.allclose(y2[:, t + 1 :], y[:, t + 1 :])


@pytest.mark.parametrize("fixed", [False, True], ids=["eager", "fixed_shape"])
@pytest.mark.parametrize("pieces", [(12,), (5, 12)], ids=["prefill", "chunked_prefill"])
@pytest.mark.parametrize("kind, role", DECODING)
def test_prefill_then_decode_equals_full_forward(
    kind: str, role: str, pieces: tuple, fixed: bool
) -> None:
    """Prefill (longer than a local window; or in 2 pieces) then one token at a time, left-padded
    rows included, gives the full forward's outputs, reading the caches eagerly (sliced) or
    with fixed shapes (whole buffers, masked). Cross: the source is read only once."""
    attn = make(kind, role).eval()
    t = 21
    inp = inputs(role, 3, t, pads=(0, 3, 6))
    x, pos, memory, mask = inp["x"], inp["positions"], inp["memory"], inp["mask"]
    cache = attn.init_cache(3, t if role == "causal" else memory.shape[1], "cpu", torch.float32)
    with torch.no_grad(), fixed_shape_decoding() if fixed else contextlib.nullcontext():
        full = attn(x, positions=pos, memory=memory, mask=mask)
        bounds = [0, *pieces, *range(pieces[-1] + 1, t + 1)]
        outs = []
        for i, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:], strict=True)):
            if role == "cross":  # after the first call the summary comes from the cache
                kw = {"memory": memory if i == 0 else None, "mask": mask if i == 0 else None}
            else:  # generation passes no mask once the new tokens are all real
                kw = {"mask": mask[:, lo:hi] if lo < max(pieces) else None}
            outs.append(attn(x[:, lo:hi], positions=pos[:, lo:hi], cache=cache, **kw))
    torch.testing.assert_close(torch.cat(outs, 1), full, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", CAUSAL)
def test_cache_memory(kind: str) -> None:
    """Caches with a capacity grow with max_len; the others (rolling, recurrent) do not, and a
    window cache grows with its window only; no cache ever grows with the tokens written."""
    attn = make(kind, "causal").eval()
    small = attn.init_cache(2, 64, "cpu", torch.float32)
    cache = attn.init_cache(2, 1024, "cpu", torch.float32)
    assert isinstance(cache, Cache)
    before = cache.nbytes
    if cache.capacity is not None:
        assert cache.capacity == 1024 and before > 10 * small.nbytes
    else:
        assert before == small.nbytes
    if "window" in _fields(type(attn)):
        wide = make(kind, "causal", window=2 * SMALL).init_cache(2, 1024, "cpu", torch.float32)
        assert wide.nbytes == 2 * before
    inp = inputs("causal", 2, 40)
    with torch.no_grad():
        attn(**inp, cache=cache)
        for _ in range(3):
            attn(inp["x"][:, :1], positions=inp["positions"][:, :1] + 40, cache=cache)
    assert cache.nbytes == before and cache.length == 43


@pytest.mark.parametrize("kind", [k for k in CAUSAL if "n_kv_heads" in _fields(ATTENTION[k][0])])
def test_kv_cache_holds_only_kv_heads(kind: str) -> None:
    full = make(kind, "causal", n_kv_heads=HEADS).init_cache(1, 64, "cpu", torch.float32)
    single = make(kind, "causal", n_kv_heads=1).init_cache(1, 64, "cpu", torch.float32)
    assert full.nbytes - single.nbytes > (HEADS - 1) * 0.9 * full.nbytes / HEADS


@pytest.mark.parametrize("kind, role", DECODING)
def test_reorder_moves_rows_in_place_and_expands(kind: str, role: str) -> None:
    """After reorder(rows), row i decodes as old row rows[i] did; same-size reorders keep the
    buffers' addresses (a compiled step keeps its inputs), expansions grow the batch."""
    attn = make(kind, role).eval()
    inp = inputs(role, 3, 9, pads=(0, 2, 4))
    s = 11 if role == "cross" else 12
    caches = [attn.init_cache(3, s, "cpu", torch.float32) for _ in range(2)]
    x1 = torch.randn(3, 1, DIM)
    pos1 = inp["positions"][:, -1:] + 1
    with torch.no_grad():
        for c in caches:
            attn(**inp, cache=c)
        expect = attn(x1, positions=pos1, cache=caches[0], memory=None)  # (3, 1, dim)
        rows = torch.tensor([2, 0, 1])
        caches[1].reorder(rows)
        got = attn(x1[rows], positions=pos1[rows], cache=caches[1], memory=None)
        torch.testing.assert_close(got, expect[rows], rtol=1e-5, atol=1e-5)
        before = caches[1].nbytes
        caches[1].reorder(torch.tensor([1, 1, 0, 2, 2]))  # rows continue old 0, 0, 2, 1, 1
        assert caches[1].nbytes > before
        x2, pos2, old = torch.randn(3, 1, DIM), pos1 + 1, [0, 0, 2, 1, 1]
        expect = attn(x2, positions=pos2, cache=caches[0])
        got = attn(x2[old], positions=pos2[old], cache=caches[1])
        torch.testing.assert_close(got, expect[old], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("one_token_steps", [False, True], ids=["verify_step", "draft_steps"])
@pytest.mark.parametrize("kind", CAUSAL)
def test_rollback_forgets_exactly_the_rejected_tokens(kind: str, one_token_steps: bool) -> None:
    """Write k + 1 tokens (one step, as a target verifies; or one at a time, as a draft
    proposes), roll back n, re-feed what the cache says it also lost, continue: the outputs
    equal a cache that only ever saw the kept tokens. Prefill runs past a local window."""
    attn, k = make(kind, "causal").eval(), 3
    inp = inputs("causal", 2, 24, pads=(0, 3))
    x, pos, mask = inp["x"], inp["positions"], inp["mask"]
    for n in range(k + 1):
        kept = 12 + k + 1 - n  # tokens the cache should hold after the rollback
        caches = [attn.init_cache(2, 24, "cpu", torch.float32, lookahead=k) for _ in range(2)]
        with torch.no_grad():
            for c in caches:
                attn(x[:, :12], positions=pos[:, :12], mask=mask[:, :12], cache=c)
            steps = [(12, 16)] if not one_token_steps else [(i, i + 1) for i in range(12, 16)]
            for lo, hi in steps:
                attn(x[:, lo:hi], positions=pos[:, lo:hi], cache=caches[0])
            extra = caches[0].rollback(n)
            assert extra >= n and caches[0].length == 16 - extra
            if extra > n:  # a recurrent state went back to its saved point: re-feed
                lo = 16 - extra
                attn(x[:, lo:kept], positions=pos[:, lo:kept], cache=caches[0])
            attn(x[:, 12:kept], positions=pos[:, 12:kept], cache=caches[1])
            ys = [attn(x[:, kept:], positions=pos[:, kept:], cache=c) for c in caches]
        torch.testing.assert_close(ys[0], ys[1], rtol=1e-5, atol=1e-5)
        assert caches[0].length == caches[1].length == 24


@pytest.mark.parametrize("kind", CHUNKED)
def test_chunk_size_does_not_change_results(kind: str) -> None:
    role = ATTENTION[kind][0].roles[0]
    inp = inputs(role, 2, 100, pads=(0, 9))
    with torch.no_grad():
        ys = [make(kind, role, chunk_size=c)(**inp) for c in (16, 32, 64)]
    for y in ys[1:]:
        torch.testing.assert_close(y, ys[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bias", [-1000.0, 30.0], ids=["strong_decay", "near_one"])
def test_gated_linear_long_sequences_stay_finite(bias: float) -> None:
    attn = make("gated_linear", "causal", chunk_size=64)
    with torch.no_grad():
        attn.gate_up.bias.fill_(bias)
    short = inputs("causal", 1, 40)
    with torch.no_grad():  # forced gates still match the twin
        y, y_ref = attn(**short), REFERENCES[type(attn)](attn, **short)
    assert rel_err(y, y_ref) <= 1e-4
    inp = inputs("causal", 1, 4096)
    inp["x"].requires_grad_(True)
    y = attn(**inp)
    y.square().mean().backward()
    assert torch.isfinite(y).all()
    assert torch.isfinite(inp["x"].grad).all()
    for p in attn.parameters():
        assert torch.isfinite(p.grad).all()


def test_unknown_kind_lists_valid_kinds() -> None:
    with pytest.raises(ValueError, match="nope") as err:
        build_attention({"kind": "nope"}, DIM, HEADS, "causal")
    for kind in ATTENTION:
        assert kind in str(err.value)


@pytest.mark.parametrize("kind, role", MISSING_ROLES)
def test_unsupported_role_names_kinds_that_can(kind: str, role: str) -> None:
    with pytest.raises(ValueError) as err:
        build_attention(kind, DIM, HEADS, role)
    message = str(err.value)
    assert kind in message and role in message
    for other in kinds_for_role(role):
        assert other in message


@pytest.mark.parametrize(
    "kind", [k for k, (c, _) in ATTENTION.items() if "n_kv_heads" in _fields(c)]
)
def test_kv_heads_must_divide_heads(kind: str) -> None:
    with pytest.raises(ValueError, match="n_heads=4.*n_kv_heads=3"):
        build_attention({"kind": kind, "n_kv_heads": 3}, DIM, HEADS, "causal")
