"""Forward+backward time and peak memory of attention kinds against sequence length, in the
causal role (default) or the bidirectional one (``--role``).

    python scripts/bench_attention.py                       # every causal kind, T = 256..16384
    python scripts/bench_attention.py --quick               # smoke run, a few seconds
    python scripts/bench_attention.py --kinds mha,gated_linear --lengths 1024,4096 --repeats 7
    python scripts/bench_attention.py --role bidirectional --kinds mha,linformer

One module per kind (``build_attention(kind, heads * head_dim, heads, role)``, default knobs,
or ``--set local.window=128``) on x (B, T, dim); one step = forward, ``sum().backward()``. A
kind with a ``max_len`` knob (linformer: E/F have max_len columns) gets the longest T benched
unless ``--set`` gives it one; a step reads only the first T columns. Without ``--kinds``,
the kinds that can fill the role.
Kinds run interleaved (each repeat rotates their order) in one process; the median is reported.

Two times per kind: ``module`` (the whole attention module, what a model pays) and ``mixing``
= module minus the fwd+bwd time of the module's own ``nn.Linear`` layers run alone on inputs
of the same shapes (its projections), i.e. what the token mixing itself costs.

Peak memory: on CUDA ``max_memory_allocated`` above what was allocated before the step. On
CPU the same quantity is tracked with a ``TorchDispatchMode``: every storage an op creates is
counted from its creation until it is freed (weakref on the storage); weights, inputs and
kernel-internal scratch buffers are not counted. Outputs: a table (ratios to ``mha``), the
crossover length where a kind starts beating ``mha``, JSON and a PNG chart in ``--out``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import statistics
import time
import weakref
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from minillm.attention import ATTENTION, build_attention, kinds_for_role

FULL_LENGTHS = [256, 512, 1024, 2048, 4096, 8192, 16384]
CLOCK_HELP = "cpu: process CPU time (robust on a shared machine, with --threads 1)"
STAT_HELP = "statistic over repeats (min resists load from other processes)"
SLOW_HELP = "drop a kind from longer T once its step took longer than this"
ROLE_HELP = "role every module is built for (bidirectional: encoder-only kinds, e.g. linformer)"
SET_HELP = "override a kind's knob, e.g. local.window=128 (repeatable)"


class PeakMemory(TorchDispatchMode):
    """Peak bytes of live tensor storages created while the mode is active (CPU or CUDA)."""

    def __init__(self) -> None:
        super().__init__()
        self.live: dict[int, int] = {}
        self.current = self.peak = 0

    def _free(self, ptr: int) -> None:
        self.current -= self.live.pop(ptr, 0)

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        inputs = {
            t.untyped_storage().data_ptr()
            for t in tree_leaves((args, kwargs))
            if isinstance(t, torch.Tensor)
        }
        for t in tree_leaves(out):
            if not isinstance(t, torch.Tensor):
                continue
            storage = t.untyped_storage()
            ptr, size = storage.data_ptr(), storage.nbytes()
            if size == 0 or ptr in inputs or ptr in self.live:
                continue  # a view of / in place on an input, or already counted
            self.live[ptr] = size
            self.current += size
            self.peak = max(self.peak, self.current)
            weakref.finalize(storage, self._free, ptr)
        return out


def step(module: nn.Module, x: Tensor, positions: Tensor) -> None:
    module.zero_grad(set_to_none=True)  # as an optimizer step would: no grad accumulation
    x.grad = None
    module(x, positions=positions).sum().backward()


def _linears(module: nn.Module) -> list[nn.Linear]:
    return [m for m in module.modules() if isinstance(m, nn.Linear)]


def linears_step(module: nn.Module, shape: tuple[int, int], device: torch.device) -> Any:
    """A step running only ``module``'s nn.Linear layers, each on an input of its shape."""
    layers = _linears(module)
    xs = [torch.randn(*shape, m.in_features, device=device, requires_grad=True) for m in layers]

    def run() -> None:
        module.zero_grad(set_to_none=True)
        for x in xs:
            x.grad = None
        sum(m(x).sum() for m, x in zip(layers, xs, strict=True)).backward()

    return run


def timed(fn: Any, device: torch.device, clock: Any) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = clock()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return clock() - start


def peak_bytes(fn: Any, device: torch.device) -> int:
    if device.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    with PeakMemory() as mem:
        fn()
    return mem.peak


