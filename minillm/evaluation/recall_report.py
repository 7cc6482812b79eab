"""The recall sweep's report (``experiment=recall``): ``recall.md`` and ``recall.png``.

A sweep folder holds one run directory per (kind, width), each with the ``metrics.json`` that
``minillm.training.run_metrics`` writes (``recall_acc``: the final ``val/recall_acc``,
``model``, ``seq_len``). The table and chart set each run's accuracy against its **state bytes
per layer**: the generation cache of one causal attention module of the run's kind and width
for one sequence of ``seq_len`` tokens in fp32 (``init_cache(1, seq_len, "cpu",
torch.float32).nbytes``). For softmax kinds that is the KV cache, which grows with
``seq_len``; for recurrent kinds the fixed state; for ``local`` its rolling window.

Runs of one (kind, width) that differ in learning rate (``experiment=recall`` sweeps
``optim.lr``, as Zoology does: the plateau before recall is learnt ends at a width-dependent
rate) make one row: the best accuracy, its learning rate and every rate's accuracy.

``RecallReport`` writes the report when the sweep ends (a Hydra callback);
``python -m minillm.evaluation.recall_report <out folder> [run or sweep folders...]`` writes it
by hand, e.g. for the runs of two sweep commands together (the first folder when none follow).
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from hydra.experimental.callback import Callback

from minillm.attention import build_attention
from minillm.evaluation.charts import plot_recall
from minillm.evaluation.report import find_runs, format_bytes, sweep_command

log = logging.getLogger(__name__)


def state_bytes(model: Mapping[str, Any], seq_len: int) -> int:
    """Bytes of one layer's generation cache for one ``seq_len``-token sequence, fp32."""
    with torch.device("meta"):  # the weights are not needed, only the cache's shapes
        attn = build_attention(model["attn"], model["dim"], model["n_heads"], "causal")
    return attn.init_cache(1, seq_len, "cpu", torch.float32).nbytes


def load_recall_run(run_dir: Path) -> dict[str, Any]:
    """metrics.json plus ``name``, ``dim`` and ``state_bytes``."""
    run = json.loads((run_dir / "metrics.json").read_text())
    model = run["model"]
    seq_len = run.get("seq_len") or model["max_len"]
    return {
        **run,
        "name": run_dir.name,
        "dim": model["dim"],
        "lr": (run.get("optim") or {}).get("lr"),
        "seq_len": seq_len,
        "state_bytes": state_bytes(model, seq_len),
    }


def best_per_point(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One run per (kind, dim), in sweep order: the most accurate, with ``tried``: (lr,
    accuracy) of every run of that point, by learning rate."""
    points: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for r in runs:
        points.setdefault((r["kind"], r["dim"]), []).append(r)
    best = []
    for same in points.values():
        top = max(same, key=lambda r: -1.0 if r.get("recall_acc") is None else r["recall_acc"])
        tried = sorted((r["lr"], r.get("recall_acc")) for r in same if r["lr"] is not None)
        best.append({**top, "tried": tried})
    return best


def _percent(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.1f}%"


def table(runs: list[dict[str, Any]]) -> str:
    """One row per run, grouped by kind (in sweep order), then by width."""
    head = ["kind", "dim", "params", "state / layer", "val recall acc", "lr", "acc per lr",
            "val loss", "steps", "train min"]  # fmt: skip
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in runs:
        tried = ", ".join(f"{lr:g}: {_percent(acc)}" for lr, acc in r.get("tried", []))
        cells = [
            r["kind"],
            str(r["dim"]),
            f"{r['params'] / 1e6:.3f}M",
            format_bytes(r["state_bytes"]),
            _percent(r.get("recall_acc")),
            f"{r['lr']:g}" if r.get("lr") is not None else "–",
            tried or "–",
            f"{r['val_loss']:.3f}",
            str(r.get("global_step")),
            f"{r['train_s'] / 60:.1f}" if r.get("train_s") else "–",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _order(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    kinds = list(dict.fromkeys(r["kind"] for r in runs))
    return sorted(runs, key=lambda r: (kinds.index(r["kind"]), r["dim"], r["name"]))


def render(runs: list[dict[str, Any]], root: Path) -> str:
    """recall.md's text: the task, the command, the table, what the columns mean, the chart."""
    first, command = runs[0], sweep_command(root)
    data, model = first.get("data") or {}, first["model"]
    queries = data.get("n_queries") or data.get("n_pairs")
    n_runs = sum(max(len(r.get("tried", [])), 1) for r in runs)
    text = [
        f"# Associative recall (MQAR): {root.name}\n",
        f"{n_runs} runs; {data.get('n_pairs')} key-value pairs and {queries} queries in "
        f"{first['seq_len']} tokens, vocabulary {data.get('vocab_size')}; "
        f"n_layers {model['n_layers']}, n_heads {model['n_heads']}; {first.get('global_step')} "
        f"steps of {first.get('train_tokens', 0) // max(first.get('global_step') or 1, 1):,} "
        f"tokens; trained on {first.get('device')}, torch threads {first.get('torch_threads')}.\n",
        *([f"```\n{command}\n```\n"] if command else []),
        table(runs) + "\n",
        "- **val recall acc**: answers (the value after a queried key) predicted exactly by "
        "argmax, over the whole validation set, at the last step; of the learning rates "
        "tried (**acc per lr**), the best (**lr**); the other columns are that run's.\n"
        "- **state / layer**: bytes of one layer's generation cache for one sequence of "
        f"{first['seq_len']} tokens, fp32: the KV cache for softmax kinds (it grows with the "
        "sequence), the fixed recurrent state for linear kinds, the rolling window for "
        "`local`.\n"
        "- **params**: every weight; a sweep with `match_params` sizes each kind's MLP to "
        "the reference kind's count at each width.\n",
        "![recall accuracy against state bytes per layer](recall.png)\n",
    ]
    return "\n".join(text)


def write_recall_report(root: str | Path, runs: Sequence[str | Path] = ()) -> Path:
    """Write ``recall.md`` and ``recall.png`` into ``root`` from the runs under it (or under
    each of ``runs``); returns the path of ``recall.md``."""
    root = Path(root)
    dirs = [d for r in (runs or [root]) for d in find_runs(r)]
    root.mkdir(parents=True, exist_ok=True)
    if not dirs:
        raise FileNotFoundError(f"no run directory with a metrics.json in {root}")
    loaded = _order(best_per_point([load_recall_run(d) for d in dirs]))
    plot_recall(loaded, root / "recall.png")
    path = root / "recall.md"
    path.write_text(render(loaded, root))
    return path


class RecallReport(Callback):
    """Hydra callback: writes the recall report into the sweep folder when the multirun ends.

    Configured under ``hydra.callbacks`` (conf/experiment/recall.yaml). A failure is logged
    with the command that retries it; the runs themselves are finished and kept.
    """

    def on_multirun_end(self, config: Any, **kwargs: Any) -> None:
        root = Path(config.hydra.sweep.dir)
        try:
            path = write_recall_report(root)
        except Exception as err:  # the runs are done and kept: say how to retry
            log.error(
                "recall report failed (%r); retry: python -m minillm.evaluation.recall_report %s",
                err,
                root,
            )
            return
        log.info("recall report: %s", path)


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit("usage: python -m minillm.evaluation.recall_report <out folder> [run folders...]")
    print(write_recall_report(sys.argv[1], sys.argv[2:]).read_text())
