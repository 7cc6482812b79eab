"""Additive (Bahdanau) attention: query blocks change nothing and bound memory, the cache
holds the projected keys W_k k (any d_att), the attention map is a causal distribution."""

from __future__ import annotations

import weakref
from typing import Any

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from minillm.attention import build_attention
from minillm.attention.additive import BLOCK_ELEMENTS
from minillm.attention.reference import REFERENCES
from minillm.models.block import positions_from_mask

DIM, HEADS = 32, 4


def make(role: str, **knobs: Any) -> torch.nn.Module:
    torch.manual_seed(0)
    attn = build_attention({"kind": "additive", **knobs}, DIM, HEADS, role)
    with torch.no_grad():
        for p in attn.parameters():
            p.normal_(0.0, 0.3)
    return attn


def inputs(role: str, b: int, t: int, s: int = 13, pads: tuple[int, ...] = ()) -> dict:
    torch.manual_seed(1)
    mask = torch.ones(b, s if role == "cross" else t, dtype=torch.bool)
    for row, n in enumerate(pads):
        mask[row, :n] = False
    return {
        "x": torch.randn(b, t, DIM, requires_grad=True),
        "positions": positions_from_mask(None if role == "cross" else mask, b, t, "cpu"),
        "memory": torch.randn(b, s, DIM) if role == "cross" else None,
        "mask": mask if pads else None,
    }


class FiveDimTensors(TorchDispatchMode):
    """Shapes of the 5-D tensors ops create (the (B, H, c, S, d_att) blocks) and the peak of
    their elements alive at once (counted from creation until the storage is freed)."""

    def __init__(self) -> None:
        super().__init__()
        self.shapes: list[tuple[int, ...]] = []
        self.live: dict[int, int] = {}
        self.current = self.peak = 0

    def _free(self, ptr: int) -> None:
        self.current -= self.live.pop(ptr, 0)

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if not isinstance(t, torch.Tensor) or t.dim() != 5:
                continue
            self.shapes.append(tuple(t.shape))
            storage = t.untyped_storage()
            if storage.data_ptr() not in self.live:
                self.live[storage.data_ptr()] = t.numel()
                self.current += t.numel()
                self.peak = max(self.peak, self.current)
                weakref.finalize(storage, self._free, storage.data_ptr())
        return out


@pytest.mark.parametrize("role", ["causal", "bidirectional", "cross"])
def test_query_blocks_give_the_full_computation(role: str) -> None:
    """Block size 1 and 7 (< T) equal one block holding all of T, outputs and gradients."""
    inp = inputs(role, 2, 21, pads=(0, 4))
    results = []
    for chunk in (None, 7, 1):  # None: at this size the budget puts all 21 queries in a block
        attn = make(role, chunk_size=chunk)
        y = attn(**inp)
        grads = torch.autograd.grad(y.square().sum(), [inp["x"], *attn.parameters()])
        results.append((y, grads))
    for y, grads in results[1:]:
        torch.testing.assert_close(y, results[0][0], rtol=1e-5, atol=1e-6)
        for g, g_full in zip(grads, results[0][1], strict=True):
            torch.testing.assert_close(g, g_full, rtol=1e-4, atol=5e-5)


