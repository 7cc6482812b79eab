"""One training run from a plain-dict config: data -> tokenizer -> model -> fit -> summary.

``train.py`` composes the config with Hydra and calls ``train``; tests call it directly.
Nothing is replaced silently: a run directory that holds checkpoints is resumed
(``ckpt_path``) or explicitly started over (``overwrite=true``), and a resumed or
fine-tuned run is checked against its checkpoint's config before any data is read.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import lightning as L
from lightning.pytorch.utilities import rank_zero_info
from tokenizers import Tokenizer

from minillm import checks
from minillm.checkpoint import read_checkpoint
from minillm.data import LMDataModule
from minillm.data.imagefolder import ImageFolderDataModule
from minillm.data.images import DigitsDataModule
from minillm.data.instructions import InstructionsDataModule
from minillm.data.mqar import MQARDataModule
from minillm.data.translation import TranslationDataModule
from minillm.models import sizing
from minillm.training.finetune import (
    InitialWeights,
    check_resume,
    describe,
    load_initial_weights,
    read_initial_weights,
    take_architecture,
)
from minillm.training.loggers import LoggerConfig, build_logger
from minillm.training.module import LMModule
from minillm.training.optim import OptimConfig
from minillm.training.run_dir import check_run_dir, resolve_ckpt_path, start_writing
from minillm.training.run_metrics import RunMetrics, write_run_metrics
from minillm.training.signals import StopOnSignal, TrainingInterrupted
from minillm.training.trainer import TrainerConfig, build_trainer

C = TypeVar("C")

# The data position is derived from the restored global step (LMDataModule.train_dataloader),
# so Lightning's warning that a mid-epoch resume replays data does not apply here.
warnings.filterwarnings("ignore", message=".*your dataloader is not resumable.*")


@dataclass
class RunConfig:
    """Top-level keys of conf/train.yaml (the groups have their own schemas)."""

    seed: int = 1234
    batch_size: int = 16
    num_workers: int = 0
    compile: bool = False  # torch.compile the model in place (keys stay clean)
    ckpt_path: str | None = None  # resume: a .ckpt file, a run directory, or "last"
    label_smoothing: float = 0.0
    on_nan: str = "stop"  # stop | skip
    cache_dir: str | None = None  # tokenizer/tokenized-data cache; default ~/.cache/minillm
    init_from: str | None = None  # fine-tune: weights + tokenizer of a .ckpt, run dir or export
    init_from_strict: bool = True  # false: load the tensors that match, list the others
    match_params: str | None = None  # a kind: size the MLP to its parameter count (compare)
    overwrite: bool = False  # start over in a run directory that holds checkpoints

    def __post_init__(self) -> None:
        checks.integer("seed", self.seed, 0)
        checks.integer("batch_size", self.batch_size)
        checks.integer("num_workers", self.num_workers, 0)
        checks.number("label_smoothing", self.label_smoothing, 0, 1, high_open=True)
        checks.choice("on_nan", self.on_nan, ("stop", "skip"))


# data.task -> the DataModule that reads that data config. Each takes
# (data: dict, *, max_len, batch_size, seed, num_workers, cache_dir, tokenizer, total_steps,
# accumulate) and after setup() has .tokenizer, .vocab_size, .num_train_tokens and
# .unigram_perplexity(); its batches are {"labels": ..., **model forward kwargs}.
DATA_MODULES: dict[str, type[L.LightningDataModule]] = {
    "lm": LMDataModule,
    "instructions": InstructionsDataModule,
    "translation": TranslationDataModule,
    "mqar": MQARDataModule,
    "digits": DigitsDataModule,
    "imagefolder": ImageFolderDataModule,
}

GROUPS = ("model", "attn", "mlp", "data", "trainer", "optim", "logger", "experiment")


def make_config(cls: type[C], values: dict[str, Any], where: str) -> C:
    """``cls(**values)`` with an error that names the config group and the valid keys."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ValueError(f"unknown {where} option(s) {unknown}; valid: {sorted(names)}")
    return cls(**values)