def bench_length(args: argparse.Namespace, t: int, kinds: list[str]) -> dict[str, dict]:
    device, dim = torch.device(args.device), args.heads * args.head_dim
    positions = torch.arange(t, device=device).expand(args.batch, t)
    runs, floors = {}, {}
    for kind in kinds:
        torch.manual_seed(0)
        module = build_attention({"kind": kind, **knobs(args, kind)}, dim, args.heads, args.role)
        module = module.to(device)
        x = torch.randn(args.batch, t, dim, device=device, requires_grad=True)
        runs[kind] = lambda m=module, x=x: step(m, x, positions)
        shapes = tuple((m.in_features, m.out_features) for m in _linears(module))
        floors[kind] = f"linears{shapes}"  # kinds with the same projections share one floor
        if floors[kind] not in runs:
            runs[floors[kind]] = linears_step(module, (args.batch, t), device)
    for fn in runs.values():  # warm-up
        for _ in range(args.warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in runs}
    names = list(runs)
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    for r in range(args.repeats):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            times[name].append(timed(runs[name], device, clock))
    stat = min if args.stat == "min" else statistics.median
    out = {}
    for kind in kinds:
        module_s = stat(times[kind])
        linears_s = stat(times[floors[kind]])
        out[kind] = {
            "module_ms": 1e3 * module_s,
            "mixing_ms": 1e3 * max(module_s - linears_s, 0.0),
            "linears_ms": 1e3 * linears_s,
            "module_ms_all": [1e3 * s for s in times[kind]],
            "linears_ms_all": [1e3 * s for s in times[floors[kind]]],
            "peak_mb": peak_bytes(runs[kind], device) / 2**20,
        }
    return out


def knobs(args: argparse.Namespace, kind: str) -> dict[str, Any]:
    """``--set`` knobs of ``kind``; a ``max_len`` knob defaults to the longest T benched."""
    fields = {f.name for f in dataclasses.fields(ATTENTION[kind][0].Config)}
    longest = {"max_len": max(args.length_list)} if "max_len" in fields else {}
    return longest | args.knobs.get(kind, {})


def crossover(lengths: list[int], ratio: list[float | None]) -> float | None:
    """Smallest T from which a kind stays faster than mha (ratio = mha time / kind time > 1),
    interpolated on log T and log ratio between grid points; ``lengths[0]`` if always faster."""
    if not ratio or ratio[-1] is None or ratio[-1] <= 1:
        return None
    i = len(ratio) - 1
    while i > 0 and ratio[i - 1] is not None and ratio[i - 1] > 1:
        i -= 1
    if i == 0:
        return float(lengths[0])
    r0, r1 = ratio[i - 1], ratio[i]
    if r0 is None:
        return float(lengths[i])
    frac = -math.log(r0) / (math.log(r1) - math.log(r0))  # where log ratio crosses 0
    return lengths[i - 1] * (lengths[i] / lengths[i - 1]) ** frac


def summarize(results: dict[int, dict[str, dict]], kinds: list[str]) -> dict[str, Any]:
    lengths = sorted(results)
    summary: dict[str, Any] = {}
    for kind in kinds:
        entry: dict[str, Any] = {}
        for measure in ("module_ms", "mixing_ms"):
            ratio = []
            for t in lengths:
                row = results[t]
                ok = "mha" in row and kind in row and row[kind][measure] > 0
                ratio.append(row["mha"][measure] / row[kind][measure] if ok else None)
            entry[f"speedup_vs_mha_{measure}"] = dict(zip(lengths, ratio, strict=True))
            entry[f"crossover_{measure}"] = crossover(lengths, ratio) if "mha" in kinds else None
        summary[kind] = entry
    return summary


def print_table(results: dict[int, dict[str, dict]], kinds: list[str], measure: str) -> None:
    what = "x = kind / mha" if measure == "peak_mb" else "x = speed-up over mha"
    print(f"\n{measure} ({what})")
    print(f"{'T':>6} " + " ".join(f"{k:>22}" for k in kinds))
    for t in sorted(results):
        row, cells = results[t], []
        for k in kinds:
            if k not in row:
                cells.append(f"{'-':>22}")
                continue
            value = row[k][measure]
            ratio = row["mha"][measure] / value if "mha" in row and value > 0 else float("nan")
            if measure == "peak_mb":
                ratio = value / row["mha"][measure] if "mha" in row else float("nan")
            unit = "MiB" if measure == "peak_mb" else "ms"
            cells.append(f"{value:>11.1f} {unit:<3} ({ratio:5.2f}x)")
        print(f"{t:>6} " + " ".join(cells))


