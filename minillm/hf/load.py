"""HF Llama-family or GPT-2 folder -> minillm decoder (``load_hf``); see ``minillm.hf``.

Each importable ``model_type`` has a reader (``READERS``): its minillm config, what minillm's
block lacks for it (refused in one line), its tensors under minillm names. GPT-2 becomes block
options of the one decoder: ``norm=layernorm``, ``mlp=gelu``, ``positions=learned``, mha with
biases.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from tokenizers import Tokenizer
from torch import Tensor, nn

from minillm.checkpoint import read_checkpoint
from minillm.hf.common import HF_PREFIX, IMPORTABLE, gpt2_to_minillm, hf_folder, minillm_name
from minillm.integrity import CHECKSUMS, CheckpointError, verify_checksums
from minillm.models import build_model
from minillm.positions import RotaryPositions


def auto_config(folder: Path) -> Any:
    """``transformers.AutoConfig`` of a local folder (never runs code from it)."""
    try:
        from transformers import AutoConfig
    except ImportError as err:  # a ValueError: the CLI reports it in one line
        raise ValueError(
            f"reading {HF_PREFIX}{folder} needs transformers: pip install 'minillm[hf]'"
        ) from err
    return AutoConfig.from_pretrained(str(folder), trust_remote_code=False)


def model_config(hf: Any) -> dict[str, Any]:
    """The minillm model config (a dict) equal to a transformers config; raises one line
    naming whatever minillm's block lacks."""
    check_importable(hf)
    return READERS[hf.model_type][0](hf)


def _llama_config(hf: Any) -> dict[str, Any]:
    n_heads, n_kv = hf.num_attention_heads, hf.num_key_value_heads or hf.num_attention_heads
    kind = "mha" if n_kv == n_heads else "mqa" if n_kv == 1 else "gqa"
    attn = {"kind": kind, "bias": IMPORTABLE[hf.model_type](hf)}
    if kind == "gqa":
        attn["n_kv_heads"] = n_kv
    return {
        "arch": "decoder",
        "vocab_size": hf.vocab_size,
        "dim": hf.hidden_size,
        "n_layers": hf.num_hidden_layers,
        "n_heads": n_heads,
        "max_len": hf.max_position_embeddings,
        "mlp_hidden": hf.intermediate_size,
        "norm_eps": hf.rms_norm_eps,
        "tie_embeddings": bool(hf.tie_word_embeddings),
        "init_std": getattr(hf, "initializer_range", 0.02),
        "attn": attn,
        "positions": _positions(float(_rope(hf)[0])),
    }


def _positions(theta: float) -> dict[str, Any] | None:
    """RoPE with the folder's base; null (the attention kind's default RoPE) at the default
    base, so a minillm export imports as the config it came from."""
    return None if theta == RotaryPositions.Config().base else {"kind": "rope", "base": theta}


def _rope(hf: Any) -> tuple[float, str]:
    """(theta, rope type): transformers 5 keeps them in ``rope_parameters``, 4 in
    ``rope_theta`` and ``rope_scaling``."""
    params = dict(getattr(hf, "rope_parameters", None) or {})
    legacy = dict(getattr(hf, "rope_scaling", None) or {})
    theta = params.get("rope_theta", getattr(hf, "rope_theta", 10000.0))
    kind = params.get("rope_type") or legacy.get("rope_type") or legacy.get("type") or "default"
    return theta, kind


def check_importable(hf: Any) -> None:
    """Raise one line naming every feature of ``hf`` minillm's block does not have."""
    model_type = getattr(hf, "model_type", None)
    if model_type not in READERS:
        raise ValueError(
            f"model_type={model_type!r} is not importable: minillm reads the Llama family "
            f"({', '.join(IMPORTABLE)}) and gpt2"
        )
    missing = READERS[model_type][1](hf)
    if missing:
        raise ValueError(f"cannot import this {model_type} model: {'; '.join(missing)}")


