"""The run directory: which checkpoint a resume reads, and that an earlier run's checkpoints
are resumed or started over on purpose, never silently replaced."""

from __future__ import annotations

from pathlib import Path

from lightning.pytorch.utilities import rank_zero_info

from minillm.checkpoint import check_writable


def resolve_ckpt_path(ckpt_path: str | None, run_dir: Path) -> str | None:
    """A file as is; a run directory -> its checkpoints/last.ckpt; "last" -> this run's."""
    if not ckpt_path:
        return None
    path = run_dir if ckpt_path == "last" else Path(ckpt_path)
    if path.is_dir():
        path = path / "checkpoints" / "last.ckpt"
    if not path.is_file():
        raise FileNotFoundError(
            f"no checkpoint to resume at {path}; pass ckpt_path=<run>/checkpoints/last.ckpt, "
            "a run directory, or ckpt_path=last together with hydra.run.dir=<run directory>"
        )
    return str(path)


def check_run_dir(run_dir: Path, ckpt_path: str | None, overwrite: bool) -> None:
    """A run directory that holds checkpoints is resumed or started over on purpose, never
    silently replaced; and it must be writable. Runs before anything is read or written."""
    check_writable(run_dir, "run directory")
    found = sorted(p.name for p in (run_dir / "checkpoints").glob("*.ckpt"))
    if found and not ckpt_path and not overwrite:
        raise FileExistsError(
            f"run directory {run_dir} already holds checkpoints ({', '.join(found)}); resume "
            "it with ckpt_path=last, choose another hydra.run.dir, or pass overwrite=true to "
            "start over in it (its checkpoints and CSV log are deleted)"
        )


def start_writing(run_dir: Path, start_over: bool, tokenizer_json: str) -> None:
    """Rank 0, just before fit: (overwrite=true) delete the previous run's checkpoints and
    CSV log, then write the tokenizer."""
    run_dir.mkdir(parents=True, exist_ok=True)
    if start_over:
        old = [*(run_dir / "checkpoints").glob("*.ckpt"), run_dir / "logs" / "metrics.csv"]
        old = [p for p in old if p.is_file()]
        for path in old:
            path.unlink()
        if old:
            names = ", ".join(str(p.relative_to(run_dir)) for p in old)
            rank_zero_info(f"overwrite=true: deleted the previous run's {names} in {run_dir}")
    (run_dir / "tokenizer.json").write_text(tokenizer_json)
