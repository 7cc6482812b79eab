"""``python scripts/attention_map.py`` / ``minillm-attention-map``: a heatmap of what one
attention layer attends to for a prompt.

    minillm-attention-map ckpt=outputs/<run>/checkpoints/best.ckpt prompt="To be, or not"
    minillm-attention-map ckpt=... prompt="..." layer=2 head=1 out=map.png
    minillm-attention-map ckpt=<exported folder> prompt="..." layer=-1      # all heads

``prompt=`` is taken verbatim (commas, colons, brackets and quotes included), so it cannot
be swept with ``-m``. The block's input is captured with a forward hook on
``blocks[layer].attn`` during one forward of the prompt, then the kind's ``attention_weights``
gives the (T, T) token-mixing weights: softmax weights for softmax kinds (``mha``/``mqa``/
``gqa``, ``local`` within its window), phi(q_t) . phi(k_s) normalised over the keys for
``linear``, and the decayed q_t . (prod alpha) . k_s for ``gated_linear`` (not a
distribution: a diverging colour map centred on 0 is used when weights are negative).
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf
from torch import Tensor, nn

from minillm import checks
from minillm.checkpoint import load_pretrained
from minillm.cli.app import hydra_app


@dataclass
class AttentionMapConfig:
    """conf/attention_map.yaml."""

    ckpt: str = MISSING  # a .ckpt file or an exported folder
    prompt: str = MISSING  # taken verbatim
    layer: int = 0  # block index; negative counts from the end
    head: int | None = None  # None: every head, one panel each
    out: str | None = None  # PNG path; default <ckpt>.attn_L<layer>_H<head>.png beside it
    labels: int = 64  # label the axes with the tokens when the prompt has at most this many

    def __post_init__(self) -> None:
        checks.integer("head", self.head, low=0, optional=True)
        checks.integer("labels", self.labels, low=0)


def capture_weights(model: nn.Module, ids: Tensor, layer: int) -> Tensor:
    """Mixing weights (H, T, T) of block ``layer``'s self-attention for one prompt (1, T)."""
    attn = model.blocks[layer].attn
    seen: dict[str, Any] = {}

    def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
        seen["x"], seen["positions"] = args[0], kwargs["positions"]

    handle = attn.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            model(ids)
            return attn.attention_weights(seen["x"], positions=seen["positions"])[0]
    finally:
        handle.remove()


def plot(weights: Tensor, heads: list[int], tokens: list[str], title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    weights = weights.float().cpu()
    signed = bool((weights < 0).any())
    limit = float(weights.abs().max()) or 1.0
    style = dict(cmap="RdBu_r", vmin=-limit, vmax=limit) if signed else dict(cmap="viridis")
    cols = min(len(heads), 4)
    rows = -(-len(heads) // cols)
    size = 4.0 + 0.12 * len(tokens) * bool(tokens)
    fig, axes = plt.subplots(rows, cols, figsize=(size * cols, size * rows), squeeze=False)
    for ax in axes.flat[len(heads) :]:
        ax.axis("off")
    for ax, h in zip(axes.flat, heads, strict=False):
        image = ax.imshow(weights[h], interpolation="nearest", **style)
        ax.set(title=f"head {h}", xlabel="key (attended) token", ylabel="query token")
        if tokens:
            ticks = range(len(tokens))
            ax.set_xticks(ticks, tokens, rotation=90, fontsize=7)
            ax.set_yticks(ticks, tokens, fontsize=7)
        fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def attention_map(args: AttentionMapConfig) -> Path:
    """Draw the map of ``args.layer`` (``args.head`` or every head); returns the PNG path."""
    model, tokenizer = load_pretrained(args.ckpt)
    n_layers = len(model.blocks)
    if not -n_layers <= args.layer < n_layers:
        raise ValueError(f"layer={args.layer}: the model has {n_layers} blocks")
    layer = args.layer % n_layers
    ids = tokenizer.encode(args.prompt, add_special_tokens=False).ids
    if not ids:
        raise ValueError(f"prompt={args.prompt!r} encodes to no tokens")
    weights = capture_weights(model, torch.tensor([ids]), layer)  # (H, T, T)
    n_heads = weights.shape[0]
    if args.head is not None and args.head >= n_heads:
        raise ValueError(f"head={args.head}: layer {layer} has {n_heads} heads")
    heads = list(range(n_heads)) if args.head is None else [args.head]
    tokens = [tokenizer.decode([i]).replace("\n", "\\n").replace(" ", "\u2423") for i in ids]
    tokens = tokens if len(ids) <= args.labels else []
    kind = model.cfg.attn.get("kind", "?")
    which = "all" if args.head is None else args.head
    out = Path(args.out or f"{args.ckpt.rstrip('/')}.attn_L{layer}_H{which}.png")
    plot(weights, heads, tokens, f"{kind}: layer {layer}, {len(ids)} tokens", out)
    print(f"wrote {out}")
    return out


def validate(cfg: dict[str, Any]) -> AttentionMapConfig:
    return AttentionMapConfig(**cfg)


def verbatim(argv: list[str], key: str) -> list[str]:
    """``key=<text>`` arguments rewritten as Hydra quoted strings holding exactly ``text``.

    In a quoted value Hydra reads backslashes as escapes only before a quote, and OmegaConf
    would resolve ``${...}``: those two are escaped, everything else is literal.
    """
    prefix = f"{key}="

    def quote(text: str) -> str:
        text = re.sub(r"(\\*)'", lambda m: m.group(1) * 2 + "\\'", text)
        text = re.sub(r"(\\+)$", lambda m: m.group(1) * 2, text)
        return "'" + text.replace("${", "\\${") + "'"

    return [prefix + quote(a[len(prefix) :]) if a.startswith(prefix) else a for a in argv]


@hydra_app("attention_map", validate)
def _command(cfg: DictConfig) -> Path:
    return attention_map(validate(OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)))


def main() -> None:
    """The command, ``prompt=`` taken verbatim."""
    sys.argv[1:] = verbatim(sys.argv[1:], "prompt")
    _command()


ConfigStore.instance().store(name="attention_map_schema", node=AttentionMapConfig)
