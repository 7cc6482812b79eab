"""``python scripts/evaluate.py`` / ``minillm-evaluate``: perplexity and bits per byte
(``metric=ppl``), BLEU and chrF (``metric=bleu``) or image classification accuracy
(``metric=accuracy``) of a checkpoint or an exported folder.

    minillm-evaluate ckpt=outputs/<run>/checkpoints/best.ckpt        # its held-out documents
    minillm-evaluate ckpt=... data=text 'data.files=[notes.txt]' stride=64    # your documents
    minillm-evaluate ckpt=... data=hf data.name=<save_to_disk folder> data.split=test
    minillm-evaluate metric=bleu ckpt=... data.test_file=test.jsonl num_beams=5
    minillm-evaluate metric=accuracy ckpt=outputs/<run>/checkpoints/best.ckpt  # its test split

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
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from minillm import checks
from minillm.checkpoint import load_pretrained
from minillm.cli.app import hydra_app
from minillm.cli.devices import resolve_device
from minillm.data.images import ImageDataModule, class_hits
from minillm.data.translation import TranslationDataConfig
from minillm.evaluation import perplexity
from minillm.evaluation.bleu import BleuOptions, run_bleu
from minillm.evaluation.documents import DOCUMENTS, checkpoint_data, data_config
from minillm.evaluation.perplexity import SCORERS
from minillm.training.run import DATA_MODULES

PPL_BATCH_SIZE = 16  # windows a forward call
PPL_ONLY = ("split", "mode", "window", "stride")
BLEU_ONLY = ("num_beams", "length_penalty", "max_new_tokens", "output", "on_malformed")
BLEU_DATA_KEYS = ("test_file", "src_field", "tgt_field", "format")  # what run_bleu reads
ACCURACY_BATCH_SIZE = 256  # images a forward call
# each metric's own options: those of another metric must keep their defaults
OWN_OPTIONS = {"ppl": PPL_ONLY, "bleu": BLEU_ONLY, "accuracy": ("split",)}
SPLITS = {"ppl": ("all", "train", "validation"), "accuracy": ("train", "validation", "test")}
IMAGE_TASKS = {k: m for k, m in DATA_MODULES.items() if issubclass(m, ImageDataModule)}


@dataclass
class EvaluateConfig:
    """conf/evaluate.yaml: the options of every metric; those of another metric must keep
    their defaults (a ``stride`` given with ``metric=bleu`` is a mistake, not ignored)."""

    metric: str = "ppl"  # ppl | bleu | accuracy
    ckpt: str = MISSING  # a .ckpt file or an exported folder (minillm-export)
    data: dict[str, Any] = field(default_factory=dict)  # data=<option> or data.<key>=...
    device: str = "auto"  # auto | cpu | cuda | cuda:1 ...
    out: str | None = None  # results JSON; default <checkpoint>.<metric>.json beside it
    batch_size: int | None = None  # windows (ppl: 16), sentences (bleu: 32), images (256)
    # metric=ppl and metric=accuracy
    split: str | None = None  # ppl: all|train|validation; accuracy: train|validation|test
    # metric=ppl
    mode: str = "window"  # window (sliding window, every kind) | recurrent (one cached pass)
    window: int | None = None  # tokens of context; default the model's max_len
    stride: int | None = None  # tokens a window advances (or a recurrent call reads); window//2
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
        resolve_device(self.device)
        self._check_other_metric_untouched()

    def _check_other_metric_untouched(self) -> None:
        mine = OWN_OPTIONS[self.metric]
        other = dict.fromkeys(k for keys in OWN_OPTIONS.values() for k in keys if k not in mine)
        defaults = {f.name: f.default for f in dataclasses.fields(self)}
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


def ppl_data(args: EvaluateConfig) -> tuple[Any, str]:
    """(the data config to score, the split): ``data=<option>``'s, else the checkpoint's."""
    if "task" in args.data:
        return data_config(args.data), args.split or "all"
    saved = checkpoint_data(args.ckpt, "data=text 'data.files=[notes.txt]'")
    return data_config({**saved, **args.data}), args.split or "validation"


def run_ppl(args: EvaluateConfig, device: str) -> dict[str, Any]:
    data, split = ppl_data(args)
    docs = DOCUMENTS[data.task][1](data, split, _cache_dir())
    model, tokenizer = load_pretrained(args.ckpt, map_location=device)
    start = time.perf_counter()
    batch_size = args.batch_size or PPL_BATCH_SIZE
    options = {"mode": args.mode, "window": args.window, "stride": args.stride}
    result = perplexity(model, tokenizer, docs, batch_size=batch_size, **options)
    window = args.window or model.cfg.max_len
    stride = args.stride or max(1, window // 2)
    print(
        f"perplexity {result.ppl:.3f} (loss {result.loss:.4f} nats/token), "
        f"{result.bits_per_byte:.4f} bits per byte\n"
        f"{result.documents} documents, {result.tokens} tokens, {result.bytes} bytes "
        f"({split} split, mode={args.mode}, window {window}, stride {stride})"
    )
    return {
        "metric": "ppl",
        "ckpt": args.ckpt,
        "data": dataclasses.asdict(data),
        "split": split,
        **{**options, "window": window, "stride": stride},
        "attn": model.cfg.attn_label,
        **result.to_dict(),
        "seconds": time.perf_counter() - start,
    }


def image_data_config(data: dict[str, Any]) -> Any:
    """``data`` as its image task's config dataclass; another task is an error."""
    task = data.get("task", "lm")
    if task not in IMAGE_TASKS:
        raise ValueError(
            f"metric=accuracy scores images (data={'|'.join(IMAGE_TASKS)}), not data.task={task}"
        )
    return IMAGE_TASKS[task].Config.coerce(data)


