"""minillm decoder -> HF Llama or GPT-2 folder (``save_hf``); see ``minillm.hf``.

A decoder with learned absolute positions is written as a GPT-2 (``GPT2LMHeadModel``), any
other as a Llama; each layout refuses, naming them, the options it cannot express. GPT-2 has
biases everywhere: a minillm projection without one is written with a zero bias.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer
from torch import Tensor, nn

from minillm.attention import attention_config
from minillm.attention.mha import MultiHeadAttention
from minillm.checkpoint import write_export_folder
from minillm.hf.common import (
    ATTN_FIELDS,
    CONFIG_ROLES,
    HF_FILES,
    MODEL_FIELDS,
    NATIVE,
    SPECIAL_ROLES,
    hf_name,
    minillm_to_gpt2,
)
from minillm.integrity import CHECKSUMS, checksums
from minillm.models import ModelConfig
from minillm.models.mlp import GeluMLP, SwiGLU, mlp_config
from minillm.positions import (
    LearnedPositions,
    RotaryPositions,
    positions_config,
    positions_kind,
)
from minillm.special_tokens import SpecialTokens

GPT2_TOKEN = "<|endoftext|>"  # GPT-2's only special token: its bos, eos and unk


def check_exportable(cfg: ModelConfig) -> None:
    """Raise one line naming every option of ``cfg`` that its HF layout (``hf_layout``)
    cannot express."""
    LAYOUTS[hf_layout(cfg)][0](cfg)


def hf_layout(cfg: ModelConfig) -> str:
    """``gpt2`` for a decoder with learned absolute positions, else ``llama``."""
    learned = cfg.positions is not None and positions_config(cfg.positions)[0] is LearnedPositions
    return "gpt2" if learned else "llama"


def _check_llama(cfg: ModelConfig) -> None:
    problems = [] if cfg.arch == "decoder" else [f"model.arch={cfg.arch!r}"]
    cls, knobs = attention_config(cfg.attn)
    if cls is not MultiHeadAttention:  # mha / gqa / mqa: softmax over every earlier key
        kind = cfg.attn if isinstance(cfg.attn, str) else cfg.attn["kind"]
        problems.append(f"attn.kind={kind!r}")
    else:
        problems += _non_default(knobs, ATTN_FIELDS, "attn.")
    mlp = cfg.mlp if isinstance(cfg.mlp, str) else cfg.mlp["kind"]  # str: older checkpoints
    if mlp_config(cfg.mlp)[0] is not SwiGLU:  # SwiGLU has no knobs: its kind says it all
        problems.append(f"mlp.kind={mlp!r}")
    problems += _positions_problems(cfg)
    problems += _non_default(cfg, MODEL_FIELDS | {"mlp", "positions"}, "model.")
    if problems:
        raise ValueError(
            f"format=hf: a Hugging Face Llama cannot express {', '.join(problems)} (it has "
            f"mha/gqa/mqa attention with plain RoPE in a decoder); {NATIVE}"
        )


def _positions_problems(cfg: ModelConfig) -> list[str]:
    """Llama rotates by RoPE: ``model.positions`` null (mha's default) or rope, unscaled."""
    if cfg.positions is None:
        return []
    cls, knobs = positions_config(cfg.positions)
    if cls is not RotaryPositions:
        return [f"model.positions={positions_kind(cfg.positions)!r}"]
    default = RotaryPositions.Config().ntk_factor
    return [] if knobs.ntk_factor == default else [f"positions.ntk_factor={knobs.ntk_factor!r}"]


def rope_theta(cfg: ModelConfig) -> float:
    """RoPE's base: the positions' own, or RoPE's default when ``model.positions`` is null."""
    if cfg.positions is None:
        return RotaryPositions.Config().base
    return positions_config(cfg.positions)[1].base


def _non_default(obj: Any, known: set[str], prefix: str) -> list[str]:
    """Fields of dataclass ``obj`` outside ``known`` that differ from their defaults: options
    added to minillm after this mapping was written, which it would otherwise drop silently."""
    out = []
    for f in dataclasses.fields(obj):
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default
        if f.name not in known and getattr(obj, f.name) != default:
            out.append(f"{prefix}{f.name}={getattr(obj, f.name)!r}")
    return out


def llama_config(cfg: ModelConfig, dtype: torch.dtype, tokenizer: Tokenizer) -> dict[str, Any]:
    """config.json of a LlamaForCausalLM equal to a minillm decoder (keys transformers 4.40
    and 5 both read: ``rope_theta`` and ``torch_dtype`` rather than 5's own spellings)."""
    _check_llama(cfg)
    attn = attention_config(cfg.attn)[1]
    ids = _token_ids(tokenizer)
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.dim,
        "intermediate_size": cfg.hidden,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": attn.n_kv_heads or cfg.n_heads,
        "head_dim": cfg.dim // cfg.n_heads,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_len,
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": rope_theta(cfg),
        "rope_scaling": None,
        "attention_bias": attn.bias,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "tie_word_embeddings": cfg.tie_embeddings,
        "initializer_range": cfg.init_std,
        "pretraining_tp": 1,
        "use_cache": True,
        "torch_dtype": str(dtype).removeprefix("torch."),
        **ids,
    }


