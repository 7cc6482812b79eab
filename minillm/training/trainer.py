"""Build the Lightning Trainer from the ``trainer`` config: strategy, precision, checkpoints."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import (
    Callback,
    LearningRateMonitor,
    ModelCheckpoint,
    TQDMProgressBar,
)
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy

from minillm.checkpoint import read_checkpoint, write_atomic
from minillm.training.optim import Rule, is_int, is_number, validate
from minillm.training.throughput import ThroughputMonitor

# Lightning 2.6's accepted values (lightning.fabric.connector; a test holds them together).
PRECISIONS = (
    "32-true",
    "bf16-mixed",
    "16-mixed",
    "bf16-true",
    "16-true",
    "64-true",
    "transformer-engine",
    "transformer-engine-float16",
)
PRECISION_ALIASES = ("32", "16", "bf16", "64", 32, 16, 64)  # Lightning warns on 16 and bf16


@dataclass
class TrainerConfig:
    accelerator: str = "auto"
    devices: Any = 1  # an int, a list of GPU ids, or "auto"
    num_nodes: int = 1
    strategy: str = "auto"  # auto | ddp | fsdp
    process_group_backend: str | None = None  # None: nccl on GPUs, gloo on CPU processes
    timeout_s: int = 600  # collective timeout: a dead rank ends the run instead of hanging it
    precision: str | None = None  # None: bf16-mixed on CUDA, 32-true elsewhere
    max_steps: int = 600
    val_check_interval: int = 200  # training batches between validations
    limit_val_batches: Any = 1.0
    log_every_n_steps: int = 10
    gradient_clip_val: float | None = 1.0
    accumulate_grad_batches: int = 1
    checkpoint_every_n_steps: int = 100  # how often last.ckpt is rewritten (atomically)
    fast_dev_run: Any = False
    deterministic: bool = False
    enable_progress_bar: bool = True
    num_sanity_val_steps: int = 0
    peak_flops: float | None = None  # device peak FLOP/s for MFU when not in the known table

    def __post_init__(self) -> None:
        validate(self, "trainer", TRAINER_RULES, precision="bf16-mixed")


def _positive_int(value: Any) -> bool:
    return is_int(value) and value > 0


def _devices(value: Any) -> bool:
    if isinstance(value, list):
        return bool(value) and all(is_int(v) and v >= 0 for v in value)
    return value == "auto" or value == -1 or _positive_int(value)


POSITIVE = "must be a positive integer"
TRAINER_RULES: dict[str, Rule] = {
    "max_steps": (_positive_int, POSITIVE),
    "val_check_interval": (_positive_int, POSITIVE),
    "accumulate_grad_batches": (_positive_int, POSITIVE),
    "checkpoint_every_n_steps": (_positive_int, POSITIVE),
    "log_every_n_steps": (_positive_int, POSITIVE),
    "devices": (_devices, "must be a positive integer, -1 (all), auto, or a list of GPU ids"),
    "num_nodes": (_positive_int, POSITIVE),
    "timeout_s": (lambda v: is_number(v) and v > 0, "must be a positive number of seconds"),
    "gradient_clip_val": (
        lambda v: v is None or (is_number(v) and v > 0),
        "must be a positive number, or null for no clipping",
    ),
    "precision": (
        lambda v: v is None or v in PRECISIONS or v in PRECISION_ALIASES,
        f"must be one of {', '.join(PRECISIONS)}, or null (bf16-mixed on CUDA, else 32-true)",
    ),
}


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes temp file + rename (no half-written ``last.ckpt``); reads with weights_only."""

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None
    ) -> None:
        write_atomic(checkpoint, path)

    def load_checkpoint(self, path: Any, map_location: Any = None, **kwargs: Any) -> dict:
        return read_checkpoint(path, map_location or "cpu")


STRATEGIES = {"ddp": DDPStrategy, "fsdp": FSDPStrategy}


def _strategy(cfg: TrainerConfig) -> Any:
    if cfg.strategy not in STRATEGIES:
        return cfg.strategy
    kwargs: dict[str, Any] = {"timeout": timedelta(seconds=cfg.timeout_s)}
    if cfg.process_group_backend:
        kwargs["process_group_backend"] = cfg.process_group_backend
    return STRATEGIES[cfg.strategy](**kwargs)


def default_precision(cfg: TrainerConfig) -> str:
    if cfg.precision:
        return cfg.precision
    gpu = cfg.accelerator in ("gpu", "cuda") or (
        cfg.accelerator == "auto" and torch.cuda.is_available()
    )
    return "bf16-mixed" if gpu else "32-true"


def build_trainer(
    cfg: TrainerConfig, run_dir: str | Path, logger: Any, extra_callbacks: list[Callback] = ()
) -> L.Trainer:
    ckpt_dir = Path(run_dir) / "checkpoints"
    best = ModelCheckpoint(
        dirpath=ckpt_dir,
        filename="best",
        monitor="val/loss",
        mode="min",
        save_top_k=1,
        enable_version_counter=False,
        auto_insert_metric_name=False,
    )
    last = ModelCheckpoint(
        dirpath=ckpt_dir,
        save_top_k=0,
        save_last=True,
        every_n_train_steps=cfg.checkpoint_every_n_steps,
        enable_version_counter=False,
    )
    callbacks = [best, last, ThroughputMonitor(cfg.peak_flops), *extra_callbacks]
    if cfg.enable_progress_bar:
        callbacks.append(TQDMProgressBar(refresh_rate=10))
    if logger:
        callbacks.append(LearningRateMonitor(logging_interval="step"))
    return L.Trainer(
        accelerator=cfg.accelerator,
        devices=cfg.devices,
        num_nodes=cfg.num_nodes,
        strategy=_strategy(cfg),
        precision=default_precision(cfg),
        max_steps=cfg.max_steps,
        val_check_interval=cfg.val_check_interval,
        check_val_every_n_epoch=None,
        limit_val_batches=cfg.limit_val_batches,
        log_every_n_steps=cfg.log_every_n_steps,
        gradient_clip_val=cfg.gradient_clip_val,
        accumulate_grad_batches=cfg.accumulate_grad_batches,
        fast_dev_run=cfg.fast_dev_run,
        deterministic=cfg.deterministic,
        enable_progress_bar=cfg.enable_progress_bar,
        num_sanity_val_steps=cfg.num_sanity_val_steps,
        default_root_dir=str(run_dir),
        logger=logger,
        callbacks=callbacks,
        plugins=[AtomicCheckpointIO()],
        use_distributed_sampler=False,  # the DataModule shards by rank itself (exact resume)
    )