def train(
    cfg: dict[str, Any], run_dir: str | Path, overrides: list[str] | None = None
) -> dict[str, Any]:
    """Fit a model as ``cfg`` says; everything is written under ``run_dir``. Returns a summary.

    ``overrides`` are the command-line overrides ``cfg`` was composed from: with
    ``init_from`` they say which model fields the user set (``finetune.take_architecture``).
    None: the running Hydra app's, else none. A SIGTERM/SIGINT during fit saves last.ckpt,
    prints the summary and raises ``TrainingInterrupted`` (exit status 128 + signal).
    """
    run_dir = Path(run_dir)
    run = make_config(RunConfig, {k: v for k, v in cfg.items() if k not in GROUPS}, "top-level")
    trainer_cfg = make_config(TrainerConfig, cfg["trainer"], "trainer")
    optim_cfg = make_config(OptimConfig, cfg["optim"], "optim")
    logger_cfg = make_config(LoggerConfig, cfg["logger"], "logger")
    ckpt_path = resolve_ckpt_path(run.ckpt_path, run_dir)
    check_run_dir(run_dir, ckpt_path, run.overwrite)
    L.seed_everything(run.seed, workers=True, verbose=False)
    model_cfg, init = _model_config(cfg, run, overrides)
    tokenizer = init.tokenizer if init is not None else None  # never retrained
    if ckpt_path:
        tokenizer = _resume_tokenizer(ckpt_path, model_cfg, optim_cfg)

    memory_len = model_cfg.get("memory_len", 0)
    data = _data_module(cfg, run, trainer_cfg, model_cfg["max_len"], tokenizer, memory_len)
    data.setup("fit")
    module = _module(cfg, run, model_cfg, optim_cfg, trainer_cfg, data)
    if init is not None:
        for line in load_initial_weights(module.model, init, run.init_from_strict):
            rank_zero_info(line)
    stopper = StopOnSignal()
    logger = build_logger(logger_cfg, run_dir)
    trainer = build_trainer(
        trainer_cfg, run_dir, logger, [*data.callbacks(), RunMetrics(), stopper]
    )
    if trainer.is_global_zero:
        start_writing(run_dir, run.overwrite and not ckpt_path, module.tokenizer_json)
    _describe_run(module, data)
    with stopper.handling():
        trainer.fit(module, datamodule=data, ckpt_path=ckpt_path)
    summary = _summary(trainer, data, run_dir, validate=stopper.stopped_by is None)
    if stopper.stopped_by is not None:
        _interrupted(stopper.stopped_by, summary)
    return summary


def _model_config(
    cfg: dict[str, Any], run: RunConfig, overrides: list[str] | None
) -> tuple[dict[str, Any], InitialWeights | None]:
    """The run's model config (init_from strict: the checkpoint's) and init_from's weights."""
    model_cfg = {**cfg["model"], "attn": cfg["attn"]}
    if run.match_params:
        model_cfg = sizing.match_params(model_cfg, run.match_params)
    if not run.init_from:
        return model_cfg, None
    init = read_initial_weights(run.init_from)
    if run.init_from_strict:
        overrides = _command_line_overrides() if overrides is None else overrides
        model_cfg, taken = take_architecture(init, model_cfg, overrides)
        if taken:
            rank_zero_info(f"init_from: the checkpoint's model config is used: {describe(taken)}")
    return model_cfg, init


def _resume_tokenizer(ckpt_path: str, model_cfg: dict[str, Any], optim: OptimConfig) -> Tokenizer:
    """Check the run's config against the checkpoint's; its tokenizer. The weights are only
    memory-mapped here: they are read, and their checksums checked, when fit restores them."""
    ckpt = read_checkpoint(ckpt_path, verify=False, mmap=True)
    check_resume(ckpt_path, ckpt, model_cfg, dataclasses.asdict(optim))
    return Tokenizer.from_str(ckpt["tokenizer"])


def _module(
    cfg: dict[str, Any],
    run: RunConfig,
    model_cfg: dict[str, Any],
    optim_cfg: OptimConfig,
    trainer_cfg: TrainerConfig,
    data: L.LightningDataModule,
) -> LMModule:
    module = LMModule(
        model={**model_cfg, "vocab_size": data.vocab_size},
        optim=dataclasses.asdict(optim_cfg),
        total_steps=trainer_cfg.max_steps,
        label_smoothing=run.label_smoothing,
        compile=run.compile,
        on_nan=run.on_nan,
        seed=run.seed,
        data=cfg["data"],
    )
    module.tokenizer_json = data.tokenizer.to_str()
    return module


