"""Length extrapolation (``scripts/evaluate.py contexts=[...]``): every checkpoint scored at
every context, each point equal to a plain evaluation with that window; the table and chart
written beside the rows; the one-line errors."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
from conftest import compose, tiny_overrides

import minillm.cli.evaluate as cli
from minillm.checkpoint import load_pretrained, save_pretrained
from minillm.cli.app import check_command_line
from minillm.cli.app import compose as compose_command
from minillm.evaluation.extrapolation import extrapolation_table, score_contexts
from minillm.models import build_model
from minillm.training.run import train

CONTEXTS = [16, 32, 64]


@pytest.fixture(scope="module")
def checkpoints(corpus_file: Path, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """A trained mha checkpoint and a gated_linear folder with the same tokenizer."""
    run_dir = tmp_path_factory.mktemp("run")
    cfg = compose(tiny_overrides(corpus_file, "trainer.max_steps=2", "model.max_len=32"))
    ckpt = Path(train(cfg, run_dir)["best_ckpt"])
    model, tokenizer = load_pretrained(ckpt)
    other = build_model({**model.cfg.to_dict(), "attn": {"kind": "gated_linear"}})
    return [ckpt, save_pretrained(other, tokenizer, run_dir / "gated")]


def run(argv: list[str]) -> dict:
    return cli.evaluate(cli.validate(compose_command("evaluate", argv)))


def test_every_checkpoint_at_every_context_with_table_and_chart(
    checkpoints: list[Path], corpus_file: Path, tmp_path: Path
) -> None:
    data = ["data=text", f"data.files=[{corpus_file}]", "data.max_docs=4", "device=cpu"]
    out = tmp_path / "ext.json"
    ckpts = f"ckpt=[{','.join(map(str, checkpoints))}]"
    summary = run([ckpts, f"contexts=[{','.join(map(str, CONTEXTS))}]", f"out={out}", *data])
    assert json.loads(out.read_text()) == summary
    rows = summary["rows"]
    assert [(r["label"], r["context"]) for r in rows] == [
        (label, c) for label in ("default / mha", "default / gated_linear") for c in CONTEXTS
    ]
    assert all(math.isfinite(r["ppl"]) and r["train_len"] == 32 for r in rows)
    # each point is the plain evaluation with that window (stride half of it)
    plain = run([f"ckpt={checkpoints[0]}", "window=64", f"out={tmp_path / 'one.json'}", *data])
    assert rows[2]["ppl"] == pytest.approx(plain["ppl"], rel=1e-6)
    table = out.with_suffix(".md").read_text().splitlines()
    assert table[0] == "| model | trained at | ppl @16 | ppl @32 | ppl @64 |"
    assert len(table) == 4 and table[2].startswith("| default / mha | 32 | ")
    assert out.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"


def test_a_context_the_model_cannot_take_is_skipped_with_its_reason() -> None:
    class Result:
        ppl = 3.0

        def to_dict(self) -> dict:
            return {"nll": 1.0}

    def score(window: int) -> Result:
        if window > 32:
            raise ValueError(f"input of {window} tokens is longer than max_len=32")
        return Result()

    rows = score_contexts(score, [16, 64], "learned / mha", 32)
    assert rows[0]["ppl"] == 3.0 and rows[1]["ppl"] is None
    assert "longer than max_len=32" in rows[1]["skipped"]
    assert extrapolation_table(rows).splitlines()[2] == "| learned / mha | 32 | 3.00 | — |"


BAD = {
    "ckpt=[a.ckpt,b.ckpt]": r"a list of checkpoints is scored only with contexts=",
    "contexts=[64] window=32": "contexts= sets the window of each score",
    "contexts=[64] mode=recurrent": "contexts= sets the window of each score",
    "contexts=[1]": "contexts=1",
    "contexts=[64,32] stride=40": "stride=40: must be at most the shortest context",
    "metric=bleu data.test_file=t contexts=[64]": "contexts=.* is not an option of metric=bleu",
}


@pytest.mark.parametrize("argv", list(BAD))
def test_bad_contexts_options_are_one_line_errors(argv: str, capsys) -> None:
    args = argv.split() if argv.startswith("ckpt=") else ["ckpt=m.ckpt", *argv.split()]
    with pytest.raises(SystemExit) as exc:
        check_command_line("evaluate", cli.validate, args)
    err = capsys.readouterr().err
    assert exc.value.code == 2 and err.startswith("error: ") and err.count("\n") == 1, err
    assert re.search(BAD[argv], err), err
