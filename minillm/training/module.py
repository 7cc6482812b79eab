"""The LightningModule: builds the model from plain-dict hyperparameters, so a checkpoint loads
without Hydra (``minillm.load_checkpoint``) and resumes with Lightning.

Exact resume: the data position follows the global step (``ResumableBatchSampler``) and so
does the random state: every micro-batch reseeds torch from (seed, rank, step, micro-batch),
so dropout draws the same masks whether or not the run was interrupted, whatever else
(validation, dataloader workers) consumed random numbers in between.

The loss is ``linear_cross_entropy`` over the model's pre-head states: the (B, T, vocab) logits
are never held whole (with a 50k vocabulary they are most of a step's memory).

Transformer-XL (``model.memory_len`` > 0): batches are consecutive segments of parallel streams
with a per-row ``segment`` index (``SegmentBatchSampler``); the module keeps the streams'
memory between steps (a plain attribute, cleared per row where ``segment`` is 0) and saves it
in the checkpoint, so a resumed run continues it exactly. Validation keeps a memory of its
own. Under DDP each rank keeps its rows' memory, and only rank 0's is saved: resume is exact
on one process only.
"""

from __future__ import annotations

import math
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.plugins.precision import FSDPPrecision, MixedPrecision
from lightning.pytorch.utilities import GradClipAlgorithmType
from torch import Tensor
from torch.distributed.fsdp import FullyShardedDataParallel