def hf_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The model's tensors under HF Llama names, on the CPU (a tied LM head omitted, as HF
    saves it)."""
    out, unmapped = {}, []
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight" and model.cfg.tie_embeddings:
            continue
        target = hf_name(name)
        if target is None:
            unmapped.append(name)
        else:
            out[target] = tensor.detach().cpu().contiguous()
    if unmapped:
        raise ValueError(f"format=hf: Llama has no tensor for {', '.join(unmapped)}; {NATIVE}")
    return out


def special_tokens(tokenizer: Tokenizer) -> dict[str, str]:
    """{"bos_token": "<bos>", ...}: each role whose minillm token the tokenizer has; GPT-2's
    ``<|endoftext|>`` is its bos, eos and unk; any other tokenizer's roles are found by name
    (``SpecialTokens``: Llama's ``<s>``, ``</s>``, ``<unk>`` ...; no pad unless it has one)."""
    roles = {k: v for k, v in SPECIAL_ROLES.items() if tokenizer.token_to_id(v) is not None}
    if tokenizer.token_to_id(GPT2_TOKEN) is not None:
        for role in ("bos_token", "eos_token", "unk_token"):
            roles.setdefault(role, GPT2_TOKEN)
    if "eos_token" not in roles:  # a stock tokenizer (Llama's <s> </s> ...): found by name
        ids = SpecialTokens.from_tokenizer(tokenizer, "format=hf: the model's tokenizer")
        found = {"bos_token": ids.bos, "eos_token": ids.eos, "unk_token": ids.unk}
        roles |= {r: tokenizer.id_to_token(i) for r, i in found.items() if i is not None}
    return roles


def _token_ids(tokenizer: Tokenizer) -> dict[str, int | None]:
    """config.json's bos/eos/pad_token_id."""
    roles = special_tokens(tokenizer)
    ids = {r: tokenizer.token_to_id(roles[r]) if r in roles else None for r in CONFIG_ROLES}
    return {f"{r}_id": i for r, i in ids.items()}


def save_hf(
    model: nn.Module, tokenizer: Tokenizer, out_dir: str | os.PathLike, overwrite: bool = False
) -> Path:
    """Write ``model`` and ``tokenizer`` as a HF Llama or GPT-2 folder (``HF_FILES``).

    Written like ``save_pretrained``: ``out_dir`` new or empty unless ``overwrite`` (then only
    these files are replaced), every file atomically; the safetensors metadata carries the
    crc32 of each tensor, which ``load_hf`` checks.
    """
    layout = LAYOUTS[hf_layout(model.cfg)]
    config = layout[1](model.cfg, next(model.parameters()).dtype, tokenizer)
    tensors = layout[2](model)
    metadata = {"format": "pt", CHECKSUMS: json.dumps(checksums(tensors))}
    roles = special_tokens(tokenizer)
    generation = {k: v for k, v in config.items() if k.endswith("_token_id") and v is not None}
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": model.cfg.max_len,
        "clean_up_tokenization_spaces": False,
        **roles,
    }
    writers = {
        HF_FILES[0]: _json(config),
        HF_FILES[1]: _json(generation),
        HF_FILES[2]: lambda tmp: save_file(tensors, str(tmp), metadata=metadata),
        HF_FILES[3]: lambda tmp: tokenizer.save(str(tmp)),
        HF_FILES[4]: _json(tokenizer_config),
        HF_FILES[5]: _json(roles),
    }
    return write_export_folder(out_dir, writers, overwrite)


