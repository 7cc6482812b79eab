"""RunMetrics' clock: training and validation time add up to the whole fit, stretch by
stretch, with a fake clock that only moves inside training and validation steps."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from minillm.training.run_metrics import RunMetrics

TRAIN_TICK, VAL_TICK = 1.0, 10.0


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class Ticking(L.LightningModule):
    """Each training step moves the clock 1 s, each validation batch 10 s."""

    def __init__(self, clock: Clock) -> None:
        super().__init__()
        self.clock = clock
        self.w = torch.nn.Parameter(torch.zeros(1))

    def training_step(self, batch, i):
        self.clock.now += TRAIN_TICK
        return (self.w - batch["labels"].float()).pow(2).mean()

    def validation_step(self, batch, i):
        self.clock.now += VAL_TICK

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def loader(n: int) -> DataLoader:
    return DataLoader([{"labels": torch.ones(3)}] * n, batch_size=1)


@pytest.mark.parametrize("val_every", [2, 3])
def test_train_and_validation_time_cover_every_stretch_of_the_fit(val_every, tmp_path):
    clock = Clock()
    timer = RunMetrics(clock=clock)
    steps, val_batches = 7, 2
    trainer = L.Trainer(
        max_steps=steps, val_check_interval=val_every, limit_val_batches=val_batches,
        num_sanity_val_steps=0, callbacks=[timer], logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
    )  # fmt: skip
    trainer.fit(Ticking(clock), loader(steps), loader(val_batches))
    n_validations = steps // val_every
    assert timer.train_s == steps * TRAIN_TICK  # every training stretch, not just the first
    assert timer.val_s == n_validations * val_batches * VAL_TICK
    assert timer.tokens == steps * 3
    assert timer.elapsed() == clock.now