from minillm.models import ModelConfig, build_model
from minillm.models.decoder import SegmentMemory
from minillm.models.linear_cross_entropy import linear_cross_entropy
from minillm.models.moe import MoEMLP
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

    ``compile=True`` compiles ``model.hidden_states`` (``hidden_states_with_memory`` with XL
    memory), the part of the model that training runs (the LM head is inside the fused
    loss); the compiled function is a plain attribute, so state-dict keys stay clean. The
    fused loss stays eager: it is two matmuls a chunk.
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
        self._moe = [m for m in self.model.modules() if isinstance(m, MoEMLP)]
        self._hidden_states = self.model.hidden_states
        if self.model_cfg.memory_len:
            self._hidden_states = self.model.hidden_states_with_memory
        self._memory: dict[str, SegmentMemory | None] = {"train": None, "val": None}
        if compile:
            self._hidden_states = torch.compile(self._hidden_states)

    def forward(self, **inputs: Tensor) -> Tensor:
        return self.model(**inputs)

    def _loss_sum(
        self, batch: dict[str, Tensor], smoothing: float, stream: str = "train"
    ) -> tuple[Tensor, Tensor]:
        """Summed token loss and the number of scored tokens.

        Equals ``F.cross_entropy(self.model(**inputs).float(), labels, ignore_index=-100,
        reduction="sum", label_smoothing=smoothing)`` (the tests hold them together). With XL
        memory, ``stream`` ("train" or "val") names the memory the batch continues.
        """
        labels = batch["labels"]
        if self.model_cfg.memory_len:
            hidden = self._hidden_with_memory(batch, stream)
        else:
            hidden = self._hidden_states(**{k: v for k, v in batch.items() if k != "labels"})
        loss = linear_cross_entropy(
            hidden.flatten(0, 1),  # (B * T, dim)
            self.model.lm_head.weight,
            labels.flatten(),
            ignore_index=-100,
            label_smoothing=smoothing,
        )
        return loss, (labels != -100).sum()

    def _hidden_with_memory(self, batch: dict[str, Tensor], stream: str) -> Tensor:
        """Hidden states of the next segments of ``stream``'s streams; keeps the new memory.
        Rows at ``segment`` 0 start a stream: their memory is cleared (no host sync)."""
        ids, segment = batch["input_ids"], batch["segment"]
        memory = self._memory[stream]
        if memory is None or memory.mask.shape[0] != ids.shape[0]:
            memory = self.model.init_memory(ids.shape[0])
        memory = memory.to(ids.device).clear(segment == 0)
        hidden, self._memory[stream] = self._hidden_states(ids, memory)
        return hidden

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        micro = batch_idx % self.trainer.accumulate_grad_batches
        torch.manual_seed(step_seed(self.hparams.seed, self.global_rank, self.global_step, micro))

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        loss_sum, n = self._loss_sum(batch, self.hparams.label_smoothing)
        loss = loss_sum / n.clamp(min=1)
        self.log("train/loss", loss, prog_bar=True)
        if self._moe:
            loss = loss + self._moe_aux_loss()
        self._last_loss = loss.detach()
        # A non-finite loss is still back-propagated (times NaN, so that every gradient is
        # NaN): the all-reduce then carries it to every rank, and on_before_optimizer_step
        # stops or skips on all of them alike. Returning None would leave the other ranks
        # waiting in the all-reduce.
        return loss * torch.where(loss.isfinite(), 1.0, torch.nan)

    def _moe_aux_loss(self) -> Tensor:
        """The weighted router losses of every MoE layer (set by the forward just run), to add
        to the training loss; logs them unweighted (means over layers), the per-expert load
        (fraction of routed slots, mean over layers), its min and max over layers and experts,
        and the fraction of dropped tokens."""
        loads = torch.stack([m.load for m in self._moe])  # (layers, experts)
        metrics = {
            "train/aux_loss": torch.stack([m.balance_loss for m in self._moe]).mean(),
            "train/z_loss": torch.stack([m.z_loss for m in self._moe]).mean(),
            "moe/load_min": loads.min(),
            "moe/load_max": loads.max(),
            "moe/dropped": torch.tensor(sum(m.dropped for m in self._moe) / len(self._moe)),
            **{f"moe/load_{i}": load for i, load in enumerate(loads.mean(0))},
        }
        for name, value in metrics.items():
            self.log(name, value.detach())
        return torch.stack([m.aux_loss for m in self._moe]).sum()

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Clip to ``trainer.gradient_clip_val``, log ``train/grad_norm``, stop or skip if not
        finite: one total norm serves all three, and its finiteness is the one host sync."""
        norm = self._clip_gradients(optimizer)
        if norm is None:
            return
        self.log("train/grad_norm", norm)
        if self._grad_scaler() is not None:
            return  # fp16's GradScaler skips steps with inf gradients itself
        if norm.isfinite():  # the one host sync a step
            return
        step, loss = self.global_step, self._last_loss.item()
        what = f"loss ({loss})" if not math.isfinite(loss) else f"gradients (loss {loss:.4g})"
        if self.hparams.on_nan == "skip":
            self.print(f"warning: non-finite {what} at step {step}; skipping this update")
            optimizer.zero_grad(set_to_none=True)  # AdamW leaves grad-less parameters alone
            return
        raise FloatingPointError(
            f"non-finite {what} at step {step}; training stopped before the bad update. "
            f"{self._last_good_checkpoint()} Start from it with init_from=<that checkpoint> and "
            "a lower optim.lr (a resume keeps the saved optimizer), or pass on_nan=skip to skip "
            "such updates."
        )

    def configure_gradient_clipping(
        self,
        optimizer: torch.optim.Optimizer,
        gradient_clip_val: float | None = None,
        gradient_clip_algorithm: str | None = None,
    ) -> None:
        """Nothing to do: ``on_before_optimizer_step`` has clipped already.

        Lightning's own clipping refuses fused AdamW under AMP (it assumes a GradScaler even
        for bf16) and norm clipping under FSDP, and computes a second norm. Clipping here,
        fused AdamW stays: on one CPU thread its clip + check + step took 4.1 ms against
        10.9 ms for foreach AdamW with Lightning's clipping (bf16 autocast, 4 x 128 model).
        """
        if gradient_clip_val and gradient_clip_algorithm == GradClipAlgorithmType.VALUE:
            raise ValueError("LMModule clips by norm only; drop gradient_clip_algorithm='value'")

    def _clip_gradients(self, optimizer: torch.optim.Optimizer) -> Tensor | None:
        """The total gradient norm before clipping (None: no gradients); clips in place.

        Under FSDP each rank holds a shard of the gradients: FSDP's own ``clip_grad_norm_``
        all-reduces the norm, so every rank clips and decides on NaN alike. fp16 gradients
        are still scaled when AdamW is fused (it would unscale inside ``step``): unscale
        first, and the GradScaler tells the fused step so.
        """
        scaler = self._grad_scaler()
        if scaler is not None and optimizer.defaults.get("fused"):
            scaler.unscale_(optimizer)
        max_norm = self.trainer.gradient_clip_val or math.inf
        wrapped = self.trainer.strategy.model
        if isinstance(wrapped, FullyShardedDataParallel):
            return wrapped.clip_grad_norm_(max_norm)
        params = [p for p in self.parameters() if p.grad is not None]
        if not params:
            return None
        norm = torch.nn.utils.get_total_norm([p.grad for p in params])
        if max_norm < math.inf:
            torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm)  # no host sync
        return norm

    def _grad_scaler(self) -> torch.amp.GradScaler | None:
        """fp16's GradScaler (bf16 and fp32 have none)."""
        plugin = self.trainer.precision_plugin
        return plugin.scaler if isinstance(plugin, (MixedPrecision, FSDPPrecision)) else None

    def _last_good_checkpoint(self) -> str:
        callbacks = self.trainer.checkpoint_callbacks
        paths = [cb.last_model_path for cb in callbacks] + [cb.best_model_path for cb in callbacks]
        path = next((p for p in paths if p), None)
        return f"Last good checkpoint: {path}." if path else "No checkpoint was saved yet."

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        loss_sum, n = self._loss_sum(batch, 0.0, "val")
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
        memory = self._memory["train"]
        if memory is not None:  # XL: the training streams' memory, for an exact resume
            checkpoint["xl_memory"] = {"states": memory.states, "mask": memory.mask}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.tokenizer_json = checkpoint.get("tokenizer", self.tokenizer_json)
        if "xl_memory" in checkpoint and self.model_cfg.memory_len:
            saved = checkpoint["xl_memory"]
            self._memory["train"] = SegmentMemory(list(saved["states"]), saved["mask"])


def step_seed(seed: int, rank: int, step: int, micro_batch: int) -> int:
    """A well-mixed 64-bit seed that depends only on the training position."""
    return int(
        np.random.SeedSequence([seed, rank, step, micro_batch]).generate_state(1, np.uint64)[0]
    )
