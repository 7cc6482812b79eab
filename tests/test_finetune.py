"""Fine-tuning: init_from's weights and tokenizer, architecture checks, instruction data."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import ROOT, compose, tiny_overrides

from minillm import load_checkpoint, save_pretrained
from minillm.checkpoint import model_state_dict, read_checkpoint
from minillm.data.instructions import (
    DEFAULT_TEMPLATE,
    InstructionsDataModule,
    format_prompt,
    saved_template,
)
from minillm.data.tokenizer import EOS_ID
from minillm.models import ModelConfig
from minillm.training.finetune import load_initial_weights, read_initial_weights
from minillm.training.run import train


@pytest.fixture(scope="module")
def pretrained(corpus_file: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run directory holding a tiny mha model trained for 2 steps."""
    run_dir = tmp_path_factory.mktemp("pretrained")
    train(compose(tiny_overrides(corpus_file, "trainer.max_steps=2")), run_dir)
    return run_dir


@pytest.fixture(scope="module")
def other_text(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("mine") / "notes.txt"
    paragraph = "My own notes about gardens, tomatoes and the weather in spring. " * 8
    path.write_text("\n\n".join(f"{i}. {paragraph}" for i in range(40)), encoding="utf-8")
    return path


def finetune(corpus: Path, init_from: Path, *extra: str) -> list[str]:
    """The overrides of a fine-tuning run (``model=tiny`` included: the checkpoint's size)."""
    return tiny_overrides(corpus, "experiment=finetune", f"init_from={init_from}", *extra)


def run(overrides: list[str], run_dir: Path) -> dict:
    """train() as train.py calls it: with the command-line overrides."""
    return train(compose(overrides), run_dir, overrides=overrides)


def without_model(overrides: list[str]) -> list[str]:
    """The overrides with the default model=small left in place of model=tiny."""
    return [o for o in overrides if o != "model=tiny"]


def test_finetune_starts_from_the_checkpoint_weights_and_tokenizer(
    pretrained, other_text, tmp_path
):
    overrides = finetune(other_text, pretrained, "trainer.max_steps=1", "data.vocab_size=500")
    assert compose(overrides)["optim"]["lr"] == 1e-4  # the preset's fine-tuning rate
    summary = run([*overrides, "optim.lr=1e-12"], tmp_path)
    assert summary["global_step"] == 1 and summary["run_dir"] == str(tmp_path)
    assert (tmp_path / "tokenizer.json").read_text() == (pretrained / "tokenizer.json").read_text()
    before = model_state_dict(read_checkpoint(pretrained / "checkpoints" / "best.ckpt"))
    after = model_state_dict(read_checkpoint(summary["last_ckpt"]))
    for name, value in before.items():  # one step at lr 1e-12 leaves the weights in place
        torch.testing.assert_close(after[name], value, rtol=0, atol=1e-6)


def test_finetune_takes_the_checkpoints_architecture(pretrained, other_text, tmp_path):
    """The default model (small: dim 192, max_len 128) is not the tiny checkpoint's: its
    config is taken, training knobs set on the command line are the user's."""
    overrides = without_model(finetune(other_text, pretrained, "trainer.max_steps=1"))
    assert compose(overrides)["model"]["dim"] == 192
    summary = run([*overrides, "model.dropout=0.1", "attn.dropout=0.2"], tmp_path)
    saved = read_checkpoint(summary["last_ckpt"])["hyper_parameters"]["model"]
    trained = read_checkpoint(pretrained / "checkpoints" / "best.ckpt")["hyper_parameters"]
    expected = ModelConfig.from_dict({**trained["model"], "dropout": 0.1}).to_dict()
    expected["attn"] = {**expected["attn"], "dropout": 0.2}
    assert ModelConfig.from_dict(saved).to_dict() == expected  # dim 32, max_len 32, mha ...


def test_an_explicit_architecture_override_names_the_field(pretrained, other_text, tmp_path):
    with pytest.raises(ValueError) as err:
        run(finetune(other_text, pretrained, "attn=linear"), tmp_path)
    message = str(err.value)
    assert "\n" not in message
    assert "attn.kind: 'mha' (checkpoint) vs 'linear' (this run)" in message
    assert "attn=mha" in message and "init_from_strict=false" in message
    with pytest.raises(ValueError, match=r"dim: 32 \(checkpoint\) vs 64 .*model.dim=32"):
        run(finetune(other_text, pretrained, "model.dim=64"), tmp_path)
    with pytest.raises(ValueError, match=r"dim: 32 \(checkpoint\) vs 192 \(this run\)"):
        run([*without_model(finetune(other_text, pretrained)), "model=small"], tmp_path)
    assert not any(tmp_path.iterdir())  # refused before anything was written


def test_train_py_finetunes_a_tiny_checkpoint_with_the_default_model(
    pretrained, other_text, tmp_path
):
    """The command line of the README (no model=): the overrides come from Hydra itself."""
    overrides = without_model(finetune(other_text, pretrained, "trainer.max_steps=1"))
    cmd = [sys.executable, "train.py", *overrides, f"hydra.run.dir={tmp_path / 'ok'}"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    cfg = read_checkpoint(tmp_path / "ok" / "checkpoints" / "last.ckpt")["hyper_parameters"]
    assert cfg["model"]["dim"] == 32
    cmd = [sys.executable, "train.py", *overrides, "attn=linear", f"hydra.run.dir={tmp_path}/x"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "attn.kind: 'mha' (checkpoint) vs 'linear' (this run)" in proc.stderr


def test_non_strict_loads_what_matches_and_lists_the_rest(pretrained, other_text, tmp_path):
    overrides = finetune(other_text, pretrained, "attn=gated_linear", "init_from_strict=false")
    summary = run([*overrides, "trainer.max_steps=1"], tmp_path)
    assert summary["global_step"] == 1
    init = read_initial_weights(str(pretrained))
    model, _ = load_checkpoint(summary["last_ckpt"])
    report = load_initial_weights(model, init, strict=False)
    assert report[0].startswith("init_from: loaded ")
    assert any("kept fresh: blocks.0.attn.gate_down.weight" in line for line in report)
    assert any("blocks.0.attn.q_proj.weight (16, 32) (checkpoint (32, 32))" in r for r in report)


def test_init_from_an_exported_folder(pretrained, other_text, tmp_path) -> None:
    model, tokenizer = load_checkpoint(pretrained / "checkpoints" / "best.ckpt")
    save_pretrained(model, tokenizer, tmp_path / "exported")
    overrides = finetune(other_text, tmp_path / "exported", "trainer.max_steps=1")
    assert run(overrides, tmp_path / "run")["global_step"] == 1


def test_finetune_without_init_from_says_what_to_pass(other_text, tmp_path) -> None:
    cfg = compose(tiny_overrides(other_text, "experiment=finetune"))
    with pytest.raises(FileNotFoundError, match=r"init_from=required: .*pass init_from=<"):
        train(cfg, tmp_path)


RECORDS = [
    {"question": f"What is {a} plus {b}?", "answer": f"{a + b}."}
    for a in range(12)
    for b in range(4)
]


@pytest.fixture(scope="module")
def chat_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("chat") / "chat.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in RECORDS), encoding="utf-8")
    return path


def instructions_overrides(chat_file: Path) -> list[str]:
    return [
        "data=instructions",
        f"data.files=[{chat_file}]",
        "data.prompt_field=question",
        "data.response_field=answer",
    ]


def test_instruction_batches_score_only_the_response_and_its_eos(pretrained, chat_file):
    tokenizer = load_checkpoint(pretrained / "checkpoints" / "best.ckpt")[1]
    cfg = compose(instructions_overrides(chat_file))["data"]
    data = InstructionsDataModule(cfg, max_len=64, batch_size=4, tokenizer=tokenizer)
    data.setup()
    batch = next(iter(data.val_dataloader()))
    assert set(batch) == {"input_ids", "labels"}
    valid = [r for r in RECORDS if format_prompt(r["question"]) in _texts(data, tokenizer)]
    assert len(valid) == len(data.valid) > 0
    for row in range(len(batch["labels"])):
        labels = batch["labels"][row]
        scored = labels[labels != -100].tolist()
        assert scored[-1] == EOS_ID  # each response ends with <eos>
        response = tokenizer.decode(scored[:-1])
        prompt_ids = batch["input_ids"][row][: (labels != -100).nonzero()[0, 0] + 1].tolist()
        assert tokenizer.decode(prompt_ids).startswith("### Instruction:\nWhat is")
        assert tokenizer.decode(prompt_ids).endswith("### Response:\n")
        assert response.rstrip(".").isdigit()
        # right padding: -100 labels after the response, nothing scored inside the prompt
        assert (labels[: len(prompt_ids) - 1] == -100).all()


def _texts(data: InstructionsDataModule, tokenizer) -> str:
    return "".join(tokenizer.decode(ids.tolist()) for ids, _ in data.valid)


def test_finetune_on_instructions_keeps_the_template_for_generation(
    pretrained, chat_file, tmp_path
) -> None:
    # max_len may differ from the checkpoint's (RoPE): 64 holds a whole record
    overrides = finetune(
        chat_file, pretrained, *instructions_overrides(chat_file), "model.max_len=64"
    )
    summary = run(overrides, tmp_path)
    assert summary["global_step"] == 4
    assert read_checkpoint(summary["last_ckpt"])["hyper_parameters"]["model"]["max_len"] == 64
    assert saved_template(summary["last_ckpt"]) == DEFAULT_TEMPLATE
    assert format_prompt("Hi?", DEFAULT_TEMPLATE) == "### Instruction:\nHi?\n\n### Response:\n"
    with pytest.raises(ValueError, match="not trained on data=instructions"):
        saved_template(pretrained / "checkpoints" / "best.ckpt")


def test_a_bad_record_names_its_file_and_line(pretrained, tmp_path) -> None:
    tokenizer = load_checkpoint(pretrained / "checkpoints" / "best.ckpt")[1]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "response": "b"}\n{"prompt": "c"}\n', encoding="utf-8")
    data = InstructionsDataModule(
        {"files": [str(bad)]}, max_len=8, batch_size=2, tokenizer=tokenizer
    )
    with pytest.raises(
        ValueError, match=r"bad.jsonl:2: no string field 'response'.*response_field"
    ):
        data.setup()
    bad.write_text('{"prompt": "a", "response": "b"}\nnot json\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"bad.jsonl:2: not valid JSON"):
        InstructionsDataModule({"files": [str(bad)]}, max_len=8, batch_size=2).setup()


def test_long_records_keep_the_prompt_end_and_the_response() -> None:
    from minillm.data.instructions import fit_example

    ids, n_prompt = fit_example(list(range(10)), [100, 101, EOS_ID], budget=8)
    assert ids == [5, 6, 7, 8, 9, 100, 101, EOS_ID] and n_prompt == 5
    ids, n_prompt = fit_example([1, 2, 3, 4], list(range(100, 110)), budget=8)
    assert ids == [1, 2, 3, 4, 100, 101, 102, 103] and n_prompt == 4
