"""Checkpoint files: safe loading (``weights_only=True``), atomic writing, model + tokenizer.

A minillm checkpoint is a Lightning checkpoint whose ``hyper_parameters`` are plain dicts
(``model`` = ModelConfig as a dict), whose ``state_dict`` keys are ``model.<param>``, and which
carries the tokenizer as a JSON string under ``tokenizer``. It loads without Hydra or Lightning.

An exported model (``save_pretrained``, ``scripts/export.py``) is a folder of three plain
files: ``model.safetensors`` (weights; a tied LM head is stored once and re-tied on load),
``config.json`` (the ModelConfig) and ``tokenizer.json``. ``load_pretrained`` reads either.

Integrity: every tensor's crc32 is recorded when it is written (``write_atomic`` puts
``{path: crc32}`` under the checkpoint's ``CHECKSUMS`` key; ``save_pretrained`` puts
``{name: crc32}`` into the safetensors metadata) and checked when it is read, so a flipped
byte is a ``CheckpointError`` naming the file and the first bad tensor before any weight is
used. crc32 rather than sha256: it is there to catch disk and copy faults, not tampering, and
it is about twice as fast (``scripts/bench_checkpoint.py``). Files written before checksums
existed (no such key) still load, unchecked.
"""

from __future__ import annotations

import json
import math
import os
import pickle
import secrets
import shutil
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_model, save_model
from tokenizers import Tokenizer
from torch import nn

from minillm.integrity import (  # CheckpointError is re-exported: this module's API
    CHECKSUMS,
    CheckpointError,
    checksums,
    named_tensors,
    verify_checksums,
)
from minillm.models import build_model


def read_checkpoint(
    path: str | os.PathLike,
    map_location: str | torch.device = "cpu",
    *,
    verify: bool = True,
    mmap: bool = False,
) -> dict:
    """torch.load with ``weights_only=True`` (a pickle that would run code is refused), then
    every tensor checked against the checksums written with it (none in older checkpoints).

    ``verify=False, mmap=True`` reads the config and tokenizer without reading the weights
    (they are memory-mapped, unchecked): for looking at a checkpoint, not for using it.
    """
    path = Path(path)
    ckpt = _load(path, map_location, mmap)
    sums = ckpt.pop(CHECKSUMS, None) if isinstance(ckpt, dict) else None
    if sums is not None and verify:
        verify_checksums(dict(named_tensors(ckpt)), sums, f"checkpoint {path}", _USE_ANOTHER)
    return ckpt


def _load(path: Path, map_location: str | torch.device, mmap: bool) -> Any:
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if not zipfile.is_zipfile(path):  # torch.save writes a zip; a cut one has no directory
        raise CheckpointError(
            f"checkpoint {path} is truncated or corrupt (not a complete "
            f"torch.save archive); {_USE_ANOTHER}"
        )
    try:
        return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as err:
        raise CheckpointError(
            f"refusing to load {path}: it is not a plain-tensor checkpoint (weights_only=True "
            f"rejected it: {_refusal_reason(err)}). Only load checkpoints you trust."
        ) from err
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile) as err:
        reason = " ".join(f"{err.__class__.__name__}: {err}".split())
        raise CheckpointError(
            f"checkpoint {path} is truncated or corrupt ({reason}); {_USE_ANOTHER}"
        ) from err


_USE_ANOTHER = "use another checkpoint, e.g. best.ckpt or an earlier one"


