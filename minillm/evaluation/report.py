"""The attention comparison report of a sweep: ``report.md`` and PNG charts beside its runs.

A sweep folder (``python train.py -m experiment=compare attn=...``) holds one run directory
per kind, each with ``logs/metrics.csv``, ``metrics.json`` (written when training ends, see
``minillm.training.run_metrics``) and ``checkpoints/best.ckpt``. ``write_report`` reads them,
measures decoding, and writes ``report.md``, ``val_loss.png``, ``decode.png`` and, given
``scripts/bench_attention.py``'s JSON, ``train_step_time.png``. ``SweepReport`` does it when
the sweep ends (a Hydra callback); ``scripts/report.py`` does it by hand.

Decode speed is measured here, one run after another in one process (so every kind sees the
same machine load): the best checkpoint on ``device``, batch 1, a random prompt of ``context``
tokens prefilled into caches sized for it, then ``warmup`` + ``new_tokens`` greedy steps of
``minillm.generation.decode_step`` (eager); ms/token is the median step, tokens/s its inverse.
Cache bytes are those of ``init_caches(1, context)``. Trained context does not matter for speed,
so softmax kinds are timed past their ``max_len`` too (RoPE takes any position).
"""

from __future__ import annotations

import csv
import json
import logging
import math
import re
import shlex
import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from hydra.experimental.callback import Callback
from omegaconf import OmegaConf

from minillm.checkpoint import load_checkpoint
from minillm.evaluation.charts import plot_decode, plot_step_time, plot_val_loss, run_label
from minillm.generation import decode_step, prefill

log = logging.getLogger(__name__)
DEFAULT_CONTEXTS = (128, 512, 2048)


def find_runs(root: str | Path) -> list[Path]:
    """``root`` if it is a run directory, else its subfolders holding a ``metrics.json``, in
    job order (``<job>_<kind>``)."""
    root = Path(root)
    if (root / "metrics.json").is_file():
        return [root]
    runs = [p for p in root.iterdir() if (p / "metrics.json").is_file()]
    return sorted(
        runs, key=lambda p: [int(s) if s.isdigit() else s for s in re.split(r"(\d+)", p.name)]
    )


def read_log(path: str | Path) -> dict[str, dict[int, float]]:
    """metric -> {step: value} from a CSV log; a step logged twice (resume) keeps its last row."""
    out: dict[str, dict[int, float]] = {}
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            if not row.get("step"):
                continue
            step = int(float(row["step"]))
            for name, value in row.items():
                if name not in ("step", "epoch") and value not in ("", None):
                    out.setdefault(name, {})[step] = float(value)
    return out


@torch.inference_mode()
def measure_decode(
    model: torch.nn.Module, contexts: Sequence[int], new_tokens: int = 16, warmup: int = 2
) -> dict[int, dict[str, float]]:
    """context -> ms_per_token, tokens_per_sec, cache_bytes (see the module docstring)."""
    model.eval()
    device = next(model.parameters()).device
    gen = torch.Generator().manual_seed(0)
    out = {}
    for context in contexts:
        caches = model.init_caches(1, context + warmup + new_tokens)
        prompt = torch.randint(4, model.cfg.vocab_size, (1, context), generator=gen)
        token = prefill(model, prompt.to(device), None, caches).argmax(-1, keepdim=True)  # (1, 1)
        times = []
        for i in range(warmup + new_tokens):
            position = torch.full((1, 1), context + i, device=device)
            start = time.perf_counter()
            token = decode_step(model, token, position, caches).argmax(-1, keepdim=True)
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        ms = 1e3 * statistics.median(times[warmup:])
        del caches
        cache_bytes = sum(c.nbytes for b in model.init_caches(1, context) for c in b if c)
        out[context] = {"ms_per_token": ms, "tokens_per_sec": 1e3 / ms, "cache_bytes": cache_bytes}
    return out


def load_run(
    run_dir: Path, contexts: Sequence[int], new_tokens: int, device: str
) -> dict[str, Any]:
    """metrics.json + the CSV log + decode measurements (empty without a checkpoint)."""
    run = json.loads((run_dir / "metrics.json").read_text())
    run.update(name=run_dir.name, dir=run_dir)
    csv_log = run_dir / "logs" / "metrics.csv"
    run["log"] = read_log(csv_log) if csv_log.is_file() else {}
    ckpt = run.get("best_ckpt") or run.get("last_ckpt")
    run["decode"] = {}
    if ckpt and Path(ckpt).is_file() and contexts:
        model, _ = load_checkpoint(ckpt)
        run["decode"] = measure_decode(model.to(device), contexts, new_tokens)
    return run


def _fmt(value: float | None, spec: str, unit: str = "") -> str:
    if value is None or math.isnan(value):
        return "–"
    return format(value, spec) + unit


def format_bytes(n: float | None) -> str:
    if n is None:
        return "–"
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n / 2**10:.1f} KiB"


