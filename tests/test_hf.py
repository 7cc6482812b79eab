"""Hugging Face interop (minillm.hf): Llama-family folders in, Llama folders out, the round
trip, and fine-tuning from ``init_from=hf:<dir>``. Tiny random models written with
transformers' own ``save_pretrained``; nothing is downloaded."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
from conftest import ROOT, compose, tiny_overrides
from tokenizers import Tokenizer, models

from minillm import save_pretrained
from minillm.checkpoint import CheckpointError, model_state_dict, read_checkpoint
from minillm.data.tokenizer import SPECIAL_TOKENS, build_tokenizer
from minillm.hf import SPECIAL_ROLES, check_exportable, hf_name, load_hf, save_hf
from minillm.models import ModelConfig, build_model
from minillm.training.finetune import architecture, read_initial_weights
from minillm.training.run import train

LINEAR_ROPE = {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}  # 4.x, 5.x keys
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}  # this checkout's minillm, not an installed one
SIZES = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)


@pytest.fixture(scope="module")
def tokenizer(corpus_file: Path) -> Tokenizer:
    texts = corpus_file.read_text(encoding="utf-8").split("\n\n")
    return build_tokenizer(texts, vocab_size=300)


def hf_folder(folder: Path, tokenizer: Tokenizer, kind: str = "Llama", **config) -> torch.nn.Module:
    """A random ``<kind>ForCausalLM`` (biases and norm weights random too) saved with the
    tokenizer; one embedding row per token unless ``config`` says otherwise."""
    torch.manual_seed(0)
    config = {"vocab_size": tokenizer.get_vocab_size(), "max_position_embeddings": 64, **config}
    cfg = getattr(transformers, f"{kind}Config")(**SIZES, **config)
    model = getattr(transformers, f"{kind}ForCausalLM")(cfg).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(("bias", "norm.weight", "layernorm.weight")):
                param.normal_(0.5 if name.endswith("weight") else 0.0, 0.2)
    model.save_pretrained(folder)
    tokenizer.save(str(folder / "tokenizer.json"))
    return model


def prompt(tokenizer: Tokenizer) -> torch.Tensor:
    return torch.tensor([tokenizer.encode("The Congress of the United States shall").ids])


@pytest.mark.parametrize(
    ("n_kv_heads", "tie", "kind"), [(4, True, "mha"), (1, False, "mqa"), (2, True, "gqa")]
)
def test_a_llama_folder_imports_with_its_logits(tokenizer, tmp_path, n_kv_heads, tie, kind):
    hf = hf_folder(tmp_path, tokenizer, num_key_value_heads=n_kv_heads, tie_word_embeddings=tie)
    model, loaded_tokenizer = load_hf(f"hf:{tmp_path}")
    assert model.cfg.attn["kind"] == kind and model.cfg.tie_embeddings == tie
    assert loaded_tokenizer.to_str() == tokenizer.to_str()
    ids = prompt(tokenizer)
    with torch.no_grad():
        torch.testing.assert_close(model(ids), hf(ids).logits, rtol=0, atol=1e-5)


@pytest.mark.parametrize(
    ("kind", "config"),
    [("Mistral", {"sliding_window": None}), ("Qwen2", {})],
)
def test_mistral_and_qwen2_folders_that_need_nothing_more_import(tokenizer, tmp_path, kind, config):
    hf = hf_folder(tmp_path, tokenizer, kind, num_key_value_heads=2, **config)
    model, _ = load_hf(tmp_path)
    assert model.cfg.attn["bias"] == (kind == "Qwen2")  # q/k/v biases; o_proj's is zero
    ids = prompt(tokenizer)
    with torch.no_grad():
        torch.testing.assert_close(model(ids), hf(ids).logits, rtol=0, atol=1e-5)


@pytest.fixture(scope="module")
def llama_dir(tokenizer, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("llama")
    hf_folder(folder, tokenizer, num_key_value_heads=2)
    return folder


@pytest.mark.parametrize(
    ("edit", "named"),
    [
        ({"hidden_act": "gelu"}, "hidden_act='gelu'"),
        ({"rope_scaling": LINEAR_ROPE, "rope_parameters": LINEAR_ROPE}, "rope_type='linear'"),
        ({"mlp_bias": True}, "mlp_bias=true"),
        ({"model_type": "mistral", "sliding_window": 16}, "sliding_window=16"),
        ({"model_type": "gpt_neox"}, "model_type='gpt_neox' is not importable"),
    ],
)
def test_import_names_what_the_llama_block_lacks(llama_dir, tmp_path, edit, named):
    folder = shutil.copytree(llama_dir, tmp_path / "edited")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, **edit}))
    with pytest.raises(ValueError) as err:
        load_hf(folder)
    assert named in str(err.value) and "\n" not in str(err.value)


def test_import_names_a_missing_file(llama_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"no config\.json there"):
        load_hf(f"hf:{tmp_path}")
    folder = shutil.copytree(llama_dir, tmp_path / "no_tokenizer")
    (folder / "tokenizer.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"no tokenizer\.json .*AutoTokenizer"):
        load_hf(folder)


def greedy(model: torch.nn.Module, ids: torch.Tensor, n: int, eos: int) -> list[int]:
    """The slow obvious twin of greedy decoding: a full forward per token, stop after <eos>."""
    for _ in range(n):
        with torch.no_grad():
            token = model(ids)[:, -1].argmax(-1, keepdim=True)  # (1, 1)
        ids = torch.cat((ids, token), dim=1)
        if token.item() == eos:
            break
    return ids[0].tolist()


def check_transformers_reads(folder: Path, model: torch.nn.Module, tokenizer: Tokenizer) -> None:
    """transformers loads ``folder`` with no custom code: same logits, greedy tokens, tokens."""
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    assert type(hf).__name__ == "LlamaForCausalLM"
    text = "The Congress of the United States shall"
    assert hf_tokenizer(text).input_ids == tokenizer.encode(text).ids
    roles = [hf_tokenizer.pad_token, hf_tokenizer.bos_token, hf_tokenizer.eos_token]
    assert [*roles, hf_tokenizer.unk_token] == SPECIAL_TOKENS == list(SPECIAL_ROLES.values())
    ids = prompt(tokenizer)
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, model(ids), rtol=0, atol=1e-5)
    out = hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=8)
    assert out[0].tolist() == greedy(model, ids, 8, hf_tokenizer.eos_token_id)


def tiny_model(tokenizer: Tokenizer, attn: dict, tie: bool = True) -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = {"vocab_size": tokenizer.get_vocab_size(), "dim": 32, "n_layers": 2, "n_heads": 4}
    cfg |= {"max_len": 64, "init_std": 0.1, "tie_embeddings": tie, "attn": attn}
    return build_model(cfg).eval()


def test_scripts_export_format_hf_writes_a_llama_folder(tokenizer, tmp_path):
    model = tiny_model(tokenizer, {"kind": "mha"})
    save_pretrained(model, tokenizer, tmp_path / "native")
    cmd = [sys.executable, "scripts/export.py", f"ckpt={tmp_path / 'native'}"]
    cmd += [f"out={tmp_path / 'hf'}", "format=hf"]
    proc = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "model.safetensors" in proc.stdout and "generation_config.json" in proc.stdout
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert (config["bos_token_id"], config["eos_token_id"], config["pad_token_id"]) == (1, 2, 0)
    check_transformers_reads(tmp_path / "hf", model, tokenizer)


@pytest.mark.parametrize(
    ("attn", "tie"),
    [({"kind": "mqa"}, False), ({"kind": "gqa", "rope_base": 500.0, "bias": True}, True)],
)
def test_save_hf_loads_in_transformers_for_every_kv_grouping(tokenizer, tmp_path, attn, tie):
    model = tiny_model(tokenizer, attn, tie)
    with torch.no_grad():  # biases are zero at init: make them count
        for name, param in model.named_parameters():
            if name.endswith("bias"):
                param.normal_(0.0, 0.2)
    save_hf(model, tokenizer, tmp_path)
    check_transformers_reads(tmp_path, model, tokenizer)


@pytest.mark.parametrize(
    ("cfg", "named"),
    [
        ({"attn": {"kind": "local"}}, "attn.kind='local'"),
        ({"attn": {"kind": "linear"}}, "attn.kind='linear'"),
        ({"attn": {"kind": "gated_linear"}}, "attn.kind='gated_linear'"),
        ({"arch": "encoder_decoder"}, "model.arch='encoder_decoder'"),
    ],
)
def test_export_names_what_llama_cannot_express(cfg, named):
    with pytest.raises(ValueError, match="format=minillm") as err:
        check_exportable(ModelConfig.from_dict({"dim": 32, "n_heads": 4, **cfg}))
    assert named in str(err.value) and "\n" not in str(err.value)


def test_a_refused_export_writes_nothing(tokenizer, tmp_path):
    model = tiny_model(tokenizer, {"kind": "linear"})
    with pytest.raises(ValueError, match="attn.kind='linear'"):
        save_hf(model, tokenizer, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_minillm_to_hf_and_back_is_exact(tokenizer, tmp_path):
    model = tiny_model(tokenizer, {"kind": "gqa"}, tie=False)
    save_hf(model, tokenizer, tmp_path)
    loaded, loaded_tokenizer = load_hf(f"hf:{tmp_path}")
    explicit = dataclasses.replace(model.cfg, mlp_hidden=model.cfg.hidden)  # import names it
    assert architecture(loaded.cfg, ()) == architecture(explicit, ())
    assert loaded_tokenizer.to_str() == tokenizer.to_str()
    ids = prompt(tokenizer)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids), model(ids), rtol=0, atol=0)
    with pytest.raises(FileExistsError, match="not empty"):
        save_hf(model, tokenizer, tmp_path)
    weights = tmp_path / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # the last byte of the last tensor's data
    weights.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"model\.safetensors is corrupt: tensor '"):
        load_hf(tmp_path)


def test_finetune_from_an_hf_folder(llama_dir, tokenizer, corpus_file, tmp_path):
    """init_from=hf:<dir> as train.py gets it: the folder's weights, config and tokenizer."""
    overrides = tiny_overrides(corpus_file, "experiment=finetune", f"init_from=hf:{llama_dir}")
    cfg = compose([*overrides, "trainer.max_steps=1", "optim.lr=1e-12"])
    summary = train(cfg, tmp_path)
    assert summary["global_step"] == 1
    assert (tmp_path / "tokenizer.json").read_text() == tokenizer.to_str()
    ckpt = read_checkpoint(summary["last_ckpt"])
    assert ckpt["hyper_parameters"]["model"]["attn"]["n_kv_heads"] == 2
    hf = transformers.AutoModelForCausalLM.from_pretrained(llama_dir).state_dict()
    for name, value in model_state_dict(ckpt).items():  # one step at lr 1e-12: unchanged
        torch.testing.assert_close(value, hf[hf_name(name)], rtol=0, atol=1e-6)


def test_finetune_refuses_a_tokenizer_without_eos_or_with_fewer_tokens_than_rows(
    llama_dir, tokenizer, tmp_path
):
    folder = shutil.copytree(llama_dir, tmp_path / "llama_tokenizer")
    vocab = {t: i for i, t in enumerate(["hello", "world", "<unk>"])}  # no end-of-sequence
    Tokenizer(models.WordLevel(vocab, unk_token="<unk>")).save(str(folder / "tokenizer.json"))
    assert load_hf(folder)[0] is not None  # fine to load and generate from
    with pytest.raises(ValueError) as err:
        read_initial_weights(f"hf:{folder}")
    assert str(folder / "tokenizer.json") in str(err.value) and "end-of-sequence" in str(err.value)
    padded = tmp_path / "padded_vocab"  # more embedding rows than tokens, as Qwen2 has
    hf_folder(padded, tokenizer, vocab_size=tokenizer.get_vocab_size() + 8)
    load_hf(padded)
    with pytest.raises(ValueError, match=r"tokenizer has \d+ tokens but the model \d+ embedding"):
        read_initial_weights(f"hf:{padded}")
