"""The commands as a user runs them (scripts/*.py, a few real subprocesses): a bad value is one
line on stderr and exit status 2, with nothing written; --help lists the options. The rest
runs in-process through the same compose + validate path."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import ROOT

from minillm.checkpoint import EXPORT_FILES, load_pretrained, save_pretrained
from minillm.cli import attention_map, evaluate, export, report
from minillm.cli.app import check_command_line, compose
from minillm.cli.devices import available_devices, resolve_device
from minillm.data.tokenizer import build_tokenizer
from minillm.models import build_model

PROMPT = "To be, or not: [that] = 'it'"  # commas, colon, brackets, quotes: taken verbatim
ABSENT_GPU = "cuda" if not torch.cuda.is_available() else f"cuda:{torch.cuda.device_count()}"


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny untrained model with a character tokenizer, as an exported folder."""
    tokenizer = build_tokenizer([PROMPT], kind="char")
    cfg = {"vocab_size": tokenizer.get_vocab_size(), "dim": 32, "n_layers": 2, "n_heads": 4}
    model = build_model({**cfg, "max_len": 64, "attn": {"kind": "mha"}})
    return save_pretrained(model, tokenizer, tmp_path_factory.mktemp("m") / "exported")


def run(script: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(ROOT / "scripts" / f"{script}.py"), *args]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}  # OMP_NUM_THREADS, MINILLM_CACHE: conftest
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def assert_usage_error(proc: subprocess.CompletedProcess, cwd: Path, *words: str) -> None:
    """Exit 2, exactly one stderr line ``error: ...`` naming ``words``, nothing in ``cwd``."""
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1, proc.stderr
    assert all(w in proc.stderr for w in words), proc.stderr
    assert list(cwd.iterdir()) == []  # no outputs/, .hydra/, log file


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["stride=0"], ["stride=0", "positive integer"]),
        (["strid=3"], ["unknown option strid", "stride"]),
        ([f"device={ABSENT_GPU}"], [f"device='{ABSENT_GPU}' is not available", "cpu"]),
    ],
    ids=["range", "unknown-key", "absent-gpu"],
)
def test_evaluate_bad_values_exit_2_with_one_line(args, words, exported: Path, tmp_path):
    assert_usage_error(run("evaluate", f"ckpt={exported}", *args, cwd=tmp_path), tmp_path, *words)


def test_evaluate_missing_checkpoint_is_one_line_too(tmp_path: Path) -> None:
    """Found while running (after Hydra started), not while validating: same contract."""
    work = tmp_path / "cwd"
    work.mkdir()
    proc = run("evaluate", f"ckpt={tmp_path / 'nope.ckpt'}", cwd=work)
    assert_usage_error(proc, work, "checkpoint not found", "nope.ckpt")


