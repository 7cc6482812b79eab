"""Data layer: document sources, tokenizers, packing, and the resumable training order."""

from __future__ import annotations

import math
import os
from pathlib import Path
from types import SimpleNamespace

import datasets
import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

import minillm.data.lm as lm_module
import minillm.data.tokenizer as tokenizer_module
from minillm.data import (
    SPECIAL_TOKENS,
    DataConfig,
    LMDataModule,
    build_tokenizer,
    load_documents,
    load_tokenizer,
)
from minillm.data.sampler import ResumableBatchSampler
from minillm.data.tokenizer import EOS_ID, UNK_ID, load_or_train_tokenizer

DOCS = [
    "The quick brown fox jumps over the lazy dog.",
    "Pack my box with five dozen liquor jugs.\nTwo lines here.",
    "How vexingly quick daft zebras jump!",
    "Sphinx of black quartz, judge my vow.",
    "The five boxing wizards jump quickly.",
    "Jackdaws love my big sphinx of quartz.",
]


@pytest.fixture(autouse=True)
def _cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    cache = tmp_path / "cache"
    monkeypatch.setenv("MINILLM_CACHE", str(cache))
    return cache


def write(path: Path, text: str | bytes) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8")
    return str(path)


def texts(ds: datasets.Dataset) -> list[str]:
    return list(ds["text"])


def all_texts(docs: datasets.DatasetDict) -> list[str]:
    return sorted(texts(docs["train"]) + texts(docs["validation"]))


def text_cfg(files: list[str], **kw: object) -> dict:
    return {"source": "text", "files": files, **kw}


# --- documents ---------------------------------------------------------------------------


def test_sotu_split_is_deterministic_and_by_document() -> None:
    a, b = load_documents({}), load_documents({"source": "sotu"})
    assert len(a["train"]) + len(a["validation"]) >= 200
    assert 1 <= len(a["validation"]) < len(a["train"])
    assert texts(a["validation"]) == texts(b["validation"])
    assert not set(texts(a["validation"])) & set(texts(a["train"]))
    other_seed = load_documents({"seed": 7})
    assert texts(other_seed["validation"]) != texts(a["validation"])


def test_text_blank_line_blocks_and_glob(tmp_path: Path) -> None:
    write(tmp_path / "c" / "b.txt", "third doc\n\n  \n\nfourth doc\r\n\r\nfifth\n")
    write(tmp_path / "c" / "a.txt", "first doc\nstill first\n\n\nsecond doc")
    docs = load_documents(text_cfg([str(tmp_path / "c" / "*.txt")], valid_fraction=0.2))
    expected = ["first doc\nstill first", "second doc", "third doc", "fourth doc", "fifth"]
    assert all_texts(docs) == sorted(expected)
    assert len(docs["validation"]) == 1
    per_file = load_documents(text_cfg([str(tmp_path / "c" / "*.txt")], split_docs="file"))
    assert len(per_file["train"]) + len(per_file["validation"]) == 2


def test_text_explicit_validation_files(tmp_path: Path) -> None:
    train = write(tmp_path / "train.txt", "a b c\n\nd e f")
    valid = write(tmp_path / "valid.txt", "g h i")
    docs = load_documents(text_cfg([train], valid_files=[valid]))
    assert texts(docs["train"]) == ["a b c", "d e f"]
    assert texts(docs["validation"]) == ["g h i"]


@pytest.mark.parametrize("fmt", ["jsonl", "csv", "parquet"])
def test_table_formats_with_text_field(tmp_path: Path, fmt: str) -> None:
    table = datasets.Dataset.from_dict({"id": list(range(len(DOCS))), "body": DOCS})
    path = str(tmp_path / f"docs.{fmt}")
    {"jsonl": table.to_json, "csv": table.to_csv, "parquet": table.to_parquet}[fmt](path)
    cfg = text_cfg([path], format=fmt, text_field="body")
    docs = load_documents(cfg, cache_dir=str(tmp_path / "hf"))
    assert all_texts(docs) == sorted(DOCS)
    assert docs["train"].column_names == ["text"]
    with pytest.raises(ValueError, match=r"available columns: \['id', 'body'\]"):
        load_documents({**cfg, "text_field": "content"}, cache_dir=str(tmp_path / "hf"))


