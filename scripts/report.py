"""Write the attention comparison report of a sweep: ``report.md`` and PNG charts beside it.

    python scripts/report.py multirun/<date>/<time>_compare
    python scripts/report.py multirun/<date>/<time>_compare --bench bench_out/attention.json
    python scripts/report.py <sweep> --contexts 128,512,2048,8192 --new-tokens 32

``python train.py -m experiment=compare attn=...`` writes the same report when the sweep ends;
run this to redo it (e.g. with ``scripts/bench_attention.py``'s JSON for the step-time chart).
What each column measures: ``minillm/evaluation/report.py`` and the notes under the table.
"""

from __future__ import annotations

import argparse
import logging

from minillm.evaluation.report import DEFAULT_CONTEXTS, write_report


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("sweep", help="a sweep folder (or a single run directory)")
    p.add_argument("runs", nargs="*", help="report these runs or sweeps instead (written to SWEEP)")
    p.add_argument("--bench", help="scripts/bench_attention.py's attention.json: step-time chart")
    p.add_argument("--contexts", default=",".join(map(str, DEFAULT_CONTEXTS)),
                   help="decode contexts (the table shows the first and the last)")  # fmt: skip
    p.add_argument("--new-tokens", type=int, default=16, help="timed decode steps per context")
    p.add_argument("--device", default=None, help="decode device (default: cuda if available)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    path = write_report(
        args.sweep,
        runs=args.runs,
        contexts=[int(c) for c in args.contexts.split(",") if c],
        new_tokens=args.new_tokens,
        bench=args.bench,
        device=args.device,
    )
    print(path.read_text())
    print(f"wrote {path} and its charts")


if __name__ == "__main__":
    main()
