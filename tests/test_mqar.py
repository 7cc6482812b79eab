"""MQAR (data=mqar): the generator's layout and determinism, exact resume, the recall-accuracy
callback, one-line errors for bad knobs, a tiny training run, and the recall report."""

from __future__ import annotations

import contextlib
import csv
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import compose
from torch import Tensor, nn

from minillm.cli.app import check_command_line
from minillm.cli.train import validate
from minillm.data.mqar import (
    FIRST_ID,
    MQARConfig,
    MQARDataModule,
    RecallAccuracy,
    generate,
    id_tokenizer,
)
from minillm.data.tokenizer import PAD_ID, check_special_tokens
from minillm.evaluation.recall_report import state_bytes, write_recall_report
from minillm.training.run import train

CFG = MQARConfig(n_pairs=5, n_queries=3, vocab_size=40, n_train=64, n_valid=16)
SEQ_LEN = 23
HALF = (40 - FIRST_ID) // 2  # keys in [4, 22), values in [22, 40)


def test_layout_answers_are_the_values_of_their_keys_and_only_answers_are_labelled() -> None:
    batch = generate(CFG, SEQ_LEN, "train", np.arange(50))
    tokens, labels = batch["input_ids"], batch["labels"]
    assert tokens.shape == labels.shape == (50, SEQ_LEN)
    for row, lab in zip(tokens.tolist(), labels.tolist(), strict=True):
        keys, values = row[0:10:2], row[1:10:2]
        assert len(set(keys)) == 5 and all(FIRST_ID <= k < FIRST_ID + HALF for k in keys)
        assert all(FIRST_ID + HALF <= v < 40 for v in values)
        answers = [t for t, y in enumerate(lab) if y != -100]
        assert len(answers) == 3 and min(answers) >= 10
        asked = [row[t] for t in answers]
        assert len(set(asked)) == 3  # distinct keys asked
        for t in answers:
            assert lab[t] == values[keys.index(row[t])]  # the value paired with the key
            if t + 1 < SEQ_LEN:
                assert row[t + 1] == lab[t]  # and it follows the query as an input
        used = {t for a in answers for t in (a, a + 1)}
        assert all(row[t] == PAD_ID for t in range(10, SEQ_LEN) if t not in used)


def test_sequences_are_a_pure_function_of_seed_split_and_index() -> None:
    whole = generate(CFG, SEQ_LEN, "train", np.arange(8))
    again = generate(CFG, SEQ_LEN, "train", np.array([5, 2, 7]))
    assert torch.equal(again["input_ids"], whole["input_ids"][[5, 2, 7]])
    valid = generate(CFG, SEQ_LEN, "validation", np.arange(8))["input_ids"]
    other = MQARConfig(**{**CFG.__dict__, "seed": 7})
    reseeded = generate(other, SEQ_LEN, "train", np.arange(8))["input_ids"]
    assert not torch.equal(valid, whole["input_ids"])
    assert not torch.equal(reseeded, whole["input_ids"])


def _data(**kwargs) -> MQARDataModule:
    data = MQARDataModule(CFG, max_len=SEQ_LEN, batch_size=4, seed=3, total_steps=40, **kwargs)
    data.setup()
    return data


def test_a_resumed_loader_gives_the_batches_of_an_uninterrupted_one() -> None:
    data = _data()
    uninterrupted = list(data.train_dataloader())
    assert len(uninterrupted) == 40  # 40 steps of 4 over 64 sequences: 2.5 epochs
    data._position = lambda: (0, 1, 13)  # a run resumed at global step 13
    resumed = list(data.train_dataloader())
    assert len(resumed) == 27
    for a, b in zip(resumed, uninterrupted[13:], strict=True):
        assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["labels"], b["labels"])


