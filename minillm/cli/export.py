"""``python scripts/export.py`` / ``minillm-export``: a checkpoint (or an exported folder) as
plain files that load without Lightning or Hydra.

    minillm-export ckpt=outputs/<run>/checkpoints/best.ckpt out=exported/ [overwrite=true]

writes ``model.safetensors`` (weights; the tied LM head stored once), ``config.json`` (the
model config) and ``tokenizer.json`` (``minillm.checkpoint.save_pretrained``). A non-empty
``out`` is refused before the checkpoint is read unless ``overwrite=true``. Load it with::

    import minillm
    model, tokenizer = minillm.load_pretrained("exported/")
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from minillm.checkpoint import EXPORT_FILES, load_pretrained, save_pretrained
from minillm.cli.app import hydra_app


@dataclass
class ExportConfig:
    """conf/export.yaml."""

    ckpt: str = MISSING  # a .ckpt file or an exported folder
    out: str = MISSING  # a new or empty folder
    overwrite: bool = False  # replace the three files in a non-empty ``out``


def validate(cfg: dict[str, Any]) -> ExportConfig:
    """The config, and ``out`` new or empty unless ``overwrite``: refused before the checkpoint
    is read (``save_pretrained`` checks again, and that the folder can be written)."""
    args = ExportConfig(**cfg)
    out = Path(args.out)
    entries = sorted(p.name for p in out.iterdir()) if out.is_dir() and not args.overwrite else []
    if entries:
        shown = ", ".join(entries[:3]) + (", ..." if len(entries) > 3 else "")
        raise FileExistsError(
            f"out={out} is not empty (it holds {shown}); choose a new or empty folder, or pass "
            "overwrite=true to replace the model files in it"
        )
    return args


def export(args: ExportConfig) -> Path:
    model, tokenizer = load_pretrained(args.ckpt)
    out = save_pretrained(model, tokenizer, args.out, overwrite=args.overwrite)
    n = sum(p.numel() for p in model.parameters())
    print(f"exported {n / 1e6:.2f}M parameters to {out}/ ({', '.join(EXPORT_FILES)})")
    return out


@hydra_app("export", validate)
def main(cfg: DictConfig) -> Path:
    return export(validate(OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)))


ConfigStore.instance().store(name="export_schema", node=ExportConfig)
