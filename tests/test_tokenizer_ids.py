"""Stock tokenizers wherever their special tokens sit: the data, evaluation, generation and
fine-tuning code ask the tokenizer for its ids (``SpecialTokens``), never assume 0-3.

Two tokenizers built here, both with their special tokens at the END of the vocabulary: a
Llama-like one (``<s> </s>``, no pad) and a GPT-2-like one (only ``<|endoftext|>``)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import transformers
from conftest import compose, tiny_overrides
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from minillm.checkpoint import load_pretrained
from minillm.data.instructions import InstructionsDataModule
from minillm.data.lm import LMDataModule
from minillm.data.tokenizer import SpecialTokens, build_tokenizer, load_or_train_tokenizer
from minillm.data.translation import collate as translation_collate
from minillm.evaluation.perplexity import perplexity
from minillm.generation.text import complete
from minillm.models import build_model
from minillm.training.run import train

DOCS = ["The Congress shall assemble.", "A more perfect union.", "We the people.", "Liberty."]
LLAMA_SPECIALS = ["<unk>", "<s>", "</s>"]
GPT2_SPECIALS = ["<|endoftext|>"]


def stock_tokenizer(texts: list[str], specials: list[str]) -> Tokenizer:
    """A byte-level BPE trained without special tokens, then ``specials`` appended: they
    take the last ids, as no minillm tokenizer has them."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=[]
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    tokenizer.add_special_tokens(specials)
    return tokenizer


@pytest.fixture(scope="module")
def texts(corpus_file: Path) -> list[str]:
    return corpus_file.read_text(encoding="utf-8").split("\n\n")


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def stock(request: pytest.FixtureRequest, texts: list[str]) -> Tokenizer:
    return stock_tokenizer(texts, LLAMA_SPECIALS if request.param == "llama" else GPT2_SPECIALS)


def test_special_ids_are_asked_of_the_tokenizer(texts):
    llama = stock_tokenizer(texts, LLAMA_SPECIALS)
    n = llama.get_vocab_size()  # <unk> <s> </s> are n - 3 .. n - 1; no pad: eos pads
    expected = SpecialTokens(pad=n - 1, bos=n - 2, eos=n - 1, unk=n - 3)
    assert SpecialTokens.from_tokenizer(llama) == expected
    gpt2 = stock_tokenizer(texts, GPT2_SPECIALS)
    n = gpt2.get_vocab_size()
    assert SpecialTokens.from_tokenizer(gpt2) == SpecialTokens(pad=n - 1, bos=n - 1, eos=n - 1)
    own = build_tokenizer(DOCS, kind="char")
    assert SpecialTokens.from_tokenizer(own) == SpecialTokens(pad=0, bos=1, eos=2, unk=3)


def test_a_tokenizer_without_eos_is_refused_in_one_line(texts, tmp_path):
    path = tmp_path / "tokenizer.json"
    stock_tokenizer(texts, ["<s>"]).save(str(path))
    with pytest.raises(ValueError) as err:
        load_or_train_tokenizer({"tokenizer": str(path)}, DOCS, tmp_path)
    message = str(err.value)
    assert str(path) in message and "no end-of-sequence token" in message
    assert "add_special_tokens(['</s>'])" in message and "\n" not in message


def test_lm_blocks_end_documents_with_its_eos(stock, tmp_path):
    path = tmp_path / "tokenizer.json"
    stock.save(str(path))
    train_file, valid_file = tmp_path / "train.txt", tmp_path / "valid.txt"
    train_file.write_text("\n\n".join(DOCS), encoding="utf-8")
    valid_file.write_text("Short.", encoding="utf-8")
    cfg = {"source": "text", "files": [str(train_file)], "valid_files": [str(valid_file)]}
    data = LMDataModule(
        {**cfg, "tokenizer": str(path)}, max_len=8, batch_size=2, cache_dir=str(tmp_path)
    )
    data.setup()
    eos = SpecialTokens.from_tokenizer(stock).eos
    assert eos == stock.get_vocab_size() - 1 and data.vocab_size == stock.get_vocab_size()
    stream = [i for doc in DOCS for i in stock.encode(doc, add_special_tokens=False).ids + [eos]]
    assert data.train_blocks.ravel().tolist() == stream[: data.train_blocks.size]
    val = next(iter(data.val_dataloader()))
    assert val["labels"][0, -1].item() == eos


