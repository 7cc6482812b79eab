"""What the per-tensor checksums cost on a GPT-2-small-size model (12 x 768, vocab 50257).

    python scripts/bench_checkpoint.py                 # weights + AdamW moments, 3 repeats
    python scripts/bench_checkpoint.py --repeats 5 --dir /fast/disk

Three files, each saved once through minillm.checkpoint and read ``--repeats`` times (median;
the file is in the page cache after a first, untimed read, so the times are CPU cost, not
disk speed): a weights-only ``.ckpt``, a ``.ckpt`` that also holds the two AdamW moments per
parameter (what ``last.ckpt`` holds), and an export (``model.safetensors``). "verify" is the
load with every tensor checked against its crc32, "plain" the same load without the check.
For the checkpoints the checksums are also timed on their own, as ``write_atomic`` adds them.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import statistics
import tempfile
import time
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer, models

import minillm.checkpoint as ckpt_io
from minillm.models import build_model

GPT2_SMALL = {"vocab_size": 50257, "dim": 768, "n_layers": 12, "n_heads": 12, "max_len": 1024}


def timed(fn: Callable[[], Any], repeats: int) -> float:
    """Median seconds of ``repeats`` calls, after one untimed warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def lightning_like(model: torch.nn.Module, moments: bool) -> dict[str, Any]:
    """A checkpoint dict shaped like Lightning's: state_dict, optimizer state, hparams."""
    params = list(model.parameters())
    state = {
        i: {"step": torch.tensor(1.0), "exp_avg": torch.randn_like(p), "exp_avg_sq": p.square()}
        for i, p in enumerate(params)
    }
    optimizer = [{"state": state, "param_groups": [{"params": list(range(len(params)))}]}]
    return {
        "state_dict": {f"model.{k}": v for k, v in model.state_dict().items()},
        "optimizer_states": optimizer if moments else [],
        "hyper_parameters": {"model": model.cfg.to_dict()},
        "tokenizer": "{}",
    }


def bench_ckpt(name: str, obj: dict, folder: Path, repeats: int) -> list[str]:
    path = folder / f"{name}.ckpt"
    save = timed(lambda: ckpt_io.write_atomic(obj, path), 1)
    sums = timed(lambda: ckpt_io.checksums(obj), repeats)
    plain = timed(lambda: ckpt_io.read_checkpoint(path, verify=False), repeats)
    verify = timed(lambda: ckpt_io.read_checkpoint(path), repeats)
    size = path.stat().st_size
    return row(name, size, save, sums, plain, verify)


def bench_export(model: torch.nn.Module, folder: Path, repeats: int) -> list[str]:
    out = folder / "export"
    tokenizer = Tokenizer(models.BPE())
    save = timed(lambda: ckpt_io.save_pretrained(model, tokenizer, out, overwrite=True), 1)
    sums = timed(lambda: ckpt_io.checksums(model.state_dict()), repeats)
    weights = out / ckpt_io.EXPORT_FILES[0]
    verify_only = timed(lambda: ckpt_io._verify_export(weights), repeats)
    verify = timed(lambda: ckpt_io.load_pretrained(out), repeats)
    size = weights.stat().st_size
    return row("export (safetensors)", size, save, sums, verify - verify_only, verify)


def row(name: str, size: int, save: float, sums: float, plain: float, verify: float) -> list[str]:
    extra = verify - plain
    return [
        name,
        f"{size / 2**20:,.0f}",
        f"{save:.2f}",
        f"{sums:.2f}",
        f"{plain:.2f}",
        f"{verify:.2f}",
        f"+{extra:.2f} ({extra / plain:+.0%})",
        f"{size / 2**30 / max(extra, 1e-9):.2f}",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dir", type=Path, default=None, help="where the files go (a temp dir)")
    args = parser.parse_args()
    torch.manual_seed(0)
    model = build_model(GPT2_SMALL)
    n = sum(p.numel() for p in model.parameters())
    print(f"model: {n / 1e6:.1f}M parameters; torch threads {torch.get_num_threads()}")
    header = ["file", "MiB", "save s", "crc32 s", "load s", "load+verify s", "verify cost", "GiB/s"]
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        folder = Path(tmp)
        rows = [
            bench_ckpt("weights .ckpt", lightning_like(model, False), folder, args.repeats),
            bench_ckpt("weights+AdamW .ckpt", lightning_like(model, True), folder, args.repeats),
            bench_export(model, folder, args.repeats),
        ]
    print_table([header, *rows])
    print(f"(median of {args.repeats}; GiB/s: file size / verify cost; {os.cpu_count()} CPUs)")
    print(hash_speeds(model.tok_emb.weight, args.repeats))


def print_table(rows: list[list[str]]) -> None:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    rows.insert(1, ["-" * w for w in widths])
    for r in rows:
        cells = [
            c.ljust(w) if i == 0 else c.rjust(w)
            for i, (c, w) in enumerate(zip(r, widths, strict=True))
        ]
        print("  ".join(cells))


def hash_speeds(t: torch.Tensor, repeats: int) -> str:
    """Throughput of crc32 (the one used) and sha256 over one large tensor's bytes."""
    data = t.detach().contiguous().view(-1).view(torch.uint8).numpy()
    speeds = {
        "crc32": timed(lambda: zlib.crc32(data), repeats),
        "sha256": timed(lambda: hashlib.sha256(data).digest(), repeats),
    }
    return "hash speed over the embedding: " + ", ".join(
        f"{k} {data.nbytes / 2**30 / v:.2f} GiB/s" for k, v in speeds.items()
    )


if __name__ == "__main__":
    main()
