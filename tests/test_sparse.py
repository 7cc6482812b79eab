"""``sparse`` beyond the registry suite: which keys each query reads, the causal role's global
tokens, the cache's fixed size, and the seeded BigBird random blocks."""

from __future__ import annotations

import pytest
import torch

from minillm.attention import build_attention
from minillm.attention.reference import REFERENCES
from minillm.attention.sparse import SparseAttention
from minillm.models.block import positions_from_mask

DIM, HEADS, T = 32, 4, 40


def make(role: str, seed: int = 0, **knobs: object) -> SparseAttention:
    torch.manual_seed(seed)
    cfg = {"kind": "sparse", "window": 8, "n_global": 2, "block_size": 4, **knobs}
    attn = build_attention(cfg, DIM, HEADS, role)
    with torch.no_grad():
        for p in attn.parameters():
            p.normal_(0.0, 0.3)
    return attn.eval()


def reads(attn: SparseAttention, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """(T, T) bool from the fast path's gradients: output t depends on input s (row 0)."""
    pos = positions_from_mask(mask, 1, x.shape[1], x.device)
    x = x.clone().requires_grad_(True)
    y = attn(x, positions=pos, mask=mask)  # (1, T, dim)
    rows = [torch.autograd.grad(y[0, t].sum(), x, retain_graph=True)[0] for t in range(x.shape[1])]
    return torch.stack(rows)[:, 0].abs().sum(-1) > 0  # (T, T)


def expected(role: str, t: int, window: int = 8, g: int = 2) -> torch.Tensor:
    """The pattern from its definition: neighbours + global keys (+ global queries)."""
    local = window - g
    i = torch.arange(t)
    q, s = i[:, None], i[None, :]
    if role == "causal":
        return ((s > q - local) | (s < g)) & (s <= q)
    return ((q - s).abs() <= local // 2) | (s < g) | (q < g)


@pytest.mark.parametrize("role", ["causal", "bidirectional"])
def test_each_query_reads_exactly_its_window_and_the_globals(role: str) -> None:
    attn = make(role)
    x = torch.randn(1, T, DIM)
    got = reads(attn, x)
    assert torch.equal(got, expected(role, T))
    assert torch.equal(attn.pattern(T), expected(role, T))
    assert (attn.attention_weights(x, positions=torch.arange(T)[None]) > 0).eq(got).all()


def test_causal_global_tokens_see_only_their_past_and_are_seen_by_all() -> None:
    attn = make("causal")
    got = reads(attn, torch.randn(1, T, DIM))
    for t in range(2):  # global queries: exactly their past
        assert got[t].nonzero().flatten().tolist() == list(range(t + 1))
    assert got[T - 1, :2].all() and not got[T - 1, 2 : T - 6].any()  # far query: globals only


def test_left_padding_moves_the_globals_to_the_first_real_tokens() -> None:
    attn, pad = make("bidirectional", random_blocks=2), 5
    x = torch.randn(1, T, DIM)
    mask = torch.ones(1, T, dtype=torch.bool)
    mask[0, :pad] = False
    padded = reads(attn, x, mask)[pad:, pad:]
    assert torch.equal(padded, reads(attn, x[:, pad:]))


def test_random_blocks_are_distinct_whole_blocks_and_match_the_twin() -> None:
    attn = make("bidirectional", random_blocks=2)
    got = reads(attn, torch.randn(1, T, DIM))
    extra = got & ~expected("bidirectional", T)  # reads the window and globals do not explain
    assert extra.any()
    bs = attn.cfg.block_size
    for qb in range(T // bs):
        if qb * bs < attn.cfg.n_global:
            continue
        rows = extra[qb * bs : (qb + 1) * bs]
        key_blocks = {int(s) // bs for s in rows.nonzero()[:, 1]}
        assert 0 < len(key_blocks) <= 2  # r blocks (some keys already in the window)
        assert torch.equal(got[qb * bs : (qb + 1) * bs], attn.pattern(T)[qb * bs : (qb + 1) * bs])
    mask = torch.ones(2, T, dtype=torch.bool)
    mask[1, :7] = False
    inp = {"x": torch.randn(2, T, DIM), "mask": mask}
    inp["positions"] = positions_from_mask(mask, 2, T, torch.device("cpu"))
    with torch.no_grad():
        y, y_ref = attn(**inp), REFERENCES[SparseAttention](attn, **inp)
    torch.testing.assert_close(y, y_ref, rtol=1e-4, atol=1e-5)


def test_random_blocks_come_from_the_saved_seed() -> None:
    a, b = (
        make("bidirectional", seed=0, random_blocks=2),
        make("bidirectional", seed=1, random_blocks=2),
    )
    assert "random_seed" in a.state_dict()
    assert not torch.equal(a.pattern(T), b.pattern(T))  # per-layer seeds differ
    b.load_state_dict(a.state_dict())
    assert torch.equal(a.pattern(T), b.pattern(T))
    x = torch.randn(1, T, DIM)
    pos = torch.arange(T)[None]
    with torch.no_grad():
        torch.testing.assert_close(a(x, positions=pos), b(x, positions=pos))


def test_cache_keeps_a_fixed_size_and_decodes_past_max_len() -> None:
    """Tensors never grow, ``window`` slots hold everything, and 100 tokens decoded from a
    cache built for 16 equal the full forward (left-padded row included)."""
    attn, t = make("causal"), 100
    mask = torch.ones(2, t, dtype=torch.bool)
    mask[1, :3] = False
    x, pos = torch.randn(2, t, DIM), positions_from_mask(mask, 2, t, torch.device("cpu"))
    cache = attn.init_cache(2, 16, "cpu", torch.float32)
    shapes = [tuple(getattr(cache, n).shape) for n in ("k", "v", "valid", "index")]
    assert cache.k.shape[2] == attn.cfg.window and cache.capacity is None
    with torch.no_grad():
        full = attn(x, positions=pos, mask=mask)
        outs = [attn(x[:, :10], positions=pos[:, :10], mask=mask[:, :10], cache=cache)]
        for i in range(10, t):
            outs.append(attn(x[:, i : i + 1], positions=pos[:, i : i + 1], cache=cache))
            assert [tuple(getattr(cache, n).shape) for n in ("k", "v", "valid", "index")] == shapes
    torch.testing.assert_close(torch.cat(outs, 1), full, rtol=1e-5, atol=1e-5)


def test_bad_knobs_name_the_value_and_the_fix() -> None:
    with pytest.raises(ValueError, match="n_global=8.*window=8"):
        build_attention({"kind": "sparse", "window": 8, "n_global": 8}, DIM, HEADS, "causal")
    with pytest.raises(ValueError, match="random_blocks=2.*random_blocks=0"):
        build_attention({"kind": "sparse", "random_blocks": 2}, DIM, HEADS, "causal")


def test_one_token_at_a_time_from_the_start_equals_the_full_forward() -> None:
    """Every token through the decode step, left padding included (a padding query sees only
    itself, as in the full forward), past the window and the globals."""
    attn = make("causal")
    x = torch.randn(3, T, DIM)
    mask = torch.ones(3, T, dtype=torch.bool)
    mask[1, :3], mask[2, :9] = False, False
    pos = positions_from_mask(mask, 3, T, x.device)
    cache = attn.init_cache(3, T, "cpu", torch.float32)
    with torch.no_grad():
        full = attn(x, positions=pos, mask=mask)
        steps = [
            attn(x[:, i : i + 1], positions=pos[:, i : i + 1], cache=cache, mask=mask[:, i : i + 1])
            for i in range(T)
        ]
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=1e-5, atol=1e-5)
