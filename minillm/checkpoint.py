"""Checkpoint files: safe loading (``weights_only=True``), atomic writing, model + tokenizer.

A minillm checkpoint is a Lightning checkpoint whose ``hyper_parameters`` are plain dicts
(``model`` = ModelConfig as a dict), whose ``state_dict`` keys are ``model.<param>``, and which
carries the tokenizer as a JSON string under ``tokenizer``. It loads without Hydra or Lightning.
"""

from __future__ import annotations

import os
import pickle
import tempfile
from pathlib import Path
from typing import Any

import torch
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
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        raise CheckpointError(
            f"refusing to load {path}: it is not a plain-tensor checkpoint (weights_only=True "
            f"rejected it: {str(err).splitlines()[0]}). Only load checkpoints you trust."
        ) from err
    except (RuntimeError, EOFError, OSError) as err:
        raise CheckpointError(
            f"checkpoint {path} is truncated or corrupt ({err.__class__.__name__}: {err}); "
            "use another checkpoint, e.g. best.ckpt or an earlier one"
        ) from err


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
