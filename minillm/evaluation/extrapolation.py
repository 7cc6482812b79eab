"""Length extrapolation: perplexity of checkpoints against the evaluation context.

``scripts/evaluate.py metric=ppl contexts=[256,512,1024,2048] ckpt=[a.ckpt,b.ckpt]`` scores
every checkpoint with sliding windows of each length (``perplexity`` in ``mode="window"``,
stride half the window unless given) on the same documents, and writes the rows as JSON, a
Markdown table (one row per checkpoint, one column per context) and a PNG (one line per
checkpoint, labelled by its positions and attention kind). A context a model cannot take
(``learned`` positions past their table) is recorded with its reason and left out of the
line, not guessed.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from minillm.evaluation.charts import pyplot


def model_label(cfg: Any) -> str:
    """``<positions> / <attention>`` of a model config, e.g. ``alibi / mha``, plus its XL
    memory if any: the line name. ``positions`` None: each kind's own default."""
    positions = getattr(cfg, "positions", None)
    name = positions if isinstance(positions, str) or positions is None else positions["kind"]
    memory = getattr(cfg, "memory_len", 0)
    return f"{name or 'default'} / {cfg.attn_label}" + (f" + XL memory {memory}" if memory else "")


def score_contexts(
    score: Callable[[int], Any], contexts: Sequence[int], label: str, max_len: int
) -> list[dict[str, Any]]:
    """One row per context: ``score(window)`` returns a ``PerplexityResult`` or raises
    ``ValueError`` when the model cannot take that window (the reason is kept)."""
    rows = []
    for context in contexts:
        row: dict[str, Any] = {"label": label, "context": context, "train_len": max_len}
        try:
            result = score(context)
        except ValueError as err:
            rows.append({**row, "ppl": None, "skipped": str(err)})
            continue
        rows.append({**row, **result.to_dict(), "ppl": result.ppl})
    return rows


def extrapolation_table(rows: list[dict[str, Any]]) -> str:
    """Markdown: a row per label, a column per context (× its training length), ppl cells."""
    contexts = sorted({r["context"] for r in rows})
    labels = list(dict.fromkeys(r["label"] for r in rows))
    cell = {(r["label"], r["context"]): r for r in rows}
    lines = [
        "| model | trained at | " + " | ".join(f"ppl @{c}" for c in contexts) + " |",
        "|---|---|" + "---|" * len(contexts),
    ]
    for label in labels:
        train_len = next(r["train_len"] for r in rows if r["label"] == label)
        cells = []
        for c in contexts:
            r = cell.get((label, c))
            cells.append("—" if r is None or r["ppl"] is None else f"{r['ppl']:.2f}")
        lines.append(f"| {label} | {train_len} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_extrapolation(rows: list[dict[str, Any]], path: Path) -> None:
    """Perplexity (log scale) against evaluation context (log 2), one line per label."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(9.5, 4.5))
    for label in dict.fromkeys(r["label"] for r in rows):
        points = [(r["context"], r["ppl"]) for r in rows if r["label"] == label and r["ppl"]]
        points = [(c, p) for c, p in sorted(points) if math.isfinite(p)]
        if points:
            ax.plot(*zip(*points, strict=True), marker="o", label=label)
    train_lens = sorted({r["train_len"] for r in rows})
    for t in train_lens:
        ax.axvline(t, color="grey", linestyle=":", linewidth=1)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(plt.matplotlib.ticker.ScalarFormatter())
    ax.yaxis.set_minor_formatter(plt.matplotlib.ticker.ScalarFormatter())
    ax.set(xlabel="evaluation context (tokens; dotted: training length)", ylabel="perplexity")
    ax.set_title("Length extrapolation")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))  # beside, not over
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_extrapolation(rows: list[dict[str, Any]], out: Path) -> tuple[Path, Path]:
    """``out`` with suffixes .md (the table) and .png (the chart); returns both paths."""
    table, chart = out.with_suffix(".md"), out.with_suffix(".png")
    table.write_text(extrapolation_table(rows))
    plot_extrapolation(rows, chart)
    return table, chart