def _refusal_reason(err: pickle.UnpicklingError) -> str:
    """torch's specific line (e.g. the refused global) from its long weights_only message."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    boilerplate = ("Weights only load failed", "Please file an issue", "Check the documentation")
    specific = [line for line in lines if not line.startswith(boilerplate)]
    return (specific or lines or ["unknown reason"])[0]


def write_atomic(obj: Any, path: str | os.PathLike) -> None:
    """torch.save (checksums added) to a temp file in the same folder, fsync, rename.

    A kill at any moment leaves either the old file or the new one, never half of one; a
    full disk or a read-only folder raises ``OSError`` with ``path`` unchanged.
    """
    if isinstance(obj, dict):
        body = {k: v for k, v in obj.items() if k != CHECKSUMS}
        obj = {**body, CHECKSUMS: checksums(body)}
    _write_files(Path(path).parent, {Path(path).name: lambda tmp: _torch_save(obj, tmp)})


def _torch_save(obj: Any, tmp: Path) -> None:
    with open(tmp, "xb") as f:
        torch.save(obj, f)


def _write_files(folder: Path, writers: dict[str, Callable[[Path], Any]]) -> None:
    """Each ``writers[name](temp path)``, fsync'd; then every temp renamed over its name.

    A failure before the renames leaves every old file as it was and no temp file behind.
    """
    temps: dict[str, Path] = {}
    try:
        folder.mkdir(parents=True, exist_ok=True)
        for name, write in writers.items():
            temps[name] = folder / f".{name}.{secrets.token_hex(4)}.tmp"
            write(temps[name])
            with open(temps[name], "rb") as f:
                os.fsync(f.fileno())
        for name, tmp in temps.items():
            os.replace(tmp, folder / name)
        fd = os.open(folder, os.O_RDONLY)  # make the renames durable too
        os.fsync(fd)
        os.close(fd)
    except BaseException as err:
        for tmp in temps.values():
            tmp.unlink(missing_ok=True)
        if not isinstance(err, OSError | RuntimeError | SafetensorError):  # torch: RuntimeError
            raise
        reason = " ".join(str(err).split()) or err.__class__.__name__
        free = shutil.disk_usage(folder).free / 2**20 if folder.is_dir() else math.nan
        raise OSError(
            f"could not write {', '.join(writers)} in {folder} ({reason}; {free:.1f} MiB free "
            "there); the files there are unchanged: free space on that disk or choose "
            "another, writable folder"
        ) from err


def model_state_dict(checkpoint: dict) -> dict[str, torch.Tensor]:
    """The model's own keys from a LightningModule state dict (``model.`` prefix stripped)."""
    return {
        k.removeprefix("model."): v
        for k, v in checkpoint["state_dict"].items()
        if k.startswith("model.")
    }


def load_checkpoint(
    path: str | os.PathLike, map_location: str | torch.device = "cpu"
) -> tuple[nn.Module, Tokenizer]:
    """Rebuild the model (eval mode) and its tokenizer from a checkpoint file."""
    ckpt = read_checkpoint(path, map_location)
    hparams = ckpt.get("hyper_parameters", {})
    if "model" not in hparams or "tokenizer" not in ckpt:
        raise CheckpointError(
            f"{path} is not a minillm checkpoint (no model config or tokenizer inside)"
        )
    model = build_model(hparams["model"])
    model.load_state_dict(model_state_dict(ckpt))
    return model.eval(), Tokenizer.from_str(ckpt["tokenizer"])


EXPORT_FILES = ("model.safetensors", "config.json", "tokenizer.json")


def save_pretrained(
    model: nn.Module, tokenizer: Tokenizer, out_dir: str | os.PathLike, overwrite: bool = False
) -> Path:
    """Write ``model.safetensors`` (with per-tensor crc32), ``config.json``, ``tokenizer.json``.

    ``out_dir`` must be new or empty unless ``overwrite`` (then those three files are
    replaced, anything else there is left alone). Each file is written under a temp name in
    ``out_dir`` and renamed into place only once all three are written.
    """
    out = Path(out_dir)
    _check_export_folder(out, overwrite)
    metadata = {"format": "pt", CHECKSUMS: json.dumps(checksums(model.state_dict()))}
    config = json.dumps(model.cfg.to_dict(), indent=2) + "\n"
    _write_files(
        out,
        {  # save_model stores tensors shared by several names (the tied LM head) once
            EXPORT_FILES[0]: lambda tmp: save_model(model, str(tmp), metadata=metadata),
            EXPORT_FILES[1]: lambda tmp: tmp.write_text(config),
            EXPORT_FILES[2]: lambda tmp: tokenizer.save(str(tmp)),
        },
    )
    return out


