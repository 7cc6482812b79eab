"""Tokens per second (and, issue 8, FLOPs utilisation) logged during training."""

from __future__ import annotations

import time
from collections import deque
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback


class ThroughputMonitor(Callback):
    """Logs ``train/tokens_per_sec``: a moving average over the last ``window`` steps.

    Time is wall time between consecutive training batch ends (data loading included,
    validation excluded), tokens are label positions over all ranks.
    """

    def __init__(self, peak_flops: float | None = None, window: int = 20) -> None:
        self.peak_flops = peak_flops
        self.window: deque[tuple[float, int]] = deque(maxlen=window)
        self._last: float | None = None

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, i: int
    ) -> None:
        now = time.perf_counter()
        tokens = batch["labels"].numel() * trainer.world_size
        if self._last is not None:
            self.window.append((now - self._last, tokens))
            seconds = sum(dt for dt, _ in self.window)
            rate = sum(n for _, n in self.window) / seconds
            pl_module.log("train/tokens_per_sec", rate, prog_bar=True, rank_zero_only=True)
        self._last = now

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._last = None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._last = None
