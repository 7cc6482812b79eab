"""``metric=ppl`` of ``minillm-evaluate`` (``minillm/cli/evaluate.py``): perplexity and bits
per byte of a checkpoint's documents, and with ``contexts=[...]`` of several checkpoints at
several window lengths (``minillm.evaluation.extrapolation``)."""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from minillm.checkpoint import load_pretrained
from minillm.evaluation import perplexity
from minillm.evaluation.documents import DOCUMENTS, checkpoint_data, data_config
from minillm.evaluation.extrapolation import model_label, score_contexts, write_extrapolation

if TYPE_CHECKING:
    from minillm.cli.evaluate import EvaluateConfig

PPL_BATCH_SIZE = 16  # windows a forward call


def ppl_data(args: EvaluateConfig) -> tuple[Any, str]:
    """(the data config to score, the split): ``data=<option>``'s, else the checkpoint's."""
    if "task" in args.data:
        return data_config(args.data), args.split or "all"
    saved = checkpoint_data(args.ckpt, "data=text 'data.files=[notes.txt]'")
    return data_config({**saved, **args.data}), args.split or "validation"


def run_ppl(args: EvaluateConfig, device: str) -> dict[str, Any]:
    if args.contexts:
        return run_contexts(args, device)
    data, split = ppl_data(args)
    docs = DOCUMENTS[data.task][1](data, split, _cache_dir())
    model, tokenizer = load_pretrained(args.ckpt, map_location=device)
    start = time.perf_counter()
    batch_size = args.batch_size or PPL_BATCH_SIZE
    options = {"mode": args.mode, "window": args.window, "stride": args.stride}
    result = perplexity(model, tokenizer, docs, batch_size=batch_size, **options)
    window = args.window or model.cfg.max_len
    stride = args.stride or max(1, window // 2)
    if args.mode == "memory":  # consecutive segments: each advances a whole window
        stride = window
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


def run_contexts(args: EvaluateConfig, device: str) -> dict[str, Any]:
    """Perplexity of every checkpoint at every context; table and chart beside ``out``."""
    rows, batch_size = [], args.batch_size or PPL_BATCH_SIZE
    for ckpt in args.checkpoints:
        data, split = ppl_data(dataclasses.replace(args, ckpt=ckpt, contexts=[]))
        docs = DOCUMENTS[data.task][1](data, split, _cache_dir())
        model, tokenizer = load_pretrained(ckpt, map_location=device)
        score = window_scorer(model, tokenizer, docs, args.stride, batch_size)
        label = model_label(model.cfg)
        for row in score_contexts(score, args.contexts, label, model.cfg.max_len):
            rows.append({**row, "ckpt": ckpt, "split": split})
            shown = "—" if row["ppl"] is None else f"{row['ppl']:.3f}"
            print(f"{label} @ {row['context']}: ppl {shown} {row.get('skipped', '')}".rstrip())
    table, chart = write_extrapolation(rows, Path(contexts_out(args)))
    print(table.read_text() + f"wrote {table} and {chart}")
    return {"metric": "ppl", "contexts": args.contexts, "rows": rows}


def window_scorer(
    model: Any, tokenizer: Any, docs: list[str], stride: int | None, batch_size: int
) -> Callable[[int], Any]:
    """window -> its perplexity result (stride half the window unless given); the batch
    shrinks as the window grows, so every context holds about as many tokens a call."""

    def score(window: int) -> Any:
        rows = max(1, batch_size * model.cfg.max_len // window)
        step = stride or max(1, window // 2)
        return perplexity(model, tokenizer, docs, window=window, stride=step, batch_size=rows)

    return score


def contexts_out(args: EvaluateConfig) -> str:
    first = Path(args.checkpoints[0])
    return args.out or str(first.with_name(f"{first.stem}.contexts.json"))


def _cache_dir() -> str:
    """Where ``datasets`` keeps Arrow copies of jsonl/csv/parquet files: as in training."""
    root = os.environ.get("MINILLM_CACHE") or os.path.expanduser("~/.cache/minillm")
    return os.path.join(root, "hf")