def _llama_lacks(hf: Any) -> list[str]:
    missing = []
    if hf.hidden_act not in ("silu", "swish"):
        missing.append(f"hidden_act={hf.hidden_act!r} (minillm's MLP is SwiGLU)")
    if _rope(hf)[1] != "default":
        missing.append(f"rope_type={_rope(hf)[1]!r} (minillm has plain RoPE, no scaling)")
    head_dim = getattr(hf, "head_dim", None)
    if head_dim not in (None, hf.hidden_size // hf.num_attention_heads):
        missing.append(f"head_dim={head_dim} (minillm's is hidden_size / num_attention_heads)")
    if getattr(hf, "mlp_bias", False):
        missing.append("mlp_bias=true (minillm's MLP has no biases)")
    window = _sliding_window(hf)
    if window is not None:
        missing.append(f"sliding_window={window} (minillm's mha attends to every earlier key)")
    return missing


def _sliding_window(hf: Any) -> int | None:
    """The window of an active sliding-window attention, None if every key is seen (no window,
    one no shorter than the context, or one switched off for every layer)."""
    window = getattr(hf, "sliding_window", None)
    layers = getattr(hf, "layer_types", None)
    if window is None or window >= hf.max_position_embeddings:
        return None
    if not getattr(hf, "use_sliding_window", True):
        return None
    return None if layers is not None and "sliding_attention" not in layers else window


def read_hf_weights(folder: Path) -> dict[str, Tensor]:
    """Every tensor of the folder (model.safetensors, pytorch_model.bin or their sharded
    indexes) by HF name; a minillm export's crc32 checksums are verified."""
    files = _weight_files(folder)
    tensors: dict[str, Tensor] = {}
    for path in files:
        if path.suffix == ".safetensors":
            tensors |= _read_safetensors(path)
        else:
            tensors |= read_checkpoint(path, mmap=True)  # weights_only: no code runs
    return tensors


def _weight_files(folder: Path) -> list[Path]:
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (folder / name).is_file():
            return [folder / name]
    for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if (folder / index).is_file():
            weight_map = json.loads((folder / index).read_text())["weight_map"]
            return [folder / name for name in sorted(set(weight_map.values()))]
    raise FileNotFoundError(
        f"{HF_PREFIX}{folder}: no model.safetensors, pytorch_model.bin or sharded index there"
    )


def _read_safetensors(path: Path) -> dict[str, Tensor]:
    try:
        with safe_open(str(path), framework="pt") as f:
            tensors = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118
            raw = (f.metadata() or {}).get(CHECKSUMS)
    except (SafetensorError, OSError) as err:
        reason = " ".join(str(err).split())
        raise CheckpointError(f"{path} is truncated or corrupt: {reason}") from err
    if raw is not None:  # written by save_hf
        verify_checksums(tensors, json.loads(raw), str(path), "export it again")
    return tensors


def _llama_tensors(tensors: dict[str, Tensor]) -> tuple[dict[str, Tensor], list[str]]:
    """(Llama tensors under minillm names, HF names with no place)."""
    mapped, unused = {}, []
    for name, tensor in tensors.items():
        target = minillm_name(name)
        if target is not None:
            mapped[target] = tensor
        elif not name.endswith("rotary_emb.inv_freq"):  # a buffer some old files carry
            unused.append(name)
    return mapped, unused


def minillm_state_dict(
    tensors: dict[str, Tensor], model: nn.Module, where: str, model_type: str = "llama"
) -> dict[str, Tensor]:
    """HF tensors of a ``model_type`` folder renamed onto ``model``'s state dict. A bias the
    file lacks is zero (a Linear without one computes the same); a tied LM head is the
    embedding."""
    mapped, unused = READERS[model_type][2](tensors)
    if unused:
        raise CheckpointError(
            f"{where}: minillm's {model_type} layout has no place for {', '.join(unused[:4])}"
        )
    own = model.state_dict()
    if model.cfg.tie_embeddings and "tok_emb.weight" in mapped:
        mapped["lm_head.weight"] = mapped["tok_emb.weight"]
    for name, value in own.items():
        if name not in mapped and name.endswith(".bias"):
            mapped[name] = torch.zeros_like(value)
    missing = [name for name in own if name not in mapped]
    if missing:
        names = ", ".join(missing[:4])
        raise CheckpointError(f"{where}: tensors missing from the weights: {names}")
    return mapped


def load_hf(
    path: str | os.PathLike, map_location: str | torch.device = "cpu"
) -> tuple[nn.Module, Tokenizer]:
    """(minillm model in eval mode, tokenizer) from ``hf:<dir>`` or a plain folder path.

    The weights are converted to the model's float32 (HF folders are often bf16). The tokenizer
    is ``tokenizer.json``, so a folder with only a slow (sentencepiece) tokenizer is refused.
    """
    folder = hf_folder(path)
    tokenizer_file = folder / "tokenizer.json"
    if not tokenizer_file.is_file():
        raise FileNotFoundError(
            f"{HF_PREFIX}{folder}: no tokenizer.json (minillm reads fast tokenizers only); write "
            "one with transformers: AutoTokenizer.from_pretrained(folder).save_pretrained(folder)"
        )
    hf = auto_config(folder)
    model = build_model(model_config(hf))
    where = f"{HF_PREFIX}{folder}"
    state = minillm_state_dict(read_hf_weights(folder), model, where, hf.model_type)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        reason = " ".join(str(err).split())
        raise CheckpointError(
            f"{HF_PREFIX}{folder}: weights do not fit config.json: {reason}"
        ) from err
    tokenizer = Tokenizer.from_file(str(tokenizer_file))
    if tokenizer.get_vocab_size() > model.cfg.vocab_size:
        raise ValueError(
            f"{HF_PREFIX}{folder}: tokenizer.json has {tokenizer.get_vocab_size()} tokens but the "
            f"model only {model.cfg.vocab_size} embedding rows"
        )
    return model.to(map_location).eval(), tokenizer


# ---------------------------------------------------------------- GPT-2
Renamer = Callable[[dict[str, Tensor]], tuple[dict[str, Tensor], list[str]]]
# GPT-2 options minillm's block cannot express: (config key, the value it must have, why)
_GPT2_FIXED = (
    ("scale_attn_weights", True, "minillm scales scores by 1/sqrt(head_dim)"),
    ("scale_attn_by_inverse_layer_idx", False, "minillm scales every layer alike"),
    ("add_cross_attention", False, "a decoder has no cross-attention"),
)
# activation_function -> GeluMLP's approximate
_GELUS = {"gelu_new": "tanh", "gelu_pytorch_tanh": "tanh", "gelu": "none"}


def _gpt2_lacks(hf: Any) -> list[str]:
    missing = [
        f"{key}={getattr(hf, key, need)!r} ({why})"
        for key, need, why in _GPT2_FIXED
        if getattr(hf, key, need) != need
    ]
    if hf.activation_function not in _GELUS:
        missing.append(
            f"activation_function={hf.activation_function!r} (minillm's gelu MLP takes "
            f"{', '.join(_GELUS)})"
        )
    return missing


def _gpt2_config(hf: Any) -> dict[str, Any]:
    """GPT-2 as block options: LayerNorm, a biased GELU MLP of width n_inner (default 4 *
    n_embd), biased q/k/v/o, a learned table of n_positions rows, tied embeddings (unless the
    config unties them). Dropout (resid/embd/attn_pdrop) is a fine-tuning choice:
    ``model.dropout`` (0 here)."""
    mlp = {"kind": "gelu", "bias": True, "approximate": _GELUS[hf.activation_function]}
    return {
        "arch": "decoder",
        "vocab_size": hf.vocab_size,
        "dim": hf.n_embd,
        "n_layers": hf.n_layer,
        "n_heads": hf.n_head,
        "max_len": hf.n_positions,
        "mlp_hidden": hf.n_inner or 4 * hf.n_embd,
        "mlp": mlp,
        "norm": "layernorm",
        "norm_eps": hf.layer_norm_epsilon,
        "tie_embeddings": bool(getattr(hf, "tie_word_embeddings", True)),
        "init_std": getattr(hf, "initializer_range", 0.02),
        "attn": {"kind": "mha", "bias": True},
        "positions": "learned",
    }


# model_type -> (its minillm config, what minillm lacks for it, its tensors under minillm names)
READERS: dict[str, tuple[Callable[[Any], dict[str, Any]], Callable[[Any], list[str]], Renamer]] = {
    **{t: (_llama_config, _llama_lacks, _llama_tensors) for t in IMPORTABLE},
    "gpt2": (_gpt2_config, _gpt2_lacks, gpt2_to_minillm),
}
