"""The attention comparison: matched parameters in experiment=compare, metrics.json, and the
report (table + charts) that one sweep command writes and the report command rewrites."""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import ROOT, compose

from minillm.attention import kinds_for_role
from minillm.cli import report as report_cli
from minillm.cli.app import compose as compose_command
from minillm.evaluation.report import read_log
from minillm.models import build_model
from minillm.models.sizing import match_params

SWEEP_KINDS = ("mha", "gated_linear")
TINY = [
    "model.dim=32",
    "model.n_layers=2",
    "model.max_len=32",
    "data=text",
    "data.vocab_size=300",
    "batch_size=4",
    "trainer=cpu",
    "trainer.max_steps=4",
    "trainer.val_check_interval=2",
    "trainer.limit_val_batches=2",
    "trainer.checkpoint_every_n_steps=2",
    "trainer.enable_progress_bar=false",
    "optim.warmup_steps=2",
    "hydra.callbacks.report.contexts=[8,16]",
    "hydra.callbacks.report.new_tokens=2",
]


def compare_params(kind: str) -> tuple[int, int]:
    """(all, non-embedding) parameters of ``kind``'s model as experiment=compare builds it."""
    cfg = compose(["experiment=compare", f"attn={kind}"])
    model_cfg = {**cfg["model"], "attn": cfg["attn"], "vocab_size": cfg["data"]["vocab_size"]}
    with torch.device("meta"):
        model = build_model(match_params(model_cfg, cfg["match_params"]))
    return model.num_params(), model.num_params(non_embedding=True)


@pytest.mark.parametrize("kind", kinds_for_role("causal"))
def test_compare_preset_matches_mha_parameter_count_within_2_percent(kind: str) -> None:
    (total, blocks), (ref_total, ref_blocks) = compare_params(kind), compare_params("mha")
    assert abs(total / ref_total - 1) < 0.02, (kind, total, ref_total)
    assert abs(blocks / ref_blocks - 1) < 0.02, (kind, blocks, ref_blocks)


def test_compare_preset_differs_between_kinds_only_in_attention_and_mlp_width() -> None:
    a, b = (compose(["experiment=compare", f"attn={k}"]) for k in ("mha", "mqa"))
    assert a["match_params"] == "mha"
    for cfg in (a, b):
        assert cfg.pop("attn") == cfg["model"].pop("attn")  # the decoder reads the attn group
    assert a == b


def test_read_log_keeps_the_last_row_of_a_step_logged_twice(tmp_path: Path) -> None:
    path = tmp_path / "metrics.csv"
    rows = [["step", "val/loss", "train/loss"], [1, 5.0, ""], [3, 4.0, ""], [3, "", 4.5]]
    rows += [[1, 4.9, ""], [3, 3.9, ""]]  # resumed from step 1: steps 1 and 3 again
    with path.open("w", newline="") as f:
        csv.writer(f).writerows(rows)
    log = read_log(path)
    assert log["val/loss"] == {1: 4.9, 3: 3.9} and log["train/loss"] == {3: 4.5}


@pytest.fixture(scope="module")
def sweep(corpus_file: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One command, as a user types it: two kinds trained, then the report written."""
    out = tmp_path_factory.mktemp("sweep")
    cmd = [sys.executable, "train.py", "-m", "experiment=compare", f"attn={','.join(SWEEP_KINDS)}"]
    cmd += [*TINY, f"data.files=[{corpus_file}]", f"hydra.sweep.dir={out}"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def test_each_run_writes_metrics_json_and_logs_wall_time(sweep: Path) -> None:
    runs = sorted(p for p in sweep.iterdir() if p.is_dir())
    assert [p.name for p in runs] == [f"{i}_{k}" for i, k in enumerate(SWEEP_KINDS)]
    metrics = [json.loads((p / "metrics.json").read_text()) for p in runs]
    assert [m["kind"] for m in metrics] == list(SWEEP_KINDS)
    for m, run in zip(metrics, runs, strict=True):
        assert m["global_step"] == 4 and m["train_tokens"] == 4 * 4 * 32
        assert math.isfinite(m["val_ppl"]) and 0 < m["bits_per_byte"] < 20
        assert m["train_tokens_per_sec"] > 0 and m["peak_memory_mb"] > 0
        assert m["val_loss"] == pytest.approx(math.log(m["val_ppl"]), rel=1e-5)
        assert read_log(run / "logs" / "metrics.csv")["time/elapsed_s"]
    assert abs(metrics[1]["params"] / metrics[0]["params"] - 1) < 0.02


def test_sweep_writes_the_table_and_charts(sweep: Path) -> None:
    report = (sweep / "report.md").read_text()
    header = next(line for line in report.splitlines() if line.startswith("| kind"))
    for column in ("params", "val ppl", "bits/byte", "train tok/s", "peak train mem"):
        assert column in header
    assert "decode tok/s @8" in header and "decode tok/s @16" in header and "cache @16" in header
    assert f"python train.py -m experiment=compare attn={','.join(SWEEP_KINDS)}" in report
    rows = [line.split(" | ")[0][2:] for line in report.splitlines() if line.startswith("| ")]
    assert rows[1:] == list(SWEEP_KINDS)  # after the header row
    for chart in ("val_loss.png", "decode.png"):
        assert (sweep / chart).read_bytes()[:4] == b"\x89PNG" and f"]({chart})" in report


def test_report_command_adds_the_step_time_chart_from_bench_attention(sweep: Path, tmp_path):
    bench = [sys.executable, "scripts/bench_attention.py", "--kinds", "mha,linear"]
    bench += ["--lengths", "16,32", "--repeats", "1", "--heads", "2", "--head-dim", "8"]
    bench += ["--out", str(tmp_path)]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(bench, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (sweep / "report.md").unlink()
    argv = [f"sweep={sweep}", "contexts=[4,8]", "new_tokens=2", "device=cpu"]
    argv.append(f"bench={tmp_path / 'attention.json'}")
    path = report_cli.report(report_cli.validate(compose_command("report", argv)))
    assert path == sweep / "report.md"
    report = path.read_text()
    assert "decode tok/s @4" in report and "](train_step_time.png)" in report
    assert (sweep / "train_step_time.png").read_bytes()[:4] == b"\x89PNG"
