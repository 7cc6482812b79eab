"""SIGTERM / SIGINT during training: finish the step, save last.ckpt, stop, exit 128 + signal.

A scheduler's SIGTERM (preemption, ``scancel``, ``kill``) or a Ctrl-C then costs at most the
step under way: the run resumes from that ``last.ckpt`` exactly as from any other
(``ckpt_path=last``). A second signal of the same kind kills the process at once.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class TrainingInterrupted(SystemExit):
    """Raised by ``train()`` after a signal stopped the run and its summary was printed.

    A ``SystemExit`` with code 128 + the signal number (143 for SIGTERM, 130 for SIGINT),
    the status a shell reports for a process the signal ended. ``summary`` is the run's.
    """

    def __init__(self, signum: int, summary: dict[str, Any]) -> None:
        super().__init__(128 + signum)
        self.signum, self.summary = signum, summary

    def __str__(self) -> str:
        name = signal.Signals(self.signum).name
        return f"training stopped by {name} at step {self.summary['global_step']}"


class StopOnSignal(Callback):
    """Turns SIGTERM/SIGINT into "save last.ckpt at the next step boundary, then stop".

    The handler only records the signal. ``on_train_batch_end`` acts on it after an
    optimizer step (not in the middle of gradient accumulation); with several processes
    the flag is reduced over ranks at every step, so all of them stop at the same step even
    when only one got the signal. Then it saves last.ckpt (that file only: best.ckpt is not
    touched, and no validation runs) and stops the trainer. Handlers are installed at
    ``on_train_start`` (after Lightning installs its own SIGTERM handler, which would stop
    without saving) and the ones found on entering ``handling()`` are restored when it exits.
    """

    def __init__(self) -> None:
        self.received: int | None = None  # the first signal seen
        self.stopped_by: int | None = None  # the signal the run stopped on

    @contextmanager
    def handling(self) -> Iterator[StopOnSignal]:
        """Wrap ``trainer.fit``: the process's handlers are as before once it returns."""
        saved = {s: signal.getsignal(s) for s in SIGNALS}
        try:
            yield self
        finally:
            if threading.current_thread() is threading.main_thread():
                for signum, handler in saved.items():
                    signal.signal(signum, handler)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if threading.current_thread() is threading.main_thread():
            for signum in SIGNALS:
                signal.signal(signum, self._record)

    def _record(self, signum: int, frame: FrameType | None) -> None:
        if self.received is None:
            self.received = signum
        signal.signal(signum, signal.SIG_DFL)  # a second one ends the process at once

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, idx: int
    ) -> None:
        if (idx + 1) % trainer.accumulate_grad_batches:
            return  # mid-accumulation: no optimizer step yet
        stop = self.received is not None
        if trainer.world_size > 1:
            stop = trainer.strategy.reduce_boolean_decision(stop, all=False)
        if not stop:
            return
        self.stopped_by = self.received or signal.SIGTERM  # another rank's signal
        if not trainer.fast_dev_run:
            last = next(cb for cb in trainer.checkpoint_callbacks if cb.save_last)
            path = Path(last.dirpath) / f"{last.CHECKPOINT_NAME_LAST}{last.FILE_EXTENSION}"
            trainer.save_checkpoint(path)
            last.last_model_path = str(path)
        trainer.should_stop = True
        trainer.limit_val_batches = 0  # Lightning validates before it stops: skip that
