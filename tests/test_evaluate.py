"""Perplexity and bits per byte, for every attention kind; scripts/evaluate.py as a user runs it."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
from conftest import ROOT, compose, tiny_overrides
from tokenizers import Tokenizer, models, pre_tokenizers

from minillm.attention import ATTENTION
from minillm.data import SPECIAL_TOKENS
from minillm.evaluation import perplexity, spans
from minillm.models import build_model
from minillm.training.run import train

KINDS = sorted(ATTENTION)
DOCS = ["the quick brown fox jumps over the lazy dog", "hello world", "résumé"]


@pytest.fixture(scope="module")
def char_tokenizer() -> Tokenizer:
    chars = sorted(set("".join(DOCS)) | set("abcdefghijklmnopqrstuvwxyz "))
    vocab = {tok: i for i, tok in enumerate([*SPECIAL_TOKENS, *chars])}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    return tokenizer


def tiny(kind: str, vocab_size: int, max_len: int = 64) -> torch.nn.Module:
    torch.manual_seed(0)
    attn = {"kind": kind, **({"window": 8} if kind == "local" else {})}
    cfg = {"vocab_size": vocab_size, "dim": 32, "n_layers": 2, "n_heads": 4, "max_len": max_len}
    return build_model({**cfg, "attn": attn}).eval()


@pytest.mark.parametrize("mode", ["window", "recurrent"])
@pytest.mark.parametrize("kind", KINDS)
def test_uniform_logits_give_the_vocabulary_size(kind: str, mode: str, char_tokenizer):
    vocab = char_tokenizer.get_vocab_size()
    model = tiny(kind, vocab)
    with torch.no_grad():
        model.norm.weight.zero_()  # final norm output 0 -> every logit 0 -> uniform
    result = perplexity(model, char_tokenizer, DOCS, mode=mode, window=16, stride=5)
    assert result.ppl == pytest.approx(vocab, rel=1e-5)
    # every character one token, plus the closing <eos>; "é" is two UTF-8 bytes
    assert result.tokens == sum(len(d) + 1 for d in DOCS)
    assert result.bytes == sum(len(d.encode()) for d in DOCS) == result.tokens - 3 + 2
    bits = result.tokens * math.log2(vocab) / result.bytes
    assert result.bits_per_byte == pytest.approx(bits, rel=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_strided_equals_unstrided_when_the_document_fits_one_window(kind: str, char_tokenizer):
    model = tiny(kind, char_tokenizer.get_vocab_size())
    full = perplexity(model, char_tokenizer, DOCS, stride=64)  # one window a document
    for stride in (1, 7):
        strided = perplexity(model, char_tokenizer, DOCS, stride=stride)
        assert strided.nll == pytest.approx(full.nll, rel=1e-5)
    recurrent = perplexity(model, char_tokenizer, DOCS, mode="recurrent", stride=7)
    assert recurrent.nll == pytest.approx(full.nll, rel=1e-5)
    assert recurrent.tokens == strided.tokens == full.tokens


def test_spans_score_every_token_exactly_once_with_the_most_context_allowed() -> None:
    for n, window, stride in [(1, 4, 2), (10, 4, 1), (10, 4, 3), (37, 8, 8), (37, 8, 5)]:
        scored = []
        for start, end, count in spans(n, window, stride):
            assert end - start <= window and count <= stride or start == 0
            scored += range(end - count, end)  # input positions whose next token is scored
            for pos in range(end - count, end):
                assert pos - start >= min(pos, window - stride)  # context before the token
        assert scored == list(range(n))


def test_local_kind_windows_equal_one_recurrent_pass_on_a_long_document(char_tokenizer):
    """A local kind sees 8 tokens; a 32-token window striding 8 gives each token all of them,
    so the sliding windows and the rolling-cache pass agree on a 300-character document."""
    model = tiny("local", char_tokenizer.get_vocab_size(), max_len=32)
    doc = [" ".join(DOCS) * 5]
    windows = perplexity(model, char_tokenizer, doc, window=32, stride=8)
    recurrent = perplexity(model, char_tokenizer, doc, mode="recurrent", stride=13)
    assert windows.tokens > 200
    assert recurrent.nll == pytest.approx(windows.nll, rel=1e-5)


@pytest.fixture(scope="module")
def trained_ckpt(corpus_file: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir = tmp_path_factory.mktemp("run")
    return Path(
        train(compose(tiny_overrides(corpus_file, "trainer.max_steps=2")), run_dir)["best_ckpt"]
    )


def load_cli() -> types.ModuleType:
    spec = importlib.util.spec_from_file_location("evaluate_cli", ROOT / "scripts/evaluate.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_evaluate_script_on_user_files_prints_and_writes_json(trained_ckpt: Path, corpus_file):
    cmd = [sys.executable, "scripts/evaluate.py", "metric=ppl", f"ckpt={trained_ckpt}"]
    cmd += ["data=text", f"data.files=[{corpus_file}]", "data.max_docs=20", "stride=8"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "perplexity" in proc.stdout and "bits per byte" in proc.stdout
    out = json.loads(trained_ckpt.with_name("best.ppl.json").read_text())
    assert out["split"] == "all" and out["stride"] == 8 and out["window"] == 32
    docs = [d.strip() for d in corpus_file.read_text().split("\n\n") if d.strip()][:20]
    assert out["documents"] == 20 and out["bytes"] == sum(len(d.encode()) for d in docs)
    assert out["ppl"] == pytest.approx(math.exp(out["nll"] / out["tokens"]))
    assert out["bits_per_byte"] == pytest.approx(out["nll"] / math.log(2) / out["bytes"])


def test_evaluate_defaults_to_the_checkpoints_validation_split(trained_ckpt: Path, tmp_path):
    out = tmp_path / "ppl.json"
    summary = load_cli().main([f"ckpt={trained_ckpt}", f"out={out}", "mode=recurrent"])
    assert summary["split"] == "validation" and summary["documents"] >= 1
    assert json.loads(out.read_text())["ppl"] == pytest.approx(summary["ppl"])


def test_evaluate_rejects_unknown_options_listing_the_valid_ones(trained_ckpt: Path) -> None:
    cli = load_cli()
    with pytest.raises(SystemExit, match=r"unknown option\(s\) \['strid'\].*'stride'"):
        cli.main([f"ckpt={trained_ckpt}", "strid=3"])
    with pytest.raises(SystemExit, match="data.files"):
        cli.main([f"ckpt={trained_ckpt}", "data=text"])
    with pytest.raises(SystemExit, match="unknown data=nope"):
        cli.main([f"ckpt={trained_ckpt}", "data=nope"])


def test_metric_bleu_hands_the_options_to_run_bleu_as_a_nested_dict(monkeypatch, tmp_path):
    seen = {}
    fake = types.ModuleType("minillm.evaluation.bleu")
    fake.run_bleu = lambda opts: seen.update(opts) or {"bleu": 42.0}
    monkeypatch.setitem(sys.modules, "minillm.evaluation.bleu", fake)
    ckpt = tmp_path / "m.ckpt"
    summary = load_cli().main(
        ["metric=bleu", f"ckpt={ckpt}", "data.test_file=t.jsonl", "num_beams=2"]
    )
    assert summary == {"bleu": 42.0}
    assert seen == {
        "metric": "bleu",
        "ckpt": str(ckpt),
        "data": {"test_file": "t.jsonl"},
        "num_beams": 2,
    }
    assert json.loads((tmp_path / "m.bleu.json").read_text()) == {"bleu": 42.0}
