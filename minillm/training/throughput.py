"""Tokens per second, achieved GFLOP/s and model FLOPs utilisation (MFU) logged during training.

FLOPs per token come from the model's shape (``minillm.models.flops``: matmuls only, attention
counted by its kind, training = 3x forward). MFU divides the achieved FLOP/s by the device's
peak: ``trainer.peak_flops`` if given, else the dense bf16 tensor-core peak of a known GPU
(``PEAK_FLOPS``) when training in 16-bit precision. Without a peak (CPU, fp32, unknown GPU)
only tokens/s and GFLOP/s are logged.
"""

from __future__ import annotations

import time
from collections import deque
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn

from minillm.models.flops import train_flops_per_token

# Dense bf16 (= fp16) peak FLOP/s per GPU, by a fragment of torch.cuda.get_device_name().
# Checked in order, so the more specific names come first.
PEAK_FLOPS: dict[str, float] = {
    "H100 PCIe": 756e12,
    "H100 NVL": 835e12,
    "H100": 989e12,  # SXM
    "H200": 989e12,
    "A100": 312e12,
}


def peak_flops_for(device_name: str) -> float | None:
    """The first ``PEAK_FLOPS`` entry whose key is part of ``device_name``, else None."""
    return next((peak for key, peak in PEAK_FLOPS.items() if key in device_name), None)


def device_peak_flops(device: torch.device, precision: str) -> float | None:
    """The table's peak for a CUDA device training in 16-bit precision, else None."""
    if device.type != "cuda" or "16" not in str(precision):
        return None
    return peak_flops_for(torch.cuda.get_device_name(device))


class ThroughputMonitor(Callback):
    """Logs ``train/tokens_per_sec``, ``train/gflops`` and, with a known peak, ``train/mfu``.

    Each is a moving average over the last ``window`` steps. Time is wall time between
    consecutive training batch ends (data loading included, validation excluded); tokens are
    label positions over all ranks; GFLOP/s are over all ranks, MFU per device. Values are
    logged as CPU tensors, so logging them never waits for the GPU.
    """

    def __init__(self, peak_flops: float | None = None, window: int = 20) -> None:
        self.peak_flops = peak_flops
        self.window: deque[tuple[float, int, float]] = deque(maxlen=window)
        self._last: float | None = None
        self._peak: float | None = None
        self._flops: dict[int, float | None] = {}  # context length -> training FLOPs per token

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._last = None
        self._peak = self.peak_flops or device_peak_flops(pl_module.device, trainer.precision)

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._last = None

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, i: int
    ) -> None:
        now = time.perf_counter()
        labels = batch["labels"]
        tokens = labels.numel() * trainer.world_size
        flops = self._flops_per_token(pl_module, labels.shape[-1])
        if self._last is not None:
            self.window.append((now - self._last, tokens, tokens * (flops or 0.0)))
            seconds = sum(dt for dt, _, _ in self.window)
            metrics = {"train/tokens_per_sec": sum(n for _, n, _ in self.window) / seconds}
            if flops is not None:
                rate = sum(f for _, _, f in self.window) / seconds  # FLOP/s, all ranks
                metrics["train/gflops"] = rate / 1e9
                if self._peak:
                    metrics["train/mfu"] = rate / (self._peak * trainer.world_size)
            for name, value in metrics.items():
                show = name != "train/gflops"
                pl_module.log(name, torch.tensor(value), prog_bar=show, rank_zero_only=True)
        self._last = now

    def _flops_per_token(self, pl_module: L.LightningModule, context: int) -> float | None:
        if context not in self._flops:
            try:
                self._flops[context] = train_flops_per_token(pl_module.model, context)
            except NotImplementedError as err:
                rank_zero_warn(f"no FLOPs count, so no GFLOP/s or MFU is logged: {err}")
                self._flops[context] = None
        return self._flops[context]
