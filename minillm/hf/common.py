"""Names shared by the export and the import: file list, special-token roles, tensor names."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

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
ATTN_FIELDS = {"n_kv_heads", "rope_base", "dropout", "bias"}


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