def test_export_refuses_a_non_empty_folder_before_reading_the_checkpoint(exported, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    work = tmp_path / "cwd"
    work.mkdir()
    proc = run("export", f"ckpt={tmp_path / 'absent.ckpt'}", f"out={out}", cwd=work)
    assert_usage_error(proc, work, "is not empty", "notes.txt", "overwrite=true")
    assert [p.name for p in out.iterdir()] == ["notes.txt"]


def test_evaluate_help_lists_its_options(tmp_path: Path) -> None:
    proc = run("evaluate", "--help", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for option in ("minillm-evaluate", "metric: ppl", "stride: null", "num_beams: 5", "data="):
        assert option in proc.stdout
    assert list(tmp_path.iterdir()) == []


def test_attention_map_script_takes_the_prompt_verbatim(exported: Path, tmp_path: Path) -> None:
    out = tmp_path / "map.png"
    proc = run("attention_map", f"ckpt={exported}", f"prompt={PROMPT}", f"out={out}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert out.read_bytes()[:4] == b"\x89PNG"
    assert [p.name for p in tmp_path.iterdir()] == ["map.png"]
    assert f"wrote {out}" in proc.stdout


@pytest.mark.parametrize(
    ("module", "options"),
    [
        (evaluate, ["metric: ppl", "window: null", "on_malformed: fail"]),
        (export, ["ckpt: ???", "out: ???", "overwrite: false"]),
        (attention_map, ["prompt: null", "image: null", "index: null", "layer: 0", "labels: 64"]),
        (report, ["sweep: ???", "bench: null", "new_tokens: 16", "device: auto"]),
    ],
    ids=["evaluate", "export", "attention_map", "report"],
)
def test_help_of_every_command(module, options, monkeypatch, capsys) -> None:
    monkeypatch.setattr(sys, "argv", ["cmd", "--help"])
    with pytest.raises(SystemExit) as exc:
        module.main()
    out = capsys.readouterr().out
    name = "minillm-" + module.__name__.rpartition(".")[2].replace("_", "-")
    assert exc.value.code == 0 and out.startswith(f"{name} (python scripts/")
    assert all(option in out for option in options), out
    assert "attn:" not in out and "trainer:" not in out  # only this command's options


def usage_error(config: str, validate, argv: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as exc:
        check_command_line(config, validate, argv)
    err = capsys.readouterr().err
    assert exc.value.code == 2 and err.startswith("error: ") and err.count("\n") == 1, err
    return err


def test_export_checks_its_options(exported: Path, tmp_path: Path, capsys) -> None:
    assert "out is required" in usage_error("export", export.validate, ["ckpt=a"], capsys)
    err = usage_error("export", export.validate, ["ckpt=a", "out=b", "force=true"], capsys)
    assert "unknown option force" in err and "overwrite" in err
    err = usage_error("export", export.validate, ["ckpt=a", f"out={exported}"], capsys)
    assert "is not empty" in err and "overwrite=true" in err


def test_export_overwrite_replaces_an_export(exported: Path, tmp_path: Path) -> None:
    out = tmp_path / "again"
    argv = [f"ckpt={exported}", f"out={out}"]
    export.export(export.validate(compose("export", argv)))  # an export of an export
    (out / "notes.txt").write_text("not ours")
    export.export(export.validate(compose("export", [*argv, "overwrite=true"])))
    assert sorted(p.name for p in out.iterdir()) == sorted([*EXPORT_FILES, "notes.txt"])
    model, _ = load_pretrained(out)
    reference, _ = load_pretrained(exported)
    ids = torch.tensor([[1, 2, 3]])
    torch.testing.assert_close(model(ids), reference(ids), rtol=0, atol=0)


def test_attention_map_checks_its_options(exported: Path, capsys) -> None:
    validate = attention_map.validate
    assert "head=-1" in usage_error(
        "attention_map", validate, ["ckpt=m", "prompt=a", "head=-1"], capsys
    )
    assert "prompt is required" in usage_error("attention_map", validate, ["ckpt=m"], capsys)
    args = validate(compose("attention_map", [f"ckpt={exported}", "prompt=a", "layer=2"]))
    with pytest.raises(ValueError, match="layer=2: the model has 2 blocks"):
        attention_map.attention_map(args)


def test_report_checks_its_options(tmp_path: Path, capsys) -> None:
    validate = report.validate
    assert "no such sweep" in usage_error("report", validate, [f"sweep={tmp_path / 'x'}"], capsys)
    sweep = f"sweep={tmp_path}"
    assert "contexts=0" in usage_error("report", validate, [sweep, "contexts=[0,8]"], capsys)
    assert "new_tokens=0" in usage_error("report", validate, [sweep, "new_tokens=0"], capsys)
    assert "bench=b.json" in usage_error("report", validate, [sweep, "bench=b.json"], capsys)
    args = validate(compose("report", [sweep, "contexts=[8,4]"]))
    assert args.contexts == [8, 4] and args.device == "auto" and args.runs == []


def test_resolve_device_names_what_is_there() -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert available_devices()[0] == "cpu"
    with pytest.raises(ValueError, match=rf"device='{ABSENT_GPU}' is not available.*one of cpu"):
        resolve_device(ABSENT_GPU)
    with pytest.raises(ValueError, match="device='gpu': not a device name; choose auto or one of"):
        resolve_device("gpu")
