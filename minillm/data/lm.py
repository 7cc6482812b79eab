"""Language-modelling data: documents -> token stream -> fixed blocks of max_len + 1.

Each document's tokens (without the tokenizer's template, e.g. Llama's leading <s>) are
followed by the tokenizer's end-of-sequence id (`SpecialTokens`) and the documents are
concatenated, then cut into non-overlapping blocks of `max_len + 1` tokens; a block gives
`input_ids` (all but the last token) and `labels` (all but the first). The train remainder
is dropped.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Mapping
from typing import Any

import datasets
import numpy as np
import torch
from tokenizers import Tokenizer
from torch.utils.data import DataLoader, Dataset

from minillm.data.base import TrainingDataModule
from minillm.data.sampler import ResumableBatchSampler, SegmentBatchSampler
from minillm.data.sources import DataConfig, load_documents
from minillm.data.tokenizer import SpecialTokens, corpus_fingerprint, load_or_train_tokenizer

# Bump when a change here makes previously cached token files wrong.
TOKENIZED_VERSION = 2  # 2: encoded without the tokenizer's template (add_special_tokens=False)

logger = logging.getLogger(__name__)


class LMDataModule(TrainingDataModule):
    """Packed next-token blocks with a resumable, DDP-sharded training order.

    The training order is a pure function of (seed, global batch position), and
    `train_dataloader` starts at `trainer.global_step * accumulate`, so a run resumed from
    a checkpoint continues with the batches an uninterrupted run would have seen. The
    trainer must be built with `use_distributed_sampler=False`: the batch sampler already
    shards by rank.

    ``segments=True`` (a model with XL memory, ``model.memory_len``): the blocks are read as
    parallel streams of consecutive segments instead (``SegmentBatchSampler``: training, same
    order every epoch; validation, ``eval_batch_size`` streams over the blocks in order, the
    last stream's missing tail filled with unscored rows), and each batch carries ``segment``
    (B,), each row's segment index in its stream (0: the model clears that row's memory).
    """

    Config = DataConfig  # the schema of its data config (conf/data/{sotu,text,hf}.yaml)

    def __init__(
        self, data: DataConfig | Mapping[str, Any], *, segments: bool = False, **kwargs: Any
    ) -> None:
        super().__init__(data, **kwargs)
        self.segments = segments
        self.train_blocks: np.ndarray | None = None  # (n_train_blocks, max_len + 1) int32
        self.valid_blocks: np.ndarray | None = None  # (n_valid_blocks, <= max_len + 1) int32
        self.special: SpecialTokens | None = None  # the tokenizer's ids, set by setup()

    def prepare_data(self) -> None:
        # Runs on one process per node first, so the other ranks' setup() hits the caches.
        self.setup()

    def setup(self, stage: str | None = None) -> None:
        """Load, tokenize (cached) and pack; idempotent, and usable without a trainer."""
        if self.train_blocks is not None:
            return
        docs = load_documents(self.cfg, cache_dir=os.path.join(self.cache_dir, "hf"))
        train_fp = corpus_fingerprint(docs["train"])
        if self.tokenizer is None:
            self.tokenizer = load_or_train_tokenizer(
                self.cfg, docs["train"], self.cache_dir, fingerprint=train_fp
            )
        self.special = SpecialTokens.from_tokenizer(self.tokenizer)
        self.vocab_size = self.tokenizer.get_vocab_size()
        tok_hash = hashlib.sha256(self.tokenizer.to_str().encode()).hexdigest()
        train = self._token_stream(docs["train"], train_fp, tok_hash, "train")
        valid_fp = corpus_fingerprint(docs["validation"])
        valid = self._token_stream(docs["validation"], valid_fp, tok_hash, "validation")

        block = self.max_len + 1
        if len(train) < block:
            raise ValueError(
                f"the training split has {len(train)} tokens, fewer than one block "
                f"of max_len + 1 = {block}; lower max_len or add data"
            )
        self.train_blocks = train[: len(train) // block * block].reshape(-1, block)
        if len(valid) >= block:
            self.valid_blocks = valid[: len(valid) // block * block].reshape(-1, block)
        else:  # one short block rather than no validation at all
            self.valid_blocks = valid[None, :]
        self.train_docs, self.valid_docs = len(docs["train"]), len(docs["validation"])
        self.num_train_tokens = len(train)
        logger.info(
            "data: %d train docs, %d tokens, %d blocks of %d; %d validation docs, %d blocks",
            self.train_docs,
            self.num_train_tokens,
            len(self.train_blocks),
            block,
            self.valid_docs,
            len(self.valid_blocks),
        )

    def _token_stream(
        self, docs: datasets.Dataset, fingerprint: str, tok_hash: str, split: str
    ) -> np.ndarray:
        """All documents' ids with eos after each, concatenated; cached as Arrow."""
        key = hashlib.sha256(f"{fingerprint}|{tok_hash}|v{TOKENIZED_VERSION}".encode()).hexdigest()[
            :20
        ]
        folder = os.path.join(self.cache_dir, "tokenized")
        os.makedirs(folder, exist_ok=True)
        ids = docs.map(
            _encode,
            fn_kwargs={"tokenizer": self.tokenizer, "eos": self.special.eos},
            input_columns="text",
            batched=True,
            remove_columns=docs.column_names,
            features=datasets.Features({"input_ids": datasets.List(datasets.Value("int32"))}),
            cache_file_name=os.path.join(folder, f"{key}_{split}.arrow"),
            load_from_cache_file=True,
            new_fingerprint=key,
            desc=f"Tokenizing {split}",
        )
        column = ids.with_format("arrow")[:].column("input_ids")
        chunks = [chunk.flatten().to_numpy() for chunk in column.chunks]
        return np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.int32)

    def train_dataloader(self) -> DataLoader:
        self.setup()
        rank, world_size, step = self._position()
        n = len(self.train_blocks)
        # Whole optimizer steps per pass: Lightning steps on a partial accumulation at the
        # end of an epoch, which would break start_batch = global_step * accumulate.
        per_epoch = n // (self.batch_size * world_size) // self.accumulate * self.accumulate
        if per_epoch == 0 and not self.total_steps:
            raise ValueError(
                f"{n} training blocks give no full step of batch_size {self.batch_size} x "
                f"world_size {world_size} x accumulate {self.accumulate}; lower them or max_len"
            )
        sampler = (SegmentBatchSampler if self.segments else ResumableBatchSampler)(
            n,
            self.batch_size,
            seed=self.seed,
            rank=rank,
            world_size=world_size,
            start_batch=step * self.accumulate,
            # one pass = the whole run when total_steps is known, else one epoch
            num_batches=self.total_steps * self.accumulate if self.total_steps else per_epoch,
        )
        dataset = _Blocks(self.train_blocks)
        if self.segments:
            dataset = _SegmentBlocks(self.train_blocks, sampler.batches_per_epoch)
        return DataLoader(
            dataset,
            batch_sampler=sampler,
            collate_fn=_collate if not self.segments else _identity,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.num_workers > 0,
        )

    def val_dataloader(self) -> DataLoader:
        """All validation blocks in order; under DDP rank r takes blocks r::world_size."""
        self.setup()
        rank, world_size, _ = self._position()
        if self.segments:  # rank r: the r-th contiguous share, so streams stay in order
            blocks = np.array_split(self.valid_blocks, world_size)[rank]
            n_streams = max(1, min(self.eval_batch_size, len(blocks)))
            length = -(-len(blocks) // n_streams)  # segments a stream
            order = [[s * length + g for s in range(n_streams)] for g in range(length)]
            return DataLoader(
                _SegmentBlocks(blocks, length),
                batch_sampler=order,
                collate_fn=_identity,
                num_workers=self.num_workers,
                pin_memory=self.pin_memory,
            )
        return DataLoader(
            _Blocks(self.valid_blocks[rank::world_size]),
            batch_size=self.eval_batch_size,
            shuffle=False,
            collate_fn=_collate,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
        )

    def test_dataloader(self) -> DataLoader:
        """There is no separate test split: `trainer.test` reports on the validation blocks."""
        return self.val_dataloader()

    def unigram_perplexity(self) -> float:
        """Validation perplexity of add-one-smoothed training unigram frequencies.

        A model that beats this has learned more than token frequencies.
        """
        self.setup()
        counts = np.bincount(self.train_blocks.ravel(), minlength=self.vocab_size)
        log_p = np.log(counts + 1.0) - np.log(counts.sum() + float(self.vocab_size))
        labels = self.valid_blocks[:, 1:].ravel()
        return float(np.exp(-log_p[labels].mean()))


def _encode(texts: list[str], tokenizer: Tokenizer, eos: int) -> dict[str, list[list[int]]]:
    encoded = tokenizer.encode_batch(texts, add_special_tokens=False)
    return {"input_ids": [enc.ids + [eos] for enc in encoded]}


class _Blocks(Dataset):
    """Rows of a block array as LongTensors; `__getitems__` fetches a batch in one copy."""

    def __init__(self, blocks: np.ndarray) -> None:
        self.blocks = blocks

    def __len__(self) -> int:
        return len(self.blocks)

    def __getitem__(self, index: int) -> torch.Tensor:
        return torch.from_numpy(self.blocks[index].astype(np.int64))

    def __getitems__(self, indices: list[int]) -> torch.Tensor:
        return torch.from_numpy(self.blocks[indices].astype(np.int64))


def _collate(blocks: torch.Tensor | list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """(B, T + 1) blocks -> input_ids and labels, both (B, T), labels shifted by one."""
    if isinstance(blocks, list):
        blocks = torch.stack(blocks)
    return {"input_ids": blocks[:, :-1].contiguous(), "labels": blocks[:, 1:].contiguous()}


class _SegmentBlocks(Dataset):
    """Blocks read as streams of ``length`` consecutive segments (XL memory): a batch of
    indices gives ``input_ids``, ``labels`` and each row's ``segment`` (index % length).
    Indices past the blocks are filler rows: token 0, no label scored."""

    def __init__(self, blocks: np.ndarray, length: int) -> None:
        self.blocks, self.length = blocks, length

    def __len__(self) -> int:
        return len(self.blocks)

    def __getitems__(self, indices: list[int]) -> dict[str, torch.Tensor]:
        index = torch.tensor(indices)
        real = index < len(self.blocks)  # (B,)
        blocks = torch.zeros(len(indices), self.blocks.shape[1], dtype=torch.long)
        blocks[real] = torch.from_numpy(self.blocks[index[real].numpy()].astype(np.int64))
        batch = _collate(blocks)
        batch["labels"][~real] = -100
        return {**batch, "segment": index % self.length}


def _identity(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The collate of ``_SegmentBlocks``, whose ``__getitems__`` makes the whole batch."""
    return batch
