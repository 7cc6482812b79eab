"""Instruction data: jsonl records of a prompt and a response; the loss is on the response.

A record becomes ``format_prompt(prompt, template)`` ids + response ids + eos; the inputs
are all but the last token, the labels all but the first, with -100 wherever the label is a
prompt token, so the model learns to answer, not to write prompts. Prompt and response are
tokenized apart (as ``scripts/generate.py`` tokenizes a prompt), so generation with the same
template starts from exactly the ids training saw. Too-long records keep the end of the
prompt and as much of the response as fits (counted in the log).

Batches are right-padded to their longest record (pad inputs, -100 labels) and carry no
mask: the decoder is causal, so padding after a token never changes what it sees. The eos
and pad ids are the tokenizer's (``SpecialTokens``), wherever it keeps them. The
training order is the ``ResumableBatchSampler`` stream over records: exact resume, DDP shards.
"""

from __future__ import annotations

import glob
import json
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from minillm import checks
from minillm.checkpoint import read_checkpoint
from minillm.data.base import TrainingDataModule, coerce_config
from minillm.data.sampler import ResumableBatchSampler
from minillm.data.sources import DataConfig, check_data_options
from minillm.data.tokenizer import SpecialTokens, load_or_train_tokenizer

DEFAULT_TEMPLATE = "### Instruction:\n{prompt}\n\n### Response:\n"

logger = logging.getLogger(__name__)


def format_prompt(prompt: str, template: str = DEFAULT_TEMPLATE) -> str:
    """The text the model sees before its response: ``template`` with ``{prompt}`` filled."""
    return template.replace("{prompt}", prompt)


def saved_template(ckpt: str | os.PathLike) -> str:
    """The template a checkpoint was fine-tuned with (its run's ``data.template``)."""
    data = read_checkpoint(ckpt).get("hyper_parameters", {}).get("data") or {}
    if data.get("task") != "instructions":
        raise ValueError(
            f"{ckpt} was not trained on data=instructions, so it has no prompt template; "
            "pass the template itself, e.g. template='### Instruction:\\n{prompt}\\n...'"
        )
    return data.get("template", DEFAULT_TEMPLATE)


@dataclass
class InstructionsConfig:
    """The schema of conf/data/instructions.yaml; every key there is a field here."""

    task: str = "instructions"  # selects InstructionsDataModule (training/run.py DATA_MODULES)
    files: list[str] = field(default_factory=list)  # jsonl paths or globs, one record a line
    valid_files: list[str] = field(default_factory=list)  # empty: valid_fraction of records
    prompt_field: str = "prompt"
    response_field: str = "response"
    template: str = DEFAULT_TEMPLATE  # "{prompt}" is replaced by the record's prompt
    valid_fraction: float = 0.05
    seed: int = 1234
    max_examples: int | None = None  # cap on records read (before the validation split)
    tokenizer: str | None = None  # a tokenizer.json to reuse; else trained and cached
    tokenizer_kind: str = "bpe"
    vocab_size: int = 8192
    min_frequency: int = 2
    eval_batch_size: int | None = None

    def __post_init__(self) -> None:
        check_data_options(self)
        checks.integer("data.max_examples", self.max_examples, optional=True)
        if not self.files:
            raise ValueError(
                "data.files is empty: data=instructions needs 'data.files=[chat.jsonl]'"
            )
        if "{prompt}" not in self.template:
            raise ValueError(f"data.template must contain {{prompt}}; got {self.template!r}")
        for key in ("files", "valid_files"):
            value = getattr(self, key)
            setattr(self, key, [value] if isinstance(value, str) else [str(v) for v in value])

    @classmethod
    def coerce(cls, cfg: Any) -> Any:
        return coerce_config(cls, cfg)

    def read(self, patterns: list[str]) -> list[tuple[str, str]]:
        """(prompt, response) pairs of every record; errors name the file and line."""
        if not patterns:
            raise ValueError("data=instructions needs data.files (jsonl paths or globs)")
        records = []
        for path in _expand(patterns):
            with open(path, encoding="utf-8") as f:
                for lineno, line in enumerate(f, 1):
                    if line.strip():
                        records.append(self._record(line, f"{path}:{lineno}"))
        return records

    def _record(self, line: str, where: str) -> tuple[str, str]:
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{where}: not valid JSON ({err.msg})") from None
        if not isinstance(record, dict):
            raise ValueError(f"{where}: a record must be a JSON object")
        values = []
        for key, option in (
            (self.prompt_field, "prompt_field"),
            (self.response_field, "response_field"),
        ):
            if not isinstance(record.get(key), str):
                raise ValueError(
                    f"{where}: no string field {key!r} (fields: {sorted(record)}); "
                    f"set data.{option}"
                )
            values.append(record[key])
        return values[0], values[1]


def _expand(patterns: list[str]) -> list[str]:
    paths = []
    for pattern in patterns:
        found = sorted(p for p in glob.glob(os.path.expanduser(pattern), recursive=True))
        if not found:
            raise FileNotFoundError(f"data file not found: {pattern!r} matches no file")
        paths += [p for p in found if os.path.isfile(p)]
    return paths


