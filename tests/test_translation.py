"""Encoder-decoder translation: every kind in every role it fills, padding, beam search over
every cache, the data module, train.py's experiment=translation, BLEU. Tiny, CPU, offline."""

from __future__ import annotations

import dataclasses
import json
import random
from pathlib import Path
from types import SimpleNamespace

import pytest
import sacrebleu
import torch
from conftest import compose

from minillm import load_checkpoint
from minillm.attention import ATTENTION, RecurrentState, kinds_for_role
from minillm.cli.generate import GenerateConfig, run
from minillm.data.translation import TranslationDataConfig, TranslationDataModule
from minillm.evaluation.bleu import run_bleu
from minillm.generation import GenerationConfig, generate_scored
from minillm.generation.seq2seq import pad_right, translate
from minillm.models import build_model
from minillm.training import LMModule, TrainerConfig, build_trainer
from minillm.training.run import train

V, SMALL = 48, 4  # vocabulary; window / chunk size, so short sequences cross their edges
CROSS = sorted({"mha", "linear"} | set(kinds_for_role("cross")))
ROLE_KINDS = (
    [("causal", k) for k in kinds_for_role("causal")]
    + [("bidirectional", k) for k in kinds_for_role("bidirectional")]
    + [("cross", k) for k in CROSS]
)
CANNOT = [
    (field, k)
    for field, role in (("encoder_attn", "bidirectional"), ("cross_attn", "cross"))
    for k in sorted(ATTENTION)
    if k not in kinds_for_role(role)
]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny ops: one thread beats two (no OpenMP hand-offs), most of all on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def kind_cfg(kind: str) -> dict:
    """``{"kind": kind}`` with windows and chunks shrunk (by field name) to SMALL."""
    if kind not in ATTENTION:
        pytest.skip(f"attention kind {kind!r} is not registered yet")
    names = {f.name for f in dataclasses.fields(ATTENTION[kind][0].Config)}
    return {"kind": kind, **{n: SMALL for n in ("window", "chunk_size") if n in names}}


def model_for(attn: str = "mha", encoder: str = "mha", cross: str = "mha", **cfg: object):
    torch.manual_seed(0)
    return build_model(
        {
            "arch": "encoder_decoder",
            "vocab_size": V,
            "dim": 32,
            "n_layers": 2,
            "n_heads": 4,
            "max_len": 32,
            "attn": kind_cfg(attn),
            "encoder_attn": kind_cfg(encoder),
            "cross_attn": kind_cfg(cross),
            "init_std": 0.2,  # far from uniform, so beams and EOS choices differ
            **cfg,
        }
    )


