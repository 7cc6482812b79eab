"""``<run>/metrics.json``: what a finished run measured, for ``minillm.evaluation.report``.

``RunMetrics`` (a callback) times training and validation, logs ``time/elapsed_s`` (wall
seconds since the run started, resumes included) with every validation, so the CSV log can
plot validation loss against wall time, and tracks peak memory during ``fit``:

- CUDA: ``torch.cuda.max_memory_allocated`` (tensors only), reset when ``fit`` starts.
- CPU: the process's peak resident set size (``VmHWM``) during ``fit``, everything included
  (Python, torch, data, weights, optimizer state, activations). The peak is reset when ``fit``
  starts (``/proc/self/clear_refs``; freed heap is returned first with ``malloc_trim``), so
  jobs of one multirun, which share a process, measure themselves only. Where the reset is
  not allowed it is the peak since the process started (``memory_measure`` says which).

``write_run_metrics`` adds the final validation numbers and bits per byte: validation loss in
bits times validation tokens per UTF-8 byte (the scored tokens of the validation blocks,
decoded; ``<eos>`` scores but has no bytes, as in ``minillm.evaluation.perplexity``); with
``data=mqar`` also ``recall_acc`` (the final ``val/recall_acc``); with an image task
(``model.arch=vit``) also ``val_accuracy`` and ``val_top5_accuracy`` (the final
``val/accuracy`` and ``val/top5_accuracy``: top-k with k = min(5, classes)), None otherwise;
``bits_per_byte`` is None there (no text). ``data`` and ``optim`` are the
run's configs, ``seq_len`` its training input length (the data module's, else ``max_len``).
"""

from __future__ import annotations

import ctypes
import dataclasses
import gc
import json
import math
import resource
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.trainer.states import TrainerFn


def _status_kb(field: str) -> int | None:
    """A ``kB`` field of /proc/self/status (VmRSS, VmHWM), or None off Linux."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_peak_rss() -> bool:
    """Return freed heap to the OS, then restart the kernel's peak-RSS count; False if denied."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
    except OSError:
        return False
    return True


class RunMetrics(Callback):
    """Wall time, training tokens, validation time and peak memory of a run (see module doc).

    Times add up over resumes: they travel in the checkpoint (``state_dict``).
    """

    def __init__(self, clock: Callable[[], float] = time.perf_counter) -> None:
        self.clock = clock  # seconds; tests pass a fake one
        self.train_s = 0.0  # training wall time, validation excluded
        self.val_s = 0.0
        self.tokens = 0  # training label positions over all ranks
        self.memory_measure = "none"
        self.rss_start_kb: int | None = None
        self._train_since: float | None = None  # start of the open training stretch
        self._val_since: float | None = None  # start of the running validation

    def _open(self) -> tuple[float, float]:
        """Seconds of the open training stretch and of the running validation."""
        now = self.clock()
        return (
            now - self._train_since if self._train_since is not None else 0.0,
            now - self._val_since if self._val_since is not None else 0.0,
        )

    def elapsed(self) -> float:
        return self.train_s + self.val_s + sum(self._open())

    def state_dict(self) -> dict[str, Any]:
        train, val = self._open()
        return {"train_s": self.train_s + train, "val_s": self.val_s + val, "tokens": self.tokens}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.train_s, self.val_s, self.tokens = state["train_s"], state["val_s"], state["tokens"]

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if pl_module.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(pl_module.device)
            self.memory_measure = "cuda_max_allocated"
        else:
            reset = _reset_peak_rss()
            self.memory_measure = "cpu_peak_rss_" + ("fit" if reset else "process")
            self.rss_start_kb = _status_kb("VmRSS")

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._train_since = self.clock()

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, i: int
    ) -> None:
        self.tokens += batch["labels"].numel() * trainer.world_size

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.train_s += self._open()[0]
        self._train_since, self._val_since = None, self.clock()

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        pl_module.log("time/elapsed_s", torch.tensor(self.elapsed()), rank_zero_only=True)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.val_s += self._open()[1]
        self._val_since = None
        if trainer.state.fn == TrainerFn.FITTING:  # validation inside fit: training goes on
            self._train_since = self.clock()

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.train_s += self._open()[0]
        self._train_since = None

    def peak_memory_mb(self, device: torch.device) -> float | None:
        if self.memory_measure == "cuda_max_allocated":
            return torch.cuda.max_memory_allocated(device) / 2**20
        if self.memory_measure == "cpu_peak_rss_fit":
            peak = _status_kb("VmHWM")
            return peak / 1024 if peak is not None else None
        if self.memory_measure == "cpu_peak_rss_process":
            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux
        return None


