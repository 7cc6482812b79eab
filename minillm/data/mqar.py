"""Multi-query associative recall (MQAR, Zoology: Arora et al. 2023), generated from a seed.

A sequence of ``seq_len + 1`` tokens (the inputs are all but the last, the labels all but the
first, as for language modelling):

    k1 v1 k2 v2 ... kn vn | <pad> <pad> kq vq <pad> kq' vq' <pad> ...
    \\--- n_pairs pairs --/ \\--- n_queries queries at random places, <pad> elsewhere ---/

Keys come from ids [4, 4 + h) and values from [4 + h, 4 + 2h), h = (vocab_size - 4) // 2;
within a sequence the keys are distinct, and so are the values. The queries ask distinct
keys of the pairs, in random order; each is followed by its value, which is the only thing
scored: the label at a query key's position is its value, -100 everywhere else (the pair
region and the padding are never scored). Query places are uniform over every arrangement
of the ``n_queries`` two-token blocks in the tail that does not overlap, and the filler is
``<pad>`` (id 0; a token like any other, no mask). Zoology instead draws the gaps from a power
law and fills with random tokens; at ``2 * (n_pairs + n_queries) = seq_len`` (as in
``experiment=recall``) one filler token is left, so the two layouts nearly coincide.

Sequence ``i`` of a split is a pure function of (``data.seed``, split, ``i``): its random
numbers come from a Philox counter keyed by (seed, split) at counter ``i``, so any batch is
generated alone, in any order, on any rank. Training sequences 0 .. ``n_train`` - 1 are read
in the ``ResumableBatchSampler`` order (exact resume, DDP shards); validation is sequences
0 .. ``n_valid`` - 1 of the validation split, the same at every validation and every run.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback
from tokenizers import Tokenizer, models, pre_tokenizers
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Subset

from minillm import checks
from minillm.data.base import TrainingDataModule, ValidationCounts, coerce_config
from minillm.data.sampler import ResumableBatchSampler
from minillm.data.tokenizer import PAD_ID, SPECIAL_TOKENS  # the id tokenizer's layout

FIRST_ID = len(SPECIAL_TOKENS)  # ids below are the special tokens
SPLITS = {"train": 0, "validation": 1}


@dataclass
class MQARConfig:
    """The schema of conf/data/mqar.yaml; every key there is a field here."""

    task: str = "mqar"  # selects MQARDataModule (training/run.py DATA_MODULES)
    n_pairs: int = 8  # key-value pairs at the start of each sequence
    n_queries: int | None = None  # keys asked after the pairs; None: every pair
    vocab_size: int = 8192  # ids: 4 special tokens, then keys, then values (Zoology: 8192)
    seq_len: int | None = None  # input tokens per sequence; None: model.max_len
    n_train: int = 100_000  # distinct training sequences (one epoch)
    n_valid: int = 1_000
    seed: int = 1234  # what the sequences hold; the run's seed orders the training ones
    eval_batch_size: int | None = None

    def __post_init__(self) -> None:
        for key in ("n_pairs", "vocab_size", "n_train", "n_valid"):
            checks.integer(f"data.{key}", getattr(self, key))
        for key in ("n_queries", "seq_len", "eval_batch_size"):
            checks.integer(f"data.{key}", getattr(self, key), optional=True)
        checks.integer("data.seed", self.seed, 0)
        if self.queries > self.n_pairs:
            raise ValueError(
                f"data.n_queries={self.n_queries}: at most data.n_pairs={self.n_pairs} "
                "(each query asks a different key)"
            )
        half = (self.vocab_size - FIRST_ID) // 2
        if half < self.n_pairs:
            raise ValueError(
                f"data.vocab_size={self.vocab_size}: holds {half} keys and {half} values, "
                f"fewer than data.n_pairs={self.n_pairs}; use data.vocab_size >= "
                f"{FIRST_ID + 2 * self.n_pairs}"
            )
        if self.seq_len is not None:
            self.check_fits(self.seq_len)

    @property
    def queries(self) -> int:
        return self.n_pairs if self.n_queries is None else self.n_queries

    def check_fits(self, seq_len: int, source: str = "data.seq_len") -> None:
        """Pairs and queries take 2 tokens each and must fit ``seq_len + 1`` tokens;
        ``source`` names the key ``seq_len`` came from."""
        need = 2 * (self.n_pairs + self.queries)
        if need > seq_len + 1:
            raise ValueError(
                f"data.n_pairs={self.n_pairs}: {self.n_pairs} pairs + {self.queries} queries "
                f"take {need} tokens, more than the {seq_len + 1} of a sequence ({source}="
                f"{seq_len} inputs + 1 target); lower data.n_pairs or data.n_queries, or raise "
                "data.seq_len (at most model.max_len)"
            )

    @classmethod
    def coerce(cls, cfg: Any) -> Any:
        return coerce_config(cls, cfg)


def id_tokenizer(vocab_size: int) -> Tokenizer:
    """Ids as words: the 4 special tokens at 0-3, then "4" ... str(vocab_size - 1).

    MQAR needs no tokenizer, but checkpoints carry one and generation decodes with it:
    ``decode([17, 4100]) == "17 4100"`` and encoding that text gives the ids back.
    """
    words = [*SPECIAL_TOKENS, *map(str, range(FIRST_ID, vocab_size))]
    tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.add_special_tokens(SPECIAL_TOKENS)
    return tokenizer


def _distinct(u: np.ndarray, n: int) -> np.ndarray:
    """Uniforms (B, k) -> (B, k) distinct ints of [0, n) a row, a uniformly random ordered
    sample: the first k steps of a Fisher-Yates shuffle of range(n), all rows at once."""
    b, k = u.shape
    pool = np.tile(np.arange(n), (b, 1))  # (B, n)
    rows = np.arange(b)
    for j in range(k):
        pick = j + np.minimum((u[:, j] * (n - j)).astype(np.int64), n - j - 1)  # (B,) in [j, n)
        pool[rows, j], pool[rows, pick] = pool[rows, pick], pool[rows, j]
    return pool[:, :k]


def _uniforms(seed: int, split: str, indices: np.ndarray, k: int) -> np.ndarray:
    """(B, k) uniforms in [0, 1): row i from Philox keyed by (seed, split) at counter i."""
    key = np.random.SeedSequence([seed, SPLITS[split]]).generate_state(2, np.uint64)
    rows = [np.random.Generator(np.random.Philox(key=key, counter=[0, i, 0, 0])) for i in indices]
    return np.stack([rng.random(k) for rng in rows]).reshape(len(indices), k)


def generate(cfg: MQARConfig, seq_len: int, split: str, indices: np.ndarray) -> dict[str, Tensor]:
    """Sequences ``indices`` of ``split``: ``input_ids`` and ``labels``, both (B, seq_len)."""
    n, m, b = cfg.n_pairs, cfg.queries, len(indices)
    u = _uniforms(cfg.seed, split, indices, 2 * n + 2 * m)  # (B, 2n + 2m)
    half = (cfg.vocab_size - FIRST_ID) // 2
    keys = FIRST_ID + _distinct(u[:, :n], half)  # (B, n)
    values = FIRST_ID + half + _distinct(u[:, n : 2 * n], half)  # (B, n)
    asked = _distinct(u[:, 2 * n : 2 * n + m], n)  # (B, m) pairs in query order
    # m non-overlapping 2-token blocks in the tail of L - 2n tokens: sorted distinct offsets
    # s_j in [0, L - 2n - m) map one to one onto block starts s_j + j
    offsets = np.sort(_distinct(u[:, 2 * n + m :], seq_len + 1 - 2 * n - m), axis=1)
    starts = 2 * n + offsets + np.arange(m)  # (B, m) positions of the query keys
    rows = np.arange(b)[:, None]
    tokens = np.full((b, seq_len + 1), PAD_ID, dtype=np.int64)
    tokens[:, 0 : 2 * n : 2], tokens[:, 1 : 2 * n : 2] = keys, values
    answers = np.take_along_axis(values, asked, 1)  # (B, m)
    tokens[rows, starts] = np.take_along_axis(keys, asked, 1)
    tokens[rows, starts + 1] = answers
    labels = np.full((b, seq_len), -100, dtype=np.int64)
    labels[rows, starts] = answers  # label t is token t + 1
    inputs = np.ascontiguousarray(tokens[:, :-1])
    return {"input_ids": torch.from_numpy(inputs), "labels": torch.from_numpy(labels)}


class MQARSequences(Dataset):
    """Sequences 0 .. n - 1 of a split; ``__getitems__`` generates a whole batch at once."""

    def __init__(self, cfg: MQARConfig, seq_len: int, split: str, n: int) -> None:
        self.cfg, self.seq_len, self.split, self.n = cfg, seq_len, split, n

    def __len__(self) -> int:
        return self.n

    def __getitems__(self, indices: list[int]) -> dict[str, Tensor]:
        return generate(self.cfg, self.seq_len, self.split, np.asarray(indices))

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        return {k: v[0] for k, v in self.__getitems__([index]).items()}


def _batch(batch: dict[str, Tensor]) -> dict[str, Tensor]:
    return batch  # __getitems__ made the batch already


class MQARDataModule(TrainingDataModule):
    """MQAR batches ``{"input_ids", "labels"}`` (B, seq_len); built like ``LMDataModule``."""

    Config = MQARConfig  # the schema of its data config (conf/data/mqar.yaml)

    def __init__(self, data: MQARConfig | Mapping[str, Any], **kwargs: Any) -> None:
        super().__init__(data, **kwargs)
        self.seq_len = self.cfg.seq_len or self.max_len
        if self.seq_len > self.max_len:
            raise ValueError(
                f"data.seq_len={self.seq_len}: longer than model.max_len={self.max_len}; "
                f"lower data.seq_len or raise model.max_len"
            )
        self.cfg.check_fits(self.seq_len, "data.seq_len" if self.cfg.seq_len else "model.max_len")

    def setup(self, stage: str | None = None) -> None:
        """The tokenizer and sizes; the sequences themselves are generated per batch."""
        if self.tokenizer is None:
            self.tokenizer = id_tokenizer(self.cfg.vocab_size)
        if self.tokenizer.get_vocab() != id_tokenizer(self.cfg.vocab_size).get_vocab():
            raise ValueError(
                f"data.vocab_size={self.cfg.vocab_size}: the given tokenizer (checkpoint, "
                f"{self.tokenizer.get_vocab_size()} tokens) is not the id tokenizer of that size; "
                "data=mqar needs its own id tokenizer (its ids are the task's tokens)"
            )
        self.vocab_size = self.cfg.vocab_size
        self.num_train_tokens = self.cfg.n_train * self.seq_len

    def train_dataloader(self) -> DataLoader:
        rank, world_size, step = self._position()
        sampler = ResumableBatchSampler(
            self.cfg.n_train,
            self.batch_size,
            seed=self.seed,
            rank=rank,
            world_size=world_size,
            start_batch=step * self.accumulate,
            num_batches=self.total_steps * self.accumulate if self.total_steps else None,
        )
        sequences = MQARSequences(self.cfg, self.seq_len, "train", self.cfg.n_train)
        return self._loader(sequences, batch_sampler=sampler)

    def val_dataloader(self) -> DataLoader:
        """Validation sequences in order; under DDP rank r takes r::world_size."""
        rank, world_size, _ = self._position()
        sequences = MQARSequences(self.cfg, self.seq_len, "validation", self.cfg.n_valid)
        shard = Subset(sequences, range(rank, self.cfg.n_valid, world_size))
        return self._loader(shard, batch_size=self.eval_batch_size, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self.val_dataloader()

    def _loader(self, dataset: Dataset, **kwargs: Any) -> DataLoader:
        return DataLoader(
            dataset,
            collate_fn=_batch,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.num_workers > 0,
            **kwargs,
        )

    def unigram_perplexity(self) -> float:
        """Perplexity of knowing only which ids can be answers: uniform over the value ids,
        which add-one-smoothed training unigrams of the answers tend to. A model that has
        learnt to look up its key reaches 1."""
        return float((self.cfg.vocab_size - FIRST_ID) // 2)

    def callbacks(self) -> list[Callback]:
        return [RecallAccuracy()]


def answer_hits(model: nn.Module, batch: Mapping[str, Tensor]) -> Tensor:
    """[answers predicted exactly by argmax, answers]: labels != -100 are the answers.

    Logits only at the answers: (N, vocab), not the (B, T, vocab) of a full forward.
    """
    labels = batch["labels"]
    answer = labels != -100  # (B, T)
    hidden = model.hidden_states(**{k: v for k, v in batch.items() if k != "labels"})  # (B, T, D)
    predicted = model.lm_head(hidden[answer]).argmax(-1)  # (N,)
    return torch.stack([(predicted == labels[answer]).sum(), answer.sum()])


class RecallAccuracy(ValidationCounts):
    """Logs ``val/recall_acc``: answers predicted exactly by argmax / answers, whole validation."""

    size = 2  # [correct, answers]

    def count(self, model: nn.Module, batch: Mapping[str, Tensor]) -> Tensor:
        return answer_hits(model, batch)

    def report(self, pl_module: L.LightningModule, counts: Tensor) -> None:
        accuracy = counts[0].double() / counts[1].clamp(min=1)
        pl_module.log("val/recall_acc", accuracy.float(), prog_bar=True, sync_dist=False)
