"""Training throughput: minillm's full step against a bare PyTorch loop, HF GPT-2 and every kind.

    python scripts/bench_train.py                       # configs a and b, every contender
    python scripts/bench_train.py --quick               # smoke run
    python scripts/bench_train.py --repeats 9 --json bench.json
    python scripts/bench_train.py --e2e b               # + train.py's logged tokens/s vs the step

Configs: (a) 4 layers / 4 heads / dim 128 / context 64 / batch 12, (b) 6 / 6 / 384 / 256 / 8,
vocab 8192 (the default tokenizer's), fp32 on CPU, bf16 on CUDA. Contenders, all in one process:

- ``minillm``: the step as ``train.py`` runs it, measured inside a real ``L.Trainer.fit`` built
  by ``build_trainer`` (``LMModule``, ``LMDataModule``'s loader and sampler, clipping, LR
  schedule, CSV logger, progress bar, checkpoint and throughput callbacks): wall time between
  consecutive ``on_train_batch_end`` hooks, so every cost of a step is inside the interval.
- ``bare``: the same model and AdamW (same param groups, fused on CPU and CUDA) in a
  hand-written loop: forward, loss, backward, clip, step, LR schedule, zero_grad. The floor.
  Its loss is ``LMModule``'s: ``hidden_states`` -> ``linear_cross_entropy`` (the LM head and
  cross-entropy fused by chunks of rows), so minillm / bare is the framework's overhead alone.
- ``bare-ce``: the bare loop with the textbook loss, ``F.cross_entropy`` over the full
  (B, T, vocab) logits: what the fused loss gains (or costs) on this machine.
- ``hf``: ``transformers`` ``GPT2LMHeadModel`` (SDPA) at the same dims in the bare loop, with
  ``F.cross_entropy`` over its logits (its own loss path; optional).
- ``bare[kind]`` at (b): the bare loop (fused loss) for every kind of ``minillm.attention``.

Interleaving: the minillm fit drives the rounds. Its callback, after every ``--steps`` timed
steps, runs ``--steps`` steps of each other contender (order rotated per round), then the
fit goes on; the interval that contains them is not timed. A round's tokens/s are paired, so
ratios are medians of per-round ratios: load from other processes hits both sides alike.
On a shared machine set ``OMP_WAIT_POLICY=PASSIVE``: spinning OpenMP threads that lose their
core make every step erratic (10x swings on 2 busy cores).

``--e2e a|b`` also runs ``train.py`` (bundled corpus, the config's shape) once in each of the
first ``--e2e-runs`` rounds and compares its last logged ``train/tokens_per_sec`` (the moving
average over its last 20 steps) with the mean of the minillm rounds just before and after it.
(Wall clock only: the CPU clock does not see a child process.)
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import logging
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from torch import nn

from minillm.attention import ATTENTION
from minillm.data import LMDataModule
from minillm.models import build_model
from minillm.models.flops import train_flops_per_token
from minillm.models.linear_cross_entropy import linear_cross_entropy
from minillm.training import LMModule, LoggerConfig, TrainerConfig, build_logger, build_trainer
from minillm.training.optim import OptimConfig, warmup_cosine

ROOT = Path(__file__).resolve().parents[1]
GOALS = {  # (numerator, denominator, config) -> minimum ratio
    ("minillm", "bare", "b"): 0.97,
    ("minillm", "bare", "a"): 0.90,
    ("minillm", "hf", "a"): 1.1,
    ("minillm", "hf", "b"): 1.1,
    ("e2e", "minillm", "a"): 0.95,
    ("e2e", "minillm", "b"): 0.95,
}


@dataclass
class Shape:
    n_layers: int
    n_heads: int
    dim: int
    context: int
    batch: int
    vocab: int = 8192

    def model(self, kind: str = "mha") -> dict[str, Any]:
        return {
            "vocab_size": self.vocab,
            "dim": self.dim,
            "n_layers": self.n_layers,
            "n_heads": self.n_heads,
            "max_len": self.context,
            "attn": {"kind": kind},
        }


CONFIGS = {"a": Shape(4, 4, 128, 64, 12), "b": Shape(6, 6, 384, 256, 8)}
# wall: what a user waits (the goals). cpu: this process's CPU time, all threads: blind to
# other processes' load (compare work on a busy machine; with OMP_WAIT_POLICY=PASSIVE).
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def adamw(model: nn.Module, cfg: OptimConfig) -> torch.optim.AdamW:
    """Decay matrices only; fused (CPU and CUDA): the fastest stock AdamW."""
    params = list(model.parameters())
    return torch.optim.AdamW(
        [
            {"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
        ],
        lr=cfg.lr,
        betas=(cfg.beta1, cfg.beta2),
        eps=cfg.eps,
        fused=True,
    )


def fused_loss(model: nn.Module, block: torch.Tensor) -> torch.Tensor:
    """Mean token loss as ``LMModule`` computes it: pre-head states -> fused head + loss."""
    hidden = model.hidden_states(block[:, :-1])  # (B, T, dim)
    labels = block[:, 1:].flatten()
    return linear_cross_entropy(hidden.flatten(0, 1), model.lm_head.weight, labels) / len(labels)


def logits_loss(logits_of: Callable) -> Callable[[nn.Module, torch.Tensor], torch.Tensor]:
    """Mean token loss by ``F.cross_entropy`` over the full fp32 logits ``logits_of`` gives."""

    def loss(model: nn.Module, block: torch.Tensor) -> torch.Tensor:
        logits = logits_of(model, block[:, :-1])  # (B, T, V)
        return F.cross_entropy(logits.flatten(0, 1).float(), block[:, 1:].flatten())

    return loss


def loop_step(
    model: nn.Module, shape: Shape, device: torch.device, total_steps: int, loss_of: Callable
) -> Callable[[], None]:
    """One hand-written training step per call over a few resident random batches."""
    cfg = OptimConfig()
    opt = adamw(model, cfg)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: warmup_cosine(s, cfg.warmup_steps, total_steps, cfg.min_lr_ratio)
    )
    blocks = torch.randint(0, shape.vocab, (4, shape.batch, shape.context + 1), device=device)
    amp = device.type == "cuda"
    state = {"i": 0}

    def step() -> None:
        block = blocks[state["i"] % len(blocks)]
        state["i"] += 1
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            loss = loss_of(model, block)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)

    return step


def hf_gpt2(shape: Shape) -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    cfg = GPT2Config(
        vocab_size=shape.vocab,
        n_positions=shape.context,
        n_embd=shape.dim,
        n_layer=shape.n_layers,
        n_head=shape.n_heads,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=0,
        eos_token_id=0,
    )
    return GPT2LMHeadModel._from_config(cfg, attn_implementation="sdpa")


class Interleave(Callback):
    """Runs the rounds from inside the minillm fit (see the module docstring).

    ``others`` are timed for ``steps`` calls a round; each of ``probes`` is called once a
    round and returns a tokens/s of its own (None: nothing more to report).
    """

    def __init__(
        self,
        others: dict[str, Callable[[], None]],
        probes: dict[str, Callable[[], float | None]],
        steps: int,
        warmup: int,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self.others, self.probes, self.steps, self.warmup = others, probes, steps, warmup
        self.clock = clock
        self.times: dict[str, list[float]] = {"minillm": [], **{k: [] for k in others}}
        self.reported: dict[str, list[float | None]] = {k: [] for k in probes}
        self.count, self.t0 = 0, 0.0
        self.failed: dict[str, str] = {}

    def on_train_batch_end(self, trainer: Any, pl_module: Any, *args: Any) -> None:
        device = pl_module.device
        self.count += 1
        if self.count < self.warmup or (self.count - self.warmup) % self.steps:
            return
        sync(device)
        warmup = self.count == self.warmup
        if not warmup:
            self.times["minillm"].append(self.clock() - self.t0)
        turn = len(self.times["minillm"]) % max(1, len(self.others))
        names = list(self.others)[turn:] + list(self.others)[:turn]  # rotate the order
        for name in names:
            self._guarded(name, self._time, name, device, warmup)
        for name in self.probes if not warmup else ():
            self._guarded(name, lambda n: self.reported[n].append(self.probes[n]()), name)
        sync(device)
        self.t0 = self.clock()

    def _time(self, name: str, device: torch.device, warmup: bool) -> None:
        sync(device)
        t0 = self.clock()
        for _ in range(self.warmup if warmup else self.steps):
            self.others[name]()
        sync(device)
        if not warmup:
            self.times[name].append(self.clock() - t0)

    def _guarded(self, name: str, fn: Callable[..., None], *args: Any) -> None:
        if name in self.failed:
            return
        try:
            fn(*args)
        except Exception as err:  # a kind still being written: report it, go on
            self.failed[name] = f"{type(err).__name__}: {str(err).splitlines()[0][:160]}"
            print(f"  {name} failed: {self.failed[name]}", file=sys.stderr, flush=True)


def e2e_probe(shape: Shape, steps: int, runs: int, out: Path) -> Callable[[], float | None]:
    """Runs ``train.py`` at ``shape`` (up to ``runs`` times): its last logged tokens/s."""
    done: list[Path] = []

    def probe() -> float | None:
        if len(done) >= runs:
            return None
        run_dir = out / f"e2e_{len(done)}"
        done.append(run_dir)
        cmd = [
            sys.executable,
            "train.py",
            f"model.dim={shape.dim}",
            f"model.n_layers={shape.n_layers}",
            f"model.n_heads={shape.n_heads}",
            f"model.max_len={shape.context}",
            f"batch_size={shape.batch}",
            f"trainer.max_steps={steps}",
            f"trainer.val_check_interval={steps}",
            "trainer.limit_val_batches=2",
            f"hydra.run.dir={run_dir}",
        ]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), *sys.path[1:]])}
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
        if proc.returncode:
            raise RuntimeError(f"train.py failed: {proc.stderr[-2000:]}")
        rows = list(csv.DictReader((run_dir / "logs" / "metrics.csv").open()))
        return [float(r["train/tokens_per_sec"]) for r in rows if r["train/tokens_per_sec"]][-1]

    return probe


def contenders(
    name: str, shape: Shape, args: argparse.Namespace, total: int
) -> tuple[dict[str, Callable[[], None]], dict[str, nn.Module]]:
    """The bare loop (fused loss and plain), bare[kind] for every kind (at ``--kinds-at``)
    and HF GPT-2."""
    device = torch.device(args.device)
    steps: dict[str, Callable[[], None]] = {}
    models: dict[str, nn.Module] = {}
    kinds = list(ATTENTION) if args.kinds == "all" else args.kinds.split(",")
    plain = logits_loss(lambda m, x: m(x))
    labels = [("bare", "mha", fused_loss), ("bare-ce", "mha", plain)]
    if name in args.kinds_at.split(","):
        labels += [(f"bare[{k}]", k, fused_loss) for k in kinds if k != "mha"]
    for label, kind, loss_of in labels:
        try:
            torch.manual_seed(0)
            models[label] = build_model(shape.model(kind)).to(device)
            steps[label] = loop_step(models[label], shape, device, total, loss_of)
        except Exception as err:  # a kind still being written
            print(f"  {label} failed to build: {err}", file=sys.stderr)
    if not args.no_hf:
        try:
            models["hf"] = hf_gpt2(shape).to(device)
        except ImportError:
            print("  hf skipped: transformers is not installed (pip install transformers)")
        else:
            hf_loss = logits_loss(lambda m, x: m(input_ids=x).logits)
            steps["hf"] = loop_step(models["hf"], shape, device, total, hf_loss)
    return steps, models


def fit_minillm(
    shape: Shape, args: argparse.Namespace, total: int, driver: Callback, out: Path
) -> nn.Module:
    """A real fit of ``total`` steps as train.py builds it, on random token blocks."""
    torch.manual_seed(0)
    module = LMModule(model=shape.model("mha"), optim={}, total_steps=total)
    source = {"source": "text", "files": ["never-read.txt"]}  # the blocks are set below
    data = LMDataModule(source, max_len=shape.context, batch_size=shape.batch, total_steps=total)
    rng = np.random.default_rng(0)  # blocks as setup() leaves them: (n, context + 1) int32
    blocks = rng.integers(0, shape.vocab, (shape.batch * total, shape.context + 1))
    data.train_blocks = blocks.astype(np.int32)
    data.valid_blocks, data.vocab_size = data.train_blocks[:1], shape.vocab
    cfg = TrainerConfig(
        accelerator=torch.device(args.device).type,
        max_steps=total,
        val_check_interval=total,
        limit_val_batches=0,
        checkpoint_every_n_steps=10**9,
    )
    trainer = build_trainer(cfg, out, build_logger(LoggerConfig(), out), [driver])
    with open(os.devnull, "w") as null:  # progress bar and summary drawn, not shown
        with contextlib.redirect_stdout(null), contextlib.redirect_stderr(null):
            trainer.fit(module, datamodule=data)
    return module.model


def bench_config(name: str, shape: Shape, args: argparse.Namespace) -> dict[str, Any]:
    steps = args.steps or (3 if shape.context * shape.batch * shape.dim < 2e5 else 1)
    total = args.warmup + args.repeats * steps
    others, models = contenders(name, shape, args, total)
    out = Path(tempfile.mkdtemp(prefix="bench_train_"))
    probes = {}
    if name in args.e2e.split(",") and args.clock == "wall":
        probes["e2e"] = e2e_probe(shape, args.e2e_steps, args.e2e_runs, out)
    driver = Interleave(others, probes, steps, args.warmup, CLOCKS[args.clock])
    models["minillm"] = fit_minillm(shape, args, total, driver, out)
    if not args.keep:
        shutil.rmtree(out, ignore_errors=True)

    result: dict[str, Any] = {"shape": asdict(shape), "steps_per_round": steps, "failed": {}}
    for label, times in driver.times.items():
        if label in driver.failed or not times:
            result["failed"][label] = driver.failed.get(label, "no timed rounds")
            continue
        rates = [steps * shape.batch * shape.context / t for t in times]
        result[label] = {"tokens_per_sec": statistics.median(rates), "rounds": rates}
        if label != "hf":  # GPT-2's Conv1D layers are not counted by minillm's FLOPs
            with contextlib.suppress(NotImplementedError):
                flops = train_flops_per_token(models[label], shape.context)
                result[label]["gflops"] = result[label]["tokens_per_sec"] * flops / 1e9
    minillm = result.get("minillm", {}).get("rounds", [])
    around = [statistics.mean(minillm[i : i + 2]) for i in range(len(minillm))]
    for label, values in driver.reported.items():  # vs the minillm rounds just before/after
        pairs = [(v, m) for v, m in zip(values, around, strict=False) if v is not None]
        if label in driver.failed or not pairs:
            result["failed"][label] = driver.failed.get(label, "no runs")
            continue
        result[label] = {
            "tokens_per_sec": statistics.median(v for v, _ in pairs),
            "rounds": [v for v, _ in pairs],
            "paired_minillm": [m for _, m in pairs],
            "run_dir": str(out) if args.keep else None,
        }
    return result


def ratio(result: dict[str, Any], num: str, den: str) -> float | None:
    """Median over rounds of num/den tokens/s (paired); e2e pairs with its own minillm rounds."""
    if num not in result or den not in result:
        return None
    a = result[num]["rounds"]
    b = result[num].get("paired_minillm") or result[den]["rounds"]
    return statistics.median(x / y for x, y in zip(a, b, strict=False))


def report(results: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    for name, res in results.items():
        s = res["shape"]
        print(
            f"\n({name}) {s['n_layers']} layers / {s['n_heads']} heads / dim {s['dim']} / "
            f"context {s['context']} / batch {s['batch']}; {res['steps_per_round']} steps/round"
        )
        print(f"  {'contender':<20}{'tokens/s':>10}{'GFLOP/s':>9}{'vs bare':>9}{'vs hf':>8}")
        for label, entry in res.items():
            if not isinstance(entry, dict) or "tokens_per_sec" not in entry:
                continue
            gf = f"{entry['gflops']:.1f}" if "gflops" in entry else "-"
            vb, vh = ratio(res, label, "bare"), ratio(res, label, "hf")
            vb = "-" if vb is None or label == "e2e" else f"{vb:.3f}"
            vh = "-" if vh is None or label == "e2e" else f"{vh:.3f}"
            print(f"  {label:<20}{entry['tokens_per_sec']:>10.0f}{gf:>9}{vb:>9}{vh:>8}")
        for label, err in res["failed"].items():
            print(f"  {label:<20} failed: {err}")
    verdicts = []
    print("\ngoals (median of per-round ratios):")
    for (num, den, cfg), goal in GOALS.items():
        value = ratio(results[cfg], num, den) if cfg in results else None
        if value is None:
            continue
        ok = value >= goal
        verdicts.append({"measure": f"{num}/{den} ({cfg})", "value": value, "goal": goal, "ok": ok})
        print(f"  {num} / {den} ({cfg}): {value:.3f}  goal >= {goal}  {'met' if ok else 'MISSED'}")
    return verdicts


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--configs", default="a,b", help="comma list of a, b")
    p.add_argument("--repeats", type=int, default=15, help="timed rounds (median reported)")
    p.add_argument("--steps", type=int, default=0, help="steps per contender per round (0: auto)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per contender first")
    p.add_argument("--kinds", default="all", help="attention kinds for bare[kind] (comma list)")
    p.add_argument("--kinds-at", default="b", help="configs where every kind runs")
    p.add_argument("--no-hf", action="store_true", help="skip HF GPT-2")
    p.add_argument("--e2e", default="", help="configs for the train.py check, e.g. b or a,b")
    p.add_argument("--e2e-steps", type=int, default=40, help="train.py max_steps")
    p.add_argument("--e2e-runs", type=int, default=3, help="train.py runs (one a round)")
    p.add_argument("--clock", choices=sorted(CLOCKS), default="wall", help="see CLOCKS")
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quick", action="store_true", help="2 rounds of 1-2 steps: a smoke run")
    p.add_argument("--json", help="write the results here")
    p.add_argument("--keep", action="store_true", help="keep the run directories (e2e logs)")
    args = p.parse_args()
    if args.quick:
        args.repeats, args.warmup, args.steps = 2, 1, args.steps or 1
        args.e2e_steps, args.e2e_runs = min(args.e2e_steps, 25), 1
    return args


def main() -> None:
    args = parse_args()
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)
    env = {
        "torch": torch.__version__,
        "device": torch.cuda.get_device_name() if args.device == "cuda" else platform.processor(),
        "threads": torch.get_num_threads(),
        "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "unset"),
        "dtype": "bf16-mixed" if args.device == "cuda" else "fp32",
        "clock": args.clock,
    }
    print("bench_train:", ", ".join(f"{k}={v}" for k, v in env.items()), flush=True)
    results = {}
    for name in args.configs.split(","):
        shape = Shape(**{**asdict(CONFIGS[name]), "vocab": args.vocab})
        results[name] = bench_config(name, shape, args)
    verdicts = report(results)
    if args.json:
        payload = {"env": env, "args": vars(args), "results": results, "goals": verdicts}
        Path(args.json).write_text(json.dumps(payload, indent=2))
        print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