def plot(results: dict[int, dict[str, dict]], kinds: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lengths = sorted(results)
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.8))
    titles = {"module_ms": "module fwd+bwd (ms)", "mixing_ms": "mixing fwd+bwd (ms)"}
    titles["peak_mb"] = "peak memory (MiB)"
    for ax, (measure, title) in zip(axes, titles.items(), strict=True):
        for kind in kinds:
            ts = [t for t in lengths if kind in results[t] and results[t][kind][measure] > 0]
            ax.plot(ts, [results[t][kind][measure] for t in ts], marker="o", label=kind)
        ax.set(xscale="log", yscale="log", xlabel="sequence length T", title=title)
        ax.set_xticks(lengths, [str(t) for t in lengths], rotation=45)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--kinds", default=None, help="comma-separated registry keys")
    p.add_argument("--role", choices=("causal", "bidirectional"), default="causal", help=ROLE_HELP)
    p.add_argument("--lengths", default=",".join(map(str, FULL_LENGTHS)))
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--clock", choices=("wall", "cpu"), default="wall", help=CLOCK_HELP)
    p.add_argument("--stat", choices=("median", "min"), default="median", help=STAT_HELP)
    p.add_argument("--max-step-seconds", type=float, default=30.0, help=SLOW_HELP)
    p.add_argument("--set", action="append", default=[], metavar="KIND.KNOB=VALUE", help=SET_HELP)
    p.add_argument("--out", default="bench_out", help="folder for attention.json / .png")
    p.add_argument("--quick", action="store_true", help="T in {256, 1024}, 2 repeats")
    args = p.parse_args()
    if args.quick:
        args.lengths, args.repeats, args.warmup = "256,1024", 2, 1
    args.knobs = {}
    for item in args.set:
        key, value = item.split("=", 1)
        kind, knob = key.split(".", 1)
        args.knobs.setdefault(kind, {})[knob] = json.loads(value)
    args.kinds = args.kinds or ",".join(kinds_for_role(args.role))
    args.length_list = sorted(int(t) for t in args.lengths.split(","))
    return args


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    kinds = [k for k in args.kinds.split(",") if k]
    lengths = args.length_list
    cuda = args.device.startswith("cuda")
    env = {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "device": torch.cuda.get_device_name() if cuda else platform.processor() or "cpu",
        "clock": args.clock,
        "loadavg_start": os.getloadavg(),
    }
    print(f"bench_attention: {env}")
    results: dict[int, dict[str, dict]] = {}
    active = list(kinds)
    for t in lengths:
        start = time.perf_counter()
        results[t] = bench_length(args, t, active)
        slow = [k for k in active if results[t][k]["module_ms"] > 1e3 * args.max_step_seconds]
        active = [k for k in active if k not in slow]
        print(
            f"T={t}: {time.perf_counter() - start:.1f}s "
            + " ".join(f"{k}={v['module_ms']:.1f}ms" for k, v in results[t].items()),
            flush=True,
        )
    env["loadavg_end"] = os.getloadavg()
    for measure in ("module_ms", "mixing_ms", "peak_mb"):
        print_table(results, kinds, measure)
    summary = summarize(results, kinds)
    print("\ncrossover T (from where a kind stays faster than mha; interpolated on log T):")
    for kind, entry in summary.items():
        cells = []
        for measure in ("module_ms", "mixing_ms"):
            x = entry[f"crossover_{measure}"]
            text = "never" if x is None else f"{x:.0f}"
            cells.append(f"{measure[:-3]} {'<= ' if x == lengths[0] else ''}{text}")
        print(f"  {kind:>14}: " + ", ".join(cells))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    config = {k: v for k, v in vars(args).items() if k != "knobs"}
    config["knobs"] = {kind: knobs(args, kind) for kind in kinds}
    payload = {"config": config, "env": env, "results": results, "summary": summary}
    (out / "attention.json").write_text(json.dumps(payload, indent=1))
    plot(results, kinds, out / "attention.png")
    print(f"wrote {out / 'attention.json'} and {out / 'attention.png'}")


if __name__ == "__main__":
    main()
