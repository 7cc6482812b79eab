"""``val/bleu``: greedy BLEU of a fixed sample of validation pairs after every validation."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import lightning as L
import sacrebleu
from lightning.pytorch.callbacks import Callback

from minillm.generation.seq2seq import translate


class ValidationBLEU(Callback):
    """Decodes ``pairs`` (source, reference) greedily and logs sacrebleu's corpus BLEU.

    The sample is fixed, so the curve compares like with like across steps. Every rank decodes
    the whole sample (the same numbers everywhere; no strings to gather), so under DDP it
    costs one rank's time, not less.
    """

    def __init__(
        self,
        pairs: Sequence[tuple[str, str]],
        tokenizer: Any,
        batch_size: int = 64,
        max_new_tokens: int | None = None,
    ) -> None:
        self.sources = [src for src, _ in pairs]
        self.references = [tgt for _, tgt in pairs]
        self.tokenizer = tokenizer
        self.batch_size, self.max_new_tokens = batch_size, max_new_tokens

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or not self.sources:
            return
        hypotheses = translate(
            pl_module.model,
            self.tokenizer,
            self.sources,
            num_beams=1,
            max_new_tokens=self.max_new_tokens,
            batch_size=self.batch_size,
        )
        bleu = sacrebleu.corpus_bleu(hypotheses, [self.references])
        pl_module.log("val/bleu", bleu.score, prog_bar=True, sync_dist=False)
