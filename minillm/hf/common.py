"""Names shared by the export and the import: file list, special-token roles, tensor names."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

HF_PREFIX = "hf:"  # init_from=hf:<dir>, export ckpt=hf:<dir>
HF_FILES = (
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
)
# minillm.data.tokenizer.SPECIAL_TOKENS by HF role (not imported: that module loads `datasets`)
SPECIAL_ROLES = {
    "pad_token": "<pad>",
    "bos_token": "<bos>",
    "eos_token": "<eos>",
    "unk_token": "<unk>",
}
CONFIG_ROLES = ("bos_token", "eos_token", "pad_token")  # config.json's *_token_id keys
NATIVE = "the minillm-native export (format=minillm, the default) stays available"

# model_type -> whether its q/k/v projections carry biases (the Llama block otherwise)
IMPORTABLE: dict[str, Callable[[Any], bool]] = {
    "llama": lambda hf: bool(getattr(hf, "attention_bias", False)),
    "mistral": lambda hf: False,
    "qwen2": lambda hf: True,
}

# Tensor names minillm -> HF: outside the blocks, and inside block i (after "blocks.i." there,
# "model.layers.i." here)
_TOP = {
    "tok_emb.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
    "lm_head.weight": "lm_head.weight",
}
_BLOCK = {
    "attn_norm.weight": "input_layernorm.weight",
    "mlp_norm.weight": "post_attention_layernorm.weight",
    **{f"attn.{p}_proj.{w}": f"self_attn.{p}_proj.{w}" for p in "qkvo" for w in ("weight", "bias")},
    **{f"mlp.{p}_proj.weight": f"mlp.{p}_proj.weight" for p in ("gate", "up", "down")},
}
# Options Llama expresses, or that a decoder does not use; any other field must be at its default
MODEL_FIELDS = {
    *("arch", "vocab_size", "dim", "n_layers", "n_heads", "max_len", "dropout", "mlp_hidden"),
    *("norm_eps", "tie_embeddings", "init_std", "attn"),
    *("n_encoder_layers", "encoder_attn", "cross_attn", "share_embeddings"),
}
ATTN_FIELDS = {"n_kv_heads", "dropout", "bias"}


def _rename(
    name: str, top: dict[str, str], block: dict[str, str], src: str, dst: str
) -> str | None:
    if name in top:
        return top[name]
    layer, _, rest = name.removeprefix(src).partition(".")
    if name.startswith(src) and layer.isdigit() and rest in block:
        return f"{dst}{layer}.{block[rest]}"
    return None


def hf_name(name: str) -> str | None:
    """The HF Llama name of a minillm tensor (None: Llama has no such tensor)."""
    return _rename(name, _TOP, _BLOCK, "blocks.", "model.layers.")


def minillm_name(name: str) -> str | None:
    """The minillm name of an HF Llama tensor (None: the Llama block has no such tensor)."""
    top, block = ({v: k for k, v in d.items()} for d in (_TOP, _BLOCK))
    return _rename(name, top, block, "model.layers.", "blocks.")


# GPT-2 (GPT2LMHeadModel): minillm -> HF names outside the blocks and inside block i
# ("transformer.h.i." there). HF's Conv1D keeps weights as (in, out), nn.Linear's transposed,
# and c_attn holds q, k, v side by side along out (GPT2_FUSED).
_GPT2_TOP = {
    "tok_emb.weight": "transformer.wte.weight",
    "pos_encoding.table.weight": "transformer.wpe.weight",
    "norm.weight": "transformer.ln_f.weight",
    "norm.bias": "transformer.ln_f.bias",
    "lm_head.weight": "lm_head.weight",
}
_GPT2_BLOCK = {
    f"{ours}.{w}": f"{theirs}.{w}"
    for ours, theirs in [
        ("attn_norm", "ln_1"),
        ("mlp_norm", "ln_2"),
        ("attn.o_proj", "attn.c_proj"),
        ("mlp.up_proj", "mlp.c_fc"),
        ("mlp.down_proj", "mlp.c_proj"),
    ]
    for w in ("weight", "bias")
}
GPT2_FUSED = "attn.c_attn."  # + weight / bias: q_proj, k_proj, v_proj concatenated
_GPT2_BUFFERS = (".attn.bias", ".attn.masked_bias")  # causal masks that old files carry


def _conv1d(rest: str, tensor: Tensor) -> Tensor:
    """A Conv1D weight (in, out) as nn.Linear's (out, in), and back; anything else as is."""
    conv = rest.startswith(("attn.c_", "mlp.c_")) and rest.endswith(".weight")
    return tensor.T.contiguous() if conv else tensor


