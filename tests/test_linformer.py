"""Linformer: every projection-sharing knob matches its twin, lengths past max_len fail naming
both numbers, short sequences use E/F's first columns, any padding is invisible, and the
cross cache holds k rows whatever the source length."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from minillm.attention import build_attention
from minillm.attention.reference import REFERENCES
from minillm.models.block import positions_from_mask

DIM, HEADS = 32, 4


def make(role: str, **knobs: Any) -> torch.nn.Module:
    torch.manual_seed(0)
    attn = build_attention({"kind": "linformer", "k": 6, "max_len": 24, **knobs}, DIM, HEADS, role)
    with torch.no_grad():
        for p in attn.parameters():
            p.normal_(0.0, 0.3)
    return attn


def inputs(role: str, mask: torch.Tensor, t: int = 9) -> dict:
    """x (B, T, dim); for cross, memory (B, S, dim) whose real tokens ``mask`` (B, S) marks."""
    torch.manual_seed(1)
    b = mask.shape[0]
    t = t if role == "cross" else mask.shape[1]
    return {
        "x": torch.randn(b, t, DIM, requires_grad=True),
        "positions": positions_from_mask(None if role == "cross" else mask, b, t, "cpu"),
        "memory": torch.randn(b, mask.shape[1], DIM, requires_grad=True)
        if role == "cross"
        else None,
        "mask": mask,
    }


KNOBS = [
    {"per_head_projection": False, "share_kv_projection": False},
    {"per_head_projection": True, "share_kv_projection": False},
    {"per_head_projection": False, "share_kv_projection": True},
    {"per_head_projection": True, "share_kv_projection": True},
]


@pytest.mark.parametrize("role", ["bidirectional", "cross"])
@pytest.mark.parametrize("knobs", KNOBS, ids=["shared", "per_head", "kv_shared", "per_head_kv"])
def test_projection_sharing_knobs_match_their_twins(knobs: dict, role: str) -> None:
    """Outputs and gradients (inputs, weights, E, F) = the loop twin, padding included, and
    the knobs give the parameter shapes they promise."""
    attn = make(role, **knobs)
    heads = HEADS if knobs["per_head_projection"] else 1
    assert attn.e_proj.shape == (heads, 6, 24)
    assert (attn.f_proj is None) == knobs["share_kv_projection"]
    mask = torch.ones(2, 17, dtype=torch.bool)
    mask[1, :4] = False
    inp = inputs(role, mask)
    leaves = [inp["x"]] + ([inp["memory"]] if role == "cross" else [])
    results = []
    for fn in (attn, lambda **kw: REFERENCES[type(attn)](attn, **kw)):
        y = fn(**inp)
        results.append((y, torch.autograd.grad(y.square().sum(), leaves + list(attn.parameters()))))
    (y, grads), (y_ref, grads_ref) = results
    for a, b in zip((y, *grads), (y_ref, *grads_ref), strict=True):  # fp32, another sum order
        assert ((a - b).norm() / b.norm()).item() <= 1e-5


@pytest.mark.parametrize("role", ["bidirectional", "cross"])
def test_too_long_input_names_both_lengths(role: str) -> None:
    attn = make(role)
    inp = inputs(role, torch.ones(1, 25, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"^linformer got a sequence of 25 tokens.*max_len=24"):
        attn(**{**inp, "mask": None})
    if role == "cross":
        with pytest.raises(ValueError, match=r"25 tokens.*max_len=24"):
            attn.init_cache(1, 25, "cpu", torch.float32)
    make(role, max_len=25)(**{**inp, "mask": None})  # the fix the message names works


def test_short_sequences_use_the_first_columns() -> None:
    """A 10-token sequence reads E/F columns 0..9 only: changing later ones changes nothing,
    changing column 9 changes the output."""
    attn = make("bidirectional").eval()
    x, pos = torch.randn(2, 10, DIM), torch.arange(10).expand(2, 10)
    with torch.no_grad():
        y = attn(x, positions=pos)
        attn.e_proj[..., 10:] += 1.0
        attn.f_proj[..., 10:] += 1.0
        torch.testing.assert_close(attn(x, positions=pos), y)
        attn.f_proj[..., 9] += 1.0
        assert not torch.allclose(attn(x, positions=pos), y)


@pytest.mark.parametrize("role", ["bidirectional", "cross"])
def test_right_and_inner_padding_are_invisible(role: str) -> None:
    """Padding anywhere (right: translation sources; holes) gives the real tokens' outputs of
    the row without it: masked keys are dropped before the projection, not after."""
    attn = make(role).eval()
    mask = torch.ones(2, 15, dtype=torch.bool)
    mask[0, 11:] = False  # right padding
    mask[1, [2, 5, 6]] = False  # holes
    inp = inputs(role, mask)
    with torch.no_grad():
        y = attn(**inp)
        for row in range(2):
            real = mask[row]
            if role == "cross":
                alone = attn(
                    inp["x"][row : row + 1],
                    positions=inp["positions"][row : row + 1],
                    memory=inp["memory"][row : row + 1, real],
                )
                torch.testing.assert_close(y[row : row + 1], alone, rtol=1e-5, atol=1e-5)
            else:
                n = int(real.sum())
                alone = attn(inp["x"][row : row + 1, real], positions=torch.arange(n)[None])
                torch.testing.assert_close(y[row : row + 1, real], alone, rtol=1e-5, atol=1e-5)


def test_cross_cache_holds_k_rows_whatever_the_source_length() -> None:
    """The cross cache is (B, H, k, D) keys and values for a 3- or a 24-token source; the
    decoding steps read it (memory=None) and equal the uncached forward. The encoder role
    keeps no cache."""
    attn = make("cross").eval()
    sizes = {attn.init_cache(2, s, "cpu", torch.float32).nbytes for s in (3, 24)}
    assert sizes == {2 * 2 * HEADS * 6 * (DIM // HEADS) * 4}
    inp = inputs("cross", torch.ones(2, 20, dtype=torch.bool))
    cache = attn.init_cache(2, 20, "cpu", torch.float32)
    with torch.no_grad():
        full = attn(**inp)
        first = attn(
            inp["x"][:, :3],
            positions=inp["positions"][:, :3],
            cache=cache,
            memory=inp["memory"],
            mask=inp["mask"],
        )
        rest = attn(inp["x"][:, 3:], positions=inp["positions"][:, 3:], cache=cache)
    torch.testing.assert_close(torch.cat((first, rest), 1), full, rtol=1e-5, atol=1e-5)
    assert cache.length == 20 and cache.capacity is None
    with pytest.raises(ValueError, match="no cache in the bidirectional role"):
        make("bidirectional").init_cache(2, 20, "cpu", torch.float32)


def test_attention_weights_are_the_token_mixing() -> None:
    """(B, H, T, T) weights: softmax over k rows times F's columns; ``weights @ v`` = output."""
    attn = make("bidirectional", per_head_projection=True).double()
    x = torch.randn(2, 11, DIM, dtype=torch.float64)
    seen = {}
    attn.o_proj.register_forward_pre_hook(lambda m, args: seen.update(y=args[0]))
    with torch.no_grad():
        attn(x, positions=torch.arange(11).expand(2, 11))
        weights = attn.attention_weights(x, positions=torch.arange(11).expand(2, 11))
        v = attn.v_proj(x).view(2, 11, HEADS, -1).transpose(1, 2)  # (B, H, T, D)
    mixed = (weights @ v).transpose(1, 2).reshape(2, 11, DIM)
    torch.testing.assert_close(mixed, seen["y"])
