"""scripts/export.py writes safetensors + config.json + tokenizer.json, and
minillm.load_pretrained loads them without Lightning or Hydra, with identical logits."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import ROOT, compose, tiny_overrides
from safetensors import safe_open

from minillm import load_checkpoint, load_pretrained, save_pretrained
from minillm.checkpoint import EXPORT_FILES, CheckpointError
from minillm.integrity import CHECKSUMS, tensor_crc32
from minillm.models import build_model
from minillm.training.run import train

ENV = {**os.environ, "PYTHONPATH": str(ROOT)}


@pytest.fixture(scope="module")
def trained_ckpt(corpus_file: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir = tmp_path_factory.mktemp("run")
    return Path(
        train(compose(tiny_overrides(corpus_file, "trainer.max_steps=2")), run_dir)["last_ckpt"]
    )


def test_export_then_load_pretrained_gives_identical_logits(trained_ckpt: Path, tmp_path: Path):
    out = tmp_path / "exported"
    cmd = [sys.executable, "scripts/export.py", f"ckpt={trained_ckpt}", f"out={out}/"]
    proc = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(p.name for p in out.iterdir()) == [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
    ]
    model, tokenizer = load_pretrained(out)
    reference, reference_tokenizer = load_checkpoint(trained_ckpt)
    assert model.lm_head.weight is model.tok_emb.weight  # tied again after loading
    assert tokenizer.to_str() == reference_tokenizer.to_str()
    ids = torch.tensor([tokenizer.encode("The Congress of the United States").ids])
    with torch.no_grad():
        torch.testing.assert_close(model(ids), reference(ids), rtol=0, atol=0)


def test_load_pretrained_needs_neither_lightning_nor_hydra(trained_ckpt: Path, tmp_path: Path):
    model, tokenizer = load_checkpoint(trained_ckpt)
    save_pretrained(model, tokenizer, tmp_path)
    code = (
        "import sys, minillm, torch\n"
        f"model, tokenizer = minillm.load_pretrained({str(tmp_path)!r})\n"
        "model(torch.tensor([tokenizer.encode('The').ids]))\n"
        "heavy = [m for m in ('lightning', 'pytorch_lightning', 'hydra') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], env=ENV, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_untied_models_round_trip_too(tmp_path: Path, trained_ckpt: Path) -> None:
    _, tokenizer = load_checkpoint(trained_ckpt)
    cfg = {"vocab_size": tokenizer.get_vocab_size(), "dim": 32, "n_layers": 1, "n_heads": 4}
    model = build_model({**cfg, "tie_embeddings": False, "attn": {"kind": "gated_linear"}}).eval()
    save_pretrained(model, tokenizer, tmp_path)
    loaded, _ = load_pretrained(tmp_path)
    ids = torch.randint(0, cfg["vocab_size"], (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids), model(ids), rtol=0, atol=0)


def test_a_broken_export_is_a_clear_error(trained_ckpt: Path, tmp_path: Path) -> None:
    model, tokenizer = load_checkpoint(trained_ckpt)
    save_pretrained(model, tokenizer, tmp_path)
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_pretrained(tmp_path)
    weights.unlink()
    with pytest.raises(FileNotFoundError, match=r"model.safetensors.*missing.*export.py"):
        load_pretrained(tmp_path)


def test_an_export_records_a_crc32_per_tensor_and_writes_no_temp_files(
    trained_ckpt: Path, tmp_path: Path
) -> None:
    model, tokenizer = load_checkpoint(trained_ckpt)
    folder = save_pretrained(model, tokenizer, tmp_path / "new" / "export")  # parents made
    assert sorted(p.name for p in folder.iterdir()) == sorted(EXPORT_FILES)
    with safe_open(str(folder / "model.safetensors"), framework="pt") as f:
        sums = json.loads(f.metadata()[CHECKSUMS])
        stored = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118
    assert sums.keys() == model.state_dict().keys()  # the tied head's name too
    assert {k: tensor_crc32(v) for k, v in stored.items()} == {k: sums[k] for k in stored}
    with pytest.raises(FileExistsError, match="overwrite=True"):
        save_pretrained(model, tokenizer, folder)
