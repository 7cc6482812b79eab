"""What ``metric=ppl`` scores: the documents of a data config's split, and the data config a
checkpoint was trained with (``minillm/cli/evaluate.py``'s docstring says which is used when).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

from minillm.checkpoint import read_checkpoint
from minillm.data import DataConfig, load_documents
from minillm.data.instructions import InstructionsConfig, InstructionsDataModule, format_prompt


def checkpoint_data(ckpt: str, example: str) -> dict[str, Any]:
    """The data config a checkpoint was trained with; an export folder has none."""
    if Path(ckpt).is_dir():
        raise ValueError(
            f"{ckpt} is an exported folder, which carries no data config: name the data "
            f"with data=<option>, e.g. {example}"
        )
    hparams = read_checkpoint(ckpt, verify=False, mmap=True).get("hyper_parameters", {})
    if not hparams.get("data"):
        raise ValueError(f"{ckpt} carries no data config; pass data=<option>, e.g. {example}")
    return hparams["data"]


def data_config(data: dict[str, Any]) -> Any:
    """``data`` as its task's config dataclass; a task without documents is an error."""
    task = data.get("task", "lm")
    if task not in DOCUMENTS:
        raise ValueError(
            f"metric=ppl scores documents (data=sotu|text|hf, or data=instructions), not "
            f"data.task={task}; score a translation checkpoint with metric=bleu"
        )
    return DOCUMENTS[task][0].coerce(data)


def lm_documents(cfg: DataConfig, split: str, cache_dir: str) -> list[str]:
    if split == "all" and cfg.source == "text" and not cfg.valid_files:
        # no validation split to draw (it needs 2+ documents): every document once
        cfg = dataclasses.replace(cfg, valid_files=cfg.files)
        return list(load_documents(cfg, cache_dir)["train"]["text"])
    splits = load_documents(cfg, cache_dir)
    names = ("train", "validation") if split == "all" else (split,)
    return [doc for name in names for doc in splits[name]["text"]]  # datasets 5: a Column


def instruction_documents(cfg: InstructionsConfig, split: str, cache_dir: str) -> list[str]:
    """Prompt (formatted with the template) + response of each record, as one document."""
    if split == "all":
        records = cfg.read(cfg.files)[: cfg.max_examples]
        records += cfg.read(cfg.valid_files) if cfg.valid_files else []
    else:  # the records training held out (or trained on): its own seeded split
        train, valid = InstructionsDataModule(cfg, max_len=1, batch_size=1)._read_splits()
        records = train if split == "train" else valid
    return [format_prompt(prompt, cfg.template) + response for prompt, response in records]


# data.task -> (its config dataclass, its documents for a split); translation has none.
DOCUMENTS: dict[str, tuple[type, Callable[[Any, str, str], list[str]]]] = {
    "lm": (DataConfig, lm_documents),
    "instructions": (InstructionsConfig, instruction_documents),
}
