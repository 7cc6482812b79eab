"""Faults: every bad file, directory or signal ends in a one-line error that names the problem
and the fix, and leaves every file that existed before byte-identical."""

from __future__ import annotations

import csv
import hashlib
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from conftest import ROOT, compose, tiny_overrides

from minillm import load_checkpoint, load_pretrained, save_pretrained
from minillm.checkpoint import CheckpointError, read_checkpoint, write_atomic
from minillm.integrity import named_tensors
from minillm.training.run import train
from minillm.training.signals import StopOnSignal

MISSING_DATA = "data.files=[/nonexistent/never-read.txt]"  # read it and the error is another


def hashes(folder: Path) -> dict[str, str]:
    """relative path -> sha256 of every file under ``folder``."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def one_line(err: pytest.ExceptionInfo) -> str:
    message = str(err.value)
    assert "\n" not in message, message
    return message


@pytest.fixture(scope="module")
def trained(corpus_file: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny run directory (mha, 2 steps): checkpoints/{best,last}.ckpt, logs, tokenizer."""
    run_dir = tmp_path_factory.mktemp("trained")
    train(compose(tiny_overrides(corpus_file, "trainer.max_steps=2")), run_dir)
    return run_dir


@pytest.fixture()
def run_copy(trained: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(trained, tmp_path / "run"))