def valid_tokens_per_byte(data: L.LightningDataModule) -> float | None:
    """Scored validation tokens per UTF-8 byte they decode to; None without validation blocks."""
    blocks = getattr(data, "valid_blocks", None)
    if blocks is None or blocks.shape[1] < 2:
        return None
    labels = blocks[:, 1:]
    texts = data.tokenizer.decode_batch(labels.tolist())  # special tokens (<eos>) decode to ""
    n_bytes = sum(len(text.encode("utf-8")) for text in texts)
    return labels.size / n_bytes if n_bytes else None


# the task-specific ``val/<name>`` metrics that metrics.json carries when the task logs them
FINAL_METRICS = ("recall_acc", "accuracy", "top5_accuracy")


def _number(value: torch.Tensor | None) -> float | None:
    return float(value) if value is not None else None


def write_run_metrics(
    trainer: L.Trainer, data: L.LightningDataModule, summary: dict[str, Any]
) -> dict[str, Any] | None:
    """Write ``<run>/metrics.json`` (rank 0) from the summary and ``RunMetrics``; return it."""
    timer = next((cb for cb in trainer.callbacks if isinstance(cb, RunMetrics)), None)
    if not trainer.is_global_zero or timer is None:
        return None
    module = trainer.lightning_module
    val_loss = trainer.callback_metrics.get("val/loss")
    val_loss = float(val_loss) if val_loss is not None else math.nan
    final = {k: trainer.callback_metrics.get(f"val/{k}") for k in FINAL_METRICS}
    data_cfg = getattr(data, "cfg", None)
    per_byte = valid_tokens_per_byte(data)
    model = module.model
    metrics = {
        **summary,
        "kind": module.model_cfg.attn_label,
        "params": model.num_params(),
        "params_non_embedding": model.num_params(non_embedding=True),
        "model": module.model_cfg.to_dict(),
        "data": dataclasses.asdict(data_cfg) if dataclasses.is_dataclass(data_cfg) else None,
        "seq_len": getattr(data, "seq_len", module.model_cfg.max_len),  # training input length
        "optim": dataclasses.asdict(module.optim_cfg),
        "val_loss": val_loss,
        "bits_per_byte": val_loss / math.log(2) * per_byte if per_byte else None,
        "recall_acc": _number(final["recall_acc"]),  # data=mqar only
        "val_accuracy": _number(final["accuracy"]),  # image tasks only
        "val_top5_accuracy": _number(final["top5_accuracy"]),
        "train_tokens": timer.tokens,
        "train_s": timer.train_s,
        "val_s": timer.val_s,
        "train_tokens_per_sec": timer.tokens / timer.train_s if timer.train_s else None,
        "peak_memory_mb": timer.peak_memory_mb(module.device),
        "memory_measure": timer.memory_measure,
        "rss_at_fit_start_mb": timer.rss_start_kb / 1024 if timer.rss_start_kb else None,
        "device": str(module.device),
        "torch_threads": torch.get_num_threads(),
    }
    path = Path(summary["run_dir"]) / "metrics.json"
    path.write_text(json.dumps(metrics, indent=1, default=str))
    return metrics
