"""Runs that start from a checkpoint: fine-tuning (``init_from``) and resuming (``ckpt_path``).

``init_from`` names a ``.ckpt`` file, a run directory (its best.ckpt, else last.ckpt), an
exported folder (``scripts/export.py``) or ``hf:<dir>``, a Hugging Face Llama-family folder
(``minillm.hf``). The tokenizer comes from there and is never retrained; any tokenizer with
an end-of-sequence token works, wherever its special tokens sit (``check_tokenizer``). The
optimizer, schedule and step start fresh in a new run directory.

Fine-tuning takes the checkpoint's model config (``take_architecture``): every model and
attention field is the checkpoint's unless the command line sets it. Setting an
architecture field to another value than the checkpoint's is an error naming it; setting a
training-time field (``TRAINING_ONLY``: dropout, max_len, init_std) is the user's choice.
"Set on the command line" means named by a Hydra override (``model=tiny``, ``attn=linear``
and ``model.dim=64`` set, respectively, every model field, every attention field, and
``dim``); the defaults and presets the config was composed from do not count.
``init_from_strict=false`` builds the run's composed config instead and copies every tensor
whose name and shape match, listing the rest.

Resuming (``check_resume``) compares instead of taking: a resumed run must describe the
checkpoint's model, see that docstring for what may change.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer
from torch import Tensor, nn

from minillm.attention import attention_config
from minillm.checkpoint import CheckpointError, load_pretrained
from minillm.hf import hf_folder, is_hf, load_hf
from minillm.models import ModelConfig
from minillm.models.mlp import mlp_config
from minillm.positions import positions_config
from minillm.special_tokens import SpecialTokens

# Keys (in the model or any attention config) that may differ between the checkpoint and
# a fine-tuning run: they change how training behaves, not which weights exist or what
# they mean (positions are RoPE: computed for any length).
TRAINING_ONLY = ("dropout", "max_len", "init_std")
# ... and between the checkpoint and a resumed run: max_len is not among them, since the
# restored data position counts blocks of max_len + 1 tokens.
RESUME_MAY_CHANGE = ("dropout", "init_std")
# optim keys a resumed run takes from the checkpoint's optimizer state, whatever it says
RESTORED_OPTIM = ("lr", "weight_decay", "beta1", "beta2", "eps")
ATTN_KEYS = ("attn", "encoder_attn", "cross_attn")

Difference = tuple[str, Any, Any]  # (key, the checkpoint's value, this run's value)


@dataclass
class InitialWeights:
    """What a run takes from ``init_from``: its file, model config, weights and tokenizer."""

    path: Path
    model_cfg: ModelConfig
    state_dict: dict[str, Tensor]
    tokenizer: Tokenizer


def resolve_init_path(init_from: str) -> Path:
    """A file as is; an exported folder as is; a run directory -> best.ckpt, else last.ckpt;
    ``hf:<dir>`` -> that folder (it must hold a config.json)."""
    if is_hf(init_from):
        return hf_folder(init_from)
    path = Path(init_from).expanduser()
    if path.is_dir() and not (path / "model.safetensors").is_file():
        found = [path / "checkpoints" / n for n in ("best.ckpt", "last.ckpt")]
        found = [p for p in found if p.is_file()]
        if not found:
            raise FileNotFoundError(
                f"init_from={init_from}: no checkpoints/best.ckpt or last.ckpt in that "
                "directory, and it is not an exported model folder"
            )
        path = found[0]
    if not path.exists():
        raise FileNotFoundError(
            f"init_from={init_from}: no such file or directory; pass init_from=<a .ckpt "
            "file, a run directory, an exported folder or hf:<Hugging Face folder>>"
        )
    return path


def read_initial_weights(init_from: str) -> InitialWeights:
    path = resolve_init_path(init_from)
    model, tokenizer = (load_hf if is_hf(init_from) else load_pretrained)(path)  # crc32 checked
    check_tokenizer(init_from, model.cfg, tokenizer)
    return InitialWeights(path, model.cfg, model.state_dict(), tokenizer)


def check_tokenizer(init_from: str, cfg: ModelConfig, tokenizer: Tokenizer) -> None:
    """Refuse, before any data is read, a tokenizer the data code cannot train with.

    The data code asks the tokenizer for its special ids (``SpecialTokens``), so it needs an
    end-of-sequence token, wherever it sits. It sizes the model's vocabulary from the
    tokenizer, so a model with more embedding rows than tokens (Qwen2 pads its rows) cannot
    fine-tune yet; generating from such a model and exporting it work.
    """
    where = hf_folder(init_from) / "tokenizer.json" if is_hf(init_from) else init_from
    SpecialTokens.from_tokenizer(tokenizer, f"init_from={init_from}: tokenizer of {where}")
    usable = "; such a model can be generated from and exported, not yet fine-tuned"
    if tokenizer.get_vocab_size() != cfg.vocab_size:
        raise ValueError(
            f"init_from={init_from}: the tokenizer has {tokenizer.get_vocab_size()} tokens but the "
            f"model {cfg.vocab_size} embedding rows, and minillm sizes the model from its "
            f"tokenizer{usable}"
        )


def architecture(cfg: ModelConfig, ignore: tuple[str, ...] = TRAINING_ONLY) -> dict[str, Any]:
    """The config as a flat dict, attention and feed-forward configs resolved (preset and
    defaults filled: ``mlp="swiglu"``, as checkpoints before the ``mlp`` group stored it,
    equals ``{"kind": "swiglu"}``), without the keys named in ``ignore`` (in the model or any
    attention config)."""
    flat = {k: v for k, v in cfg.to_dict().items() if k not in (*ATTN_KEYS, "mlp")}
    _, mlp = mlp_config(cfg.mlp)
    flat["mlp.kind"] = cfg.mlp if isinstance(cfg.mlp, str) else cfg.mlp["kind"]
    flat |= {f"mlp.{k}": v for k, v in dataclasses.asdict(mlp).items()}
    for key in ATTN_KEYS:
        value = getattr(cfg, key)  # a registry key or {"kind": key, **knobs}
        _, resolved = attention_config(value)
        flat[f"{key}.kind"] = value if isinstance(value, str) else value["kind"]
        flat |= {f"{key}.{k}": v for k, v in dataclasses.asdict(resolved).items()}
    return {k: v for k, v in flat.items() if k.rsplit(".", 1)[-1] not in ignore}


def differences(
    theirs: ModelConfig, ours: ModelConfig, ignore: tuple[str, ...]
) -> list[Difference]:
    """The fields that differ; a changed attention kind hides that group's other knobs."""
    a, b = architecture(theirs, ignore), architecture(ours, ignore)
    keys = [k for k in sorted(a.keys() | b.keys()) if a.get(k) != b.get(k)]
    return [(k, a.get(k), b.get(k)) for k in keys if not _knob_of_changed_kind(k, keys)]


