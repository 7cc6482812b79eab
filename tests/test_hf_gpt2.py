"""GPT-2 interop (minillm.hf): a GPT2LMHeadModel folder imports as block options (LayerNorm,
the gelu MLP, learned positions, biases), generates and fine-tunes; a GPT-2-shaped minillm model
exports back as GPT-2. Tiny random models written with transformers' own ``save_pretrained``
and a tiny byte-level BPE whose only special token is ``<|endoftext|>``; nothing is downloaded."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import transformers
from conftest import compose, tiny_overrides
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from minillm.checkpoint import model_state_dict, read_checkpoint
from minillm.generation.generate import generate_ids
from minillm.hf import check_exportable, load_hf, save_hf
from minillm.hf.common import gpt2_to_minillm
from minillm.models import ModelConfig, build_model
from minillm.models.flops import forward_flops_per_token
from minillm.training.run import train

EOT = "<|endoftext|>"
SIZES = dict(n_embd=32, n_layer=2, n_head=4, n_positions=64)
TEXTS = ["The Congress of the United States shall", "We hold these truths", "It is"]


@pytest.fixture(scope="module")
def tokenizer(corpus_file: Path) -> Tokenizer:
    """GPT-2's kind of tokenizer: byte-level BPE, ``<|endoftext|>`` its only special token."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=[EOT], initial_alphabet=alphabet)
    tok.train_from_iterator(corpus_file.read_text(encoding="utf-8").split("\n\n"), trainer)
    return tok


def gpt2_folder(folder: Path, tokenizer: Tokenizer, **config) -> torch.nn.Module:
    """A random GPT2LMHeadModel (biases and LayerNorm weights random too) saved with the
    tokenizer."""
    torch.manual_seed(0)
    eot = tokenizer.token_to_id(EOT)
    config = {"vocab_size": tokenizer.get_vocab_size(), "bos_token_id": eot, **config}
    config.setdefault("initializer_range", 1.0)  # random, yet not one token repeated
    model = transformers.GPT2LMHeadModel(
        transformers.GPT2Config(**SIZES, eos_token_id=eot, **config)
    ).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias") or ".ln_" in name:
                param.normal_(0.5 if name.endswith("weight") else 0.0, 0.2)
    model.save_pretrained(folder)
    tokenizer.save(str(folder / "tokenizer.json"))
    return model


