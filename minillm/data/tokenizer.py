"""Tokenizers built with HF `tokenizers`: byte-level BPE or exact character level.

Both kinds reserve the same four special tokens at fixed ids (pad=0, bos=1, eos=2, unk=3).
The data, evaluation and generation code never assume those ids: they ask any tokenizer for
its special ids with ``SpecialTokens.from_tokenizer``, so a stock tokenizer.json (Llama,
GPT-2, Qwen2 ...) works wherever its special tokens sit. Trained tokenizers are cached on
disk, keyed by a hash of the training texts and the training settings.
"""

from __future__ import annotations

import hashlib
import logging
import os
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import datasets
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from minillm.data.sources import DataConfig
from minillm.special_tokens import SpecialTokens

SPECIAL_TOKENS = ["<pad>", "<bos>", "<eos>", "<unk>"]
# The ids of minillm's own tokenizers only (tests and the MQAR id tokenizer); code that takes
# a tokenizer asks it instead (SpecialTokens.from_tokenizer)
PAD_ID, BOS_ID, EOS_ID, UNK_ID = range(len(SPECIAL_TOKENS))
# Bump when a change here makes previously cached tokenizers wrong.
FORMAT_VERSION = 1
_BATCH = 1000

logger = logging.getLogger(__name__)

Texts = datasets.Dataset | Sequence[str] | Callable[[], Iterable[str]]


def build_tokenizer(
    texts: Texts, kind: str = "bpe", vocab_size: int = 8192, min_frequency: int = 2
) -> Tokenizer:
    """Train a tokenizer of `kind` ("bpe" or "char") on `texts`.

    `texts` is a Dataset with a "text" column, a sequence of strings, or a zero-argument
    callable returning a fresh iterator of strings. `vocab_size` and `min_frequency`
    apply to BPE only; the char kind keeps every character seen in training.
    """
    if kind not in TOKENIZER_KINDS:
        raise ValueError(f"unknown tokenizer kind {kind!r}; choose from {sorted(TOKENIZER_KINDS)}")
    n = len(texts) if isinstance(texts, datasets.Dataset | Sequence) else None
    logger.info("training %s tokenizer on %s documents", kind, n if n is not None else "all")
    tokenizer = TOKENIZER_KINDS[kind](lambda: _batches(texts), n, vocab_size, min_frequency)
    check_special_tokens(tokenizer)
    return tokenizer


def _train_bpe(
    batches: Callable[[], Iterator[list[str]]], n: int | None, vocab_size: int, min_frequency: int
) -> Tokenizer:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(batches(), trainer=trainer, length=n)
    return tokenizer


def _train_char(
    batches: Callable[[], Iterator[list[str]]], n: int | None, vocab_size: int, min_frequency: int
) -> Tokenizer:
    """One token per Unicode code point, so decode(encode(s)) == s for seen characters."""
    chars: set[str] = set()
    for batch in batches():
        for text in batch:
            chars.update(text)
    vocab = {tok: i for i, tok in enumerate([*SPECIAL_TOKENS, *sorted(chars)])}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Split("", "isolated")  # every char alone
    tokenizer.decoder = decoders.Fuse()  # join without the default spaces
    tokenizer.add_special_tokens(SPECIAL_TOKENS)
    return tokenizer


TOKENIZER_KINDS: dict[str, Callable[..., Tokenizer]] = {"bpe": _train_bpe, "char": _train_char}


def _batches(texts: Texts) -> Iterator[list[str]]:
    if isinstance(texts, datasets.Dataset):
        for batch in texts.iter(batch_size=_BATCH):
            yield batch["text"]
        return
    source = texts() if callable(texts) else texts
    batch: list[str] = []
    for text in source:
        batch.append(text)
        if len(batch) == _BATCH:
            yield batch
            batch = []
    if batch:
        yield batch


def corpus_fingerprint(texts: Texts) -> str:
    """sha256 over the texts, each length-prefixed so that splits between texts count."""
    h = hashlib.sha256()
    for batch in _batches(texts):
        for text in batch:
            data = text.encode("utf-8")
            h.update(len(data).to_bytes(8, "little"))
            h.update(data)
    return h.hexdigest()


def check_special_tokens(tokenizer: Tokenizer) -> None:
    """Fail unless SPECIAL_TOKENS sit at ids 0..3, as a tokenizer minillm trains must have."""
    wrong = [t for i, t in enumerate(SPECIAL_TOKENS) if tokenizer.token_to_id(t) != i]
    if wrong:
        raise ValueError(
            f"tokenizer must map {SPECIAL_TOKENS} to ids 0..{len(SPECIAL_TOKENS) - 1}; "
            f"wrong or missing: {wrong}"
        )


def load_tokenizer(path_or_json: str | os.PathLike) -> Tokenizer:
    """Load from a tokenizer.json path, or from its JSON text (as stored in checkpoints)."""
    text = str(path_or_json)
    if text.lstrip().startswith("{"):
        return Tokenizer.from_str(text)
    path = os.path.expanduser(text)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"tokenizer file not found: {path}")
    return Tokenizer.from_file(path)


def load_or_train_tokenizer(
    cfg: DataConfig | Mapping[str, Any],
    train_dataset: Texts,
    cache_dir: str | os.PathLike,
    fingerprint: str | None = None,
) -> Tokenizer:
    """`cfg.tokenizer` if set (any tokenizer.json with an end-of-sequence token), else the
    cached tokenizer for this corpus and settings.

    On a cache miss the tokenizer is trained and written atomically to
    `<cache_dir>/tokenizers/<hash>.json`, so concurrent processes (DDP ranks) only ever
    see whole files. `fingerprint` skips rehashing when the caller already has
    `corpus_fingerprint(train_dataset)`.
    """
    cfg = DataConfig.coerce(cfg)
    if cfg.tokenizer:
        tokenizer = load_tokenizer(cfg.tokenizer)
        SpecialTokens.from_tokenizer(tokenizer, f"data.tokenizer={cfg.tokenizer}")
        return tokenizer
    fingerprint = fingerprint or corpus_fingerprint(train_dataset)
    settings = f"{fingerprint}|{cfg.tokenizer_kind}|{cfg.vocab_size}|{cfg.min_frequency}"
    key = hashlib.sha256(f"{settings}|v{FORMAT_VERSION}".encode()).hexdigest()[:20]
    path = Path(cache_dir) / "tokenizers" / f"{key}.json"
    if path.is_file():
        logger.info("loading cached tokenizer %s", path)
        return Tokenizer.from_file(str(path))
    tokenizer = build_tokenizer(
        train_dataset, cfg.tokenizer_kind, cfg.vocab_size, cfg.min_frequency
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex}.tmp")
    tokenizer.save(str(tmp))
    os.replace(tmp, path)
    logger.info("saved tokenizer (vocab %d) to %s", tokenizer.get_vocab_size(), path)
    return tokenizer
