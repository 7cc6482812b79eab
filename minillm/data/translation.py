"""Parallel-text data for the encoder-decoder model: pairs -> one joint BPE -> length buckets.

A pair becomes ``src_ids = source + <eos>``, ``input_ids = <bos> + target`` and
``labels = target + <eos>``; batches are right-padded (``<pad>`` in the inputs, -100 in the
labels) and carry ``src_mask``. Right padding needs no decoder mask: the decoder is causal.
The special ids are the tokenizer's (``SpecialTokens``: <bos> and <pad> fall back to <eos>).

Batches are fixed groups of similar-length pairs (sorted by source then target length, ties
broken by the seed); their order is the ``ResumableBatchSampler`` stream over batch indices,
a pure function of (seed, position), so a resumed run sees the batches an uninterrupted one
would, and DDP rank r takes every r-th batch of each global step.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from lightning.pytorch.callbacks import Callback
from torch.utils.data import DataLoader, Dataset

from minillm import checks
from minillm.data.base import TrainingDataModule, coerce_config
from minillm.data.parallel import Pair, read_hf_pairs, read_pairs
from minillm.data.sampler import ResumableBatchSampler
from minillm.data.sources import DataConfig, check_data_options
from minillm.data.tokenizer import SpecialTokens, load_or_train_tokenizer
from minillm.training.bleu_callback import ValidationBLEU

logger = logging.getLogger(__name__)
TOKENIZER_KEYS = ("tokenizer", "tokenizer_kind", "vocab_size", "min_frequency")


@dataclass
class TranslationDataConfig:
    """The schema of conf/data/translation.yaml; every key there is a field here."""

    task: str = "translation"  # selects TranslationDataModule (training/run.py DATA_MODULES)
    format: str = "auto"  # auto (by extension: .jsonl/.json, .tsv) | jsonl | tsv | hf
    train_files: list[str] = field(default_factory=list)  # paths or globs
    valid_files: list[str] = field(default_factory=list)  # empty: valid_fraction of train
    test_file: str | None = None  # scored by `scripts/evaluate.py metric=bleu`
    src_field: str = "src"  # jsonl/hf field of the source; dotted for nesting: translation.en
    tgt_field: str = "tgt"
    on_malformed: str = "skip"  # skip (warn with count and file:line) | fail
    # format=hf: a hub name or a save_to_disk folder, and its splits
    name: str | None = None
    config: str | None = None
    split: str = "train"
    valid_split: str | None = "validation"  # None: valid_fraction of train
    test_split: str = "test"
    valid_fraction: float = 0.01
    seed: int = 1234
    max_examples: int | None = None  # cap on training pairs (after shuffling: a random subset)
    # length filter, in tokens (source + <eos>, target + <eos>); None: model.max_len
    max_src_len: int | None = None
    max_tgt_len: int | None = None
    # tokenizer: one BPE for both sides
    tokenizer: str | None = None  # a tokenizer.json to reuse; else trained and cached
    tokenizer_kind: str = "bpe"
    vocab_size: int = 8000
    min_frequency: int = 2
    eval_batch_size: int | None = None
    bleu_samples: int = 200  # validation pairs decoded greedily for val/bleu; 0: off

    def __post_init__(self) -> None:
        check_data_options(self)
        checks.choice("data.format", self.format, SPLIT_READERS)
        checks.choice("data.on_malformed", self.on_malformed, ("skip", "fail"))
        checks.integer("data.max_examples", self.max_examples, optional=True)
        checks.integer("data.max_src_len", self.max_src_len, 2, optional=True)
        checks.integer("data.max_tgt_len", self.max_tgt_len, 2, optional=True)
        checks.integer("data.bleu_samples", self.bleu_samples, 0)
        if self.format == "hf" and not self.name:
            raise ValueError("data.name is not set: data.format=hf needs data.name=<dataset>")

    @classmethod
    def coerce(cls, cfg: Any) -> Any:
        return coerce_config(cls, cfg, ("train_files", "valid_files"))

    def read(self, which: str) -> list[Pair]:
        """Pairs of ``which`` ("train", "valid" or "test"); [] when that split is not set."""
        if self.format not in SPLIT_READERS:
            raise ValueError(f"unknown data.format {self.format!r}; choose {sorted(SPLIT_READERS)}")
        return SPLIT_READERS[self.format](self, which)


def _read_files(cfg: TranslationDataConfig, which: str) -> list[Pair]:
    files = {"train": cfg.train_files, "valid": cfg.valid_files, "test": cfg.test_file}[which]
    if which == "train" and not files:
        raise ValueError("data=translation needs data.train_files (paths or globs)")
    fields = (cfg.src_field, cfg.tgt_field, cfg.on_malformed)
    return read_pairs(files, cfg.format, *fields) if files else []


def _read_hf(cfg: TranslationDataConfig, which: str) -> list[Pair]:
    if not cfg.name:
        raise ValueError("data.format=hf needs data.name (hub name or save_to_disk dir)")
    split = {"train": cfg.split, "valid": cfg.valid_split, "test": cfg.test_split}[which]
    fields = (cfg.src_field, cfg.tgt_field, cfg.on_malformed)
    return read_hf_pairs(cfg.name, cfg.config, split, *fields) if split else []


SPLIT_READERS = {"auto": _read_files, "jsonl": _read_files, "tsv": _read_files, "hf": _read_hf}


@dataclass
class Encoded:
    """Tokenized pairs: ``src[i]`` = source + <eos>, ``tgt[i]`` = target ids (no specials)."""

    src: list[np.ndarray]
    tgt: list[np.ndarray]
    pairs: list[Pair]

    def __len__(self) -> int:
        return len(self.src)


class TranslationDataModule(TrainingDataModule):
    """Length-bucketed batches of ``{"src_ids", "src_mask", "input_ids", "labels"}``.

    Built like ``LMDataModule`` (same constructor; the trainer must use
    ``use_distributed_sampler=False``). ``callbacks()`` gives the validation-BLEU callback.
    """

    Config = TranslationDataConfig  # the schema of its ``data`` config group

    def __init__(self, data: TranslationDataConfig | Mapping[str, Any], **kwargs: Any) -> None:
        super().__init__(data, **kwargs)
        self.train: Encoded | None = None  # set by setup()
        self.special: SpecialTokens | None = None  # the tokenizer's ids, set by setup()
        self.valid: Encoded | None = None

    def prepare_data(self) -> None:
        self.setup()  # one process per node first: the other ranks then find the tokenizer cached

    def setup(self, stage: str | None = None) -> None:
        """Read, split, tokenize and filter; idempotent and usable without a trainer."""
        if self.train is not None:
            return
        train, valid = self._read_splits()
        if self.tokenizer is None:
            settings = DataConfig(**{k: getattr(self.cfg, k) for k in TOKENIZER_KEYS})
            texts = [text for pair in train for text in pair]  # both sides: one joint BPE
            self.tokenizer = load_or_train_tokenizer(settings, texts, self.cache_dir)
        self.special = SpecialTokens.from_tokenizer(self.tokenizer)
        self.vocab_size = self.tokenizer.get_vocab_size()
        self.train = self._encode(train, "train")
        self.valid = self._encode(valid, "validation")
        self.num_train_tokens = int(sum(len(t) + 1 for t in self.train.tgt))  # label tokens
        self.train_batches = bucket_batches(self.train, self.batch_size, self.seed)
        self.valid_batches = bucket_batches(self.valid, self.eval_batch_size, self.seed)

    def _read_splits(self) -> tuple[list[Pair], list[Pair]]:
        train, valid = self.cfg.read("train"), self.cfg.read("valid")
        order = np.random.default_rng(self.cfg.seed).permutation(len(train))
        if not valid:  # hold out a seeded fraction of the training pairs
            n_valid = min(len(train) - 1, max(1, round(len(train) * self.cfg.valid_fraction)))
            valid = [train[i] for i in sorted(order[:n_valid])]
            order = order[n_valid:]
        if self.cfg.max_examples is not None:
            order = order[: self.cfg.max_examples]
        return [train[i] for i in sorted(order)], valid

    def _encode(self, pairs: list[Pair], split: str) -> Encoded:
        """Tokenize and drop empty or over-long pairs (counted in the log)."""
        max_src = self.cfg.max_src_len or self.max_len
        max_tgt = self.cfg.max_tgt_len or self.max_len
        src = self.tokenizer.encode_batch([p[0] for p in pairs], add_special_tokens=False)
        tgt = self.tokenizer.encode_batch([p[1] for p in pairs], add_special_tokens=False)
        kept = Encoded([], [], [])
        for pair, s, t in zip(pairs, src, tgt, strict=True):
            if 0 < len(s.ids) < max_src and 0 < len(t.ids) < max_tgt:
                kept.src.append(np.array(s.ids + [self.special.eos], dtype=np.int32))
                kept.tgt.append(np.array(t.ids, dtype=np.int32))
                kept.pairs.append(pair)
        logger.info(
            "%s: %d pairs, %d dropped (empty, or longer than %d source / %d target tokens)",
            split, len(kept), len(pairs) - len(kept), max_src, max_tgt,
        )  # fmt: skip
        if not kept.src:
            raise ValueError(
                f"no {split} pair is left after length filtering ({len(pairs)} read); raise "
                f"model.max_len or data.max_src_len / data.max_tgt_len"
            )
        return kept

    def train_dataloader(self) -> DataLoader:
        self.setup()
        rank, world_size, step = self._position()
        n = len(self.train_batches)
        per_epoch = n // world_size // self.accumulate * self.accumulate
        sampler = ResumableBatchSampler(  # batch_size 1: one item = one bucketed batch
            n,
            1,
            seed=self.seed,
            rank=rank,
            world_size=world_size,
            start_batch=step * self.accumulate,
            num_batches=self.total_steps * self.accumulate if self.total_steps else per_epoch,
        )
        return self._loader(self.train, self.train_batches, sampler=sampler)

    def val_dataloader(self) -> DataLoader:
        """All validation batches in order; under DDP rank r takes batches r::world_size."""
        self.setup()
        rank, world_size, _ = self._position()
        return self._loader(self.valid, self.valid_batches[rank::world_size])

    def test_dataloader(self) -> DataLoader:
        """``test_file`` (or the HF test split) if set, else the validation batches."""
        self.setup()
        pairs = self.cfg.read("test")
        if not pairs:
            return self.val_dataloader()
        test = self._encode(pairs, "test")
        return self._loader(test, bucket_batches(test, self.eval_batch_size, self.seed))

    def _loader(
        self, data: Encoded, batches: list[np.ndarray], sampler: ResumableBatchSampler | None = None
    ) -> DataLoader:
        """One dataset item = one whole batch; ``sampler`` picks batch indices (else in order)."""
        dataset = _Batches(data, batches, self.special)
        if sampler is None:
            return DataLoader(dataset, batch_size=None, num_workers=self.num_workers)
        return DataLoader(
            dataset, batch_sampler=sampler, collate_fn=_first, num_workers=self.num_workers
        )

    def callbacks(self) -> list[Callback]:
        """The validation-BLEU callback on a fixed, seeded sample of the validation pairs."""
        self.setup()
        n = min(self.cfg.bleu_samples, len(self.valid))
        if n <= 0:
            return []
        pick = sorted(np.random.default_rng(self.cfg.seed).permutation(len(self.valid))[:n])
        sample = [self.valid.pairs[i] for i in pick]
        return [ValidationBLEU(sample, self.tokenizer, batch_size=self.eval_batch_size)]

    def unigram_perplexity(self) -> float:
        """Validation label perplexity of add-one-smoothed training label frequencies."""
        self.setup()
        eos = self.special.eos
        labels = [np.append(t, eos) for t in self.train.tgt]
        counts = np.bincount(np.concatenate(labels), minlength=self.vocab_size)
        log_p = np.log(counts + 1.0) - np.log(counts.sum() + float(self.vocab_size))
        valid = np.concatenate([np.append(t, eos) for t in self.valid.tgt])
        return float(np.exp(-log_p[valid].mean()))


def bucket_batches(data: Encoded, batch_size: int, seed: int) -> list[np.ndarray]:
    """Index batches of similar lengths: sorted by (source, target) length, ties by the seed."""
    tie = np.random.default_rng(seed).permutation(len(data))
    src_len = np.array([len(s) for s in data.src])
    tgt_len = np.array([len(t) for t in data.tgt])
    order = np.lexsort((tie, tgt_len, src_len))
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def collate(
    src: list[np.ndarray], tgt: list[np.ndarray], special: SpecialTokens
) -> dict[str, torch.Tensor]:
    """Right-padded batch: src_ids/src_mask (B, S), input_ids/labels (B, T); the decoder
    input starts with ``special.bos`` and the labels end with ``special.eos``."""
    b = len(src)
    s, t = max(len(x) for x in src), max(len(y) for y in tgt) + 1
    src_ids = torch.full((b, s), special.pad, dtype=torch.long)
    src_mask = torch.zeros(b, s, dtype=torch.bool)
    input_ids = torch.full((b, t), special.pad, dtype=torch.long)
    labels = torch.full((b, t), -100, dtype=torch.long)
    for i, (x, y) in enumerate(zip(src, tgt, strict=True)):
        src_ids[i, : len(x)] = torch.from_numpy(x.astype(np.int64))
        src_mask[i, : len(x)] = True
        y = torch.from_numpy(y.astype(np.int64))
        input_ids[i, 0], input_ids[i, 1 : len(y) + 1] = special.bos, y
        labels[i, : len(y)], labels[i, len(y)] = y, special.eos
    return {"src_ids": src_ids, "src_mask": src_mask, "input_ids": input_ids, "labels": labels}


class _Batches(Dataset):
    """Item i = the collated batch ``batches[i]``."""

    def __init__(self, data: Encoded, batches: list[np.ndarray], special: SpecialTokens) -> None:
        self.data, self.batches, self.special = data, batches, special

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        rows = self.batches[index]
        src, tgt = [self.data.src[i] for i in rows], [self.data.tgt[i] for i in rows]
        return collate(src, tgt, self.special)


def _first(items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return items[0]
