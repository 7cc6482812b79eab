"""Export a checkpoint as plain files that load without Lightning or Hydra.

    python scripts/export.py ckpt=outputs/<run>/checkpoints/best.ckpt out=exported/

writes ``model.safetensors`` (weights; the tied LM head stored once), ``config.json`` (the
model config) and ``tokenizer.json``. Load it with::

    import minillm
    model, tokenizer = minillm.load_pretrained("exported/")
"""

from __future__ import annotations

import sys

from minillm.checkpoint import EXPORT_FILES, load_pretrained, save_pretrained


def parse_args(argv: list[str]) -> dict[str, str]:
    valid = ("ckpt", "out")
    args = dict(a.partition("=")[::2] for a in argv)
    unknown = sorted(set(args) - set(valid))
    if unknown or not all(args.get(k) for k in valid):
        raise SystemExit(
            "usage: python scripts/export.py ckpt=<checkpoint> out=<folder>"
            + (f" (unknown option(s) {unknown}; valid: {list(valid)})" if unknown else "")
        )
    return args


def main(argv: list[str]) -> None:
    args = parse_args(argv)
    try:
        model, tokenizer = load_pretrained(args["ckpt"])
    except (ValueError, FileNotFoundError) as err:  # CheckpointError is a ValueError
        raise SystemExit(f"error: {err}") from None
    out = save_pretrained(model, tokenizer, args["out"])
    n = sum(p.numel() for p in model.parameters())
    print(f"exported {n / 1e6:.2f}M parameters to {out}/ ({', '.join(EXPORT_FILES)})")


if __name__ == "__main__":
    main(sys.argv[1:])
