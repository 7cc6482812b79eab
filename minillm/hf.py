"""Hugging Face interop for the Llama family: a minillm decoder <-> an HF model folder.

minillm's decoder block is the Llama block (pre-norm RMSNorm, SwiGLU, RoPE, grouped KV heads),
so converting is renaming tensors and translating config keys:

- ``save_hf`` writes a folder that ``transformers.AutoModelForCausalLM`` and ``AutoTokenizer``
  load with no custom code (``LlamaForCausalLM``, ``PreTrainedTokenizerFast``). What Llama
  cannot express (another attention kind, the encoder-decoder, an option added to minillm
  after this mapping) is refused in one line; the minillm-native export stays available.
- ``load_hf`` reads a ``LlamaForCausalLM`` folder, or a Mistral / Qwen2 one that needs nothing
  more (no active sliding window), into a ``DecoderLM`` plus the folder's ``tokenizer.json``.
  Qwen2's q/k/v biases become ``bias=True`` with a zero ``o_proj`` bias (a missing bias is a
  zero one), which exports back as Llama's ``attention_bias=true``.

RoPE needs no permutation of q/k rows: ``minillm.attention.rope`` rotates pairs (i, i + D/2)
with inv_freq = base^(-2i/D), HF Llama's ``rotate_half`` convention (HF permutes Meta's
interleaved checkpoints when converting them).

Exporting needs safetensors and tokenizers only. Importing reads the config through
``transformers.AutoConfig`` (it knows each model type's defaults for the keys a config.json
leaves out); transformers is the optional ``hf`` extra and is imported only then.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from tokenizers import Tokenizer
from torch import Tensor, nn

from minillm.attention import attention_config
from minillm.attention.mha import MultiHeadAttention
from minillm.checkpoint import (
    CHECKSUMS,
    CheckpointError,
    checksums,
    read_checkpoint,
    verify_checksums,
    write_export_folder,
)
from minillm.models import ModelConfig, build_model

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
_CONFIG_ROLES = ("bos_token", "eos_token", "pad_token")  # config.json's *_token_id keys
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
_MODEL_FIELDS = {
    *("arch", "vocab_size", "dim", "n_layers", "n_heads", "max_len", "dropout", "mlp_hidden"),
    *("norm_eps", "tie_embeddings", "init_std", "attn"),
    *("n_encoder_layers", "encoder_attn", "cross_attn", "share_embeddings"),
}
_ATTN_FIELDS = {"n_kv_heads", "rope_base", "dropout", "bias"}


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


def check_exportable(cfg: ModelConfig) -> None:
    """Raise one line naming every option of ``cfg`` that a HF Llama cannot express."""
    problems = [] if cfg.arch == "decoder" else [f"model.arch={cfg.arch!r}"]
    cls, knobs = attention_config(cfg.attn)
    if cls is not MultiHeadAttention:  # mha / gqa / mqa: softmax over every earlier key
        kind = cfg.attn if isinstance(cfg.attn, str) else cfg.attn["kind"]
        problems.append(f"attn.kind={kind!r}")
    else:
        problems += _non_default(knobs, _ATTN_FIELDS, "attn.")
    problems += _non_default(cfg, _MODEL_FIELDS, "model.")
    if problems:
        raise ValueError(
            f"format=hf: a Hugging Face Llama cannot express {', '.join(problems)} (it has "
            f"mha/gqa/mqa attention in a decoder); {NATIVE}"
        )


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
    check_exportable(cfg)
    attn = attention_config(cfg.attn)[1]
    ids = {f"{role}_id": tokenizer.token_to_id(SPECIAL_ROLES[role]) for role in _CONFIG_ROLES}
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
        "rope_theta": attn.rope_base,
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
    """{"bos_token": "<bos>", ...}: each role whose minillm token the tokenizer has."""
    return {k: v for k, v in SPECIAL_ROLES.items() if tokenizer.token_to_id(v) is not None}


def save_hf(
    model: nn.Module, tokenizer: Tokenizer, out_dir: str | os.PathLike, overwrite: bool = False
) -> Path:
    """Write ``model`` and ``tokenizer`` as a HF Llama folder (``HF_FILES``).

    Written like ``save_pretrained``: ``out_dir`` new or empty unless ``overwrite`` (then only
    these files are replaced), every file atomically; the safetensors metadata carries the
    crc32 of each tensor, which ``load_hf`` checks.
    """
    config = llama_config(model.cfg, next(model.parameters()).dtype, tokenizer)
    tensors = hf_state_dict(model)
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
    naming whatever the Llama block lacks."""
    check_importable(hf)
    n_heads, n_kv = hf.num_attention_heads, hf.num_key_value_heads or hf.num_attention_heads
    kind = "mha" if n_kv == n_heads else "mqa" if n_kv == 1 else "gqa"
    attn = {"kind": kind, "rope_base": float(_rope(hf)[0]), "bias": IMPORTABLE[hf.model_type](hf)}
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
    }


def _rope(hf: Any) -> tuple[float, str]:
    """(theta, rope type): transformers 5 keeps them in ``rope_parameters``, 4 in
    ``rope_theta`` and ``rope_scaling``."""
    params = dict(getattr(hf, "rope_parameters", None) or {})
    legacy = dict(getattr(hf, "rope_scaling", None) or {})
    theta = params.get("rope_theta", getattr(hf, "rope_theta", 10000.0))
    kind = params.get("rope_type") or legacy.get("rope_type") or legacy.get("type") or "default"
    return theta, kind


def check_importable(hf: Any) -> None:
    """Raise one line naming every feature of ``hf`` the Llama block does not have."""
    model_type = getattr(hf, "model_type", None)
    if model_type not in IMPORTABLE:
        raise ValueError(
            f"model_type={model_type!r} is not importable: minillm reads the Llama family "
            f"({', '.join(IMPORTABLE)}); GPT-2-style models need block options minillm lacks"
        )
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
    if missing:
        raise ValueError(f"cannot import this {model_type} model: {'; '.join(missing)}")


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


def minillm_state_dict(
    tensors: dict[str, Tensor], model: nn.Module, where: str
) -> dict[str, Tensor]:
    """HF tensors renamed onto ``model``'s state dict. A bias the file lacks is zero (a Linear
    without one computes the same); a tied LM head is the embedding."""
    mapped, unused = {}, []
    for name, tensor in tensors.items():
        target = minillm_name(name)
        if target is not None:
            mapped[target] = tensor
        elif not name.endswith("rotary_emb.inv_freq"):  # a buffer some old files carry
            unused.append(name)
    if unused:
        raise CheckpointError(f"{where}: the Llama block has no place for {', '.join(unused[:4])}")
    own = model.state_dict()
    if model.cfg.tie_embeddings and "tok_emb.weight" in mapped:
        mapped["lm_head.weight"] = mapped["tok_emb.weight"]
    for name, value in own.items():
        if name not in mapped and name.endswith(".bias"):
            mapped[name] = torch.zeros_like(value)
    missing = [name for name in own if name not in mapped]
    if missing:
        names = ", ".join(filter(None, map(hf_name, missing[:4])))
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
    model = build_model(model_config(auto_config(folder)))
    state = minillm_state_dict(read_hf_weights(folder), model, f"{HF_PREFIX}{folder}")
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
