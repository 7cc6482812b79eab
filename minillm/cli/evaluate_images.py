"""``metric=accuracy`` of ``minillm-evaluate`` (``minillm/cli/evaluate.py``): top-1 and top-5
accuracy of an image classifier (``model.arch=vit``) on one split of its data."""

from __future__ import annotations

import dataclasses
import time
from typing import TYPE_CHECKING, Any

import torch

from minillm.checkpoint import load_pretrained
from minillm.data.images import ImageDataModule, class_hits
from minillm.evaluation.documents import checkpoint_data
from minillm.training.run import DATA_MODULES

if TYPE_CHECKING:
    from minillm.cli.evaluate import EvaluateConfig

ACCURACY_BATCH_SIZE = 256  # images a forward call
IMAGE_TASKS = {k: m for k, m in DATA_MODULES.items() if issubclass(m, ImageDataModule)}


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