def test_instruction_batches_use_its_eos_and_pad(texts, tmp_path):
    llama = stock_tokenizer(texts, LLAMA_SPECIALS)
    special = SpecialTokens.from_tokenizer(llama)
    records = [{"prompt": "Who?", "response": "We the people."}, {"prompt": "Q", "response": "A"}]
    chat = tmp_path / "chat.jsonl"
    chat.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    cfg = {"files": [str(chat)], "valid_files": [str(chat)]}
    data = InstructionsDataModule(cfg, max_len=64, batch_size=2, tokenizer=llama)
    data.setup()
    batch = next(iter(data.val_dataloader()))
    long_row, short_row = batch["labels"][0], batch["labels"][1]
    assert long_row[-1].item() == special.eos  # the longer record: no padding after its eos
    n = int((short_row != -100).nonzero().max())  # the shorter: its eos, then padding
    assert short_row[n].item() == special.eos
    assert (batch["input_ids"][1, n + 1 :] == special.pad).all() and special.pad == special.eos


def test_translation_batches_start_and_end_with_its_ids(texts):
    gpt2 = stock_tokenizer(texts, GPT2_SPECIALS)
    special = SpecialTokens.from_tokenizer(gpt2)  # <|endoftext|> is bos, eos and pad
    src = [torch.tensor([5, 6, special.eos]).numpy(), torch.tensor([7, special.eos]).numpy()]
    batch = translation_collate(src, [torch.tensor([8, 9]).numpy()] * 2, special)
    assert batch["input_ids"][:, 0].tolist() == [special.bos] * 2
    assert batch["labels"][:, -1].tolist() == [special.eos] * 2
    assert batch["src_ids"][1, -1].item() == special.pad and not batch["src_mask"][1, -1]


def test_perplexity_scores_with_its_eos(stock):
    torch.manual_seed(0)
    sizes = {"dim": 32, "n_layers": 2, "n_heads": 4, "max_len": 64}
    model = build_model({"vocab_size": stock.get_vocab_size(), **sizes}).eval()
    eos = SpecialTokens.from_tokenizer(stock).eos
    expected = 0.0  # the slow twin: one whole-document forward each, <eos> + tokens + <eos>
    for doc in DOCS[:2]:
        ids = torch.tensor([eos, *stock.encode(doc, add_special_tokens=False).ids, eos])
        with torch.no_grad():
            logits = model(ids[None, :-1])[0]  # (T, V)
        expected += F.cross_entropy(logits, ids[1:], reduction="sum").item()
    result = perplexity(model, stock, DOCS[:2], batch_size=2)  # one right-padded batch
    assert result.nll == pytest.approx(expected, rel=1e-5)


def test_finetune_from_an_hf_folder_with_specials_at_the_end(texts, corpus_file, tmp_path):
    """init_from=hf:<dir> whose tokenizer keeps <s> </s> last: trains, and generation stops
    at that tokenizer's </s> (not at id 2)."""
    tokenizer = stock_tokenizer(texts, LLAMA_SPECIALS)
    eos = SpecialTokens.from_tokenizer(tokenizer).eos
    folder = tmp_path / "llama"
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=tokenizer.get_vocab_size(), hidden_size=32, intermediate_size=64,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=64, tie_word_embeddings=False,
    )  # fmt: skip
    transformers.LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save(str(folder / "tokenizer.json"))
    overrides = tiny_overrides(corpus_file, "experiment=finetune", f"init_from=hf:{folder}")
    summary = train(compose([*overrides, "trainer.max_steps=2"]), tmp_path / "run")
    assert summary["global_step"] == 2
    model, loaded = load_pretrained(summary["last_ckpt"])
    assert loaded.to_str() == tokenizer.to_str() and model.cfg.vocab_size == eos + 1

    prompt = "The Congress of the United States"
    first = complete(model, loaded, prompt, temperature=0, max_new_tokens=4)[0].token_ids
    assert eos not in first and len(first) == 4
    ids = torch.tensor([loaded.encode(prompt, add_special_tokens=False).ids + first[:1]])
    with torch.no_grad():  # make </s> the greedy choice where first[1] was (a positive logit)
        model.lm_head.weight[eos] = 2 * model.lm_head.weight[first[1]]
        assert model(ids)[0, -1].argmax().item() == eos  # the slow twin: a full forward
    stopped = complete(model, loaded, prompt, temperature=0, max_new_tokens=16)[0]
    assert stopped.token_ids == first[:1]  # stopped at </s>, which is not part of the output