def describe(diff: list[Difference]) -> str:
    return "; ".join(f"{k}: {a!r} (checkpoint) vs {b!r} (this run)" for k, a, b in diff)


def _knob_of_changed_kind(key: str, diff: list[str]) -> bool:
    """``attn.window`` when ``attn.kind`` differs too: another kind brings its own knobs."""
    group, _, knob = key.rpartition(".")
    return bool(group) and knob != "kind" and f"{group}.kind" in diff


def _suggest(diff: list[Difference]) -> str:
    """Overrides that make this run's config the checkpoint's (a kind change sets the kind)."""
    out = []
    for key, value, _ in diff:
        group = key.rpartition(".")[0]
        value = (
            "null" if value is None else str(value).lower() if isinstance(value, bool) else value
        )
        if key in ("attn.kind", "mlp.kind"):
            out.append(f"{group}={value}")
        elif group in ("attn", "mlp", "optim"):
            out.append(f"{key}={value}")
        else:  # model keys, encoder_attn/cross_attn included
            out.append(f"model.{key.removesuffix('.kind')}={value}")
    return " ".join(out)


def is_explicit(key: str, overrides: list[str]) -> bool:
    """Whether a Hydra override sets ``key`` (an ``architecture`` key: ``dim``, ``attn.window``).

    ``model=<option>`` sets every model key but the ``attn.*`` and ``mlp.*`` ones,
    ``attn=<option>`` every ``attn.*`` key; ``model.attn.x`` is ``attn.x`` (``model.attn`` is the
    ``attn`` group); ``mlp`` likewise.
    """
    for override in overrides:
        name = override.lstrip("+~").partition("=")[0]
        if name == "model":
            if not key.startswith(("attn.", "mlp.")):
                return True
        elif name.startswith("model.") or name.partition(".")[0] in ("attn", "mlp"):
            name = name.removeprefix("model.")
            if key == name or key.startswith(f"{name}."):
                return True
    return False


def take_architecture(
    init: InitialWeights, run_model: dict[str, Any], overrides: list[str]
) -> tuple[dict[str, Any], list[Difference]]:
    """The model config of a strict ``init_from`` run: the checkpoint's, with the
    training-time fields the command line sets. Returns it and the fields where the composed
    config differed (taken from the checkpoint). Raises if an override sets an architecture
    field to another value than the checkpoint's."""
    theirs = init.model_cfg
    ours = ModelConfig.from_dict({**run_model, "vocab_size": theirs.vocab_size})
    free = training_only(theirs)
    diff = differences(theirs, ours, free)
    explicit = [d for d in diff if is_explicit(d[0], overrides)]
    if explicit:
        raise ValueError(
            f"init_from={init.path}: fine-tuning builds the checkpoint's architecture, but "
            f"this run's config sets {describe(explicit)}; drop those overrides (or match "
            f"the checkpoint: {_suggest(explicit)}), or pass init_from_strict=false to build "
            "this run's config and load only the tensors whose names and shapes match"
        )
    model = theirs.to_dict()
    for key in free:
        if key in run_model and is_explicit(key, overrides):
            model[key] = run_model[key]
    model["attn"] = _attn_knobs(theirs.attn, run_model.get("attn"), overrides)
    return model, diff


