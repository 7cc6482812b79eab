"""Resume and crash safety: kill -9 + resume = one uninterrupted run; bad checkpoints are
refused with the file named; a diverging run stops (or skips) and never saves NaN weights."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import pytest
import torch
from conftest import ROOT, compose, tiny_overrides
from torch.utils.data import DataLoader

from minillm import load_checkpoint
from minillm.checkpoint import CheckpointError, model_state_dict, read_checkpoint
from minillm.training import LMModule
from minillm.training.run import train

N = 6  # the crash happens after N of 2N steps


@pytest.fixture(autouse=True)
def _restore_determinism():
    """trainer.deterministic=true flips a process-wide torch flag; put it back."""
    before = torch.are_deterministic_algorithms_enabled()
    yield
    torch.use_deterministic_algorithms(before)


def resume_overrides(corpus: Path) -> list[str]:
    """Dropout on (so the random state matters) and validation off the checkpoint steps."""
    return tiny_overrides(
        corpus,
        f"trainer.max_steps={2 * N}",
        f"trainer.checkpoint_every_n_steps={N}",
        "trainer.val_check_interval=4",
        "trainer.deterministic=true",
        "model.dropout=0.1",
        "attn.dropout=0.1",
        "seed=7",
    )


def last_losses(run_dir: Path) -> dict[int, float]:
    """step -> train/loss; a step logged twice (before the crash and after resume) keeps
    its last row."""
    rows = csv.DictReader((run_dir / "logs" / "metrics.csv").open())
    return {int(r["step"]): float(r["train/loss"]) for r in rows if r.get("train/loss")}


def start_and_signal(overrides: list[str], run_dir: Path, signum: int) -> tuple[int, str]:
    """Run train.py; send ``signum`` once its first last.ckpt (step N) is written.

    Returns the exit status and the end of its output."""
    last = run_dir / "checkpoints" / "last.ckpt"
    cmd = [sys.executable, "train.py", *overrides, f"hydra.run.dir={run_dir}"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 120
    while not last.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    os.kill(proc.pid, signum)
    out = proc.communicate()[0].decode()[-3000:]
    return proc.returncode, out


def assert_resume_equals_whole(whole: dict, resumed: dict, whole_dir: Path, run_dir: Path):
    assert resumed["global_step"] == 2 * N
    a, b = last_losses(whole_dir), last_losses(run_dir)
    # Lightning writes step N-1's row just after its checkpoint: a kill in between loses it.
    assert set(range(2 * N)) - {N - 1} <= set(b)
    for step in range(N, 2 * N):
        assert abs(a[step] - b[step]) <= 1e-6, (step, a[step], b[step])
    assert abs(whole["val_ppl"] - resumed["val_ppl"]) <= 1e-6 * whole["val_ppl"]
    weights_a = model_state_dict(read_checkpoint(whole["last_ckpt"]))
    weights_b = model_state_dict(read_checkpoint(resumed["last_ckpt"]))
    for name, value in weights_a.items():
        torch.testing.assert_close(weights_b[name], value, rtol=0, atol=1e-6)


@pytest.fixture(scope="module")
def whole(corpus_file: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The uninterrupted 2N-step run both interrupted runs must end equal to."""
    summary = train(compose(resume_overrides(corpus_file)), tmp_path_factory.mktemp("whole"))
    assert summary["global_step"] == 2 * N
    return summary


def test_kill_9_and_resume_equals_one_uninterrupted_run(whole, corpus_file: Path, tmp_path: Path):
    overrides = resume_overrides(corpus_file)
    run_dir = tmp_path / "crashed"
    status, out = start_and_signal(overrides, run_dir, signal.SIGKILL)
    assert status == -signal.SIGKILL, f"the run ended before it was killed:\n{out}"
    last = run_dir / "checkpoints" / "last.ckpt"
    assert read_checkpoint(last)["global_step"] == N, "killed too late: raise N"
    resumed = train(compose([*overrides, "ckpt_path=last"]), run_dir)
    assert_resume_equals_whole(whole, resumed, Path(whole["run_dir"]), run_dir)


def test_sigterm_saves_at_a_step_and_resume_equals_one_uninterrupted_run(
    whole, corpus_file: Path, tmp_path: Path
):
    overrides = resume_overrides(corpus_file)
    run_dir = tmp_path / "stopped"
    status, out = start_and_signal(overrides, run_dir, signal.SIGTERM)
    assert status == 143, f"expected exit status 143 (128 + SIGTERM):\n{out}"
    assert "stopped by SIGTERM at step" in out and "ckpt_path=last" in out, out
    stopped_at = read_checkpoint(run_dir / "checkpoints" / "last.ckpt")["global_step"]
    assert N <= stopped_at < 2 * N, "stopped too late: raise N"
    assert f"stopped by SIGTERM at step {stopped_at}:" in out, out  # saved where it stopped
    resumed = train(compose([*overrides, "ckpt_path=last"]), run_dir)
    assert_resume_equals_whole(whole, resumed, Path(whole["run_dir"]), run_dir)