def flip_in_largest_storage(ckpt: Path) -> None:
    """Flip one byte inside the largest tensor storage of a torch.save zip, in place.

    Entries are stored uncompressed, so the zip's directory stays valid and torch.load
    reads the changed bytes without complaint (it does not check the zip's own CRCs).
    """
    with zipfile.ZipFile(ckpt) as z:
        info = max((i for i in z.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    raw = bytearray(ckpt.read_bytes())
    name_len, extra_len = struct.unpack(
        "<HH", raw[info.header_offset + 26 : info.header_offset + 30]
    )
    raw[info.header_offset + 30 + name_len + extra_len + info.file_size // 2] ^= 0xFF
    ckpt.write_bytes(raw)


def first_changed_tensor(good: Path, bad: Path) -> str:
    before = dict(named_tensors(read_checkpoint(good, verify=False)))
    after = dict(named_tensors(read_checkpoint(bad, verify=False)))
    return next(name for name, t in before.items() if not torch.equal(t, after[name]))


def test_a_flipped_byte_in_a_checkpoint_names_the_file_and_the_tensor(
    trained: Path, run_copy: Path, corpus_file: Path
) -> None:
    ckpt = run_copy / "checkpoints" / "last.ckpt"
    flip_in_largest_storage(ckpt)
    assert zipfile.ZipFile(ckpt).namelist()  # still a readable zip
    bad_tensor = first_changed_tensor(trained / "checkpoints" / "last.ckpt", ckpt)
    before = hashes(run_copy)
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(ckpt)
    message = one_line(err)
    assert f"checkpoint {ckpt} is corrupt: tensor {bad_tensor!r}" in message
    assert "use another checkpoint" in message
    with pytest.raises(CheckpointError, match=rf"{ckpt} is corrupt: tensor {bad_tensor!r}"):
        train(compose(tiny_overrides(corpus_file, "ckpt_path=last")), run_copy)  # no step taken
    assert hashes(run_copy) == before


def flip_in_safetensors(path: Path, name: str) -> None:
    """Flip one byte in the middle of tensor ``name``'s data (the header stays valid)."""
    raw = bytearray(path.read_bytes())
    n = int.from_bytes(raw[:8], "little")
    begin, end = json.loads(raw[8 : 8 + n])[name]["data_offsets"]
    raw[8 + n + (begin + end) // 2] ^= 0xFF
    path.write_bytes(raw)


def test_a_flipped_byte_in_an_export_names_the_file_and_the_tensor(
    trained: Path, tmp_path: Path, corpus_file: Path
) -> None:
    folder = save_pretrained(
        *load_checkpoint(trained / "checkpoints" / "last.ckpt"), tmp_path / "x"
    )
    weights = folder / "model.safetensors"
    flip_in_safetensors(weights, "blocks.1.attn.q_proj.weight")
    before = hashes(tmp_path)
    with pytest.raises(CheckpointError) as err:
        load_pretrained(folder)
    message = one_line(err)
    assert f"{weights} is corrupt: tensor 'blocks.1.attn.q_proj.weight'" in message
    assert "export it again" in message
    with pytest.raises(CheckpointError, match="blocks.1.attn.q_proj.weight"):  # before any data
        train(compose(tiny_overrides(corpus_file, f"init_from={folder}", MISSING_DATA)), tmp_path)
    assert hashes(tmp_path) == before


def test_truncated_files_are_reported_by_name(run_copy: Path, tmp_path: Path) -> None:
    ckpt = run_copy / "checkpoints" / "last.ckpt"
    ckpt.write_bytes(ckpt.read_bytes()[:-200])  # the zip directory is at the end
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(ckpt)
    assert f"checkpoint {ckpt} is truncated or corrupt" in one_line(err)
    folder = save_pretrained(
        *load_checkpoint(run_copy / "checkpoints" / "best.ckpt"), tmp_path / "export"
    )
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(CheckpointError) as err:
        load_pretrained(folder)
    assert f"{weights} is truncated, corrupt" in one_line(err)


@pytest.mark.parametrize(
    ("override", "named"),
    [
        ("attn=linear", "attn.kind: 'mha' (checkpoint) vs 'linear' (this run)"),
        ("model.max_len=64", "max_len: 32 (checkpoint) vs 64 (this run)"),
        ("optim.lr=0.5", "optim.lr: 0.001 (checkpoint) vs 0.5 (this run)"),
    ],
)
def test_resuming_with_another_config_is_refused_before_any_data_is_read(
    run_copy: Path, corpus_file: Path, override: str, named: str
) -> None:
    before = hashes(run_copy)
    overrides = tiny_overrides(corpus_file, "ckpt_path=last", override, MISSING_DATA)
    with pytest.raises(ValueError) as err:
        train(compose(overrides), run_copy)
    message = one_line(err)
    assert message.startswith(f"ckpt_path={run_copy / 'checkpoints' / 'last.ckpt'}: ")
    assert named in message and "init_from=" in message
    assert hashes(run_copy) == before


def test_a_run_directory_with_checkpoints_is_never_silently_replaced(
    run_copy: Path, corpus_file: Path
) -> None:
    before = hashes(run_copy)
    with pytest.raises(FileExistsError) as err:
        train(compose(tiny_overrides(corpus_file, MISSING_DATA)), run_copy)
    message = one_line(err)
    assert f"run directory {run_copy} already holds checkpoints (best.ckpt, last.ckpt)" in message
    assert "ckpt_path=last" in message and "hydra.run.dir" in message
    assert "overwrite=true" in message
    assert hashes(run_copy) == before
    handlers = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    summary = train(compose(tiny_overrides(corpus_file, "overwrite=true")), run_copy)
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == handlers
    assert summary["global_step"] == 4  # a new run, not a resumed one
    rows = csv.DictReader((run_copy / "logs" / "metrics.csv").open())
    assert sorted(int(r["step"]) for r in rows if r["train/loss"]) == [0, 1, 2, 3]  # no old rows


def test_a_non_empty_export_folder_is_never_silently_replaced(trained: Path, tmp_path: Path):
    model, tokenizer = load_checkpoint(trained / "checkpoints" / "last.ckpt")
    (tmp_path / "notes.txt").write_text("mine")
    before = hashes(tmp_path)
    with pytest.raises(FileExistsError) as err:
        save_pretrained(model, tokenizer, tmp_path)
    assert f"export folder {tmp_path} is not empty (it holds notes.txt)" in one_line(err)
    assert "overwrite=True" in str(err.value)
    assert hashes(tmp_path) == before
    save_pretrained(model, tokenizer, tmp_path, overwrite=True)
    assert (tmp_path / "notes.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "config.json",
        "model.safetensors",
        "notes.txt",
        "tokenizer.json",
    ]  # no temp file left behind


@pytest.mark.parametrize(("signum", "status"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_saves_last_ckpt_and_exits_128_plus_signal(
    corpus_file: Path, tmp_path: Path, signum: int, status: int
) -> None:
    overrides = tiny_overrides(
        corpus_file, "trainer.max_steps=2000", "trainer.val_check_interval=500"
    )
    cmd = [sys.executable, "train.py", *overrides, f"hydra.run.dir={tmp_path}"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    last = tmp_path / "checkpoints" / "last.ckpt"
    deadline = time.monotonic() + 120
    while not last.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    os.kill(proc.pid, signum)
    out = proc.communicate(timeout=120)[0].decode()
    assert proc.returncode == status, out[-3000:]
    name = signal.Signals(signum).name
    assert f"stopped by {name} at step" in out and "ckpt_path=last" in out, out[-3000:]
    step = read_checkpoint(last)["global_step"]
    assert 2 <= step < 2000 and f"stopped by {name} at step {step}:" in out, out[-3000:]
    load_checkpoint(last)  # complete and verified


def test_the_first_signal_is_recorded_a_second_one_kills_and_handlers_come_back() -> None:
    before = [signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)]
    stopper = StopOnSignal()
    with stopper.handling():
        stopper.on_train_start(None, None)  # what Lightning calls once training starts
        os.kill(os.getpid(), signal.SIGINT)  # recorded, not a KeyboardInterrupt
        assert stopper.received == signal.SIGINT
        assert signal.getsignal(signal.SIGINT) is signal.SIG_DFL  # the next one kills
        assert signal.getsignal(signal.SIGTERM) == stopper._record
    assert [signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)] == before


@pytest.fixture()
def readonly_dir(tmp_path: Path) -> Iterator[Path]:
    """A folder nobody can write: chmod for a user, a read-only tmpfs for root."""
    folder = tmp_path / "ro"
    folder.mkdir()
    if os.geteuid() != 0:
        folder.chmod(0o555)
        yield folder
        folder.chmod(0o755)
        return
    if subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(folder)]
    ).returncode:
        pytest.skip("running as root, which ignores permissions, and cannot mount a tmpfs")
    yield folder
    subprocess.run(["umount", str(folder)], check=True)


def test_a_read_only_output_directory_is_refused_before_any_work(
    readonly_dir: Path, trained: Path, corpus_file: Path
) -> None:
    with pytest.raises(PermissionError) as err:
        train(compose(tiny_overrides(corpus_file, MISSING_DATA)), readonly_dir / "run")
    assert f"run directory {readonly_dir / 'run'} cannot be written" in one_line(err)
    model, tokenizer = load_checkpoint(trained / "checkpoints" / "last.ckpt")
    with pytest.raises(PermissionError, match=f"export folder {readonly_dir} cannot be written"):
        save_pretrained(model, tokenizer, readonly_dir)
    assert not any(readonly_dir.iterdir())


@pytest.fixture()
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 1 MiB tmpfs (needs root and mount)."""
    folder = tmp_path / "disk"
    folder.mkdir()
    if os.geteuid() != 0:
        pytest.skip("needs root to mount a small tmpfs")
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(folder)]).returncode:
        pytest.skip("cannot mount a tmpfs here")
    yield folder
    subprocess.run(["umount", str(folder)], check=True)


def fill(folder: Path) -> None:
    with open(folder / "filler", "wb", buffering=0) as f:
        try:
            while True:
                f.write(b"\0" * 4096)
                f.flush()
        except OSError:
            pass


def test_a_full_disk_leaves_the_previous_files_intact(small_disk: Path, trained: Path):
    model, tokenizer = load_checkpoint(trained / "checkpoints" / "last.ckpt")
    save_pretrained(model, tokenizer, small_disk / "export")
    ckpt = {"state_dict": {f"model.{k}": v for k, v in model.state_dict().items()}}
    write_atomic(ckpt, small_disk / "last.ckpt")
    fill(small_disk)
    before = hashes(small_disk)
    with torch.no_grad():
        model.tok_emb.weight.add_(1.0)
    with pytest.raises(OSError) as err:
        save_pretrained(model, tokenizer, small_disk / "export", overwrite=True)
    message = one_line(err)
    assert (
        f"could not write model.safetensors, config.json, tokenizer.json in {small_disk}" in message
    )
    assert "the files there are unchanged" in message and "MiB free" in message
    ckpt = {"state_dict": {f"model.{k}": v for k, v in model.state_dict().items()}}
    with pytest.raises(OSError, match=rf"could not write last.ckpt in {small_disk} "):
        write_atomic(ckpt, small_disk / "last.ckpt")
    assert hashes(small_disk) == before  # old files as they were, no temp file left
    (small_disk / "filler").unlink()
    load_pretrained(small_disk / "export")


def test_checkpoints_and_exports_without_checksums_still_load(trained: Path, tmp_path: Path):
    ckpt = read_checkpoint(trained / "checkpoints" / "last.ckpt")  # checksums popped
    torch.save(ckpt, tmp_path / "old.ckpt")  # as written before checksums existed
    assert "minillm_crc32" not in torch.load(tmp_path / "old.ckpt", weights_only=True)
    model, tokenizer = load_checkpoint(tmp_path / "old.ckpt")
    folder = save_pretrained(model, tokenizer, tmp_path / "export")
    from safetensors.torch import save_model

    save_model(model, str(folder / "model.safetensors"), metadata={"format": "pt"})
    loaded, _ = load_pretrained(folder)
    for name, value in model.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[name], value, rtol=0, atol=0)
