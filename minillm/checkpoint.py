"""Checkpoint files: safe loading (``weights_only=True``), atomic writing, model + tokenizer.

A minillm checkpoint is a Lightning checkpoint whose ``hyper_parameters`` are plain dicts
(``model`` = ModelConfig as a dict), whose ``state_dict`` keys are ``model.<param>``, and which
carries the tokenizer as a JSON string under ``tokenizer``. It loads without Hydra or Lightning.

An exported model (``save_pretrained``, ``scripts/export.py``) is a folder of three plain
files: ``model.safetensors`` (weights; a tied LM head is stored once and re-tied on load),
``config.json`` (the ModelConfig) and ``tokenizer.json``. ``load_pretrained`` reads either.
"""

from __future__ import annotations

import json
import os
import pickle
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_model, save_model
from tokenizers import Tokenizer
from torch import nn

from minillm.models import build_model


class CheckpointError(ValueError):
    """A checkpoint file that is truncated, corrupt, unsafe or not a minillm checkpoint."""


def read_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict:
    """torch.load with ``weights_only=True``: a pickle that would run code is refused."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if not zipfile.is_zipfile(path):  # torch.save writes a zip; a cut one has no directory
        raise CheckpointError(
            f"checkpoint {path} is truncated or corrupt (not a complete "
            f"torch.save archive); {_USE_ANOTHER}"
        )
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        raise CheckpointError(
            f"refusing to load {path}: it is not a plain-tensor checkpoint (weights_only=True "
            f"rejected it: {_refusal_reason(err)}). Only load checkpoints you trust."
        ) from err
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile) as err:
        raise CheckpointError(
            f"checkpoint {path} is truncated or corrupt ({err.__class__.__name__}: {err}); "
            f"{_USE_ANOTHER}"
        ) from err


_USE_ANOTHER = "use another checkpoint, e.g. best.ckpt or an earlier one"


def _refusal_reason(err: pickle.UnpicklingError) -> str:
    """torch's specific line (e.g. the refused global) from its long weights_only message."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    boilerplate = ("Weights only load failed", "Please file an issue", "Check the documentation")
    specific = [line for line in lines if not line.startswith(boilerplate)]
    return (specific or lines or ["unknown reason"])[0]


def write_atomic(obj: Any, path: str | os.PathLike) -> None:
    """torch.save to a temp file in the same folder, fsync, then rename over ``path``.

    A kill at any moment leaves either the old file or the new one, never half of one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


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


def save_pretrained(model: nn.Module, tokenizer: Tokenizer, out_dir: str | os.PathLike) -> Path:
    """Write ``model.safetensors``, ``config.json`` and ``tokenizer.json`` into ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # save_model stores tensors shared by several names (the tied LM head) once
    save_model(model, str(out / EXPORT_FILES[0]), metadata={"format": "pt"})
    (out / EXPORT_FILES[1]).write_text(json.dumps(model.cfg.to_dict(), indent=2) + "\n")
    tokenizer.save(str(out / EXPORT_FILES[2]))
    return out


def load_pretrained(
    path: str | os.PathLike, map_location: str | torch.device = "cpu"
) -> tuple[nn.Module, Tokenizer]:
    """(model in eval mode, tokenizer) from an exported folder or a ``.ckpt`` file.

    Needs neither Lightning nor Hydra: torch, safetensors and tokenizers only.
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
        load_model(model, str(weights), strict=True)
    except (SafetensorError, RuntimeError, OSError) as err:
        raise CheckpointError(
            f"{weights} is truncated, corrupt or does not fit config.json: {err}"
        ) from err
    tokenizer = Tokenizer.from_file(str(path / EXPORT_FILES[2]))
    return model.to(map_location).eval(), tokenizer