def test_two_ranks_together_read_the_global_batch_of_one_process() -> None:
    single = MQARDataModule(CFG, max_len=SEQ_LEN, batch_size=8, seed=3, total_steps=40)
    single._position = lambda: (0, 1, 13)
    ranks = []
    for rank in (0, 1):
        data = _data()
        data._position = lambda rank=rank: (rank, 2, 13)
        ranks.append(next(iter(data.train_dataloader()))["input_ids"])
    assert torch.equal(torch.cat(ranks), next(iter(single.train_dataloader()))["input_ids"])


def test_data_module_tokenizer_and_sizes() -> None:
    data = _data()
    tokenizer = data.tokenizer
    check_special_tokens(tokenizer)
    assert data.vocab_size == tokenizer.get_vocab_size() == 40
    assert tokenizer.encode("17 39").ids == [17, 39] and tokenizer.decode([17, 39]) == "17 39"
    assert data.num_train_tokens == 64 * SEQ_LEN and data.unigram_perplexity() == HALF
    valid = torch.cat([b["input_ids"] for b in data.val_dataloader()])
    assert torch.equal(valid, generate(CFG, SEQ_LEN, "validation", np.arange(16))["input_ids"])
    with pytest.raises(ValueError, match="data.vocab_size=40: the given tokenizer"):
        _data(tokenizer=id_tokenizer(50))


class _Lookup(nn.Module):
    """Predicts a fixed token for each input token: one-hot states, a permutation head."""

    def __init__(self, vocab: int, answer: dict[int, int]) -> None:
        super().__init__()
        self.lm_head = nn.Linear(vocab, vocab, bias=False)
        table = torch.zeros(vocab, vocab)
        for token in range(vocab):
            table[answer.get(token, 0), token] = 1.0
        self.lm_head.weight.data = table
        self.vocab = vocab

    def hidden_states(self, input_ids: Tensor) -> Tensor:
        return nn.functional.one_hot(input_ids, self.vocab).float()  # (B, T, vocab)


def test_recall_callback_counts_exact_answers_over_the_whole_validation() -> None:
    model = _Lookup(10, {4: 7, 5: 8, 6: 9})  # knows keys 4, 5, 6; says 0 for anything else
    logged = {}
    module = SimpleNamespace(model=model, device=torch.device("cpu"))
    module.log = lambda name, value, **kw: logged.update({name: float(value)})
    trainer = SimpleNamespace(
        precision_plugin=SimpleNamespace(forward_context=contextlib.nullcontext),
        strategy=SimpleNamespace(reduce=lambda t, reduce_op: t),
    )
    batches = [  # answers: 4 -> 7 right, 5 -> 8 wrong; 6 -> 9 right, 3 -> 0 wrong
        {"input_ids": torch.tensor([[4, 7, 5, 0]]), "labels": torch.tensor([[7, -100, 9, -100]])},
        {"input_ids": torch.tensor([[6, 3]]), "labels": torch.tensor([[9, 5]])},
    ]
    callback = RecallAccuracy()
    callback.on_validation_epoch_start(trainer, module)
    for i, batch in enumerate(batches):
        callback.on_validation_batch_end(trainer, module, None, batch, i)
    callback.on_validation_epoch_end(trainer, module)
    assert logged == {"val/recall_acc": pytest.approx(2 / 4)}
    callback.on_validation_epoch_start(trainer, module)  # the next validation starts at zero
    callback.on_validation_batch_end(trainer, module, None, batches[1], 0)
    callback.on_validation_epoch_end(trainer, module)
    assert logged == {"val/recall_acc": pytest.approx(1 / 2)}


BAD = [
    ("data.n_pairs=12 data.seq_len=40", "data.n_pairs=12"),  # 48 tokens > 41
    ("data.n_pairs=8 data.vocab_size=19", "data.vocab_size=19"),  # 7 keys < 8 pairs
    ("data.n_queries=9", "data.n_queries=9"),  # more queries than pairs
    ("data.n_train=0", "data.n_train=0"),
]


