"""``scripts/generate.py`` / ``minillm-generate`` as a user runs it: every architecture and
kind, beam search for language models, sampling for translation, one-line errors."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import ROOT
from tokenizers import Tokenizer

from minillm.attention import kinds_for_role
from minillm.cli.app import check_command_line
from minillm.cli.generate import GenerateConfig, run, validate
from minillm.data.tokenizer import build_tokenizer
from minillm.generation import complete
from minillm.models import build_model

ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def tokenizer(corpus_file: Path) -> Tokenizer:
    return build_tokenizer([corpus_file.read_text(encoding="utf-8")], "bpe", 300, 2)


def save_ckpt(path: Path, tokenizer: Tokenizer, **model_cfg) -> Path:
    """A checkpoint in the layout ``minillm.checkpoint`` reads, of a random tiny model."""
    torch.manual_seed(0)
    cfg = {"vocab_size": tokenizer.get_vocab_size(), "dim": 32, "n_layers": 2, "n_heads": 4}
    model = build_model({**cfg, "max_len": 32, **model_cfg})
    ckpt = {
        "hyper_parameters": {"model": model.cfg.to_dict()},
        "state_dict": {f"model.{k}": v for k, v in model.state_dict().items()},
        "tokenizer": tokenizer.to_str(),
    }
    torch.save(ckpt, path)
    return path


def generate_cli(capsys, **options) -> tuple[list, str]:
    out = run(GenerateConfig(**options))
    return out, capsys.readouterr().out


@pytest.mark.parametrize("kind", kinds_for_role("causal"))
def test_every_kind_greedy_and_beam(kind: str, tokenizer, tmp_path: Path, capsys) -> None:
    ckpt = save_ckpt(tmp_path / "m.ckpt", tokenizer, attn={"kind": kind})
    args = {"ckpt": str(ckpt), "prompt": "The Congress", "max_new_tokens": 5}
    out, printed = generate_cli(capsys, **args, temperature=0)
    model, _ = __import__("minillm").load_pretrained(ckpt)
    expect = complete(model, tokenizer, ["The Congress"], temperature=0, max_new_tokens=5)
    assert out[0].text == expect[0].text and printed == f"The Congress{expect[0].text}\n"
    beams, printed = generate_cli(capsys, **args, num_beams=3, n_best=2)
    assert len(beams) == 2 and beams[0].score >= beams[1].score
    assert "hypothesis 2" in printed


def test_translation_checkpoint_samples_with_a_seed(tokenizer, tmp_path: Path, capsys) -> None:
    ckpt = save_ckpt(tmp_path / "t.ckpt", tokenizer, arch="encoder_decoder")
    args = {"ckpt": str(ckpt), "prompt": "Select the text.", "temperature": 0.8, "top_p": 0.9}
    first, printed = generate_cli(capsys, **args, seed=1)
    again, _ = generate_cli(capsys, **args, seed=1)
    assert first[0].token_ids == again[0].token_ids and printed.strip() == first[0].text.strip()
    beam, _ = generate_cli(capsys, **{**args, "temperature": 0}, num_beams=4)
    assert beam[0].score is not None


def test_prompts_file_and_several_samples(tokenizer, tmp_path: Path, capsys) -> None:
    ckpt = save_ckpt(tmp_path / "m.ckpt", tokenizer)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("The Congress\n\nWe the People\n", encoding="utf-8")
    opts = {"ckpt": str(ckpt), "prompts_file": str(prompts), "max_new_tokens": 4}
    out, printed = generate_cli(capsys, **opts, num_samples=2, seed=1, top_p=0.9)
    assert len(out) == 4 and "=== prompt 2, sample 2" in printed and "tokens/s" in printed


BAD = [
    (["prompt=x"], "ckpt is required"),
    (["ckpt=x.ckpt"], "exactly one of prompt"),
    (["ckpt=x", "prompt=a", "num_beams=0"], "num_beams=0"),
    (["ckpt=x", "prompt=a", "max_new_tokens=many"], "max_new_tokens"),
    (["ckpt=x", "prompt=a", "tempreature=1"], "tempreature"),
    (["ckpt=x", "prompt=a", "top_p=1.5"], "top_p"),
    (["ckpt=x", "prompt=a", "dtype=float8"], "dtype"),
]


@pytest.mark.parametrize(("argv", "named"), BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_options_one_line_exit_2(argv: list[str], named: str, capsys) -> None:
    with pytest.raises(SystemExit) as info:
        check_command_line("generate", validate, argv)
    err = capsys.readouterr().err.strip()
    assert info.value.code == 2 and err.startswith("error: ") and "\n" not in err
    assert named in err, err


def test_command_line_escapes_and_lists() -> None:
    cfg = validate({"ckpt": "x", "prompt": "a", "stop": ["\\n\\n", "END"]})
    assert cfg.stop == ["\n\n", "END"]


@pytest.mark.slow
def test_generate_py_runs_and_fails_in_one_line(tokenizer, tmp_path: Path) -> None:
    ckpt = save_ckpt(tmp_path / "m.ckpt", tokenizer)
    cmd = [sys.executable, "scripts/generate.py", f"ckpt={ckpt}", "prompt=We"]
    proc = subprocess.run([*cmd, "max_new_tokens=3", "num_beams=2"], cwd=ROOT, env=ENV,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("We") and "tokens/s" in proc.stderr
    missing = tmp_path / "nowhere.ckpt"
    cmd = [sys.executable, "scripts/generate.py", f"ckpt={missing}", "prompt=a"]
    proc = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert str(missing) in proc.stderr and not (ROOT / "outputs" / ".hydra").exists()
