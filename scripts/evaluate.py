"""Evaluate a checkpoint: perplexity and bits per byte (``metric=ppl``) or BLEU (``metric=bleu``).

    python scripts/evaluate.py ckpt=outputs/<run>/checkpoints/best.ckpt          # its held-out docs
    python scripts/evaluate.py ckpt=... data=text 'data.files=[notes.txt]'       # your documents
    python scripts/evaluate.py ckpt=... data=hf data.name=wikitext data.config=wikitext-2-raw-v1 \
        data.split=test stride=64
    python scripts/evaluate.py metric=bleu ckpt=... data.test_file=test.jsonl num_beams=5

Arguments are ``key=value``. ``data=<name>`` loads ``conf/data/<name>.yaml`` and ``data.<key>=``
overrides it; without ``data`` the checkpoint's own data config is used. ``metric=ppl`` options
are the fields of ``PerplexityArgs``; ``metric=bleu`` passes every option to
``minillm.evaluation.bleu.run_bleu``. Results are printed and written as JSON (``out``,
default ``<checkpoint>.<metric>.json`` next to the checkpoint).
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from minillm.checkpoint import load_pretrained, read_checkpoint
from minillm.data import DataConfig, load_documents
from minillm.evaluation import perplexity

CONF = Path(__file__).resolve().parents[1] / "conf"
METRICS = ("ppl", "bleu")


@dataclass
class PerplexityArgs:
    metric: str = "ppl"
    ckpt: str = "???"  # a .ckpt file or an exported folder (scripts/export.py)
    data: dict[str, Any] = field(default_factory=dict)  # a data config; default: the ckpt's
    split: str | None = None  # all | train | validation; default: validation of the
    # checkpoint's own data, all documents of data given here
    mode: str = "window"  # window (sliding window, every kind) | recurrent (one cached pass)
    window: int | None = None  # tokens of context; default the model's max_len
    stride: int | None = None  # tokens a window advances (or a recurrent call reads); window//2
    batch_size: int = 16  # windows a forward call
    device: str = "auto"  # auto | cpu | cuda | cuda:1 ...
    out: str | None = None  # JSON file; default <checkpoint>.ppl.json


def parse_args(argv: list[str]) -> dict[str, Any]:
    """``key=value`` arguments -> a plain nested dict; ``data=<name>`` loads that YAML."""
    groups = [a.partition("=")[2] for a in argv if a.startswith("data=")]
    try:
        opts = OmegaConf.to_container(
            OmegaConf.from_cli([a for a in argv if not a.startswith("data=")])
        )
    except OmegaConfBaseException as err:
        raise SystemExit(f"cannot parse the arguments: {err}") from None
    if groups:
        path = CONF / "data" / f"{groups[-1]}.yaml"
        if not path.is_file():
            choices = sorted(p.stem for p in (CONF / "data").glob("*.yaml"))
            raise SystemExit(f"unknown data={groups[-1]}; choose one of {choices}")
        base = OmegaConf.load(path)
        opts["data"] = OmegaConf.to_container(OmegaConf.merge(base, opts.get("data") or {}))
        missing = [k for k, v in opts["data"].items() if v == "???"]
        if missing:
            raise SystemExit(
                f"data={groups[-1]} needs {', '.join(f'data.{k}=...' for k in missing)}"
            )
    opts.setdefault("metric", "ppl")
    if opts["metric"] not in METRICS:
        raise SystemExit(f"unknown metric={opts['metric']}; choose one of {list(METRICS)}")
    return opts


def ppl_args(opts: dict[str, Any]) -> PerplexityArgs:
    names = [f.name for f in dataclasses.fields(PerplexityArgs)]
    unknown = sorted(set(opts) - set(names))
    if unknown:
        raise SystemExit(f"unknown option(s) {unknown} for metric=ppl; valid: {names}")
    try:
        merged = OmegaConf.merge(OmegaConf.structured(PerplexityArgs), opts)
    except OmegaConfBaseException as err:
        raise SystemExit(f"bad option: {err}") from None
    args = PerplexityArgs(**OmegaConf.to_container(merged))
    if args.ckpt == "???":
        raise SystemExit("metric=ppl needs ckpt=<checkpoint file or exported folder>")
    return args


def documents(args: PerplexityArgs) -> tuple[list[str], dict[str, Any], str]:
    """The documents to score, the data config they came from and the split."""
    data, split = args.data, args.split or ("all" if args.data else "validation")
    if not data:
        if Path(args.ckpt).is_file():
            data = read_checkpoint(args.ckpt).get("hyper_parameters", {}).get("data") or {}
        if not data:
            raise SystemExit(f"{args.ckpt} carries no data config; pass data=... (e.g. data=text)")
    if data.get("task", "lm") != "lm":
        raise SystemExit(
            f"metric=ppl scores text documents (data.task=lm), not task={data['task']}"
        )
    cfg = DataConfig.coerce(data)
    if split == "all" and cfg.source == "text" and not cfg.valid_files:
        # no validation split to draw (it needs 2+ documents): every document once
        docs = load_documents(dataclasses.replace(cfg, valid_files=cfg.files))["train"]["text"]
    elif split == "all":
        splits = load_documents(cfg)
        docs = splits["train"]["text"] + splits["validation"]["text"]
    elif split in ("train", "validation"):
        docs = load_documents(cfg)[split]["text"]
    else:
        raise SystemExit(f"unknown split={split}; choose all, train or validation")
    return docs, dataclasses.asdict(cfg), split


def run_ppl(args: PerplexityArgs) -> dict[str, Any]:
    device = (
        args.device if args.device != "auto" else "cuda" if torch.cuda.is_available() else "cpu"
    )
    model, tokenizer = load_pretrained(args.ckpt, map_location=device)
    docs, data, split = documents(args)
    start = time.perf_counter()
    result = perplexity(
        model,
        tokenizer,
        docs,
        mode=args.mode,
        window=args.window,
        stride=args.stride,
        batch_size=args.batch_size,
    )
    window = args.window or model.cfg.max_len
    summary = {
        "metric": "ppl",
        "ckpt": args.ckpt,
        "data": data,
        "split": split,
        "mode": args.mode,
        "window": window,
        "stride": args.stride or max(1, window // 2),
        "attn": model.cfg.attn["kind"],
        **result.to_dict(),
        "seconds": time.perf_counter() - start,
    }
    print(
        f"perplexity {result.ppl:.3f} (loss {result.loss:.4f} nats/token), "
        f"{result.bits_per_byte:.4f} bits per byte\n"
        f"{result.documents} documents, {result.tokens} tokens, {result.bytes} bytes "
        f"({split} split, mode={args.mode}, window {window}, stride {summary['stride']})"
    )
    return summary


def main(argv: list[str]) -> dict[str, Any]:
    opts = parse_args(argv)
    try:
        if opts["metric"] == "bleu":
            from minillm.evaluation.bleu import run_bleu  # sacrebleu, seq2seq: only when asked

            summary, out = run_bleu(opts), None  # run_bleu names its own hypotheses file
        else:
            args = ppl_args(opts)
            summary, out = run_ppl(args), args.out
    except (ValueError, FileNotFoundError) as err:  # CheckpointError is a ValueError
        raise SystemExit(f"error: {err}") from None
    ckpt = Path(opts["ckpt"])
    out = Path(out) if out else ckpt.with_name(f"{ckpt.stem}.{opts['metric']}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(summary, indent=2) + "\n")
    print(f"results: {out}")
    return summary


if __name__ == "__main__":
    main(sys.argv[1:])