@pytest.mark.parametrize(("args", "named"), BAD, ids=[a for a, _ in BAD])
def test_bad_knob_is_one_line_and_exit_2(args: str, named: str, capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        check_command_line("train", validate, ["data=mqar", "model=tiny", *args.split()])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {named}") and "\n" not in err, err


def test_sequences_must_fit_the_model_context() -> None:
    with pytest.raises(ValueError, match=r"^data.seq_len=40: longer than model.max_len=32;"):
        MQARDataModule({"seq_len": 40}, max_len=32, batch_size=4)
    with pytest.raises(ValueError, match=r"^data.n_pairs=9: .* \(model.max_len=32 inputs \+ 1"):
        MQARDataModule({"n_pairs": 9}, max_len=32, batch_size=4)  # seq_len unset: max_len


def test_tiny_train_run_logs_recall_accuracy(tmp_path: Path) -> None:
    overrides = ["data=mqar", "model=tiny", "model.max_len=16", "data.n_pairs=4"]
    overrides += ["data.vocab_size=32", "data.n_valid=8", "batch_size=4", "trainer=cpu"]
    overrides += ["trainer.max_steps=2", "trainer.val_check_interval=1"]
    overrides += ["trainer.enable_progress_bar=false", "optim.warmup_steps=1"]
    summary = train(compose(overrides), tmp_path)
    with open(tmp_path / "logs" / "metrics.csv", newline="") as f:
        recall = [float(r["val/recall_acc"]) for r in csv.DictReader(f) if r["val/recall_acc"]]
    assert len(recall) == 2 and all(0 <= r <= 1 for r in recall)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["recall_acc"] == pytest.approx(recall[-1]) and metrics["seq_len"] == 16
    assert metrics["data"]["task"] == "mqar" and summary["unigram_ppl"] == 14


def _fake_run(root: Path, name: str, kind: str, dim: int, acc: float, lr: float) -> None:
    run = root / name
    run.mkdir(parents=True)
    model = {"attn": {"kind": kind}, "dim": dim, "n_heads": 1, "n_layers": 2, "max_len": 24}
    metrics = {"kind": kind, "model": model, "seq_len": 24, "recall_acc": acc, "params": 5e4}
    metrics["optim"] = {"lr": lr}
    metrics |= {"val_loss": 0.5, "global_step": 10, "train_tokens": 640, "train_s": 30.0}
    metrics["data"] = {"n_pairs": 6, "n_queries": None, "vocab_size": 128}
    (run / "metrics.json").write_text(json.dumps(metrics))


def test_report_writes_the_table_and_chart_against_state_bytes(tmp_path: Path) -> None:
    _fake_run(tmp_path, "0_mha_d32_lr0.001", "mha", 32, 0.995, 1e-3)
    _fake_run(tmp_path, "1_mha_d32_lr0.003", "mha", 32, 0.2, 3e-3)
    _fake_run(tmp_path, "2_linear_d32_lr0.001", "linear", 32, 0.3, 1e-3)
    _fake_run(tmp_path, "3_linear_d32_lr0.003", "linear", 32, 0.41, 3e-3)
    path = write_recall_report(tmp_path)
    report = path.read_text()
    assert path == tmp_path / "recall.md" and "](recall.png)" in report
    assert (tmp_path / "recall.png").read_bytes()[:4] == b"\x89PNG"
    rows = [line.split(" | ") for line in report.splitlines() if line.startswith("| ")]
    assert rows[0][:7] == ["| kind", "dim", "params", "state / layer", "val recall acc", "lr",
                           "acc per lr"]  # fmt: skip
    assert [r[0] for r in rows[1:]] == ["| mha", "| linear"]  # one row per (kind, width)
    assert rows[1][4:7] == ["99.5%", "0.001", "0.001: 99.5%, 0.003: 20.0%"]
    assert rows[2][4:6] == ["41.0%", "0.003"]
    kv = state_bytes({"attn": {"kind": "mha"}, "dim": 32, "n_heads": 1}, 24)
    assert kv >= 2 * 24 * 32 * 4  # keys and values of 24 tokens, fp32
    assert state_bytes({"attn": {"kind": "linear"}, "dim": 32, "n_heads": 1}, 24) >= 32 * 32 * 4