@pytest.fixture(scope="module")
def gpt2_dir(tokenizer, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("gpt2")
    gpt2_folder(folder, tokenizer)
    return folder


def hf_logits(hf: torch.nn.Module, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return hf(torch.tensor([ids])).logits[0]  # (T, vocab)


@pytest.mark.parametrize(
    ("config", "approximate"),
    [({}, "tanh"), ({"tie_word_embeddings": False, "activation_function": "gelu"}, "none")],
)
def test_a_gpt2_folder_imports_as_block_options_with_its_logits(
    tokenizer, tmp_path, config, approximate
):
    hf = gpt2_folder(tmp_path, tokenizer, n_inner=96, **config)
    model, loaded_tokenizer = load_hf(f"hf:{tmp_path}")
    cfg = model.cfg
    assert (cfg.norm, cfg.positions, cfg.max_len) == ("layernorm", "learned", 64)
    assert cfg.mlp_hidden == 96  # n_inner (None: 4 * n_embd)
    assert cfg.mlp == {"kind": "gelu", "bias": True, "approximate": approximate}
    assert cfg.attn == {"kind": "mha", "bias": True}
    assert cfg.tie_embeddings == config.get("tie_word_embeddings", True)
    assert loaded_tokenizer.to_str() == tokenizer.to_str()
    ids = [tokenizer.encode(t).ids for t in TEXTS]
    with torch.no_grad():
        full = model(torch.tensor([ids[0]]))[0]
    torch.testing.assert_close(full, hf_logits(hf, ids[0]), rtol=0, atol=1e-5)
    # a left-padded batch: each row's real tokens give the logits of that row alone
    t = max(map(len, ids))
    batch = torch.tensor([[0] * (t - len(row)) + row for row in ids])  # (B, T)
    mask = torch.tensor([[False] * (t - len(row)) + [True] * len(row) for row in ids])
    with torch.no_grad():
        padded = model(batch, mask=mask)  # (B, T, vocab)
    for row, real in enumerate(ids):
        got = padded[row, t - len(real) :]
        torch.testing.assert_close(got, hf_logits(hf, real), rtol=0, atol=1e-5)


def test_greedy_generation_equals_transformers_generate(gpt2_dir, tokenizer):
    """minillm's cached decoding of a left-padded batch = HF's greedy ``generate`` per prompt."""
    model, _ = load_hf(gpt2_dir)
    hf = transformers.GPT2LMHeadModel.from_pretrained(gpt2_dir).eval()
    eot = tokenizer.token_to_id(EOT)
    prompts = [tokenizer.encode(t).ids for t in TEXTS]
    ours = generate_ids(model, prompts, max_new_tokens=12, temperature=0, eos_id=eot, pad_id=eot)
    for prompt, new in zip(prompts, ours, strict=True):
        ids = torch.tensor([prompt])
        mask = torch.ones_like(ids)
        out = hf.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=12)
        theirs = out[0, len(prompt) :].tolist()
        assert new == (theirs[:-1] if theirs[-1] == eot else theirs)


def test_finetune_from_a_gpt2_folder(gpt2_dir, tokenizer, corpus_file, tmp_path):
    """init_from=hf:<gpt2 dir> trains through train.py with GPT-2's tokenizer and block."""
    overrides = [o for o in tiny_overrides(corpus_file) if o != "model=tiny"]  # the folder's
    overrides += ["experiment=finetune", f"init_from=hf:{gpt2_dir}", "trainer.max_steps=1"]
    summary = train(compose([*overrides, "optim.lr=1e-12"]), tmp_path)
    assert summary["global_step"] == 1
    assert (tmp_path / "tokenizer.json").read_text() == tokenizer.to_str()
    ckpt = read_checkpoint(summary["last_ckpt"])
    model = ckpt["hyper_parameters"]["model"]
    assert (model["norm"], model["positions"]) == ("layernorm", "learned")
    assert model["mlp"]["kind"] == "gelu"
    hf = transformers.GPT2LMHeadModel.from_pretrained(gpt2_dir).state_dict()
    theirs, _ = gpt2_to_minillm(hf)
    ours = model_state_dict(ckpt)
    assert set(ours) == set(theirs)
    for name, value in ours.items():  # one step at lr 1e-12: unchanged
        torch.testing.assert_close(value, theirs[name], rtol=0, atol=1e-6)


def test_finetune_refuses_another_max_len_for_a_learned_table(gpt2_dir, corpus_file, tmp_path):
    """GPT-2's positions are a table of n_positions rows: max_len is architecture there."""
    overrides = [o for o in tiny_overrides(corpus_file) if o != "model=tiny"]
    overrides += ["experiment=finetune", f"init_from=hf:{gpt2_dir}", "model.max_len=32"]
    with pytest.raises(ValueError, match=r"this run's config sets max_len.*model\.max_len=64"):
        train(compose(overrides), tmp_path, overrides=overrides)


@pytest.mark.parametrize(
    ("edit", "named"),
    [
        ({"activation_function": "relu"}, "activation_function='relu'"),
        ({"scale_attn_weights": False}, "scale_attn_weights=False"),
        ({"scale_attn_by_inverse_layer_idx": True}, "scale_attn_by_inverse_layer_idx=True"),
        ({"add_cross_attention": True}, "add_cross_attention=True"),
        ({"model_type": "gpt_neox"}, "model_type='gpt_neox' is not importable"),
    ],
)
def test_import_names_what_minillm_cannot_express(gpt2_dir, tmp_path, edit, named):
    folder = shutil.copytree(gpt2_dir, tmp_path / "edited")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, **edit}))
    with pytest.raises(ValueError) as err:
        load_hf(folder)
    assert named in str(err.value) and "\n" not in str(err.value)


