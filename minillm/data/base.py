"""The shared base of the training DataModules (``minillm.training.run.DATA_MODULES``)."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from typing import Any, ClassVar

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from tokenizers import Tokenizer
from torch import Tensor, nn


def coerce_config(cls: type, cfg: Any, lists: tuple[str, ...] = ()) -> Any:
    """``cfg`` (a ``cls``, or a mapping of its fields) as a ``cls``; unknown keys are an error.

    Keys starting with "_" (Hydra's ``_target_`` and friends) are ignored; the ``lists``
    fields, given as one string, become one-element lists.
    """
    if isinstance(cfg, cls):
        return cfg
    cfg = {k: v for k, v in dict(cfg).items() if not str(k).startswith("_")}
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(cfg) - names)
    if unknown:
        raise ValueError(f"unknown data option(s) {unknown}; valid: {sorted(names)}")
    for key in lists:
        if isinstance(cfg.get(key), str):
            cfg[key] = [cfg[key]]
    return cls(**cfg)


class ValidationCounts(Callback):
    """Sums ``count(model, batch)`` over the validation split and the ranks, then ``report``s it.

    ``LMModule.validation_step`` returns no logits (its fused loss never forms them), so a
    metric beyond the loss runs the model once more on each validation batch. At the sizes
    of the tasks that use it (MQAR, digits) that costs about one more validation, a small
    part of a run. Subclasses set ``size`` (how many counts) and define the two methods.
    """

    size: ClassVar[int]

    def __init__(self) -> None:
        self.counts = torch.zeros(self.size, dtype=torch.long)

    def count(self, model: nn.Module, batch: Mapping[str, Tensor]) -> Tensor:
        raise NotImplementedError

    def report(self, pl_module: L.LightningModule, counts: Tensor) -> None:
        raise NotImplementedError

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.counts = torch.zeros(self.size, dtype=torch.long, device=pl_module.device)

    def on_validation_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: dict[str, Tensor],
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        with trainer.precision_plugin.forward_context():
            self.counts += self.count(pl_module.model, batch)

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.report(pl_module, trainer.strategy.reduce(self.counts, reduce_op="sum"))  # over ranks


class TrainingDataModule(L.LightningDataModule):
    """What a DataModule in ``minillm.training.run.DATA_MODULES`` provides.

    It is built as ``Module(data, *, max_len, batch_size, seed, num_workers, cache_dir,
    tokenizer, total_steps, accumulate, pin_memory)``, ``data`` being a ``Config`` or a
    mapping of its fields. After ``setup()`` it has ``tokenizer``, ``vocab_size``,
    ``num_train_tokens`` and ``unigram_perplexity()``; its batches are
    ``{"labels": ..., **model forward kwargs}``. The training order is a pure function of
    (seed, global batch position) and ``train_dataloader`` starts at
    ``global_step * accumulate``, so a resumed run sees the batches an uninterrupted one
    would. It shards by rank itself: the trainer must be built with
    ``use_distributed_sampler=False``. ``callbacks()`` gives its task's training callbacks.
    """

    Config: ClassVar[type]  # the schema of its data config; set by each subclass

    def __init__(
        self,
        data: Any | Mapping[str, Any],
        *,
        max_len: int,
        batch_size: int,
        seed: int = 1234,
        num_workers: int = 0,
        cache_dir: str | None = None,
        tokenizer: Tokenizer | None = None,
        total_steps: int | None = None,
        accumulate: int = 1,
        pin_memory: bool = False,
    ) -> None:
        super().__init__()
        self.cfg = self.Config.coerce(data)
        self.max_len, self.batch_size, self.seed = max_len, batch_size, seed
        self.eval_batch_size = self.cfg.eval_batch_size or batch_size
        self.num_workers, self.pin_memory = num_workers, pin_memory
        self.total_steps, self.accumulate = total_steps, accumulate
        default_cache = os.environ.get("MINILLM_CACHE") or os.path.expanduser("~/.cache/minillm")
        self.cache_dir = cache_dir or default_cache
        self.tokenizer = tokenizer  # a given tokenizer is used as is, never retrained
        self.vocab_size: int | None = None  # set by setup()

    def _position(self) -> tuple[int, int, int]:
        """(rank, world_size, global_step) of the attached trainer, else (0, 1, 0)."""
        if self.trainer is None:
            return 0, 1, 0
        trainer = self.trainer
        return trainer.global_rank, trainer.world_size, trainer.global_step

    def callbacks(self) -> list[Callback]:
        """Task-specific training callbacks: none unless a subclass says otherwise."""
        return []
