"""FLOPs accounting against torch's FLOP counter, and the throughput columns of a real run.

No timing is asserted: only counts, and relations between logged columns that hold exactly.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import compose, tiny_overrides
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from minillm import load_checkpoint
from minillm.attention import ATTENTION, build_attention
from minillm.attention.mha import MultiHeadAttention
from minillm.models import build_model
from minillm.models.flops import forward_flops_per_token, train_flops_per_token
from minillm.models.linear_cross_entropy import linear_cross_entropy
from minillm.training.run import train
from minillm.training.throughput import peak_flops_for

DENSE_KINDS = [k for k, (cls, _) in ATTENTION.items() if cls is MultiHeadAttention]


def counted_train_flops(model: torch.nn.Module, *inputs: torch.Tensor) -> int:
    """FlopCounterMode's count of forward + backward of ``model(*inputs).sum()``.

    The MATH SDPA backend runs attention as plain bmm's: the fused CPU kernel is invisible
    to the counter.
    """
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(*inputs).float().square().mean().backward()
    return counter.get_total_flops()


@pytest.mark.parametrize("kind", DENSE_KINDS)
def test_dense_kinds_decoder_flops_equal_the_flop_counter(kind: str) -> None:
    """Exact: both count 2 per multiply-add of matmuls only, elementwise work in neither, and
    every forward matmul costs two in the backward, so training = 3 x forward on both sides.
    A causal query is counted against all T keys by both (the masked half is computed)."""
    torch.manual_seed(0)
    t = 16
    model = build_model(
        {"vocab_size": 64, "dim": 32, "n_layers": 2, "n_heads": 4, "attn": {"kind": kind}}
    )
    ids = torch.randint(0, 64, (2, t))
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        F.cross_entropy(model(ids).flatten(0, 1), ids.flatten()).backward()
    assert counter.get_total_flops() == train_flops_per_token(model, t) * ids.numel()


@pytest.mark.parametrize("kind", sorted(ATTENTION))
def test_every_kind_counts_its_flops_within_a_factor_of_its_kernels(kind: str) -> None:
    """A kind's model FLOPs need not equal what its kernels run (local attention's bands
    compute padded keys; tiny tiles may go elementwise), but within 2x: a formula further off
    has a wrong term. Kinds that do not count yet say so with NotImplementedError."""
    torch.manual_seed(0)
    t = 256
    role = ATTENTION[kind][0].roles[0]  # causal where it can (linformer: bidirectional)
    attn = build_attention({"kind": kind}, 32, 4, role)
    try:
        analytic = 3 * attn.flops_per_token(t) * t
    except NotImplementedError:
        pytest.skip(f"{kind} does not count its FLOPs yet")
    assert attn.flops_per_token(t) > attn.projection_flops() > 0
    x = torch.randn(1, t, 32, requires_grad=True)
    counted = counted_train_flops(lambda x: attn(x, positions=torch.arange(t)[None]), x)
    assert 0.5 <= counted / analytic <= 2.0


def test_model_flops_are_its_linears_plus_its_attention() -> None:
    model = build_model({"vocab_size": 50, "dim": 32, "n_layers": 3, "n_heads": 4})
    mlp = sum(2 * p.numel() for block in model.blocks for p in block.mlp.parameters())
    linears = mlp + 2 * 50 * 32  # the MLPs and the (tied) LM head
    attention = sum(block.attn.flops_per_token(20) for block in model.blocks)
    assert forward_flops_per_token(model, 20) == linears + attention
    # softmax: the context only adds 4 * dim FLOPs per layer per extra key
    assert forward_flops_per_token(model, 21) - forward_flops_per_token(model, 20) == 3 * 4 * 32


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
@pytest.mark.parametrize("chunk_rows", [7, None])
def test_linear_cross_entropy_equals_its_slow_twin(smoothing: float, chunk_rows: int | None):
    """Loss and both gradients against F.linear + F.cross_entropy; ignored labels included.
    fp32, same math in another order (log-sum-exp per chunk): equal to ~1e-6 relative."""
    torch.manual_seed(0)
    h = torch.randn(50, 16, requires_grad=True)
    w = torch.randn(37, 16, requires_grad=True)
    labels = torch.randint(0, 37, (50,))
    labels[::5] = -100
    fast = linear_cross_entropy(h, w, labels, label_smoothing=smoothing, chunk_rows=chunk_rows)
    (0.3 * fast).backward()
    grads = h.grad.clone(), w.grad.clone()
    h.grad = w.grad = None
    slow = F.cross_entropy(
        F.linear(h, w).float(), labels, reduction="sum", label_smoothing=smoothing
    )
    (0.3 * slow).backward()
    torch.testing.assert_close(fast, slow, rtol=1e-6, atol=1e-4)
    torch.testing.assert_close(grads, (h.grad, w.grad), rtol=1e-5, atol=1e-6)
    with torch.no_grad():  # evaluation: no gradients computed, same loss
        again = linear_cross_entropy(h, w, labels, label_smoothing=smoothing)
    torch.testing.assert_close(again, slow, rtol=1e-6, atol=1e-4)


def test_hidden_states_are_what_the_lm_head_reads() -> None:
    torch.manual_seed(0)
    model = build_model({"vocab_size": 50, "dim": 32, "n_layers": 2, "n_heads": 4})
    ids = torch.randint(0, 50, (2, 9))
    torch.testing.assert_close(model.lm_head(model.hidden_states(ids)), model(ids), rtol=0, atol=0)


@pytest.mark.parametrize(
    ("name", "peak"),
    [
        ("NVIDIA H100 80GB HBM3", 989e12),
        ("NVIDIA H100 PCIe", 756e12),
        ("NVIDIA H200", 989e12),
        ("NVIDIA A100-SXM4-80GB", 312e12),
        ("Tesla T4", None),
    ],
)
def test_peak_flops_table(name: str, peak: float | None) -> None:
    assert peak_flops_for(name) == peak


def _rows(run_dir: Path) -> list[dict[str, str]]:
    return list(csv.DictReader((run_dir / "logs" / "metrics.csv").open()))


def test_a_run_logs_tokens_gflops_and_mfu_consistently(corpus_file: Path, tmp_path: Path):
    cfg = compose(tiny_overrides(corpus_file, "trainer.peak_flops=1e12"))
    summary = train(cfg, tmp_path)
    rows = [r for r in _rows(tmp_path) if r.get("train/tokens_per_sec")]
    assert rows and {"train/gflops", "train/mfu"} <= set(rows[0])
    model, _ = load_checkpoint(summary["last_ckpt"])
    per_token = train_flops_per_token(model, cfg["model"]["max_len"])
    for row in rows:
        tokens, gflops = float(row["train/tokens_per_sec"]), float(row["train/gflops"])
        assert tokens > 0 and math.isfinite(tokens)
        assert gflops * 1e9 == pytest.approx(tokens * per_token, rel=1e-5)  # fp32 logging
        assert float(row["train/mfu"]) == pytest.approx(gflops * 1e9 / 1e12, rel=1e-5)


def test_without_a_peak_a_cpu_run_logs_gflops_but_no_mfu(corpus_file: Path, tmp_path: Path):
    train(compose(tiny_overrides(corpus_file)), tmp_path)
    header = set(_rows(tmp_path)[0])
    assert {"train/tokens_per_sec", "train/gflops"} <= header
    assert "train/mfu" not in header
