"""The foundation as a user runs it: train.py's config trains every kind, checkpoints load
without Hydra and give the same logits, resume continues, bad input gets a clear error."""

from __future__ import annotations

import csv
import math
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from conftest import ROOT, compose, tiny_overrides
from torch.utils.data import DataLoader

from minillm import load_checkpoint
from minillm.attention import kinds_for_role
from minillm.models import build_model
from minillm.training import LMModule
from minillm.training.run import train


def run(corpus: Path, out: Path, *extra: str) -> dict:
    return train(compose(tiny_overrides(corpus, *extra)), out)


@pytest.mark.parametrize("kind", kinds_for_role("causal"))
def test_every_kind_trains_through_the_train_config(kind: str, corpus_file: Path, tmp_path: Path):
    summary = run(corpus_file, tmp_path, f"attn={kind}")
    assert summary["global_step"] == 4
    assert math.isfinite(summary["val_ppl"])
    assert Path(summary["last_ckpt"]).is_file() and Path(summary["best_ckpt"]).is_file()
    assert (tmp_path / "tokenizer.json").is_file()
    header = next(csv.reader((tmp_path / "logs" / "metrics.csv").open()))
    assert {"train/loss", "val/loss", "val/ppl", "train/tokens_per_sec"} <= set(header)


def test_gqa_with_kv_heads_override_trains(corpus_file: Path, tmp_path: Path) -> None:
    summary = run(corpus_file, tmp_path, "attn=gqa", "attn.n_kv_heads=2", "trainer.max_steps=2")
    model, _ = load_checkpoint(summary["last_ckpt"])
    assert model.blocks[0].attn.k_proj.out_features == 2 * model.blocks[0].attn.head_dim


def test_n_heads_not_divisible_by_n_kv_heads_names_both(corpus_file: Path, tmp_path: Path):
    with pytest.raises(ValueError, match=r"n_heads=4 .*n_kv_heads=3"):
        run(corpus_file, tmp_path, "attn=gqa", "attn.n_kv_heads=3")


def test_missing_file_names_the_path(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere.txt"
    with pytest.raises(FileNotFoundError, match="nowhere.txt"):
        run(missing, tmp_path / "run")


def test_checkpoint_round_trip_gives_the_same_logits(tmp_path: Path) -> None:
    cfg = {"vocab_size": 64, "dim": 32, "n_layers": 2, "n_heads": 4, "max_len": 16}
    module = LMModule(model=cfg, optim={"warmup_steps": 1}, total_steps=3)
    module.tokenizer_json = _tiny_tokenizer_json()
    ids = torch.randint(0, 64, (8, 17))
    loader = DataLoader([{"input_ids": r[:-1], "labels": r[1:]} for r in ids], batch_size=4)
    trainer = L.Trainer(
        max_steps=3,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        accelerator="cpu",
        enable_model_summary=False,
    )
    trainer.fit(module, loader)
    path = tmp_path / "m.ckpt"
    trainer.save_checkpoint(path)
    model, tokenizer = load_checkpoint(path)
    module.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(ids), module.model(ids), rtol=0, atol=0)
    assert tokenizer.to_str() == module.tokenizer_json


def test_resume_continues_the_step_count(corpus_file: Path, tmp_path: Path) -> None:
    first = run(corpus_file, tmp_path)
    assert first["global_step"] == 4
    resumed = run(corpus_file, tmp_path, f"ckpt_path={tmp_path}", "trainer.max_steps=6")
    assert resumed["global_step"] == 6
    steps = [int(r["step"]) for r in csv.DictReader((tmp_path / "logs" / "metrics.csv").open())]
    assert {0, 3, 4, 5} <= set(steps)  # one log across both runs


def test_resume_from_a_missing_checkpoint_says_how(corpus_file: Path, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="ckpt_path"):
        run(corpus_file, tmp_path, "ckpt_path=last")


@pytest.mark.parametrize("kind", kinds_for_role("causal"))
def test_decoder_is_causal(kind: str) -> None:
    torch.manual_seed(0)
    model = build_model(
        {"vocab_size": 50, "dim": 32, "n_layers": 2, "n_heads": 4, "attn": {"kind": kind}}
    ).eval()
    ids = torch.randint(0, 50, (2, 24))
    changed = ids.clone()
    changed[:, 13] = (changed[:, 13] + 1) % 50
    with torch.no_grad():
        a, b = model(ids), model(changed)
    torch.testing.assert_close(a[:, :13], b[:, :13], rtol=0, atol=0)
    assert not torch.allclose(a[:, 13:], b[:, 13:])


def test_train_py_default_config_runs_and_prints_the_summary(tmp_path: Path) -> None:
    """The real entry point on the bundled corpus (a slice of it: experiment=debug)."""
    out = _train_py(tmp_path, "experiment=debug", "trainer.max_steps=6")
    assert "validation perplexity" in out and "unigram baseline" in out
    assert (tmp_path / "checkpoints" / "last.ckpt").is_file()


@pytest.mark.slow
def test_ddp_sim_two_cpu_processes_one_run_directory(tmp_path: Path) -> None:
    out = _train_py(tmp_path, "experiment=debug", "trainer=ddp_sim", "trainer.max_steps=6")
    assert "validation perplexity" in out
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == [
        "best.ckpt",
        "last.ckpt",
    ]
    model, _ = load_checkpoint(tmp_path / "checkpoints" / "last.ckpt")
    assert model.cfg.n_layers == 2


def _train_py(run_dir: Path, *overrides: str) -> str:
    cmd = [
        sys.executable,
        "train.py",
        *overrides,
        f"hydra.run.dir={run_dir}",
        "trainer.enable_progress_bar=false",
    ]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout + proc.stderr


def _tiny_tokenizer_json() -> str:
    from tokenizers import Tokenizer, models

    return Tokenizer(models.WordLevel({"<pad>": 0, "<unk>": 1}, unk_token="<unk>")).to_str()
