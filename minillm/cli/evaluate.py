"""``python scripts/evaluate.py`` / ``minillm-evaluate``: perplexity and bits per byte
(``metric=ppl``), BLEU and chrF (``metric=bleu``) or image classification accuracy
(``metric=accuracy``) of a checkpoint or an exported folder.

    minillm-evaluate ckpt=outputs/<run>/checkpoints/best.ckpt        # its held-out documents
    minillm-evaluate ckpt=... data=text 'data.files=[notes.txt]' stride=64    # your documents
    minillm-evaluate ckpt=... data=hf data.name=<save_to_disk folder> data.split=test
    minillm-evaluate metric=bleu ckpt=... data.test_file=test.jsonl num_beams=5
    minillm-evaluate metric=accuracy ckpt=outputs/<run>/checkpoints/best.ckpt  # its test split
    minillm-evaluate ckpt='[rope/best.ckpt,alibi/best.ckpt]' contexts=[256,512,1024,2048]

``contexts=[...]`` (metric=ppl) scores each checkpoint of ``ckpt`` (one or a list) with sliding
windows of each length, on its own held-out documents (or ``data=``'s), and writes the rows
(``out``, default ``<first checkpoint>.contexts.json``) with a table (.md) and a chart (.png)
of perplexity against context beside it: ``minillm.evaluation.extrapolation``.

Which documents ``metric=ppl`` scores:

- ``data=<option>`` (``conf/data/<option>.yaml``, the group train uses, so ``data.*`` keys
  are typed and checked): all of them (``split=all``) unless ``split=train|validation``.
- no ``data=``: the checkpoint's own data config with the ``data.<key>=`` given put over it,
  and by default its validation split, the documents training held out. An exported folder
  carries no data config, so it needs ``data=``.
- ``data=instructions``: each record is one document, the template-formatted prompt followed
  by the response, and every token is scored, the prompt's too. It is the perplexity of the
  text, not the fine-tuning val loss, which counts response tokens only.
- ``data=translation`` is scored with ``metric=bleu`` only.

``metric=bleu`` reads the test set from the ``data.*`` keys given (``data.test_file`` and
optionally ``data.src_field``, ``data.tgt_field``, ``data.format``, or ``data=translation``);
``minillm.evaluation.bleu.run_bleu`` does the work.

``metric=accuracy`` (``model.arch=vit``) reports top-1 and top-5 accuracy on ``split=test``
(default; or ``train``, ``validation``) of the checkpoint's own image data config, the same
seeded split training used, with any ``data.<key>=`` put over it (``data.path=`` another folder
with the same classes). ``data=digits`` or ``data=imagefolder`` give a whole data config
instead (imagefolder then needs ``data.image_size=`` and ``data.channels=``: no model group
here to take them from). Results are printed and written as JSON
(``out``, default ``<checkpoint>.<metric>.json`` beside the checkpoint or folder).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from minillm import checks
from minillm.cli.app import hydra_app
from minillm.cli.devices import resolve_device
from minillm.cli.evaluate_images import image_data_config, run_accuracy
from minillm.cli.evaluate_ppl import contexts_out, run_ppl
from minillm.data.translation import TranslationDataConfig
from minillm.evaluation.bleu import BleuOptions, run_bleu
from minillm.evaluation.documents import data_config
from minillm.evaluation.perplexity import SCORERS

PPL_ONLY = ("split", "mode", "window", "stride", "contexts")
BLEU_ONLY = ("num_beams", "length_penalty", "max_new_tokens", "output", "on_malformed")
BLEU_DATA_KEYS = ("test_file", "src_field", "tgt_field", "format")  # what run_bleu reads
# each metric's own options: those of another metric must keep their defaults
OWN_OPTIONS = {"ppl": PPL_ONLY, "bleu": BLEU_ONLY, "accuracy": ("split",)}
SPLITS = {"ppl": ("all", "train", "validation"), "accuracy": ("train", "validation", "test")}


@dataclass
class EvaluateConfig:
    """conf/evaluate.yaml: the options of every metric; those of another metric must keep
    their defaults (a ``stride`` given with ``metric=bleu`` is a mistake, not ignored)."""

    metric: str = "ppl"  # ppl | bleu | accuracy
    ckpt: Any = MISSING  # a .ckpt file or an exported folder; with contexts=, a list of them
    data: dict[str, Any] = field(default_factory=dict)  # data=<option> or data.<key>=...
    device: str = "auto"  # auto | cpu | cuda | cuda:1 ...
    out: str | None = None  # results JSON; default <checkpoint>.<metric>.json beside it
    batch_size: int | None = None  # windows (ppl: 16), sentences (bleu: 32), images (256)
    # metric=ppl and metric=accuracy
    split: str | None = None  # ppl: all|train|validation; accuracy: train|validation|test
    # metric=ppl
    # window (sliding window, every kind) | recurrent (one cached pass) | memory (segments of
    # `window` tokens carrying the XL memory: a model trained with model.memory_len > 0)
    mode: str = "window"
    window: int | None = None  # tokens of context; default the model's max_len
    stride: int | None = None  # tokens a window advances (or a recurrent call reads); window//2
    contexts: list[int] = field(default_factory=list)  # windows to score (extrapolation)
    # metric=bleu
    num_beams: int = BleuOptions.num_beams
    length_penalty: float = BleuOptions.length_penalty
    max_new_tokens: int | None = None  # default 1.5 x source tokens + 10
    output: str | None = None  # hypotheses file; default beside the checkpoint
    on_malformed: str = BleuOptions.on_malformed  # fail | skip (a malformed test-set line)

    def __post_init__(self) -> None:
        checks.choice("metric", self.metric, METRICS)
        if self.metric in SPLITS:
            checks.choice("split", self.split, (None, *SPLITS[self.metric]))
        checks.choice("mode", self.mode, sorted(SCORERS))
        for key in ("batch_size", "window", "stride", "max_new_tokens"):
            checks.integer(key, getattr(self, key), optional=True)
        checks.integer("num_beams", self.num_beams)
        checks.number("length_penalty", self.length_penalty)
        checks.choice("on_malformed", self.on_malformed, ("fail", "skip"))
        if self.window and self.stride and self.stride > self.window:
            raise ValueError(f"stride={self.stride}: must be at most window={self.window}")
        self._check_contexts()
        resolve_device(self.device)
        self._check_other_metric_untouched()

    def _check_contexts(self) -> None:
        for context in self.contexts:
            checks.integer("contexts", context, 2)
        if self.contexts and (self.window or self.mode != "window"):
            raise ValueError(
                "contexts= sets the window of each score (mode=window): drop window= and mode="
            )
        if self.contexts and self.stride and self.stride > min(self.contexts):
            raise ValueError(f"stride={self.stride}: must be at most the shortest context")
        if not isinstance(self.ckpt, str) and not self.contexts:
            raise ValueError(
                f"ckpt={self.ckpt!r}: a list of checkpoints is scored only with contexts=[...]; "
                "give one checkpoint, or contexts="
            )

    @property
    def checkpoints(self) -> list[str]:
        return [self.ckpt] if isinstance(self.ckpt, str) else [str(c) for c in self.ckpt]

    def _check_other_metric_untouched(self) -> None:
        mine = OWN_OPTIONS[self.metric]
        other = dict.fromkeys(k for keys in OWN_OPTIONS.values() for k in keys if k not in mine)
        defaults = {
            f.name: f.default_factory() if f.default is dataclasses.MISSING else f.default
            for f in dataclasses.fields(self)
            if f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING
        }
        changed = [k for k in other if getattr(self, k) != defaults[k]]
        if changed:
            raise ValueError(
                f"{changed[0]}={getattr(self, changed[0])!r} is not an option of "
                f"metric={self.metric} (its own: {', '.join(mine)}); drop it or change metric="
            )


def validate(cfg: dict[str, Any]) -> EvaluateConfig:
    """The composed config as ``EvaluateConfig``, its data keys checked as far as they can be
    without reading the checkpoint (the checkpoint's own data config is checked when read)."""
    args = EvaluateConfig(**cfg)
    if args.metric == "bleu":
        BleuOptions.parse(bleu_options(args, "cpu"))
    elif args.metric == "accuracy":
        if "task" in args.data:
            image_data_config(args.data)
    elif "task" in args.data:  # data=<option>: a whole data config
        data_config(args.data)
    return args


def bleu_options(args: EvaluateConfig, device: str) -> dict[str, Any]:
    """``run_bleu``'s options: the test set from ``data``, the rest from the command."""
    data = args.data
    if "task" in data and data["task"] != "translation":
        raise ValueError(f"metric=bleu reads a translation test set, not data.task={data['task']}")
    if "task" in data:  # data=translation: its keys checked by its schema
        TranslationDataConfig.coerce(data)
    unknown = sorted(set(data) - set(BLEU_DATA_KEYS)) if "task" not in data else []
    if unknown:
        raise ValueError(
            f"data.{unknown[0]} is not a metric=bleu option; the test set takes "
            f"{', '.join(f'data.{k}' for k in BLEU_DATA_KEYS)}"
        )
    options = {k: getattr(args, k) for k in ("ckpt", *BLEU_ONLY)}
    batch_size = args.batch_size or BleuOptions.batch_size
    test_set = {k: data[k] for k in BLEU_DATA_KEYS if data.get(k) is not None}
    return {**options, "data": test_set, "device": device, "batch_size": batch_size}


METRICS = {
    "ppl": run_ppl,
    "bleu": lambda args, device: run_bleu(bleu_options(args, device)),
    "accuracy": run_accuracy,
}


def evaluate(args: EvaluateConfig) -> dict[str, Any]:
    """Score, print, and write the results JSON; returns what was written."""
    summary = METRICS[args.metric](args, str(resolve_device(args.device)))
    ckpt = Path(args.checkpoints[0])
    out = Path(args.out or ckpt.with_name(f"{ckpt.stem}.{args.metric}.json"))
    if args.contexts:
        out = Path(contexts_out(args))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(summary, indent=2) + "\n")
    print(f"results: {out}")
    return summary


@hydra_app("evaluate", validate)
def main(cfg: DictConfig) -> dict[str, Any]:
    return evaluate(validate(OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)))


def register() -> None:
    """``evaluate_schema``; its ``data`` node accepts new keys, so ``data.test_file=...``
    works without ``data=`` (they are checked against the data schema when it is known)."""
    node = OmegaConf.structured(EvaluateConfig)
    OmegaConf.set_struct(node.data, False)
    ConfigStore.instance().store(name="evaluate_schema", node=node)


register()
