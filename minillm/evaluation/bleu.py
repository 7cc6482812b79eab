"""Test-set BLEU and chrF of a translation checkpoint (``scripts/evaluate.py metric=bleu``).

Decodes every source of the test file with beam search (progress bar), detokenizes, scores
with sacrebleu against the references (BLEU with its default 13a tokenization, chrF2) and
prints both with their signatures. Hypotheses are written one per line, in test-file order,
next to the checkpoint (``<ckpt stem>.<test stem>.beam<K>.txt``) or to ``output``.

The test set is read strictly (``on_malformed="fail"``): a skipped line would silently change
the score. Pass ``on_malformed=skip`` to score the readable lines only.
"""

from __future__ import annotations

import time
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import sacrebleu
import torch

from minillm.checkpoint import load_pretrained
from minillm.data.parallel import read_pairs
from minillm.generation.seq2seq import translate


@dataclass
class BleuOptions:
    ckpt: str = ""  # a .ckpt file or an exported folder (scripts/export.py)
    test_file: str = ""  # given as data.test_file
    num_beams: int = 5
    length_penalty: float = 1.0
    batch_size: int = 32
    max_new_tokens: int | None = None  # None: 1.5 x source tokens + 10
    output: str | None = None  # hypotheses file; default next to the checkpoint
    device: str = "auto"  # auto | cpu | cuda | cuda:1 ...
    src_field: str = "src"
    tgt_field: str = "tgt"
    format: str = "auto"  # auto (by extension) | jsonl | tsv
    on_malformed: str = "fail"

    @classmethod
    def parse(cls, options: dict[str, Any]) -> BleuOptions:
        """From the script's options: ``data.test_file`` nested or flat; strings converted."""
        options = dict(options)
        options.pop("metric", None)
        data = dict(options.pop("data", None) or {})  # data.test_file, data.src_field ...
        if "data.test_file" in options:
            data["test_file"] = options.pop("data.test_file")
        for key in ("test_file", "src_field", "tgt_field", "format"):
            if data.get(key) is not None:
                options.setdefault(key, data[key])
        hints = typing.get_type_hints(cls)
        unknown = sorted(set(options) - set(hints))
        if unknown:
            raise ValueError(f"unknown bleu option(s) {unknown}; valid: {sorted(hints)}")
        values = {k: _convert(k, v, hints[k]) for k, v in options.items()}
        opts = cls(**values)
        if not opts.ckpt or not opts.test_file:
            raise ValueError("metric=bleu needs ckpt=<checkpoint> and data.test_file=<file>")
        return opts


def _convert(name: str, value: Any, hint: Any) -> Any:
    """A string from the command line to the field's type (None for none/null if optional)."""
    if not isinstance(value, str):
        return value
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if typing.get_args(hint) and value.lower() in ("none", "null"):
        return None
    base = args[0] if args else hint
    try:
        return base(value) if base in (int, float) else value
    except ValueError:
        raise ValueError(f"bad value for {name}={value!r}: expected {base.__name__}") from None


def hypotheses_path(opts: BleuOptions) -> Path:
    """``output``, else beside a .ckpt file (``<stem>.<test>.beam<K>.txt``) or in an export."""
    if opts.output:
        return Path(opts.output)
    ckpt, name = Path(opts.ckpt), f"{Path(opts.test_file).stem}.beam{opts.num_beams}.txt"
    return ckpt / name if ckpt.is_dir() else ckpt.with_name(f"{ckpt.stem}.{name}")


def run_bleu(options: dict[str, Any]) -> dict[str, Any]:
    """Decode ``data.test_file`` with the checkpoint; print and return BLEU and chrF."""
    opts = BleuOptions.parse(options)
    device = opts.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    model, tokenizer = load_pretrained(opts.ckpt, map_location=device)
    if not hasattr(model, "encode"):
        raise ValueError(
            f"{opts.ckpt} holds a {model.cfg.arch} model; metric=bleu needs a translation "
            "(encoder_decoder) checkpoint"
        )
    pairs = read_pairs(
        opts.test_file, opts.format, opts.src_field, opts.tgt_field, opts.on_malformed
    )
    start = time.perf_counter()
    hyps = translate(
        model,
        tokenizer,
        [src for src, _ in pairs],
        num_beams=opts.num_beams,
        length_penalty=opts.length_penalty,
        max_new_tokens=opts.max_new_tokens,
        batch_size=opts.batch_size,
        progress=True,
    )
    seconds = time.perf_counter() - start
    refs = [[tgt for _, tgt in pairs]]
    bleu, chrf = sacrebleu.BLEU(), sacrebleu.CHRF()
    bleu_score, chrf_score = bleu.corpus_score(hyps, refs), chrf.corpus_score(hyps, refs)
    out = hypotheses_path(opts)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(h.replace("\n", " ") + "\n" for h in hyps), encoding="utf-8")
    print(f"{bleu_score}\n  signature: {bleu.get_signature()}")
    print(f"{chrf_score}\n  signature: {chrf.get_signature()}")
    print(f"{len(pairs)} sentences, beam {opts.num_beams}, {seconds:.1f}s; hypotheses: {out}")
    return {
        "bleu": bleu_score.score,
        "chrf": chrf_score.score,
        "bleu_signature": str(bleu.get_signature()),
        "chrf_signature": str(chrf.get_signature()),
        "n_sentences": len(pairs),
        "seconds": seconds,
        "hypotheses": str(out),
        "num_beams": opts.num_beams,
        "ckpt": opts.ckpt,
    }
