"""The LightningModule: builds the model from plain-dict hyperparameters, so a checkpoint loads
without Hydra (``minillm.load_checkpoint``) and resumes with Lightning."""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor

from minillm.models import ModelConfig, build_model
from minillm.training.optim import OptimConfig, build_optimizer, warmup_cosine


class LMModule(L.LightningModule):
    """Trains any minillm model on batches ``{"labels": (B, T), **model inputs}``.

    Labels of -100 are ignored (padding, prompt tokens). ``model``/``optim`` are plain dicts;
    the tokenizer JSON travels in the checkpoint (not in hparams: it is large).
    """

    def __init__(
        self,
        model: dict[str, Any],
        optim: dict[str, Any] | None = None,
        total_steps: int = 1000,
        label_smoothing: float = 0.0,
        compile: bool = False,
        on_nan: str = "stop",
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

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor | None:
        loss_sum, n = self._loss_sum(batch, self.hparams.label_smoothing)
        loss = loss_sum / n.clamp(min=1)
        if not torch.isfinite(loss):  # one host sync a step: never step on NaN
            return self._non_finite_loss(loss)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def _non_finite_loss(self, loss: Tensor) -> None:
        step = self.global_step
        if self.hparams.on_nan == "skip":
            self.print(f"warning: loss is {loss.item()} at step {step}; skipping this batch")
            return None
        last = getattr(self.trainer.checkpoint_callback, "last_model_path", "") or "none yet"
        raise FloatingPointError(
            f"loss became {loss.item()} at step {step}; training stopped before the bad update. "
            f"Last good checkpoint: {last}. Resume from it with a lower optim.lr, or pass "
            "on_nan=skip to skip such batches."
        )

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
        checkpoint["tokenizer"] = self.tokenizer_json

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.tokenizer_json = checkpoint.get("tokenizer", self.tokenizer_json)