def training_only(cfg: ModelConfig) -> tuple[str, ...]:
    """``TRAINING_ONLY`` for this checkpoint: ``max_len`` is architecture when the positions
    are a learned table of ``max_len`` rows (GPT-2's), a free choice otherwise."""
    if cfg.positions is not None and positions_config(cfg.positions)[0].mechanism == "absolute":
        return tuple(k for k in TRAINING_ONLY if k != "max_len")
    return TRAINING_ONLY


def _attn_knobs(theirs: Any, ours: Any, overrides: list[str]) -> dict[str, Any]:
    """The checkpoint's attention config with the training-time knobs the overrides set."""
    theirs = {"kind": theirs} if isinstance(theirs, str) else dict(theirs)
    ours = {"kind": ours} if isinstance(ours, str) else dict(ours or {})
    _, resolved = attention_config(theirs)
    for knob in {f.name for f in dataclasses.fields(resolved)} & set(TRAINING_ONLY):
        if knob in ours and is_explicit(f"attn.{knob}", overrides):
            theirs[knob] = ours[knob]
    return theirs


def check_resume(
    path: str, ckpt: dict[str, Any], run_model: dict[str, Any], run_optim: dict[str, Any]
) -> None:
    """Refuse to resume ``ckpt`` (read from ``path``) with another model or optimizer.

    The model config (architecture, sizes, every attention kind and knob, max_len) must be
    the checkpoint's, except ``RESUME_MAY_CHANGE`` (dropout; init_std, unused as the weights
    are restored); the vocabulary and tokenizer are the checkpoint's. ``RESTORED_OPTIM``
    (lr, weight_decay, beta1, beta2, eps) must be too: the optimizer state restores them,
    so another value would be ignored. Free to change: ``optim.warmup_steps`` and
    ``min_lr_ratio`` and ``trainer.max_steps`` (the schedule is recomputed from the restored
    step on), the trainer's intervals, logging, precision. Not compared, and they decide
    which batches come next: ``data``, ``batch_size``, ``seed``, accumulation and the
    number of processes (an unchanged set resumes exactly where the run stopped).
    """
    hparams = ckpt.get("hyper_parameters") or {}
    if "model" not in hparams or "tokenizer" not in ckpt:
        raise CheckpointError(
            f"ckpt_path={path} is not a minillm checkpoint (no model config or tokenizer "
            "inside); pass a last.ckpt or best.ckpt written by train.py"
        )
    theirs = ModelConfig.from_dict(hparams["model"])
    ours = ModelConfig.from_dict({**run_model, "vocab_size": theirs.vocab_size})
    diff = differences(theirs, ours, RESUME_MAY_CHANGE)
    saved = hparams.get("optim") or {}
    diff += [
        (f"optim.{k}", saved[k], run_optim.get(k))
        for k in RESTORED_OPTIM
        if k in saved and saved[k] != run_optim.get(k)
    ]
    if diff:
        raise ValueError(
            f"ckpt_path={path}: this run's config differs from the checkpoint's: "
            f"{describe(diff)}; resume with the checkpoint's settings ({_suggest(diff)}), "
            f"or start a new run from its weights with init_from={path} (a fresh optimizer)"
        )


def load_initial_weights(model: nn.Module, init: InitialWeights, strict: bool) -> list[str]:
    """Copy the checkpoint's tensors into ``model``; returns the lines of a loading report.

    Strict: every tensor must match (``take_architecture`` built the model). Non-strict:
    tensors whose name and shape match are copied; the others keep their fresh values.
    """
    if strict:
        model.load_state_dict(init.state_dict, strict=True)
        return [f"init_from: loaded all {len(init.state_dict)} tensors from {init.path}"]
    own = model.state_dict()
    matched = {k: v for k, v in init.state_dict.items() if k in own and own[k].shape == v.shape}
    if not matched:
        raise ValueError(
            f"init_from={init.path}: no tensor matches this run's model by name and shape"
        )
    model.load_state_dict(matched, strict=False)
    report = [f"init_from: loaded {len(matched)} of {len(own)} tensors from {init.path}"]
    for name, value in own.items():
        if name not in matched:
            theirs = init.state_dict.get(name)
            where = (
                "not in the checkpoint" if theirs is None else f"checkpoint {tuple(theirs.shape)}"
            )
            report.append(f"  kept fresh: {name} {tuple(value.shape)} ({where})")
    report += [f"  unused from checkpoint: {k}" for k in init.state_dict if k not in own]
    return report
