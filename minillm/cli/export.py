"""``python scripts/export.py`` / ``minillm-export``: a checkpoint (or an exported folder) as
plain files that load without Lightning or Hydra, in minillm's layout or Hugging Face's.

    minillm-export ckpt=outputs/<run>/checkpoints/best.ckpt out=exported/ [overwrite=true]
    minillm-export ckpt=... out=hf_model/ format=hf       # LlamaForCausalLM or GPT2LMHeadModel
    minillm-export ckpt=hf:<HF folder> out=converted/     # Llama-family or GPT-2 to minillm's

``format=minillm`` (default) writes ``model.safetensors`` (weights; the tied LM head stored
once), ``config.json`` (the model config) and ``tokenizer.json``
(``minillm.checkpoint.save_pretrained``); load it with ``minillm.load_pretrained("exported/")``.
``format=hf`` writes a folder ``transformers.AutoModelForCausalLM.from_pretrained`` and
``AutoTokenizer.from_pretrained`` read (``minillm.hf.save_hf``); a model Llama cannot express
(another attention kind, an encoder-decoder) is refused in one line. A non-empty ``out`` is
refused before the checkpoint is read unless ``overwrite=true``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from minillm import checks
from minillm.checkpoint import EXPORT_FILES, load_pretrained, save_pretrained
from minillm.cli.app import hydra_app
from minillm.hf import HF_FILES, is_hf, load_hf, save_hf

# format -> (writer(model, tokenizer, out, overwrite=) -> folder, the files it writes)
FORMATS: dict[str, tuple[Callable[..., Path], tuple[str, ...]]] = {
    "minillm": (save_pretrained, EXPORT_FILES),
    "hf": (save_hf, HF_FILES),
}


@dataclass
class ExportConfig:
    """conf/export.yaml."""

    ckpt: str = MISSING  # a .ckpt file, an exported folder or hf:<Hugging Face folder>
    out: str = MISSING  # a new or empty folder
    overwrite: bool = False  # replace the model files in a non-empty ``out``
    format: str = "minillm"  # minillm (load_pretrained) or hf (transformers: Llama or GPT-2)

    def __post_init__(self) -> None:
        checks.choice("format", self.format, FORMATS)


def validate(cfg: dict[str, Any]) -> ExportConfig:
    """The config, and ``out`` new or empty unless ``overwrite``: refused before the checkpoint
    is read (the writer checks again, and that the folder can be written)."""
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
    model, tokenizer = (load_hf if is_hf(args.ckpt) else load_pretrained)(args.ckpt)
    write, files = FORMATS[args.format]
    out = write(model, tokenizer, args.out, overwrite=args.overwrite)
    n = sum(p.numel() for p in model.parameters())
    print(f"exported {n / 1e6:.2f}M parameters to {out}/ ({', '.join(files)})")
    return out


@hydra_app("export", validate)
def main(cfg: DictConfig) -> Path:
    return export(validate(OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)))


ConfigStore.instance().store(name="export_schema", node=ExportConfig)