def test_gpt2_to_minillm_to_gpt2_is_exact(gpt2_dir, tokenizer, tmp_path):
    """An imported GPT-2 exports as a GPT2LMHeadModel transformers loads with the same logits
    and tokens, and imports back exactly."""
    model, _ = load_hf(gpt2_dir)
    save_hf(model, tokenizer, tmp_path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(hf).__name__ == "GPT2LMHeadModel"
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert hf_tokenizer(TEXTS[0]).input_ids == tokenizer.encode(TEXTS[0]).ids
    assert hf_tokenizer.eos_token == hf_tokenizer.bos_token == EOT
    ids = tokenizer.encode(TEXTS[0]).ids
    with torch.no_grad():
        ours = model(torch.tensor([ids]))[0]
    torch.testing.assert_close(hf_logits(hf, ids), ours, rtol=0, atol=1e-5)
    back, _ = load_hf(tmp_path)
    assert back.cfg == model.cfg
    for name, value in model.state_dict().items():
        torch.testing.assert_close(back.state_dict()[name], value, rtol=0, atol=0)


GPT2_SHAPED = {"dim": 32, "n_layers": 2, "n_heads": 4, "max_len": 64, "norm": "layernorm"}
GPT2_SHAPED |= {"mlp": {"kind": "gelu"}, "mlp_hidden": 128, "positions": "learned"}


def test_a_minillm_gpt2_without_biases_exports_with_zero_ones(tokenizer, tmp_path):
    """Trained here (attention without biases, exact GELU): GPT-2 gets zero biases."""
    torch.manual_seed(0)
    mlp = {"kind": "gelu", "bias": False, "approximate": "none"}
    cfg = {**GPT2_SHAPED, "vocab_size": tokenizer.get_vocab_size(), "init_std": 0.1, "mlp": mlp}
    model = build_model(cfg).eval()
    save_hf(model, tokenizer, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert (config["activation_function"], config["n_inner"]) == ("gelu", 128)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    ids = tokenizer.encode(TEXTS[1]).ids
    with torch.no_grad():
        ours = model(torch.tensor([ids]))[0]
    torch.testing.assert_close(hf_logits(hf, ids), ours, rtol=0, atol=1e-5)


@pytest.mark.parametrize(
    ("cfg", "named"),
    [
        ({"norm": "rmsnorm"}, "model.norm='rmsnorm'"),
        ({"mlp": "swiglu"}, "mlp.kind='swiglu'"),
        ({"attn": {"kind": "gqa", "n_kv_heads": 2}}, "attn.kind='gqa'"),
        ({"arch": "encoder_decoder"}, "model.arch='encoder_decoder'"),
    ],
)
def test_export_names_what_gpt2_cannot_express(cfg, named):
    with pytest.raises(ValueError, match="Hugging Face GPT-2.*format=minillm") as err:
        check_exportable(ModelConfig.from_dict({**GPT2_SHAPED, **cfg}))
    assert named in str(err.value) and "\n" not in str(err.value)


def test_llama_export_names_gpt2_block_options():
    """Without learned positions the layout is Llama's, which has no LayerNorm or GELU MLP."""
    cfg = {**GPT2_SHAPED, "positions": None}
    with pytest.raises(ValueError, match="Hugging Face Llama") as err:
        check_exportable(ModelConfig.from_dict(cfg))
    assert "mlp.kind='gelu'" in str(err.value) and "model.norm='layernorm'" in str(err.value)


def test_gpt2_block_options_compose_and_initialise(corpus_file):
    """``mlp=gelu model.norm=layernorm`` from the command line; GPT-2's init for the gelu MLP:
    N(0, std) in, N(0, std / sqrt(2 * n_layers)) out, zero biases."""
    overrides = tiny_overrides(corpus_file, "mlp=gelu", "model.norm=layernorm")
    model_cfg = compose([*overrides, "model.positions=learned", "model.dim=64"])["model"]
    model = build_model({**model_cfg, "vocab_size": 300, "mlp_hidden": 256})
    block = model.blocks[0]
    assert isinstance(block.attn_norm, torch.nn.LayerNorm) and block.mlp.up_proj.bias is not None
    assert isinstance(model.norm, torch.nn.LayerNorm)
    std = model.cfg.init_std
    assert block.mlp.up_proj.weight.std().item() == pytest.approx(std, rel=0.03)
    assert block.mlp.down_proj.weight.std().item() == pytest.approx(std / 2, rel=0.03)
    assert not block.mlp.up_proj.bias.any() and not block.mlp.down_proj.bias.any()
    attention = sum(b.attn.flops_per_token(16) for b in model.blocks)
    mlp = 2 * (2 * 64 * 256) * len(model.blocks)  # up and down: 2 FLOPs per multiply-add
    assert forward_flops_per_token(model, 16) == attention + mlp + 2 * 64 * 300  # + lm_head
