"""The LightningModule: builds the model from plain-dict hyperparameters, so a checkpoint loads
without Hydra (``minillm.load_checkpoint``) and resumes with Lightning.

Exact resume: the data position follows the global step (``ResumableBatchSampler``) and so
does the random state: every micro-batch reseeds torch from (seed, rank, step, micro-batch),
so dropout draws the same masks whether or not the run was interrupted, whatever else
(validation, dataloader workers) consumed random numbers in between.
"""

from __future__ import annotations

import math
from typing import Any

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch.plugins.precision import MixedPrecision
from torch import Tensor

from minillm.models import ModelConfig, build_model
from minillm.training.optim import OptimConfig, build_optimizer, warmup_cosine


class LMModule(L.LightningModule):
    """Trains any minillm model on batches ``{"labels": (B, T), **model inputs}``.

    Labels of -100 are ignored (padding, prompt tokens). ``model``/``optim`` are plain dicts;
    the tokenizer JSON travels in the checkpoint (not in hparams: it is large). ``data`` is
    the run's data config, kept so ``scripts/evaluate.py`` can default to its validation split.

    A non-finite loss or gradient (checked once a step, after the DDP all-reduce, so every
    rank decides alike) stops the run before the update (``on_nan="stop"``) or drops that
    update (``"skip"``: no parameter changes, the step and data position still advance).
    Weights that are not finite are never written to a checkpoint.
    """

    def __init__(
        self,
        model: dict[str, Any],
        optim: dict[str, Any] | None = None,
        total_steps: int = 1000,
        label_smoothing: float = 0.0,
        compile: bool = False,
        on_nan: str = "stop",
        seed: int = 1234,
        data: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if on_nan not in ("stop", "skip"):
            raise ValueError(f"on_nan={on_nan!r}; choose 'stop' or 'skip'")
        self.save_hyperparameters()
        self.model_cfg = ModelConfig.from_dict(model)
        self.model = build_model(self.model_cfg)
        self.optim_cfg = OptimConfig(**(optim or {}))
        self.tokenizer_json: str | None = None
        self.last_val_step = -1  # global step of the latest validation
        self._last_loss = torch.zeros(())  # the latest training loss, for messages only
        self._val_sums: list[Tensor] = []
        if compile:
            self.model.compile()  # in place: state-dict keys stay clean

    def forward(self, **inputs: Tensor) -> Tensor:
        return self.model(**inputs)

    def _loss_sum(self, batch: dict[str, Tensor], smoothing: float) -> tuple[Tensor, Tensor]:
        """Summed token loss and the number of scored tokens."""
        labels = batch["labels"]
        logits = self.model(**{k: v for k, v in batch.items() if k != "labels"})  # (B, T, V)
        loss = F.cross_entropy(
            logits.flatten(0, 1).float(),
            labels.flatten(),
            ignore_index=-100,
            reduction="sum",
            label_smoothing=smoothing,
        )
        return loss, (labels != -100).sum()

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        micro = batch_idx % self.trainer.accumulate_grad_batches
        torch.manual_seed(step_seed(self.hparams.seed, self.global_rank, self.global_step, micro))

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        loss_sum, n = self._loss_sum(batch, self.hparams.label_smoothing)
        loss = loss_sum / n.clamp(min=1)
        self._last_loss = loss.detach()
        self.log("train/loss", loss, prog_bar=True)
        # A non-finite loss is still back-propagated (times NaN, so that every gradient is
        # NaN): the all-reduce then carries it to every rank, and on_before_optimizer_step
        # stops or skips on all of them alike. Returning None would leave the other ranks
        # waiting in the all-reduce.
        return loss * torch.where(loss.isfinite(), 1.0, torch.nan)

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        grads = [p.grad for p in self.parameters() if p.grad is not None]
        plugin = self.trainer.precision_plugin
        if not grads or (isinstance(plugin, MixedPrecision) and plugin.scaler is not None):
            return  # fp16's GradScaler skips steps with inf gradients itself
        if torch.nn.utils.get_total_norm(grads).isfinite():  # the one host sync a step
            return
        step, loss = self.global_step, self._last_loss.item()
        what = f"loss ({loss})" if not math.isfinite(loss) else f"gradients (loss {loss:.4g})"
        if self.hparams.on_nan == "skip":
            self.print(f"warning: non-finite {what} at step {step}; skipping this update")
            optimizer.zero_grad(set_to_none=True)  # AdamW leaves grad-less parameters alone
            return
        raise FloatingPointError(
            f"non-finite {what} at step {step}; training stopped before the bad update. "
            f"{self._last_good_checkpoint()} Resume from it with a lower optim.lr, or pass "
            "on_nan=skip to skip such updates."
        )

    def _last_good_checkpoint(self) -> str:
        callbacks = self.trainer.checkpoint_callbacks
        paths = [cb.last_model_path for cb in callbacks] + [cb.best_model_path for cb in callbacks]
        path = next((p for p in paths if p), None)
        return f"Last good checkpoint: {path}." if path else "No checkpoint was saved yet."

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        loss_sum, n = self._loss_sum(batch, 0.0)
        self._val_sums.append(torch.stack([loss_sum.detach(), n.to(loss_sum.dtype)]))

    def on_validation_epoch_end(self) -> None:
        if not self._val_sums:
            return
        total = torch.stack(self._val_sums).sum(0)
        self._val_sums.clear()
        total = self.trainer.strategy.reduce(total, reduce_op="sum")  # over ranks
        val_loss = total[0] / total[1].clamp(min=1)
        self.last_val_step = self.global_step
        self.log("val/loss", val_loss, prog_bar=True, sync_dist=False)
        self.log("val/ppl", val_loss.exp(), prog_bar=True, sync_dist=False)

    def configure_optimizers(self) -> dict[str, Any]:
        opt = build_optimizer(self.model, self.optim_cfg)
        cfg, total = self.optim_cfg, self.hparams.total_steps
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda step: warmup_cosine(step, cfg.warmup_steps, total, cfg.min_lr_ratio)
        )
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        bad = [name for name, p in self.named_parameters() if not p.isfinite().all()]
        if bad:  # raising here keeps the previous file: checkpoints are written atomically
            raise FloatingPointError(
                f"refusing to save a checkpoint at step {self.global_step}: parameters {bad[:4]}"
                f"{' ...' if len(bad) > 4 else ''} are not finite. {self._last_good_checkpoint()}"
            )
        checkpoint["tokenizer"] = self.tokenizer_json

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.tokenizer_json = checkpoint.get("tokenizer", self.tokenizer_json)


def step_seed(seed: int, rank: int, step: int, micro_batch: int) -> int:
    """A well-mixed 64-bit seed that depends only on the training position."""
    return int(
        np.random.SeedSequence([seed, rank, step, micro_batch]).generate_state(1, np.uint64)[0]
    )