class InstructionsDataModule(TrainingDataModule):
    """Batches ``{"input_ids", "labels"}`` (B, T), right-padded; built like ``LMDataModule``."""

    Config = InstructionsConfig  # the schema of its data config (conf/data/instructions.yaml)

    def __init__(self, data: InstructionsConfig | Mapping[str, Any], **kwargs: Any) -> None:
        super().__init__(data, **kwargs)
        self.train: list[tuple[np.ndarray, int]] | None = None  # (ids, prompt length)
        self.valid: list[tuple[np.ndarray, int]] | None = None
        self.special: SpecialTokens | None = None  # the tokenizer's ids, set by setup()

    def setup(self, stage: str | None = None) -> None:
        """Read, split, tokenize; idempotent and usable without a trainer."""
        if self.train is not None:
            return
        train, valid = self._read_splits()
        if self.tokenizer is None:
            settings = ("tokenizer", "tokenizer_kind", "vocab_size", "min_frequency")
            texts = [t for p, r in train for t in (format_prompt(p, self.cfg.template), r)]
            cfg = DataConfig(**{k: getattr(self.cfg, k) for k in settings})
            self.tokenizer = load_or_train_tokenizer(cfg, texts, self.cache_dir)
        self.special = SpecialTokens.from_tokenizer(self.tokenizer)
        self.vocab_size = self.tokenizer.get_vocab_size()
        self.train, self.valid = self._encode(train, "train"), self._encode(valid, "validation")
        self.num_train_tokens = int(sum(len(ids) for ids, _ in self.train))

    def _read_splits(self) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
        records = self.cfg.read(self.cfg.files)[: self.cfg.max_examples]
        if self.cfg.valid_files:
            return records, self.cfg.read(self.cfg.valid_files)
        if len(records) < 2:
            raise ValueError(
                f"need at least 2 records to draw a validation split, got {len(records)}; "
                "add records or set data.valid_files"
            )
        n_valid = min(len(records) - 1, max(1, round(len(records) * self.cfg.valid_fraction)))
        order = np.random.default_rng(self.cfg.seed).permutation(len(records))
        valid = set(order[:n_valid].tolist())
        return (
            [r for i, r in enumerate(records) if i not in valid],
            [r for i, r in enumerate(records) if i in valid],
        )

    def _encode(self, records: list[tuple[str, str]], split: str) -> list[tuple[np.ndarray, int]]:
        prompts = [format_prompt(p, self.cfg.template) for p, _ in records]
        encode = self.tokenizer.encode_batch
        prompt_ids = encode(prompts, add_special_tokens=False)
        response_ids = encode([r for _, r in records], add_special_tokens=False)
        out, cut = [], 0
        for p, r in zip(prompt_ids, response_ids, strict=True):
            ids, n_prompt = fit_example(p.ids, r.ids + [self.special.eos], self.max_len + 1)
            cut += len(ids) < len(p.ids) + len(r.ids) + 1
            out.append((np.asarray(ids, dtype=np.int64), n_prompt))
        if cut:
            logger.warning("%s: %d of %d records cut to max_len + 1 tokens", split, cut, len(out))
        return out

    def train_dataloader(self) -> DataLoader:
        self.setup()
        rank, world_size, step = self._position()
        sampler = ResumableBatchSampler(
            len(self.train),
            self.batch_size,
            seed=self.seed,
            rank=rank,
            world_size=world_size,
            start_batch=step * self.accumulate,
            num_batches=self.total_steps * self.accumulate if self.total_steps else None,
        )
        return self._loader(self.train, batch_sampler=sampler)

    def val_dataloader(self) -> DataLoader:
        """All validation records in order; under DDP rank r takes records r::world_size."""
        self.setup()
        rank, world_size, _ = self._position()
        return self._loader(self.valid[rank::world_size], batch_size=self.eval_batch_size)

    def test_dataloader(self) -> DataLoader:
        return self.val_dataloader()

    def _loader(self, examples: list[tuple[np.ndarray, int]], **batching: Any) -> DataLoader:
        return DataLoader(
            examples,
            collate_fn=partial(collate, pad_id=self.special.pad),
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            **batching,
        )

    def unigram_perplexity(self) -> float:
        """Validation response-token perplexity of add-one-smoothed training label counts."""
        self.setup()
        counts = np.bincount(_labels(self.train), minlength=self.vocab_size)
        log_p = np.log(counts + 1.0) - np.log(counts.sum() + float(self.vocab_size))
        return float(np.exp(-log_p[_labels(self.valid)].mean()))


def fit_example(prompt: list[int], response: list[int], budget: int) -> tuple[list[int], int]:
    """prompt + response in at most ``budget`` tokens: the prompt loses its start first
    (down to half the budget), then the response its end. Returns (ids, prompt length)."""
    if len(prompt) + len(response) > budget:
        keep = min(len(prompt), max(budget - len(response), budget // 2))
        prompt = prompt[len(prompt) - keep :]
        response = response[: budget - keep]
    return prompt + response, len(prompt)


def _labels(examples: list[tuple[np.ndarray, int]]) -> np.ndarray:
    return np.concatenate([ids[max(n_prompt, 1) :] for ids, n_prompt in examples])


def collate(examples: list[tuple[np.ndarray, int]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded (B, T) inputs and labels; labels of prompt tokens and padding are -100."""
    t = max(len(ids) for ids, _ in examples) - 1
    input_ids = torch.full((len(examples), t), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), t), -100, dtype=torch.long)
    for row, (ids, n_prompt) in enumerate(examples):
        ids = torch.from_numpy(ids)
        n = len(ids) - 1
        input_ids[row, :n] = ids[:-1]
        labels[row, :n] = ids[1:]
        labels[row, : max(n_prompt - 1, 0)] = -100  # label j is token j + 1: a prompt token
    return {"input_ids": input_ids, "labels": labels}
