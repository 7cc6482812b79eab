"""Start a run from another model's weights and tokenizer (``init_from``): fine-tuning.

``init_from`` names a ``.ckpt`` file, a run directory (its best.ckpt, else last.ckpt) or an
exported folder (``scripts/export.py``). The tokenizer comes from there and is never
retrained; the optimizer, schedule and step start fresh in a new run directory.

The run's model config must describe the same architecture as the checkpoint's, except for
training-time settings (``TRAINING_ONLY``): otherwise the error names both configs and the
differences. ``init_from_strict=false`` builds the run's config instead and copies every
tensor whose name and shape match, listing the rest.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer
from torch import Tensor, nn

from minillm.attention import attention_config
from minillm.checkpoint import load_pretrained
from minillm.models import ModelConfig

# Keys (in the model or any attention config) that may differ between the checkpoint and
# the run: they change how training behaves, not which weights exist or what they mean.
TRAINING_ONLY = ("dropout", "max_len", "init_std")
ATTN_KEYS = ("attn", "encoder_attn", "cross_attn")


@dataclass
class InitialWeights:
    """What a run takes from ``init_from``: its file, model config, weights and tokenizer."""

    path: Path
    model_cfg: ModelConfig
    state_dict: dict[str, Tensor]
    tokenizer: Tokenizer


def resolve_init_path(init_from: str) -> Path:
    """A file as is; an exported folder as is; a run directory -> best.ckpt, else last.ckpt."""
    path = Path(init_from).expanduser()
    if path.is_dir() and not (path / "model.safetensors").is_file():
        found = [path / "checkpoints" / n for n in ("best.ckpt", "last.ckpt")]
        found = [p for p in found if p.is_file()]
        if not found:
            raise FileNotFoundError(
                f"init_from={init_from}: no checkpoints/best.ckpt or last.ckpt in that "
                "directory, and it is not an exported model folder"
            )
        path = found[0]
    if not path.exists():
        raise FileNotFoundError(
            f"init_from={init_from}: no such file or directory; pass init_from=<a .ckpt "
            "file, a run directory or an exported folder>"
        )
    return path


def read_initial_weights(init_from: str) -> InitialWeights:
    path = resolve_init_path(init_from)
    model, tokenizer = load_pretrained(path)
    return InitialWeights(path, model.cfg, model.state_dict(), tokenizer)


def architecture(cfg: ModelConfig) -> dict[str, Any]:
    """The config as a flat dict, attention configs resolved (preset and defaults filled)."""
    flat = {k: v for k, v in cfg.to_dict().items() if k not in ATTN_KEYS}
    for key in ATTN_KEYS:
        value = getattr(cfg, key)  # a registry key or {"kind": key, **knobs}
        _, resolved = attention_config(value)
        flat[f"{key}.kind"] = value if isinstance(value, str) else value["kind"]
        flat |= {f"{key}.{k}": v for k, v in dataclasses.asdict(resolved).items()}
    return {k: v for k, v in flat.items() if k.rsplit(".", 1)[-1] not in TRAINING_ONLY}


def check_architecture(init: InitialWeights, run_cfg: ModelConfig) -> None:
    """Raise naming both configs when the run's architecture is not the checkpoint's."""
    theirs, ours = architecture(init.model_cfg), architecture(run_cfg)
    diff = [k for k in sorted(theirs.keys() | ours.keys()) if theirs.get(k) != ours.get(k)]
    diff = [k for k in diff if not _knob_of_changed_kind(k, diff)]
    if not diff:
        return
    lines = "\n".join(
        f"  {k}: {theirs.get(k)!r} (checkpoint) vs {ours.get(k)!r} (this run)" for k in diff
    )
    overrides = _suggest(diff, theirs)
    raise ValueError(
        f"init_from={init.path}: the checkpoint's architecture differs from this run's config:\n"
        f"{lines}\ncheckpoint: {init.model_cfg.to_dict()}\nthis run:   {run_cfg.to_dict()}\n"
        f"Match the checkpoint (e.g. {overrides}) or pass init_from_strict=false to load "
        "only the tensors whose names and shapes match."
    )


def _knob_of_changed_kind(key: str, diff: list[str]) -> bool:
    """``attn.window`` when ``attn.kind`` differs too: another kind brings its own knobs."""
    group, _, knob = key.rpartition(".")
    return bool(group) and knob != "kind" and f"{group}.kind" in diff


def _suggest(diff: list[str], theirs: dict[str, Any]) -> str:
    """Overrides that make this run's config the checkpoint's (a kind change sets the kind)."""
    out = []
    for key in diff:
        group = key.rpartition(".")[0]
        value = theirs.get(key)
        value = (
            "null" if value is None else str(value).lower() if isinstance(value, bool) else value
        )
        if key == "attn.kind":
            out.append(f"attn={value}")
        elif group == "attn":
            out.append(f"{key}={value}")
        else:  # model keys, encoder_attn/cross_attn included
            out.append(f"model.{key.removesuffix('.kind')}={value}")
    return " ".join(out)


def load_initial_weights(model: nn.Module, init: InitialWeights, strict: bool) -> list[str]:
    """Copy the checkpoint's tensors into ``model``; returns the lines of a loading report.

    Strict: every tensor must match (``check_architecture`` has run). Non-strict: tensors
    whose name and shape match are copied; the others keep their fresh initialisation.
    """
    if strict:
        model.load_state_dict(init.state_dict, strict=True)
        return [f"init_from: loaded all {len(init.state_dict)} tensors from {init.path}"]
    own = model.state_dict()
    matched = {k: v for k, v in init.state_dict.items() if k in own and own[k].shape == v.shape}
    if not matched:
        raise ValueError(
            f"init_from={init.path}: no tensor matches this run's model by name and shape"
        )
    model.load_state_dict(matched, strict=False)
    report = [f"init_from: loaded {len(matched)} of {len(own)} tensors from {init.path}"]
    for name, value in own.items():
        if name not in matched:
            theirs = init.state_dict.get(name)
            where = (
                "not in the checkpoint" if theirs is None else f"checkpoint {tuple(theirs.shape)}"
            )
            report.append(f"  kept fresh: {name} {tuple(value.shape)} ({where})")
    report += [f"  unused from checkpoint: {k}" for k in init.state_dict if k not in own]
    return report