def write_export_folder(
    out_dir: str | os.PathLike, writers: dict[str, Callable[[Path], Any]], overwrite: bool = False
) -> Path:
    """Write an export folder as ``save_pretrained`` does, for other layouts (``minillm.hf``):
    ``writers[name](temp path)`` writes each file; ``out_dir`` new or empty unless
    ``overwrite``, and every file renamed into place only once all are written."""
    out = Path(out_dir)
    _check_export_folder(out, overwrite)
    _write_files(out, writers)
    return out


def _check_export_folder(folder: Path, overwrite: bool) -> None:
    if folder.exists() and not folder.is_dir():
        raise FileExistsError(f"export folder {folder} is a file; choose a folder path")
    entries = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
    if entries and not overwrite:
        shown = ", ".join(entries[:3]) + (", ..." if len(entries) > 3 else "")
        raise FileExistsError(
            f"export folder {folder} is not empty (it holds {shown}); choose a new or empty "
            "folder, or pass overwrite=True to replace the files in it"
        )
    check_writable(folder, "export folder")


def check_writable(folder: Path, what: str) -> None:
    """Refuse a folder this user cannot create or write into (root may write anywhere)."""
    existing = next((p for p in (folder, *folder.parents) if p.exists()), folder)
    if not os.access(existing, os.W_OK | os.X_OK):
        raise PermissionError(
            f"{what} {folder} cannot be written ({existing} is not writable by this user); "
            "choose a writable folder"
        )


def load_pretrained(
    path: str | os.PathLike, map_location: str | torch.device = "cpu"
) -> tuple[nn.Module, Tokenizer]:
    """(model in eval mode, tokenizer) from an exported folder or a ``.ckpt`` file.

    Needs neither Lightning nor Hydra: torch, safetensors and tokenizers only. The weights
    are checked against the crc32s in the safetensors metadata (exports written before
    checksums existed have none and load unchecked).
    """
    path = Path(path)
    if path.is_file():
        return load_checkpoint(path, map_location)
    if not path.is_dir():
        raise FileNotFoundError(f"no exported model or checkpoint at {path}")
    missing = [name for name in EXPORT_FILES if not (path / name).is_file()]
    if missing:
        raise FileNotFoundError(
            f"{path} is not an exported minillm model: {missing} missing "
            "(write one with: python scripts/export.py ckpt=<checkpoint> out=<folder>)"
        )
    model = build_model(json.loads((path / "config.json").read_text()))
    weights = path / EXPORT_FILES[0]
    try:
        _verify_export(weights)
        load_model(model, str(weights), strict=True)
    except (SafetensorError, RuntimeError, OSError) as err:
        reason = " ".join(str(err).split())
        raise CheckpointError(
            f"{weights} is truncated, corrupt or does not fit config.json: {reason}"
        ) from err
    tokenizer = Tokenizer.from_file(str(path / EXPORT_FILES[2]))
    return model.to(map_location).eval(), tokenizer


_REEXPORT = "export it again (python scripts/export.py ckpt=<checkpoint> out=<folder>)"


def _verify_export(weights: Path) -> None:
    with safe_open(str(weights), framework="pt") as f:
        raw = (f.metadata() or {}).get(CHECKSUMS)
        if raw is None:
            return  # exported before checksums existed
        try:
            sums = json.loads(raw)
        except json.JSONDecodeError as err:
            raise CheckpointError(f"{weights} has unreadable checksums; {_REEXPORT}") from err
        tensors = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118
    verify_checksums(tensors, sums, str(weights), _REEXPORT)