def test_kill_9_and_resume_with_xl_memory_equals_one_uninterrupted_run(
    corpus_file: Path, tmp_path: Path
):
    """The streams' memory at the checkpoint travels in it: without it step N's loss would
    differ (the resumed memory would be empty); validation (step 4, 8) keeps its own."""
    overrides = [*resume_overrides(corpus_file), "model.memory_len=24"]
    whole = train(compose(overrides), tmp_path / "whole")
    run_dir = tmp_path / "crashed"
    status, out = start_and_signal(overrides, run_dir, signal.SIGKILL)
    assert status == -signal.SIGKILL, f"the run ended before it was killed:\n{out}"
    assert read_checkpoint(run_dir / "checkpoints" / "last.ckpt")["global_step"] == N
    resumed = train(compose([*overrides, "ckpt_path=last"]), run_dir)
    assert_resume_equals_whole(whole, resumed, Path(whole["run_dir"]), run_dir)


@pytest.fixture(scope="module")
def good_ckpt(corpus_file: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir = tmp_path_factory.mktemp("good")
    return Path(
        train(compose(tiny_overrides(corpus_file, "trainer.max_steps=2")), run_dir)["last_ckpt"]
    )


def test_truncated_checkpoint_is_a_clear_error_naming_the_file(
    good_ckpt: Path, corpus_file: Path, tmp_path: Path
) -> None:
    data = good_ckpt.read_bytes()
    truncated, garbage = tmp_path / "truncated.ckpt", tmp_path / "garbage.ckpt"
    truncated.write_bytes(data[: len(data) // 2])
    garbage.write_bytes(b"not a checkpoint at all")
    for path in (truncated, garbage):
        with pytest.raises(CheckpointError, match=rf"{path.name}.*truncated or corrupt"):
            load_checkpoint(path)
    with pytest.raises(CheckpointError, match="truncated.ckpt"):
        train(compose(tiny_overrides(corpus_file, f"ckpt_path={truncated}")), tmp_path / "r")


class _RunsCode:
    """Unpickling this would run a shell command."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_pickle_that_would_run_code_is_refused(good_ckpt: Path, tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    ckpt = read_checkpoint(good_ckpt)
    ckpt["payload"] = _RunsCode(marker)
    evil = tmp_path / "evil.ckpt"
    torch.save(ckpt, evil)
    with pytest.raises(CheckpointError, match=r"refusing to load .*evil.ckpt.*weights_only"):
        load_checkpoint(evil)
    assert not marker.exists()


def diverging(corpus: Path, on_nan: str) -> list[str]:
    """A learning rate of 1e6 makes the gradients non-finite within a couple of steps."""
    return tiny_overrides(
        corpus,
        "optim.lr=1e6",
        "optim.warmup_steps=1",
        f"on_nan={on_nan}",
        "trainer.max_steps=6",
        "trainer.checkpoint_every_n_steps=1",
    )


def all_finite(ckpt: Path) -> bool:
    return all(v.isfinite().all() for v in model_state_dict(read_checkpoint(ckpt)).values())


def test_non_finite_gradients_stop_the_run_naming_step_and_checkpoint(
    corpus_file: Path, tmp_path: Path
) -> None:
    with pytest.raises(FloatingPointError, match=r"at step \d+.*Last good checkpoint: .*last.ckpt"):
        train(compose(diverging(corpus_file, "stop")), tmp_path)
    assert all_finite(tmp_path / "checkpoints" / "last.ckpt")


def test_on_nan_skip_drops_the_bad_updates_and_finishes(corpus_file: Path, tmp_path: Path):
    summary = train(compose(diverging(corpus_file, "skip")), tmp_path)
    assert summary["global_step"] == 6  # steps and data position still advance
    assert all_finite(Path(summary["last_ckpt"]))


def test_nan_weights_are_never_saved_over_a_good_checkpoint(tmp_path: Path) -> None:
    module = LMModule(model={"vocab_size": 64, "dim": 32, "n_layers": 1, "n_heads": 4})
    ids = torch.randint(0, 64, (4, 9))
    loader = DataLoader([{"input_ids": r[:-1], "labels": r[1:]} for r in ids], batch_size=4)
    trainer = L.Trainer(
        max_steps=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, loader)
    path = tmp_path / "last.ckpt"
    trainer.save_checkpoint(path)
    good = path.read_bytes()
    with torch.no_grad():
        module.model.norm.weight[0] = float("nan")
    with pytest.raises(FloatingPointError, match=r"refusing to save .*norm.weight"):
        trainer.save_checkpoint(path)
    assert path.read_bytes() == good
