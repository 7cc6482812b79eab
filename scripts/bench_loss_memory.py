"""Peak memory of one training step: plain cross-entropy on full logits vs the fused LM-head loss.

    python scripts/bench_loss_memory.py                     # GPT-2 124M width, 12 layers
    python scripts/bench_loss_memory.py --layers 2 --bf16   # fewer layers; bf16 autocast

Both sides run the same model, batch and AdamW in one process, one after the other, each as
forward + loss + backward + optimizer step:

- ``plain``: what ``LMModule`` computed before: ``model(**inputs)`` -> (B, T, vocab) logits ->
  ``F.cross_entropy(logits.float(), reduction="sum")``.
- ``fused``: ``LMModule._loss_sum`` as training runs it: ``hidden_states`` ->
  ``linear_cross_entropy`` (logits by chunks of rows, never whole).

Method: ``torch.profiler`` with ``profile_memory=True`` records every allocation and free of
the CPU tensor allocator with its running total; the table's "step peak" is the largest
total during the step above what was live when it began (parameters and AdamW state; a
warm-up step first, and gradients are set to None after each step). It counts tensor storage
only: not Python objects, not allocator caching, not RSS. On CUDA it reads
``torch.cuda.max_memory_allocated`` instead. Time is one step without the profiler (median of
``--repeats``): this process's CPU time on CPU (all its threads; blind to other processes'
load, so set ``--threads``), wall time on CUDA.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.profiler import ProfilerActivity, profile

from minillm.training import LMModule
from minillm.training.optim import OptimConfig, build_optimizer

MiB = 2**20


def plain_loss(module: LMModule, batch: dict[str, Tensor]) -> Tensor:
    """The loss as ``LMModule`` computed it before the fused path: full fp32 logits."""
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    logits = module.model(**inputs)  # (B, T, V)
    return F.cross_entropy(
        logits.flatten(0, 1).float(), batch["labels"].flatten(), ignore_index=-100, reduction="sum"
    )


def fused_loss(module: LMModule, batch: dict[str, Tensor]) -> Tensor:
    return module._loss_sum(batch, 0.0)[0]


def step_fn(
    module: LMModule, batch: dict[str, Tensor], loss_of: Callable, bf16: bool
) -> Callable[[], None]:
    opt = build_optimizer(module.model, OptimConfig())
    n = (batch["labels"] != -100).sum()
    device = batch["labels"].device.type

    def step() -> None:
        with torch.autocast(device, dtype=torch.bfloat16, enabled=bf16):
            loss = loss_of(module, batch) / n
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def peak_bytes(step: Callable[[], None], device: torch.device) -> int:
    """Largest tensor memory live during ``step`` above what was live before it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        step()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    with tempfile.TemporaryDirectory() as tmp:
        trace = Path(tmp) / "trace.json"
        prof.export_chrome_trace(str(trace))
        events = json.loads(trace.read_text())["traceEvents"]
    totals = [
        e["args"]["Total Allocated"]
        for e in events
        if e.get("name") == "[memory]" and e["args"].get("Device Type") == 0  # CPU
    ]
    return max(totals, default=0)


def seconds(step: Callable[[], None], repeats: int, device: torch.device) -> float:
    cuda = device.type == "cuda"
    clock = time.perf_counter if cuda else time.process_time
    times = []
    for _ in range(repeats):
        if cuda:
            torch.cuda.synchronize(device)
        t0 = clock()
        step()
        if cuda:
            torch.cuda.synchronize(device)
        times.append(clock() - t0)
    return statistics.median(times)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--dim", type=int, default=768)
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--vocab", type=int, default=50257)
    p.add_argument("--context", type=int, default=256)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--bf16", action="store_true", help="bf16 autocast (fp32 weights)")
    p.add_argument("--repeats", type=int, default=1, help="timed steps per side (median)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return p.parse_args()


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    model = {
        "vocab_size": args.vocab,
        "dim": args.dim,
        "n_layers": args.layers,
        "n_heads": args.heads,
        "max_len": args.context,
    }
    torch.manual_seed(0)
    module = LMModule(model).to(device)
    ids = torch.randint(0, args.vocab, (args.batch, args.context + 1), device=device)
    batch = {"input_ids": ids[:, :-1], "labels": ids[:, 1:]}
    logits_mib = args.batch * args.context * args.vocab * 4 / MiB
    print(
        f"bench_loss_memory: {args.layers} x {args.dim}, vocab {args.vocab}, context "
        f"{args.context}, batch {args.batch}, {'bf16 autocast' if args.bf16 else 'fp32'}, "
        f"{device.type}, {torch.get_num_threads()} threads; {module.model.num_params() / 1e6:.1f}M "
        f"parameters; fp32 logits (B, T, V) = {logits_mib:.0f} MiB"
    )
    print("\n| loss | step peak above start (MiB) | step time (s) |\n|---|---|---|")
    for name, loss_of in (("plain", plain_loss), ("fused", fused_loss)):
        step = step_fn(module, batch, loss_of, args.bf16)
        step()  # warm-up: AdamW state allocated, gradients freed again
        peak = peak_bytes(step, device) / MiB
        print(f"| {name} | {peak:.0f} | {seconds(step, args.repeats, device):.2f} |", flush=True)


if __name__ == "__main__":
    main()
