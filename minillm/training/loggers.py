"""Experiment loggers: CSV by default, TensorBoard, or wandb (offline unless told otherwise)."""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lightning.pytorch.loggers import CSVLogger, Logger, TensorBoardLogger, WandbLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter

from minillm import checks


@dataclass
class LoggerConfig:
    kind: str = "csv"  # csv | tensorboard | wandb | none
    project: str = "minillm"  # wandb project
    name: str | None = None  # wandb run name (default: the run directory's name)
    mode: str = "offline"  # wandb: offline (default), online (after `wandb login`), disabled

    def __post_init__(self) -> None:
        checks.choice("logger.kind", self.kind, [*LOGGERS, "none"])
        checks.choice("logger.mode", self.mode, ("offline", "online", "disabled"))


class _AppendingWriter(ExperimentWriter):
    """Appends to an existing metrics.csv (a resumed run keeps one log) instead of deleting it.

    Rows logged after the resumed checkpoint but before a crash appear twice; readers keep
    the last row of each step. Lightning writes a step's row just after that step's
    checkpoint, so a kill in that instant loses the one row of the checkpointed step.
    """

    def _check_log_dir_exists(self) -> None:
        if os.path.isfile(self.metrics_file_path):
            with open(self.metrics_file_path, newline="") as f:
                self.metrics_keys = next(csv.reader(f), [])


class AppendingCSVLogger(CSVLogger):
    @property
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            os.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _AppendingWriter(log_dir=self.log_dir)
        return self._experiment


def _csv(cfg: LoggerConfig, run_dir: Path) -> Logger:
    return AppendingCSVLogger(save_dir=run_dir, name="logs", version="")


def _tensorboard(cfg: LoggerConfig, run_dir: Path) -> Logger:
    return TensorBoardLogger(save_dir=run_dir, name="tensorboard", version="")


def _wandb(cfg: LoggerConfig, run_dir: Path) -> Logger:
    os.environ.setdefault("WANDB_MODE", cfg.mode)
    return WandbLogger(
        project=cfg.project, name=cfg.name or run_dir.name, save_dir=str(run_dir), mode=cfg.mode
    )


LOGGERS = {"csv": _csv, "tensorboard": _tensorboard, "wandb": _wandb}


def build_logger(cfg: LoggerConfig, run_dir: str | Path) -> Any:
    if cfg.kind == "none":
        return False
    if cfg.kind not in LOGGERS:
        raise ValueError(f"unknown logger {cfg.kind!r}; choose one of {sorted(LOGGERS)} or none")
    return LOGGERS[cfg.kind](cfg, Path(run_dir))
