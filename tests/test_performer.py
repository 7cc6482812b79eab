"""``performer`` beyond the registry suite: FAVOR+ approximates softmax attention better with
more features, features are redrawn on schedule in training only, and travel in checkpoints."""

from __future__ import annotations

import io

import torch

from minillm.attention import build_attention
from minillm.attention.performer import PerformerAttention, orthogonal_gaussian

DIM, HEADS, T = 32, 2, 48


def make(
    role: str = "causal", seed: int = 0, std: float = 0.15, **knobs: object
) -> PerformerAttention:
    torch.manual_seed(seed)
    attn = build_attention({"kind": "performer", **knobs}, DIM, HEADS, role)
    with torch.no_grad():
        for p in attn.parameters():
            p.normal_(0.0, std)
    return attn


def exact_softmax(attn: PerformerAttention, x: torch.Tensor) -> torch.Tensor:
    """Softmax attention with the module's own projections (same q, k, v), no features."""
    q, k, v = (attn._heads(p, x) for p in (attn.q_proj, attn.k_proj, attn.v_proj))  # (B,H,T,D)
    scores = q @ k.transpose(-1, -2) / attn.head_dim**0.5  # (B, H, T, T)
    if attn.causal:
        scores = scores.masked_fill(~torch.ones(T, T, dtype=torch.bool).tril(), float("-inf"))
    y = scores.softmax(-1) @ v  # (B, H, T, D)
    return attn.o_proj(y.transpose(1, 2).reshape(x.shape[0], T, DIM))


def test_error_to_softmax_attention_falls_as_features_grow() -> None:
    """Mean relative error over 6 seeds (weights, inputs and features): 256 features at least
    2x better than 16 (theory: error ~ 1/sqrt(m), i.e. 4x), in both the causal form and the
    bidirectional one. Small weights keep |q|, |k| moderate, where the estimator's variance
    (which grows as exp|q + k|^2) lets a few seeds show the trend."""
    for role in ("causal", "bidirectional"):
        errors = {}
        for m in (16, 64, 256):
            total = 0.0
            for seed in range(6):
                attn = make(role, seed=seed, std=0.05, n_features=m).eval()
                x = torch.randn(2, T, DIM)
                with torch.no_grad():
                    y, exact = attn(x, positions=torch.arange(T)[None]), exact_softmax(attn, x)
                total += ((y - exact).norm() / exact.norm()).item() / 6
            errors[m] = total
        assert errors[16] > errors[64] > errors[256], errors
        assert errors[256] < 0.5 * errors[16], errors


def test_features_are_orthogonal_blocks_of_gaussian_length() -> None:
    w = orthogonal_gaussian(40, 16, torch.Generator().manual_seed(0))
    block = w[:16] / w[:16].norm(dim=1, keepdim=True)
    torch.testing.assert_close(block @ block.T, torch.eye(16), atol=1e-5, rtol=0)
    assert w.shape == (40, 16) and 2.0 < w.norm(dim=1).mean() < 6.0  # chi(16) ~ 3.9


def test_redraw_every_interval_in_training_never_in_eval() -> None:
    attn, interval = make(redraw_interval=3), 3
    x, pos = torch.randn(1, 8, DIM), torch.arange(8)[None]
    changed = []
    for _ in range(7):
        before = attn.features.clone()
        attn(x, positions=pos)
        changed.append(not torch.equal(before, attn.features))
    assert changed == [False, False, True, False, False, True, False]  # calls 3 and 6
    attn.eval()
    before = attn.features.clone()
    with torch.no_grad():
        for _ in range(2 * interval):
            attn(x, positions=pos)
    assert torch.equal(before, attn.features)
    never = make(redraw_interval=0)
    before = never.features.clone()
    for _ in range(5):
        never(x, positions=pos)
    assert torch.equal(before, never.features)


def test_redraws_are_reproducible_from_the_saved_seed() -> None:
    a, b = make(seed=0, redraw_interval=1), make(seed=1, redraw_interval=1)
    b.load_state_dict(a.state_dict())
    x, pos = torch.randn(1, 8, DIM), torch.arange(8)[None]
    for _ in range(2):
        a(x, positions=pos), b(x, positions=pos)
    assert torch.equal(a.features, b.features)


def test_features_survive_a_state_dict_round_trip() -> None:
    a = make(seed=0, redraw_interval=1)
    a(torch.randn(1, 8, DIM), positions=torch.arange(8)[None])  # a redrawn draw, not the init one
    buffer = io.BytesIO()
    torch.save(a.state_dict(), buffer)
    b = make(seed=1).eval()
    assert not torch.equal(a.features, b.features)
    b.load_state_dict(torch.load(io.BytesIO(buffer.getvalue())))
    a.eval()
    x, pos = torch.randn(2, T, DIM), torch.arange(T)[None]
    assert torch.equal(a.features, b.features)
    with torch.no_grad():
        torch.testing.assert_close(a(x, positions=pos), b(x, positions=pos), rtol=0, atol=0)


def test_a_resumed_module_redraws_on_the_uninterrupted_schedule() -> None:
    """Saved after 4 training calls (one redraw at call 3, interval 3), loaded into a fresh
    module: calls 5..9 redraw at 6 and 9 with the same draws as the module never stopped."""
    x, pos = torch.randn(1, 8, DIM), torch.arange(8)[None]
    a = make(seed=0, redraw_interval=3)
    for _ in range(4):
        a(x, positions=pos)
    buffer = io.BytesIO()
    torch.save(a.state_dict(), buffer)
    b = make(seed=1, redraw_interval=3)
    b.load_state_dict(torch.load(io.BytesIO(buffer.getvalue()), weights_only=True))
    for _ in range(5):
        a(x, positions=pos), b(x, positions=pos)
        assert torch.equal(a.features, b.features)
    assert (b.training_calls, b.redraws) == (9, 3)


def test_a_state_dict_without_redraw_counts_still_loads() -> None:
    """Checkpoints written before the counts were saved load, the counts starting at 0."""
    a = make(seed=0, redraw_interval=1)
    a(torch.randn(1, 8, DIM), positions=torch.arange(8)[None])
    state = a.state_dict()
    assert state.pop("redraw_count").tolist() == [1, 1]
    b = make(seed=1)
    b.load_state_dict(state)  # strict
    assert torch.equal(a.features, b.features) and (b.training_calls, b.redraws) == (0, 0)
