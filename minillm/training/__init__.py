"""Training: the LightningModule, optimizer and schedule, trainer/logger builders."""

from minillm.training.loggers import LoggerConfig, build_logger
from minillm.training.module import LMModule
from minillm.training.optim import OptimConfig
from minillm.training.trainer import TrainerConfig, build_trainer

__all__ = [
    "LMModule",
    "LoggerConfig",
    "OptimConfig",
    "TrainerConfig",
    "build_logger",
    "build_trainer",
]
