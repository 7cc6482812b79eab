"""The comparison report's charts (``minillm.evaluation.report``): matplotlib, Agg backend.

``plot_val_loss`` and ``plot_decode`` take the loaded runs (dicts from ``report.load_run``:
``kind``, ``name``, ``log`` metric -> {step: value}, ``decode`` context -> numbers),
``plot_step_time`` the JSON of ``scripts/bench_attention.py``, ``plot_recall`` the runs of the
recall sweep (``minillm.evaluation.recall_report``); each writes one PNG.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


def run_label(run: dict[str, Any], runs: list[dict[str, Any]]) -> str:
    """The kind, or the run directory's name when two runs share a kind."""
    same = sum(r.get("kind") == run.get("kind") for r in runs)
    return run.get("kind") or run["name"] if same == 1 else run["name"]


def pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_val_loss(runs: list[dict[str, Any]], path: Path) -> None:
    plt = pyplot()
    fig, (by_step, by_time) = plt.subplots(1, 2, figsize=(12, 4.5))
    for r in runs:
        val, elapsed = r["log"].get("val/loss", {}), r["log"].get("time/elapsed_s", {})
        steps = sorted(val)
        by_step.plot(steps, [val[s] for s in steps], marker=".", label=run_label(r, runs))
        timed = [s for s in steps if s in elapsed]
        by_time.plot([elapsed[s] / 60 for s in timed], [val[s] for s in timed], marker=".")
    by_step.set(xlabel="step", ylabel="validation loss (nats/token)", title="vs step")
    by_time.set(xlabel="wall time (min, validation included)", title="vs wall time")
    for ax in (by_step, by_time):
        ax.grid(True, alpha=0.3)
    by_step.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_decode(runs: list[dict[str, Any]], path: Path) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for r in runs:
        ctx = sorted(r["decode"])
        ax.plot(
            ctx, [r["decode"][c]["ms_per_token"] for c in ctx], marker="o", label=run_label(r, runs)
        )
    ax.set(xscale="log", xlabel="context (tokens in the cache)", ylabel="ms per new token")
    contexts = sorted({c for r in runs for c in r["decode"]})
    ax.set_xticks(contexts, [str(c) for c in contexts])
    ax.set_xticks([], minor=True)
    ax.set_title("decode time per token (batch 1)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_step_time(bench: dict[str, Any], path: Path) -> None:
    """Forward+backward time of one attention module against T, from bench_attention's JSON."""
    plt = pyplot()
    results = {int(t): row for t, row in bench["results"].items()}
    kinds = list(dict.fromkeys(k for row in results.values() for k in row))
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for kind in kinds:
        ts = sorted(t for t in results if kind in results[t])
        ax.plot(ts, [results[t][kind]["module_ms"] for t in ts], marker="o", label=kind)
    cfg = bench.get("config", {})
    ax.set(xscale="log", yscale="log", xlabel="sequence length T", ylabel="ms (fwd + bwd)")
    ax.set_xticks(sorted(results), [str(t) for t in sorted(results)], rotation=45)
    ax.set_xticks([], minor=True)
    ax.set_title(f"attention training step, B={cfg.get('batch')} H={cfg.get('heads')} "
                 f"D={cfg.get('head_dim')}")  # fmt: skip
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_recall(runs: list[dict[str, Any]], path: Path) -> None:
    """Recall accuracy against state bytes per layer, one line per kind across widths
    (runs from ``recall_report.load_recall_run``: ``kind``, ``dim``, ``state_bytes``,
    ``recall_acc``); each point is labelled with its width."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for kind in dict.fromkeys(r["kind"] for r in runs):
        mine = sorted((r for r in runs if r["kind"] == kind), key=lambda r: r["state_bytes"])
        x = [r["state_bytes"] / 2**10 for r in mine]
        y = [100 * (r["recall_acc"] if r["recall_acc"] is not None else float("nan")) for r in mine]
        ax.plot(x, y, marker="o", label=kind)
        for r, xi, yi in zip(mine, x, y, strict=True):
            ax.annotate(f"d{r['dim']}", (xi, yi), textcoords="offset points", xytext=(4, 4),
                        fontsize=7)  # fmt: skip
    ax.set_xscale("log", base=2)
    ax.xaxis.set_major_formatter(lambda value, _: f"{value:g}")
    ax.set(xlabel="state per layer (KiB, fp32; softmax kinds: KV cache at seq_len)",
           ylabel="validation recall accuracy (%)", ylim=(-2, 102))  # fmt: skip
    ax.set_title("MQAR recall against state size")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