def gpt2_to_minillm(tensors: dict[str, Tensor]) -> tuple[dict[str, Tensor], list[str]]:
    """(GPT-2 tensors under minillm names, HF names with no place). GPT2Model files (no
    ``transformer.`` prefix, as the original gpt2 checkpoint) read the same."""
    top, block = ({v: k for k, v in d.items()} for d in (_GPT2_TOP, _GPT2_BLOCK))
    out, unused = {}, []
    for name, tensor in tensors.items():
        full = name if name.startswith(("transformer.", "lm_head.")) else f"transformer.{name}"
        layer, _, rest = full.removeprefix("transformer.h.").partition(".")
        if full.endswith(_GPT2_BUFFERS):
            continue
        if full.startswith("transformer.h.") and rest.startswith(GPT2_FUSED):
            w = rest.removeprefix(GPT2_FUSED)
            for p, part in zip("qkv", _conv1d(rest, tensor).chunk(3, dim=0), strict=True):
                out[f"blocks.{layer}.attn.{p}_proj.{w}"] = part.contiguous()  # (dim, ...)
            continue
        target = _rename(full, top, block, "transformer.h.", "blocks.")
        if target is None:
            unused.append(name)
        else:
            out[target] = _conv1d(rest, tensor)
    return out, unused


def minillm_to_gpt2(state: dict[str, Tensor]) -> tuple[dict[str, Tensor], list[str]]:
    """(minillm tensors under GPT-2 names, minillm names GPT-2 has no tensor for)."""
    out, unmapped, qkv = {}, [], {}
    for name, tensor in state.items():
        layer, _, rest = name.removeprefix("blocks.").partition(".")
        proj, _, w = rest.removeprefix("attn.").partition("_proj.")
        if name.startswith("blocks.") and rest.startswith("attn.") and proj in ("q", "k", "v"):
            qkv.setdefault((layer, w), {})[proj] = tensor
            continue
        target = _rename(name, _GPT2_TOP, _GPT2_BLOCK, "blocks.", "transformer.h.")
        if target is None:
            unmapped.append(name)
        else:
            out[target] = _conv1d(target.partition(".h.")[2].partition(".")[2], tensor)
    for (layer, w), parts in qkv.items():
        fused = torch.cat([parts[p] for p in "qkv"], dim=0)  # (3 * dim, ...)
        out[f"transformer.h.{layer}.{GPT2_FUSED}{w}"] = _conv1d(f"{GPT2_FUSED}{w}", fused)
    return out, unmapped


def is_hf(spec: str | os.PathLike) -> bool:
    return str(spec).startswith(HF_PREFIX)


def hf_folder(spec: str | os.PathLike) -> Path:
    """The local folder named by ``hf:<dir>`` (or a bare path); it must hold config.json."""
    folder = Path(str(spec).removeprefix(HF_PREFIX)).expanduser()
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(
            f"{HF_PREFIX}{folder}: no config.json there; pass hf:<a local folder in Hugging Face "
            "layout>, e.g. one written by huggingface-cli download <model> --local-dir <folder>"
        )
    return folder


# ---------------------------------------------------------------- export: minillm -> HF