@pytest.mark.parametrize("as_dict", [False, True])
def test_hf_load_from_disk(tmp_path: Path, as_dict: bool) -> None:
    ds = datasets.Dataset.from_dict({"text": DOCS + ["   "]})
    saved = tmp_path / "saved"
    (datasets.DatasetDict(train=ds) if as_dict else ds).save_to_disk(str(saved))
    before = sorted(os.listdir(saved))
    docs = load_documents({"source": "hf", "name": str(saved)})
    assert all_texts(docs) == sorted(DOCS)
    assert sorted(os.listdir(saved)) == before  # nothing written into the user's folder


def test_missing_file_names_the_path(tmp_path: Path) -> None:
    missing = str(tmp_path / "nope" / "*.txt")
    with pytest.raises(FileNotFoundError, match="nope"):
        load_documents(text_cfg([missing]))


def test_empty_corpus_and_too_few_documents(tmp_path: Path) -> None:
    empty = write(tmp_path / "empty.txt", "  \n\n \t\n")
    with pytest.raises(ValueError, match=r"corpus is empty.*empty\.txt"):
        load_documents(text_cfg([empty]))
    one = write(tmp_path / "one.txt", "just one document")
    with pytest.raises(ValueError, match="at least 2 documents"):
        load_documents(text_cfg([one]))


def test_non_utf8_error_and_replace(tmp_path: Path) -> None:
    bad = write(tmp_path / "latin1.txt", b"good text\n\ncaf\xe9 au lait")
    with pytest.raises(ValueError, match=r"latin1\.txt.*byte offset 14.*encoding_errors=replace"):
        load_documents(text_cfg([bad]))
    with pytest.warns(UserWarning, match=r"latin1\.txt"):
        docs = load_documents(text_cfg([bad], encoding_errors="replace"))
    assert "caf\ufffd au lait" in all_texts(docs)


def test_config_rejects_unknown_keys() -> None:
    with pytest.raises(ValueError, match="unknown data config keys \\['vocab'\\]"):
        DataConfig.coerce({"vocab": 10})
    assert DataConfig.coerce({"_target_": "x", "files": "a.txt"}).files == ["a.txt"]


# --- tokenizers --------------------------------------------------------------------------


def test_bpe_special_ids_and_round_trip() -> None:
    tok = build_tokenizer(DOCS * 3, kind="bpe", vocab_size=300)
    assert [tok.token_to_id(t) for t in SPECIAL_TOKENS] == [0, 1, 2, 3]
    text = "Unseen words, ünïcödé ✓ 😀\n\n\ttabs  and  double spaces "
    assert tok.decode(tok.encode(text).ids) == text
    assert load_tokenizer(tok.to_str()).encode(text).ids == tok.encode(text).ids


def test_char_tokenizer_exact_round_trip() -> None:
    tok = build_tokenizer(lambda: iter(DOCS + ["  \t\n ünï"]), kind="char")
    assert [tok.token_to_id(t) for t in SPECIAL_TOKENS] == [0, 1, 2, 3]
    text = "The  quick\n\n\tfox ünï  "
    enc = tok.encode(text)
    assert len(enc.ids) == len(text)
    assert tok.decode(enc.ids) == text
    assert tok.encode("~").ids == [UNK_ID]