def _command_line_overrides() -> list[str]:
    """The running Hydra app's overrides; [] when ``train`` is called from Python."""
    from hydra.core.hydra_config import HydraConfig

    return list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []


def _data_module(
    cfg: dict[str, Any],
    run: RunConfig,
    trainer_cfg: TrainerConfig,
    max_len: int,
    tokenizer: Tokenizer | None,
    memory_len: Any = 0,
) -> L.LightningDataModule:
    """``memory_len`` > 0 (XL memory): the lm task reads its blocks as streams of segments."""
    task = cfg["data"].get("task", "lm")
    if task not in DATA_MODULES:
        raise ValueError(f"unknown data.task {task!r}; choose one of {sorted(DATA_MODULES)}")
    segments = {}
    if isinstance(memory_len, int) and memory_len > 0:  # else ModelConfig names the problem
        if task != "lm":
            raise ValueError(
                f"model.memory_len={memory_len} reads the data as streams of consecutive "
                f"segments: it needs data.task=lm (got {task!r}); set model.memory_len=0"
            )
        segments = {"segments": True}
    return DATA_MODULES[task](
        cfg["data"],
        max_len=max_len,
        batch_size=run.batch_size,
        seed=run.seed,
        num_workers=run.num_workers,
        cache_dir=run.cache_dir,
        tokenizer=tokenizer,
        total_steps=trainer_cfg.max_steps,
        accumulate=trainer_cfg.accumulate_grad_batches,
        **segments,
    )


def _describe_run(module: LMModule, data: L.LightningDataModule) -> None:
    mlp = module.model_cfg.mlp  # "swiglu" or {"kind": ...} (the mlp group)
    rank_zero_info(
        f"model: {module.model_cfg.arch}, attn={module.model_cfg.attn_label}, "
        f"mlp={mlp if isinstance(mlp, str) else mlp['kind']}, "
        f"{module.model.num_params() / 1e6:.2f}M parameters; "
        f"data: {data.num_train_tokens / 1e6:.2f}M training tokens, vocab {data.vocab_size}"
    )


def _interrupted(signum: int, summary: dict[str, Any]) -> None:
    stop = TrainingInterrupted(signum, summary)
    rank_zero_info(
        f"{stop}: {summary['last_ckpt']} holds it. Resume with the same command plus "
        f"ckpt_path=last hydra.run.dir={summary['run_dir']}"
    )
    raise stop


def _validate_final_model(trainer: L.Trainer, data: L.LightningDataModule) -> None:
    """Validate the last step if no validation landed on it, and keep best.ckpt honest."""
    module = trainer.lightning_module
    if trainer.fast_dev_run or module.last_val_step == trainer.global_step:
        return
    trainer.validate(module, datamodule=data, verbose=False)
    best = trainer.checkpoint_callbacks[0]
    score = trainer.callback_metrics["val/loss"]
    if best.best_model_score is None or score < best.best_model_score:
        path = Path(best.dirpath) / f"{best.filename}.ckpt"
        trainer.save_checkpoint(path, weights_only=False)  # full state, as ModelCheckpoint
        best.best_model_path, best.best_model_score = str(path), score


def _summary(
    trainer: L.Trainer, data: L.LightningDataModule, run_dir: Path, validate: bool = True
) -> dict[str, Any]:
    if validate:  # not after a signal: the user wants the process to end
        _validate_final_model(trainer, data)
    ppl = trainer.callback_metrics.get("val/ppl")
    summary = {
        "run_dir": str(run_dir),
        "best_ckpt": trainer.checkpoint_callbacks[0].best_model_path or None,
        "last_ckpt": trainer.checkpoint_callbacks[1].last_model_path or None,
        "val_ppl": float(ppl) if ppl is not None else math.nan,
        "unigram_ppl": data.unigram_perplexity(),
        "global_step": trainer.global_step,
    }
    write_run_metrics(trainer, data, summary)  # <run>/metrics.json for the comparison report
    rank_zero_info(
        f"\nrun directory:  {summary['run_dir']}\n"
        f"checkpoints:    {summary['best_ckpt']} (best), {summary['last_ckpt']} (last)\n"
        f"validation perplexity: {summary['val_ppl']:.2f} "
        f"(unigram baseline: {summary['unigram_ppl']:.2f}) after {trainer.global_step} steps"
    )
    return summary