@pytest.mark.parametrize("chunk", [1, 5, None])
def test_never_allocates_the_whole_pairwise_tensor(chunk: int | None) -> None:
    """Forward and backward: no 5-D tensor larger than one block's (B, H, c, S, d_att) (block
    i's S is its (i + 1) * c keys: causal blocks skip the keys after them), a few
    blocks alive at most (the backward recomputes each block instead of keeping it), and the
    default block stays under BLOCK_ELEMENTS."""
    b, t, d_att = 1, 512, 8  # whole tensor 4 * 512 * 512 * 8 = 2 * BLOCK_ELEMENTS
    attn = make("causal", chunk_size=chunk, d_att=d_att)
    inp = inputs("causal", b, t)
    with FiveDimTensors() as seen:
        attn(**inp).sum().backward()
    block = chunk or BLOCK_ELEMENTS // (b * HEADS * t * d_att)
    one_block = b * HEADS * block * t * d_att
    sizes = [torch.Size(s).numel() for s in seen.shapes]
    assert max(sizes) <= one_block <= BLOCK_ELEMENTS
    keys_seen = {torch.Size(s)[3] for s in seen.shapes}  # causal: block i sees (i + 1) * c keys
    assert {min(block * (i + 1), t) for i in range(-(-t // block))} <= keys_seen | {1}
    assert seen.peak <= 8 * one_block < b * HEADS * t * t * d_att or chunk is None
    assert len(seen.shapes) >= 2 * -(-t // block)  # the backward recomputed every block
    assert inp["x"].grad is not None and torch.isfinite(inp["x"].grad).all()


@pytest.mark.parametrize("role", ["causal", "cross"])
def test_cache_holds_projected_keys_of_any_width(role: str) -> None:
    """d_att != head_dim: the twin still matches, the cache's keys are W_k k (d_att wide, not
    the input), and prefill + one-token decode equals the full forward."""
    attn = make(role, d_att=5, chunk_size=4).eval()
    inp = inputs(role, 2, 9, pads=(0, 3))
    with torch.no_grad():
        full = attn(**inp)
        torch.testing.assert_close(full, REFERENCES[type(attn)](attn, **inp), rtol=1e-5, atol=1e-6)
        src_len = 13 if role == "cross" else 9
        cache = attn.init_cache(2, src_len, "cpu", torch.float32)
        kw = {"memory": inp["memory"], "mask": inp["mask"]}
        if role != "cross":
            kw = {"mask": inp["mask"][:, :6]}
        pre = attn(inp["x"][:, :6], positions=inp["positions"][:, :6], cache=cache, **kw)
        src = inp["memory"] if role == "cross" else inp["x"][:, :6]
        projected = attn.k_proj(src).view(2, -1, HEADS, 5).transpose(1, 2)  # (B, H, S, 5)
        assert cache.k.shape[-1] == 5 and cache.v.shape[-1] == DIM // HEADS
        torch.testing.assert_close(cache.k[:, :, : src.shape[1]], projected)
        steps = [
            attn(inp["x"][:, i : i + 1], positions=inp["positions"][:, i : i + 1], cache=cache)
            for i in range(6, 9)
        ]
    torch.testing.assert_close(torch.cat([pre, *steps], 1), full, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("role", ["causal", "bidirectional"])
def test_attention_weights_are_softmax_distributions(role: str) -> None:
    attn = make(role, chunk_size=3)
    x = torch.randn(2, 11, DIM)
    with torch.no_grad():
        weights = attn.attention_weights(x, positions=torch.arange(11).expand(2, 11))
    assert weights.shape == (2, HEADS, 11, 11) and (weights >= 0).all()
    torch.testing.assert_close(weights.sum(-1), torch.ones(2, HEADS, 11))
    if role == "causal":
        assert (weights.triu(1) == 0).all()
    else:  # every key is seen, the future ones too
        assert (weights[..., torch.ones(11, 11, dtype=torch.bool).triu(1)] > 0).all()


def test_flops_count_the_pairwise_mlp() -> None:
    """Per key, per head: 4 * d_att (add, tanh, w^T) + 2 * head_dim (values); mha: 4 * head_dim."""
    attn, mha = make("causal", d_att=16), build_attention("mha", DIM, HEADS, "causal")
    per_key = attn.flops_per_token(200) - attn.flops_per_token(100)
    assert per_key == 100 * HEADS * (4 * 16 + 2 * 8)
    assert per_key > mha.flops_per_token(200) - mha.flops_per_token(100)


def test_bad_knobs_fail_with_the_value() -> None:
    with pytest.raises(ValueError, match="chunk_size=0"):
        build_attention({"kind": "additive", "chunk_size": 0}, DIM, HEADS, "causal")