def test_tokenizer_cache_hit_does_not_retrain(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    train = datasets.Dataset.from_dict({"text": DOCS})
    cfg = {"vocab_size": 300}
    first = load_or_train_tokenizer(cfg, train, tmp_path)
    [cached] = list((tmp_path / "tokenizers").glob("*.json"))
    mtime = cached.stat().st_mtime_ns

    def no_training(*args: object, **kw: object) -> None:
        raise AssertionError("retrained despite a cached tokenizer")

    monkeypatch.setattr(tokenizer_module, "build_tokenizer", no_training)
    second = load_or_train_tokenizer(cfg, train, tmp_path)
    assert second.to_str() == first.to_str()
    assert cached.stat().st_mtime_ns == mtime
    assert list((tmp_path / "tokenizers").iterdir()) == [cached]  # no temp files left
    with pytest.raises(AssertionError):  # other settings -> another cache entry
        load_or_train_tokenizer({"vocab_size": 301}, train, tmp_path)


def test_tokenizer_path_missing_names_it(tmp_path: Path) -> None:
    missing = str(tmp_path / "absent" / "tokenizer.json")
    with pytest.raises(FileNotFoundError, match="absent"):
        load_or_train_tokenizer({"tokenizer": missing}, DOCS, tmp_path)


# --- LM DataModule -----------------------------------------------------------------------


def make_dm(tmp_path: Path, valid_text: str = "Short.", **kw: object) -> LMDataModule:
    train = write(tmp_path / "train.txt", "\n\n".join(DOCS))
    valid = write(tmp_path / "valid.txt", valid_text)
    cfg = text_cfg([train], valid_files=[valid], tokenizer_kind="char")
    return LMDataModule(cfg, **{"max_len": 16, "batch_size": 4, **kw})


def test_packing_shapes_and_shifted_labels(tmp_path: Path) -> None:
    dm = make_dm(tmp_path)
    dm.setup()
    dm.setup()  # idempotent
    tok = dm.tokenizer
    stream = [i for doc in DOCS for i in tok.encode(doc).ids + [EOS_ID]]
    assert dm.num_train_tokens == len(stream) and dm.train_docs == len(DOCS)
    assert dm.train_blocks.shape == (len(stream) // 17, 17)
    assert dm.train_blocks.ravel().tolist() == stream[: dm.train_blocks.size]
    batch = next(iter(dm.train_dataloader()))
    assert batch["input_ids"].shape == batch["labels"].shape == (4, 16)
    assert batch["input_ids"].dtype == batch["labels"].dtype == torch.long
    assert torch.equal(batch["input_ids"][:, 1:], batch["labels"][:, :-1])
    # validation shorter than one block -> one short block, ending in <eos>
    assert dm.valid_blocks.shape == (1, len("Short.") + 1)
    val = next(iter(dm.val_dataloader()))
    assert val["labels"][0, -1].item() == EOS_ID and val["input_ids"].shape == (1, 6)


def test_tokenized_cache_and_given_tokenizer(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    dm = make_dm(tmp_path)
    dm.setup()
    assert len(list((tmp_path / "cache" / "tokenized").glob("*.arrow"))) == 2

    def fail(*args: object, **kw: object) -> None:
        raise AssertionError("recomputed despite a cache")

    monkeypatch.setattr(lm_module, "_encode", fail)
    monkeypatch.setattr(tokenizer_module, "build_tokenizer", fail)
    again = make_dm(tmp_path)
    again.setup()
    assert (again.train_blocks == dm.train_blocks).all()
    monkeypatch.undo()
    monkeypatch.setattr(tokenizer_module, "build_tokenizer", fail)
    given = make_dm(tmp_path, tokenizer=dm.tokenizer, cache_dir=str(tmp_path / "other"))
    given.setup()  # tokenizes into the new cache, never trains
    assert given.tokenizer is dm.tokenizer


def test_unigram_perplexity_is_a_sane_baseline(tmp_path: Path) -> None:
    dm = make_dm(tmp_path, valid_text="The lazy fox, the quick dog.\n\nMy vow.")
    dm.setup()
    ppl = dm.unigram_perplexity()
    assert math.isfinite(ppl) and 1.0 < ppl <= dm.vocab_size


def test_ddp_shards_train_and_validation(tmp_path: Path) -> None:
    dm = make_dm(tmp_path, valid_text="\n\n".join(DOCS), batch_size=2)
    dm.setup()
    single = [b["input_ids"] for b in make_dm(tmp_path, batch_size=4).train_dataloader()]
    ranks = []
    for rank in range(2):
        dm.trainer = SimpleNamespace(global_rank=rank, world_size=2, global_step=0)
        ranks.append([b["input_ids"] for b in dm.train_dataloader()])
        val = torch.cat([b["input_ids"] for b in dm.val_dataloader()])
        assert torch.equal(val, torch.from_numpy(dm.valid_blocks[rank::2, :-1]).long())
    assert len(ranks[0]) == len(ranks[1]) == len(single)
    for a, b, both in zip(*ranks, single, strict=True):
        assert torch.equal(torch.cat([a, b]), both)


# --- training order ----------------------------------------------------------------------


def stream(sampler: ResumableBatchSampler) -> list[list[int]]:
    return list(sampler)


def test_sampler_ranks_are_disjoint_slices_of_the_global_batch() -> None:
    single = stream(ResumableBatchSampler(50, 6, seed=3, num_batches=20))
    per_rank = [stream(ResumableBatchSampler(50, 2, 3, r, 3, num_batches=20)) for r in range(3)]
    for step, global_batch in enumerate(single):
        parts = [per_rank[r][step] for r in range(3)]
        assert sum(parts, []) == global_batch
        assert len(set(global_batch)) == 6
    epoch = [i for b in single[:8] for i in b]  # 50 // 6 = 8 batches per epoch
    assert len(set(epoch)) == 48 and single[8:16] != single[:8]


@pytest.mark.parametrize("start", [0, 3, 7, 8, 13])
def test_sampler_resume_matches_uninterrupted_stream(start: int) -> None:
    full = stream(ResumableBatchSampler(35, 4, seed=0, num_batches=20))  # 8 batches/epoch
    resumed = ResumableBatchSampler(35, 4, seed=0, start_batch=start, num_batches=20)
    assert len(resumed) == 20
    assert stream(resumed) == full[start:]
    later = stream(ResumableBatchSampler(35, 4, seed=0, num_batches=60))[20:40]
    assert stream(resumed) == later  # each later pass is the next num_batches
    assert (
        stream(ResumableBatchSampler(35, 4, seed=0, start_batch=20 + start, num_batches=20))
        == stream(ResumableBatchSampler(35, 4, seed=0, num_batches=40))[20 + start :]
    )


class _Recorder(L.LightningModule):
    def __init__(self, vocab_size: int) -> None:
        super().__init__()
        self.emb = torch.nn.Embedding(vocab_size, 1)
        self.seen: list[list[int]] = []

    def training_step(self, batch: dict[str, torch.Tensor], index: int) -> torch.Tensor:
        self.seen.append(batch["input_ids"][:, 0].tolist())
        return self.emb(batch["input_ids"]).mean()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _fit(
    dm: LMDataModule,
    max_steps: int,
    accumulate: int,
    resume: str | None = None,
    ckpt_dir: Path | None = None,
    every: int | None = None,
) -> list[list[int]]:
    dm.setup()
    model = _Recorder(dm.vocab_size)
    callbacks = [ModelCheckpoint(ckpt_dir, every_n_train_steps=every, save_top_k=-1)]
    trainer = L.Trainer(
        max_steps=max_steps,
        max_epochs=-1,
        accumulate_grad_batches=accumulate,
        accelerator="cpu",
        logger=False,
        callbacks=callbacks if every else None,
        enable_checkpointing=bool(every),
        enable_progress_bar=False,
        enable_model_summary=False,
        use_distributed_sampler=False,
        limit_val_batches=0,
    )
    trainer.fit(model, datamodule=dm, ckpt_path=resume)
    return model.seen


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize(("total_steps", "accumulate", "at"), [(8, 2, 3), (None, 1, 4)])
def test_lightning_resume_continues_the_data_order(
    tmp_path: Path, total_steps: int | None, accumulate: int, at: int
) -> None:
    """Checkpoint mid-pass at step `at`, resume, and see the uninterrupted run's batches.

    6 docs ~ 250 chars -> 14 blocks of 17 -> 3 batches of 4 per epoch, so both runs cross
    epochs; without total_steps each Lightning epoch is one 3-batch pass.
    """
    make = lambda: make_dm(tmp_path, total_steps=total_steps, accumulate=accumulate)
    full = _fit(make(), 8, accumulate, ckpt_dir=tmp_path / "ckpt", every=at)
    assert len(full) == 8 * accumulate
    [ckpt] = (tmp_path / "ckpt").glob(f"*step={at}.ckpt")
    assert _fit(make(), 8, accumulate, resume=str(ckpt)) == full[at * accumulate :]