def accuracy_data(args: EvaluateConfig) -> Any:
    """The image data config to score: ``data=<option>``'s, else the checkpoint's with the
    ``data.<key>=`` given put over it."""
    if "task" in args.data:
        return image_data_config(args.data)
    return image_data_config({**checkpoint_data(args.ckpt, "data=digits"), **args.data})


def run_accuracy(args: EvaluateConfig, device: str) -> dict[str, Any]:
    """Top-1 and top-5 accuracy of an image classifier on one split of its data."""
    cfg = accuracy_data(args)
    if args.batch_size:
        cfg = dataclasses.replace(cfg, eval_batch_size=args.batch_size)
    model, tokenizer = load_pretrained(args.ckpt, map_location=device)
    module = IMAGE_TASKS[cfg.task]
    data = module(cfg, max_len=1, batch_size=ACCURACY_BATCH_SIZE, tokenizer=tokenizer)
    data.setup("test")
    split, start = args.split or "test", time.perf_counter()
    counts = torch.zeros(3, dtype=torch.long, device=device)  # [top-1, top-5, images]
    with torch.inference_mode():
        for batch in data.eval_dataloader(split):
            counts += class_hits(model, {k: v.to(device) for k, v in batch.items()})
    top1, top5, n = (int(c) for c in counts)
    print(f"accuracy {top1 / n:.4f} ({top1}/{n}), top-5 {top5 / n:.4f} ({split} split)")
    return {
        "metric": "accuracy",
        "ckpt": args.ckpt,
        "data": dataclasses.asdict(cfg),
        "split": split,
        "attn": model.cfg.attn_label,
        "accuracy": top1 / n,
        "top5_accuracy": top5 / n,
        "images": n,
        "seconds": time.perf_counter() - start,
    }


METRICS = {
    "ppl": run_ppl,
    "bleu": lambda args, device: run_bleu(bleu_options(args, device)),
    "accuracy": run_accuracy,
}


def _cache_dir() -> str:
    """Where ``datasets`` keeps Arrow copies of jsonl/csv/parquet files: as in training."""
    root = os.environ.get("MINILLM_CACHE") or os.path.expanduser("~/.cache/minillm")
    return os.path.join(root, "hf")


def evaluate(args: EvaluateConfig) -> dict[str, Any]:
    """Score, print, and write the results JSON; returns what was written."""
    summary = METRICS[args.metric](args, str(resolve_device(args.device)))
    ckpt = Path(args.ckpt)
    out = Path(args.out or ckpt.with_name(f"{ckpt.stem}.{args.metric}.json"))
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
