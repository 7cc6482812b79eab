"""Two CPU processes (trainer=ddp_sim, gloo): the same training as one process with the same
global batch, and a rank that dies ends the run with an error instead of hanging it."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import ROOT, compose, tiny_overrides

from minillm.checkpoint import model_state_dict, read_checkpoint
from minillm.training.run import train

pytestmark = pytest.mark.slow


def val_losses(run_dir: Path) -> dict[int, float]:
    rows = csv.DictReader((run_dir / "logs" / "metrics.csv").open())
    return {int(r["step"]): float(r["val/loss"]) for r in rows if r.get("val/loss")}


def train_py(run_dir: Path, overrides: list[str]) -> subprocess.Popen:
    cmd = [sys.executable, "train.py", *overrides, f"hydra.run.dir={run_dir}"]
    return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def test_ddp_sim_matches_one_process_with_the_same_global_batch(corpus_file: Path, tmp_path):
    steps = ["trainer.max_steps=6", "trainer.val_check_interval=3"]
    single = train(compose(tiny_overrides(corpus_file, *steps)), tmp_path / "single")
    proc = train_py(
        tmp_path / "ddp", tiny_overrides(corpus_file, *steps, "trainer=ddp_sim", "batch_size=2")
    )
    out = proc.communicate(timeout=300)[0].decode()
    assert proc.returncode == 0, out[-3000:]
    ddp_dir = tmp_path / "ddp"
    assert sorted(p.name for p in (ddp_dir / "checkpoints").iterdir()) == ["best.ckpt", "last.ckpt"]
    a, b = val_losses(tmp_path / "single"), val_losses(ddp_dir)
    assert a.keys() == b.keys() == {2, 5}
    for step in a:  # validation is sharded over the ranks and summed: the same blocks
        assert b[step] == pytest.approx(a[step], rel=1e-5)
    weights_a = model_state_dict(read_checkpoint(single["last_ckpt"]))
    weights_b = model_state_dict(read_checkpoint(ddp_dir / "checkpoints" / "last.ckpt"))
    for name, value in weights_a.items():
        # atol 1e-4: the fused loss sums the two halves' gradients in another order, and Adam's
        # normalisation magnifies that rounding in near-zero gradients (max seen 1.4e-5)
        torch.testing.assert_close(weights_b[name], value, rtol=1e-4, atol=1e-4)


def rank_1(parent: int) -> int | None:
    """The child process Lightning launched for local rank 1, if it is up yet."""
    for task in Path(f"/proc/{parent}/task").iterdir():
        for child in (task / "children").read_text().split():
            environ = Path(f"/proc/{child}/environ").read_bytes().split(b"\0")
            if b"LOCAL_RANK=1" in environ:
                return int(child)
    return None


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="needs Linux /proc")
def test_a_rank_that_dies_ends_the_run_with_an_error(corpus_file: Path, tmp_path: Path):
    overrides = tiny_overrides(
        corpus_file, "trainer=ddp_sim", "batch_size=2", "trainer.max_steps=500"
    )
    proc = train_py(tmp_path, overrides)
    first = tmp_path / "checkpoints" / "last.ckpt"  # training is under way on both ranks
    deadline = time.monotonic() + 180
    while not first.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    child = rank_1(proc.pid)
    assert child is not None, proc.communicate()[0].decode()[-3000:]
    os.kill(child, signal.SIGKILL)
    killed = time.monotonic()
    out = proc.communicate(timeout=120)[0].decode()  # a hang fails here
    assert proc.returncode != 0
    assert time.monotonic() - killed < 60
    assert "Connection reset by peer" in out or "Connection closed by peer" in out, out[-3000:]
