"""``python train.py`` / ``minillm-train``: compose conf/train.yaml, check it, train.

Hydra's output directory is the run directory (``minillm.training.run.train``).
"""

from __future__ import annotations

from typing import Any

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from minillm.cli.app import hydra_app
from minillm.models import ModelConfig
from minillm.training import LoggerConfig, OptimConfig, TrainerConfig
from minillm.training.run import DATA_MODULES, RunConfig, train

GROUPS = {"trainer": TrainerConfig, "optim": OptimConfig, "logger": LoggerConfig}


def validate(cfg: dict[str, Any]) -> None:
    """Build every config dataclass of a composed train config: their checks raise."""
    top = {k: v for k, v in cfg.items() if k not in dataclass_groups()}
    RunConfig(**top)
    for group, cls in GROUPS.items():
        cls(**cfg[group])
    task = cfg["data"].get("task", "lm")
    if task not in DATA_MODULES:
        raise ValueError(f"data.task={task!r}: choose one of {', '.join(DATA_MODULES)}")
    data = DATA_MODULES[task].Config.coerce(cfg["data"])
    ModelConfig.from_dict({**cfg["model"], "attn": cfg["attn"], "vocab_size": data.vocab_size})


def dataclass_groups() -> set[str]:
    return {"model", "attn", "mlp", "data", *GROUPS}


@hydra_app("train", validate)
def main(cfg: DictConfig) -> float:
    plain = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    hydra_cfg = HydraConfig.get()
    overrides = list(hydra_cfg.overrides.task)  # what the user set (fine-tuning tells them apart)
    summary = train(plain, hydra_cfg.runtime.output_dir, overrides=overrides)
    return summary["val_ppl"]  # the value a Hydra sweeper would minimise