def sources(lengths: tuple[int, ...] = (7, 3, 10)) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded random sources, each ending in <eos> (2)."""
    gen = torch.Generator().manual_seed(1)
    seqs = [torch.randint(4, V, (n,), generator=gen).tolist() + [2] for n in lengths]
    return pad_right(seqs, 0, "cpu")


@pytest.mark.parametrize(("role", "kind"), ROLE_KINDS, ids=[f"{r}-{k}" for r, k in ROLE_KINDS])
def test_forward_backward_every_kind_in_every_role(role: str, kind: str) -> None:
    slot = {"causal": "attn", "bidirectional": "encoder", "cross": "cross"}[role]
    model = model_for(**{slot: kind})
    src_ids, src_mask = sources()
    input_ids = torch.randint(3, V, (3, 9))
    logits = model(src_ids, input_ids, src_mask=src_mask)  # (B, T, V)
    assert logits.shape == (3, 9, V)
    logits.logsumexp(-1).mean().backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert model.encoder[0].attn.q_proj.weight.grad.abs().sum() > 0  # the encoder is reached


@pytest.mark.parametrize(("field", "kind"), CANNOT, ids=[f"{f}-{k}" for f, k in CANNOT])
def test_kind_in_a_role_it_cannot_fill_fails_at_build_naming_kinds_that_can(field, kind):
    role = {"encoder_attn": "bidirectional", "cross_attn": "cross"}[field]
    with pytest.raises(ValueError, match=rf"{kind}.*{role}.*kinds that can: ") as err:
        build_model({"arch": "encoder_decoder", "vocab_size": V, "dim": 32, field: kind})
    assert all(k in str(err.value) for k in kinds_for_role(role))


PAD_CASES = [(e, "mha") for e in kinds_for_role("bidirectional")]
PAD_CASES += [("mha", c) for c in CROSS if c != "mha"]


@pytest.mark.parametrize(("encoder", "cross"), PAD_CASES, ids=[f"{e}-{c}" for e, c in PAD_CASES])
def test_extra_source_padding_does_not_change_decoder_outputs(encoder: str, cross: str) -> None:
    model = model_for(encoder=encoder, cross=cross).eval()
    src_ids, _ = sources((6,))
    padded = torch.cat((src_ids, torch.zeros(1, 5, dtype=torch.long)), dim=1)  # 5 extra pads
    padded_mask = padded != 0
    input_ids = torch.randint(3, V, (1, 8))
    with torch.no_grad():
        alone = model(src_ids, input_ids)
        with_pads = model(padded, input_ids, src_mask=padded_mask)
    torch.testing.assert_close(with_pads, alone, rtol=1e-5, atol=1e-5)


DECODE_CASES = [(a, "mha") for a in kinds_for_role("causal")]
DECODE_CASES += [("mha", c) for c in CROSS if c != "mha"]


def translate_ids(model, src_ids, src_mask, **options) -> tuple[list, list]:
    """Token rows and scores of the one generation loop, decoder starting from <bos> (1)."""
    srcs = [row[mask].tolist() for row, mask in zip(src_ids, src_mask, strict=True)]
    cfg = GenerationConfig(**{"temperature": 0, **options})
    return generate_scored(model, [[1]] * len(srcs), cfg, sources=srcs, eos_id=2)


@pytest.mark.parametrize(("attn", "cross"), DECODE_CASES, ids=[f"{a}-{c}" for a, c in DECODE_CASES])
def test_cached_beam_search_equals_uncached_and_one_beam_equals_greedy(attn: str, cross: str):
    model = model_for(attn=attn, cross=cross).eval()
    src_ids, src_mask = sources()
    opts = {"max_new_tokens": 10, "num_beams": 3, "length_penalty": 0.8}
    cached = translate_ids(model, src_ids, src_mask, **opts)[0]
    assert cached == translate_ids(model, src_ids, src_mask, **opts, use_cache=False)[0]
    greedy = translate_ids(model, src_ids, src_mask, max_new_tokens=10)[0]
    assert greedy == translate_ids(model, src_ids, src_mask, max_new_tokens=10, use_cache=False)[0]
    assert translate_ids(model, src_ids, src_mask, max_new_tokens=10, num_beams=1)[0] == greedy


@pytest.mark.parametrize("cross", CROSS)
def test_cross_caches_are_filled_once_then_memory_is_never_read(cross: str) -> None:
    """``start`` encodes once and fills the cross caches; the state keeps no memory, and rows
    expanded from one source (samples, beams) share its cross caches."""
    model = model_for(cross=cross).eval()
    src_ids, src_mask = sources()
    bos = torch.ones(3, 1, dtype=torch.long)
    with torch.no_grad():
        first, state = model.start(bos, src_ids=src_ids, src_mask=src_mask, max_new_tokens=4)
        assert state.memory is None and state.memory_mask is None
        state.reorder(torch.arange(3).repeat_interleave(2))  # 2 rows per source
        history = torch.cat((bos, first.argmax(-1, keepdim=True)), 1).repeat_interleave(2, 0)
        second = model.step(history[:, 1:], state)[:, -1]  # (6, V)
        memory = model.encode(src_ids, src_mask).repeat_interleave(2, 0)
        mask = src_mask.repeat_interleave(2, 0)
        full = model.decode(history, memory, memory_mask=mask)[:, -1]
    torch.testing.assert_close(second, full, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(second[0::2], second[1::2])  # rows of a source share memory


def test_a_batched_source_decodes_as_it_would_alone() -> None:
    model = model_for().eval()
    src_ids, src_mask = sources()
    batched = translate_ids(model, src_ids, src_mask, num_beams=3, max_new_tokens=8)[0]
    for row in range(3):
        alone = src_ids[row : row + 1, : int(src_mask[row].sum())]
        mask = torch.ones_like(alone, dtype=torch.bool)
        assert translate_ids(model, alone, mask, num_beams=3, max_new_tokens=8)[0] == [batched[row]]


def test_beam_search_scores_at_least_as_high_as_greedy() -> None:
    model = model_for().eval()
    src_ids, src_mask = sources((5,))
    with torch.no_grad():
        memory = model.encode(src_ids, src_mask)

    def logprob(tokens: list[int]) -> float:
        ids = torch.tensor([[1, *tokens, 2]])
        logp = model.decode(ids[:, :-1], memory, memory_mask=src_mask).log_softmax(-1)
        return float(logp[0].gather(1, ids[0, 1:, None]).sum())

    opts = {"max_new_tokens": 12, "length_penalty": 0.0, "early_stopping": False}
    (beam,), (score,) = translate_ids(model, src_ids, src_mask, num_beams=6, **opts)
    greedy = translate_ids(model, src_ids, src_mask, max_new_tokens=12)[0][0]
    if len(beam) < 12 and len(greedy) < 12:  # both ended with EOS: comparable sequences
        with torch.no_grad():
            assert logprob(beam) == pytest.approx(score, abs=1e-4)  # length_penalty 0
            assert logprob(beam) >= logprob(greedy) - 1e-5


@pytest.mark.parametrize("with_normalizer", [True, False])
def test_recurrent_state_reorder_moves_the_right_rows(with_normalizer: bool) -> None:
    state = torch.arange(4.0)[:, None, None, None].expand(4, 2, 3, 3).clone()  # row i = i
    normalizer = (
        torch.arange(4.0)[:, None, None].expand(4, 2, 3).clone() if with_normalizer else None
    )
    cache = RecurrentState(state, normalizer)
    address = cache.state.data_ptr()
    cache.reorder(torch.tensor([2, 2, 0, 3]))
    assert cache.state[:, 0, 0, 0].tolist() == [2.0, 2.0, 0.0, 3.0]
    assert cache.state.data_ptr() == address  # in place: a compiled step keeps its buffers
    if with_normalizer:
        assert cache.normalizer[:, 0, 0].tolist() == [2.0, 2.0, 0.0, 3.0]


# --- data -------------------------------------------------------------------------------

WORDS = "red blue green gold pink gray black white".split()


def write_reverse_task(folder: Path, n_train: int, n_valid: int, seed: int = 0) -> Path:
    """jsonl pairs: 3-6 words -> the same words reversed."""
    rng = random.Random(seed)
    for name, n in (("train", n_train), ("valid", n_valid), ("test", n_valid)):
        with (folder / f"{name}.jsonl").open("w") as f:
            for _ in range(n):
                words = [rng.choice(WORDS) for _ in range(rng.randint(3, 6))]
                f.write(json.dumps({"src": " ".join(words), "tgt": " ".join(words[::-1])}) + "\n")
    return folder


def test_translation_option_is_its_dataclass() -> None:
    data = compose(["data=translation"])["data"]
    assert data == dataclasses.asdict(TranslationDataConfig()) and data["task"] == "translation"


def test_malformed_lines_are_reported_with_file_and_line(tmp_path: Path) -> None:
    good = json.dumps({"src": "a b", "tgt": "b a"})
    lines = [good, "{not json", json.dumps({"src": "x"}), "", json.dumps({"src": 1, "tgt": "y"})]
    path = tmp_path / "bad.jsonl"
    path.write_bytes(("\n".join([*lines, good]) + "\n").encode() + b"\xff\xfe\n")
    cfg = {"train_files": [str(path)], "valid_files": [str(path)], "vocab_size": 300}
    data = TranslationDataModule(cfg, max_len=16, batch_size=2)
    with pytest.warns(UserWarning, match=r"skipped 4 malformed line\(s\)") as record:
        data.setup()
    message = str(record[0].message)
    for where in ("bad.jsonl:2: invalid JSON", "bad.jsonl:3: no field 'tgt'", "bad.jsonl:5"):
        assert where in message
    assert "bad.jsonl:7: not valid UTF-8" in message and len(data.train) == 2
    strict = TranslationDataModule({**cfg, "on_malformed": "fail"}, max_len=16, batch_size=2)
    with pytest.raises(ValueError, match=r"bad.jsonl:2: invalid JSON.*on_malformed=skip"):
        strict.setup()
    tsv = tmp_path / "bad.tsv"
    tsv.write_text("a b\tb a\nonly one column\n")
    with pytest.warns(UserWarning, match=r"bad.tsv:2: expected 2 tab-separated columns, got 1"):
        TranslationDataModule({**cfg, "train_files": [str(tsv)]}, max_len=16, batch_size=2).setup()


def test_hf_dataset_with_a_translation_field_and_tsv_files_read(tmp_path: Path) -> None:
    import datasets

    rows = [{"translation": {"en": f"red {w}", "de": f"{w} rot"}} for w in WORDS]
    splits = {"train": rows, "validation": rows[:2]}
    folder = tmp_path / "hf"
    datasets.DatasetDict(
        {k: datasets.Dataset.from_list(v) for k, v in splits.items()}
    ).save_to_disk(folder)
    hf = {"format": "hf", "name": str(folder), "vocab_size": 300}
    fields = {"src_field": "translation.en", "tgt_field": "translation.de"}
    data = TranslationDataModule({**hf, **fields}, max_len=16, batch_size=2)
    data.setup()
    assert data.train.pairs[0] == ("red red", "red rot") and len(data.valid) == 2
    tsv = tmp_path / "pairs.tsv"
    tsv.write_text("".join(f"red {w}\t{w} rot\n" for w in WORDS))
    files = {"train_files": str(tsv), "vocab_size": 300, "valid_fraction": 0.25}
    data = TranslationDataModule(files, max_len=16, batch_size=2)
    data.setup()
    assert len(data.train) == 6 and len(data.valid) == 2


def test_batches_are_bucketed_padded_and_resume_exactly(tmp_path: Path) -> None:
    folder = write_reverse_task(tmp_path, 120, 20)
    cfg = {"train_files": [str(folder / "train.jsonl")], "vocab_size": 300, "valid_fraction": 0.1}
    data = TranslationDataModule(cfg, max_len=32, batch_size=8, total_steps=12)
    data.setup()
    assert len(data.valid) == 12 and len(data.train) == 108
    batch = next(iter(data.train_dataloader()))
    assert set(batch) == {"src_ids", "src_mask", "input_ids", "labels"}
    n_tgt = (batch["labels"] != -100).sum(1)  # target tokens + <eos> per row
    rows = torch.arange(len(n_tgt))
    assert (batch["input_ids"][:, 0] == 1).all() and (batch["labels"][rows, n_tgt - 1] == 2).all()
    assert torch.equal(batch["input_ids"][:, 1:][rows, n_tgt - 2], batch["labels"][rows, n_tgt - 2])
    assert (batch["input_ids"][batch["labels"] == -100] == 0).all()  # pad where labels ignore
    assert (batch["src_mask"] == (batch["src_ids"] != 0)).all()
    lengths = batch["src_mask"].sum(1)
    assert lengths.max() - lengths.min() <= 2  # one length bucket
    fresh = [b["src_ids"] for b in data.train_dataloader()]
    data.trainer = SimpleNamespace(global_rank=0, world_size=1, global_step=5)
    resumed = [b["src_ids"] for b in data.train_dataloader()]
    assert all(torch.equal(a, b) for a, b in zip(fresh[5:], resumed, strict=True))
    shards = []
    for rank in (0, 1):
        data.trainer = SimpleNamespace(global_rank=rank, world_size=2, global_step=0)
        shards.append([b["src_ids"] for b in data.train_dataloader()])
    assert not any(torch.equal(a, b) for a, b in zip(*shards, strict=True)) and len(shards[0]) == 12


def test_train_py_experiment_translation_runs_and_its_checkpoint_translates(tmp_path: Path):
    folder = write_reverse_task(tmp_path, 200, 16)
    cfg = compose(
        [
            "experiment=translation",
            f"data.train_files=[{folder / 'train.jsonl'}]",
            f"data.valid_files=[{folder / 'valid.jsonl'}]",
            f"data.test_file={folder / 'test.jsonl'}",
            *TINY,
            "trainer.max_steps=3",
            "trainer.val_check_interval=3",
        ]
    )
    assert cfg["model"]["arch"] == "encoder_decoder" and cfg["label_smoothing"] == 0.1
    summary = train(cfg, tmp_path / "run")
    assert summary["global_step"] == 3 and summary["val_ppl"] == summary["val_ppl"]
    model, tokenizer = load_checkpoint(summary["last_ckpt"])
    (hyp,) = translate(model, tokenizer, ["red blue green"], num_beams=2, max_new_tokens=5)
    assert isinstance(hyp, str)


TINY = [
    "model.dim=64",
    "model.n_layers=2",
    "model.n_encoder_layers=2",
    "model.n_heads=4",
    "model.max_len=24",
    "model.dropout=0.0",
    "data.vocab_size=300",
    "data.bleu_samples=16",
    "batch_size=32",
    "trainer=cpu",
    "trainer.enable_progress_bar=false",
    "trainer.log_every_n_steps=10",
]


def test_a_tiny_reversal_task_is_learned_to_bleu_90(tmp_path: Path, capsys) -> None:
    """Train with the translation recipe's pieces (val/bleu callback included), score
    with beam search and through run_bleu, in well under a minute on 2 cores."""
    folder = write_reverse_task(tmp_path, 2000, 64)
    overrides = [
        "experiment=translation",
        f"data.train_files=[{folder / 'train.jsonl'}]",
        f"data.valid_files=[{folder / 'valid.jsonl'}]",
        *TINY,
        "label_smoothing=0.0",
        "optim.lr=3e-3",
        "optim.warmup_steps=30",
        "trainer.max_steps=300",
        "trainer.val_check_interval=300",
    ]
    cfg = compose(overrides)
    torch.manual_seed(0)
    data = TranslationDataModule(cfg["data"], max_len=24, batch_size=32, total_steps=300)
    data.setup()
    module = LMModule(
        {**cfg["model"], "attn": cfg["attn"], "vocab_size": data.vocab_size},
        optim=cfg["optim"],
        total_steps=300,
    )
    module.tokenizer_json = data.tokenizer.to_str()
    trainer_cfg = TrainerConfig(**{**cfg["trainer"], "accelerator": "cpu"})
    trainer = build_trainer(trainer_cfg, tmp_path / "run", None, data.callbacks())
    trainer.fit(module, datamodule=data)
    assert trainer.callback_metrics["val/bleu"] >= 90
    pairs = [json.loads(line) for line in (folder / "test.jsonl").open()]
    hyps = translate(module.model, data.tokenizer, [p["src"] for p in pairs], num_beams=3)
    assert sacrebleu.corpus_bleu(hyps, [[p["tgt"] for p in pairs]]).score >= 90
    ckpt = tmp_path / "run" / "tiny.ckpt"
    trainer.save_checkpoint(ckpt)
    scores = run_bleu(
        {
            "ckpt": str(ckpt),
            "data": {"test_file": str(folder / "test.jsonl")},
            "num_beams": "2",
            "batch_size": "16",
        }
    )
    assert scores["bleu"] >= 90 and Path(scores["hypotheses"]).is_file()
    assert Path(scores["hypotheses"]).name == "tiny.test.beam2.txt"
    out = capsys.readouterr().out
    assert "BLEU = " in out and "chrF2 = " in out and "tok:13a" in out
    # the generation CLI translates with the same checkpoint
    pair = pairs[0]
    (out,) = run(GenerateConfig(ckpt=str(ckpt), prompt=pair["src"], num_beams=3))
    assert out.text == pair["tgt"]
    assert capsys.readouterr().out.strip() == pair["tgt"]