def table(runs: list[dict[str, Any]], contexts: Sequence[int]) -> str:
    """The markdown table, one row per run; decode at the shortest and longest context."""
    lo, hi = contexts[0], contexts[-1]
    ref = next((r["val_ppl"] for r in runs if r.get("kind") == "mha"), None)
    head = ["kind", "params", "val ppl", "vs mha", "bits/byte", "train tok/s", "peak train mem",
            f"decode tok/s @{lo}", f"decode tok/s @{hi}", f"cache @{hi}"]  # fmt: skip
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in runs:
        low, high = r["decode"].get(lo, {}), r["decode"].get(hi, {})
        cells = [
            run_label(r, runs),
            _fmt(r["params"] / 1e6, ".3f", "M"),
            _fmt(r["val_ppl"], ".2f"),
            _fmt(100 * (r["val_ppl"] / ref - 1) if ref else None, "+.1f", "%"),
            _fmt(r.get("bits_per_byte"), ".3f"),
            _fmt(r.get("train_tokens_per_sec"), ",.0f"),
            _fmt(r.get("peak_memory_mb"), ",.0f", " MiB"),
            _fmt(low.get("tokens_per_sec"), ".1f"),
            _fmt(high.get("tokens_per_sec"), ".1f"),
            format_bytes(high.get("cache_bytes")),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


NOTES = """\
- **params**: every weight, embeddings included (`experiment=compare` sizes each kind's MLP
  to `mha`'s count: `match_params`). **val ppl**: the final validation; **vs mha**: its gap
  to `mha`'s. **bits/byte**: validation loss in bits x validation tokens per UTF-8 byte.
- **train tok/s**: training tokens / training wall time (validation excluded), whole run.
- **peak train mem**: {memory}
- **decode**: the best checkpoint on {device}, batch 1, greedy, eager; a random prompt of
  `context` tokens prefilled, then the median of {new_tokens} single-token steps; **cache**:
  bytes of the generation caches holding `context` tokens. Measured back to back by
  `minillm.evaluation.report`, {threads} torch threads.
"""

MEMORY = {
    "cuda_max_allocated": "`torch.cuda.max_memory_allocated` during `fit` (tensors only).",
    "cpu_peak_rss_fit": "the training process's peak resident memory (VmHWM) during `fit`, "
    "all of it (Python, torch, data, weights, optimizer, activations).",
    "cpu_peak_rss_process": "the process's peak resident memory since it started (ru_maxrss).",
}


def sweep_command(root: Path) -> str | None:
    """The ``train.py -m`` command line that made the sweep, from its ``multirun.yaml``."""
    path = root / "multirun.yaml"
    if not path.is_file():
        return None
    overrides = OmegaConf.load(path).hydra.overrides
    skip = ("hydra.mode=", "hydra.sweep.dir=")
    args = [*overrides.task, *(o for o in overrides.hydra if not o.startswith(skip))]
    return "python train.py -m " + " ".join(shlex.quote(a) for a in args)


def render(runs: list[dict[str, Any]], root: Path, contexts: Sequence[int], **notes: Any) -> str:
    """report.md's text: summary line, the command, the table, how it was measured, charts."""
    first, charts = runs[0], notes.pop("charts")
    model, command = first.get("model", {}), sweep_command(root)
    text = [
        f"# Attention comparison: {root.name}\n",
        f"{len(runs)} runs, {first.get('global_step')} steps, "
        f"{first.get('train_tokens', 0):,} training tokens each; "
        f"model {model.get('n_layers')} x {model.get('dim')}, {model.get('n_heads')} heads, "
        f"context {model.get('max_len')}, vocab {model.get('vocab_size')}; "
        f"trained on {first.get('device')}.\n",
        *([f"```\n{command}\n```\n"] if command else []),
        table(runs, contexts) + "\n",
        NOTES.format(memory=MEMORY.get(first.get("memory_measure"), "not measured."), **notes),
        *(f"![{c[:-4]}]({c})\n" for c in charts),
    ]
    return "\n".join(text)


def write_report(
    root: str | Path,
    *,
    runs: Sequence[str | Path] = (),
    contexts: Sequence[int] = DEFAULT_CONTEXTS,
    new_tokens: int = 16,
    bench: str | Path | None = None,
    device: str | None = None,
) -> Path:
    """Write ``report.md`` (+ ``report.json``: the decode numbers) and the charts into
    ``root``, from the runs under it (or under ``runs``)."""
    root = Path(root)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dirs = [d for r in (runs or [root]) for d in find_runs(r)]
    if not dirs:
        raise FileNotFoundError(f"no run directory with a metrics.json in {root}")
    contexts = sorted(contexts)
    loaded = []
    for d in dirs:
        log.info("report: %s", d)
        loaded.append(load_run(d, contexts, new_tokens, device))
    plot_val_loss(loaded, root / "val_loss.png")
    charts = ["val_loss.png"]
    if any(r["decode"] for r in loaded):
        plot_decode(loaded, root / "decode.png")
        charts.append("decode.png")
    if bench:
        plot_step_time(json.loads(Path(bench).read_text()), root / "train_step_time.png")
        charts.append("train_step_time.png")
    threads = torch.get_num_threads()
    text = render(loaded, root, contexts, charts=charts, device=device, new_tokens=new_tokens,
                  threads=threads)  # fmt: skip
    path = root / "report.md"
    path.write_text(text)
    decode = {r["name"]: r["decode"] for r in loaded}
    (root / "report.json").write_text(json.dumps({"decode": decode}, indent=1))
    return path


class SweepReport(Callback):
    """Hydra callback: writes the report into the sweep folder when the multirun ends.

    Configured under ``hydra.callbacks`` (conf/experiment/compare.yaml). A failure is logged
    with the command that retries it; the runs themselves are finished and kept.
    """

    def __init__(
        self,
        contexts: Sequence[int] = DEFAULT_CONTEXTS,
        new_tokens: int = 16,
        bench: str | None = None,
    ) -> None:
        self.contexts, self.new_tokens, self.bench = list(contexts), new_tokens, bench

    def on_multirun_end(self, config: Any, **kwargs: Any) -> None:
        root = Path(config.hydra.sweep.dir)
        try:
            path = write_report(
                root, contexts=self.contexts, new_tokens=self.new_tokens, bench=self.bench
            )
        except Exception as err:  # the runs are done and kept: say how to retry
            log.error("report failed (%r); retry: python scripts/report.py sweep=%s", err, root)
            return
        log.info("report: %s", path)