def _json(obj: Any) -> Callable[[Path], Any]:
    return lambda tmp: tmp.write_text(json.dumps(obj, indent=2) + "\n")


# ---------------------------------------------------------------- import: HF -> minillm


# ---------------------------------------------------------------- GPT-2
def _check_gpt2(cfg: ModelConfig) -> None:
    """GPT-2: LayerNorm, a GELU MLP, mha (no grouped KV heads), learned positions."""
    problems = [] if cfg.arch == "decoder" else [f"model.arch={cfg.arch!r}"]
    cls, knobs = attention_config(cfg.attn)
    if cls is not MultiHeadAttention or knobs.n_kv_heads not in (None, cfg.n_heads):
        kind = cfg.attn if isinstance(cfg.attn, str) else cfg.attn["kind"]
        problems.append(f"attn.kind={kind!r}")
    if mlp_config(cfg.mlp)[0] is not GeluMLP:
        problems.append(f"mlp.kind={cfg.mlp if isinstance(cfg.mlp, str) else cfg.mlp['kind']!r}")
    if cfg.norm != "layernorm":
        problems.append(f"model.norm={cfg.norm!r}")
    problems += _non_default(cfg, MODEL_FIELDS | {"mlp", "positions", "norm"}, "model.")
    if problems:
        raise ValueError(
            f"format=hf: a Hugging Face GPT-2 (what learned positions export as) cannot express "
            f"{', '.join(problems)} (it has LayerNorm, a GELU MLP and mha in a decoder); {NATIVE}"
        )


def gpt2_config(cfg: ModelConfig, dtype: torch.dtype, tokenizer: Tokenizer) -> dict[str, Any]:
    """config.json of a GPT2LMHeadModel equal to a minillm decoder (dropout 0: set it when
    fine-tuning)."""
    _check_gpt2(cfg)
    gelu = {"tanh": "gelu_new", "none": "gelu"}[mlp_config(cfg.mlp)[1].approximate]
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": cfg.vocab_size,
        "n_embd": cfg.dim,
        "n_layer": cfg.n_layers,
        "n_head": cfg.n_heads,
        "n_positions": cfg.max_len,
        "n_inner": cfg.hidden,
        "activation_function": gelu,
        "layer_norm_epsilon": cfg.norm_eps,
        "tie_word_embeddings": cfg.tie_embeddings,
        "initializer_range": cfg.init_std,
        **{key: 0.0 for key in ("resid_pdrop", "embd_pdrop", "attn_pdrop")},
        "scale_attn_weights": True,
        "scale_attn_by_inverse_layer_idx": False,
        "reorder_and_upcast_attn": False,
        "use_cache": True,
        "torch_dtype": str(dtype).removeprefix("torch."),
        **_token_ids(tokenizer),
    }


def gpt2_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The model's tensors under GPT-2 names (Conv1D layout, q/k/v fused), on the CPU; a
    block projection without a bias gets a zero one, a tied LM head is omitted."""
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    for name, module in model.blocks.named_modules(prefix="blocks"):
        if isinstance(module, nn.Linear) and module.bias is None:
            state[f"{name}.bias"] = torch.zeros(module.out_features, dtype=module.weight.dtype)
    if model.cfg.tie_embeddings:
        del state["lm_head.weight"]
    out, unmapped = minillm_to_gpt2(state)
    if unmapped:
        raise ValueError(f"format=hf: GPT-2 has no tensor for {', '.join(unmapped)}; {NATIVE}")
    return {k: v.contiguous() for k, v in out.items()}


# layout -> (check, config.json, tensors under its names)
LAYOUTS: dict[str, tuple[Callable[..., Any], Callable[..., dict], Callable[..., dict]]] = {
    "llama": (_check_llama, llama_config, hf_state_dict),
    "gpt2": (_check_gpt2, gpt2_config, gpt2_state_dict),
}
