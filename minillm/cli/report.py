"""``python scripts/report.py`` / ``minillm-report``: the attention comparison report of a
sweep, ``report.md`` and PNG charts written into the sweep folder.

    minillm-report sweep=multirun/<date>/<time>_compare
    minillm-report sweep=multirun/<date>/<time>_compare bench=bench_out/attention.json
    minillm-report sweep=<folder> contexts=[128,512,2048,8192] new_tokens=32
    minillm-report sweep=<folder> 'runs=[multirun/a,multirun/b]'   # runs from elsewhere

``python train.py -m experiment=compare attn=...`` writes the same report when the sweep ends;
run this to redo it (e.g. with ``scripts/bench_attention.py``'s JSON for the step-time chart).
What each column measures: ``minillm/evaluation/report.py`` and the notes under the table.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from minillm import checks
from minillm.cli.app import hydra_app
from minillm.cli.devices import resolve_device
from minillm.evaluation.report import DEFAULT_CONTEXTS, write_report


@dataclass
class ReportConfig:
    """conf/report.yaml."""

    sweep: str = MISSING  # a sweep folder (or a single run directory); the report goes here
    runs: list[str] = field(default_factory=list)  # report these runs or sweeps instead
    bench: str | None = None  # scripts/bench_attention.py's attention.json: step-time chart
    contexts: list[int] = field(default_factory=lambda: list(DEFAULT_CONTEXTS))  # decode
    new_tokens: int = 16  # timed decode steps per context
    device: str = "auto"  # decode device: auto | cpu | cuda | cuda:1 ...

    def __post_init__(self) -> None:
        if not self.contexts:
            raise ValueError("contexts=[]: give at least one decode context, e.g. [128,2048]")
        for context in self.contexts:
            checks.integer("contexts", context)
        checks.integer("new_tokens", self.new_tokens)
        resolve_device(self.device)


def validate(cfg: dict[str, Any]) -> ReportConfig:
    args = ReportConfig(**cfg)
    for path in (args.sweep, *args.runs):
        if not Path(path).is_dir():
            raise FileNotFoundError(f"{path}: no such sweep or run folder")
    if args.bench and not Path(args.bench).is_file():
        raise FileNotFoundError(f"bench={args.bench}: no such file")
    return args


def report(args: ReportConfig) -> Path:
    """Write the report and its charts; returns the path of ``report.md``."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    path = write_report(
        args.sweep,
        runs=args.runs,
        contexts=args.contexts,
        new_tokens=args.new_tokens,
        bench=args.bench,
        device=str(resolve_device(args.device)),
    )
    print(path.read_text())
    print(f"wrote {path} and its charts")
    return path


@hydra_app("report", validate)
def main(cfg: DictConfig) -> Path:
    return report(validate(OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)))


ConfigStore.instance().store(name="report_schema", node=ReportConfig)
