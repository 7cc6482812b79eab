"""Reading parallel text: (source, target) pairs from jsonl, tsv or an HF dataset.

Malformed lines (bad JSON, a missing or non-string field, a wrong column count, invalid
UTF-8) are reported as ``file:line: reason``. ``on_malformed="skip"`` (the default) drops them
and warns once per file with the count and the first few locations; ``"fail"`` raises on the
first one. A file where nothing is readable always fails. Blank lines are not malformed.
"""

from __future__ import annotations

import functools
import glob
import json
import os
import warnings
from collections.abc import Callable, Iterable, Mapping
from typing import Any

Pair = tuple[str, str]
ON_MALFORMED = ("skip", "fail")
SHOWN_PROBLEMS = 5  # locations listed in a skip warning


class MalformedLine(ValueError):
    pass


def field_value(row: Any, path: str) -> str:
    """``row["a"]["b"]`` for ``path="a.b"`` (e.g. ``translation.en``); must be a string."""
    value = row
    for key in path.split("."):
        if not isinstance(value, Mapping) or key not in value:
            keys = sorted(row) if isinstance(row, Mapping) else type(row).__name__
            raise MalformedLine(f"no field {path!r} (has {keys}); set data.src_field/tgt_field")
        value = value[key]
    if not isinstance(value, str):
        raise MalformedLine(f"field {path!r} is {type(value).__name__}, not a string")
    return value


def _parse_jsonl(line: str, src_field: str, tgt_field: str) -> Pair:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as err:
        raise MalformedLine(f"invalid JSON ({err.msg} at column {err.colno})") from None
    if not isinstance(row, dict):
        raise MalformedLine(f"expected a JSON object, got {type(row).__name__}")
    return field_value(row, src_field), field_value(row, tgt_field)


def _parse_tsv(line: str, src_field: str, tgt_field: str) -> Pair:
    """``source<TAB>target``; the field names do not apply."""
    parts = line.rstrip("\r\n").split("\t")
    if len(parts) != 2:
        raise MalformedLine(f"expected 2 tab-separated columns, got {len(parts)}")
    return parts[0], parts[1]


PARSERS: dict[str, Callable[[str, str, str], Pair]] = {"jsonl": _parse_jsonl, "tsv": _parse_tsv}
EXTENSIONS = {".jsonl": "jsonl", ".json": "jsonl", ".tsv": "tsv"}


def file_format(path: str, fmt: str) -> str:
    """``fmt`` itself, or for ``"auto"`` the format of the file extension."""
    if fmt == "auto":
        ext = os.path.splitext(path)[1].lower()
        if ext not in EXTENSIONS:
            raise ValueError(
                f"cannot tell the format of {path} from its extension; name it "
                f"{'/'.join(EXTENSIONS)} or set data.format to one of {sorted(PARSERS)}"
            )
        return EXTENSIONS[ext]
    if fmt not in PARSERS:
        raise ValueError(f"unknown file format {fmt!r}; choose auto or one of {sorted(PARSERS)}")
    return fmt


def expand_files(patterns: str | Iterable[str]) -> list[str]:
    """Each pattern's matches, sorted, in pattern order; a pattern matching nothing fails."""
    paths = []
    for pattern in [patterns] if isinstance(patterns, str) else patterns:
        pattern = os.path.expanduser(str(pattern))
        matches = sorted(p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p))
        if not matches:
            raise FileNotFoundError(f"data file not found: {pattern!r} matches no file")
        paths += matches
    return paths


def read_pairs(
    patterns: str | Iterable[str],
    fmt: str = "auto",
    src_field: str = "src",
    tgt_field: str = "tgt",
    on_malformed: str = "skip",
) -> list[Pair]:
    """All pairs of the files matching ``patterns``, in file order."""
    pairs: list[Pair] = []
    for path in expand_files(patterns):
        parse = functools.partial(
            PARSERS[file_format(path, fmt)], src_field=src_field, tgt_field=tgt_field
        )
        pairs += collect(_numbered_lines(path), parse, on_malformed, path)
    return pairs


def _numbered_lines(path: str) -> Iterable[tuple[str, Any]]:
    """(``path:line``, text) of each non-blank line; undecodable lines carry the error."""
    with open(path, "rb") as f:
        for number, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                line = MalformedLine(f"not valid UTF-8 (byte {err.start})")
            if isinstance(line, Exception) or line.strip():
                yield f"{path}:{number}", line


def collect(
    rows: Iterable[tuple[str, Any]],
    parse: Callable[[Any], Pair],
    on_malformed: str,
    origin: str,
) -> list[Pair]:
    """``parse`` every (location, row); skip or fail on malformed rows as ``on_malformed`` says."""
    if on_malformed not in ON_MALFORMED:
        raise ValueError(f"data.on_malformed={on_malformed!r}; choose one of {ON_MALFORMED}")
    pairs, problems = [], []
    for where, row in rows:
        try:
            if isinstance(row, Exception):
                raise row
            pairs.append(parse(row))
        except MalformedLine as err:
            if on_malformed == "fail":
                raise ValueError(
                    f"{where}: {err} (pass data.on_malformed=skip to skip such lines)"
                ) from None
            problems.append(f"{where}: {err}")
    if problems and not pairs:
        raise ValueError(f"no readable pair in {origin}; e.g. {problems[0]}")
    if problems:
        shown = "; ".join(problems[:SHOWN_PROBLEMS])
        more = len(problems) - SHOWN_PROBLEMS
        shown += f" (and {more} more)" if more > 0 else ""
        warnings.warn(
            f"skipped {len(problems)} malformed line(s) of {origin}: {shown}", stacklevel=3
        )
    return pairs


def read_hf_pairs(
    name: str, config: str | None, split: str, src_field: str, tgt_field: str, on_malformed: str
) -> list[Pair]:
    """Pairs of an HF dataset split (hub name, or a ``save_to_disk`` folder), e.g. rows
    ``{"translation": {"en": ..., "de": ...}}`` with ``src_field="translation.en"``."""
    import datasets

    if os.path.isdir(name):
        ds = datasets.load_from_disk(name)
        if isinstance(ds, datasets.DatasetDict):
            if split not in ds:
                raise ValueError(f"{name} has no split {split!r}; it has {list(ds)}")
            ds = ds[split]
    else:
        ds = datasets.load_dataset(name, config, split=split)
    rows = ((f"{name}[{split}] row {i}", row) for i, row in enumerate(ds))
    origin = f"{name}[{split}]"
    return collect(
        rows, lambda r: (field_value(r, src_field), field_value(r, tgt_field)), on_malformed, origin
    )
