"""``python scripts/attention_map.py`` / ``minillm-attention-map``: a heatmap of what one
attention layer attends to for a prompt, or for an image (``model.arch=vit``).

    minillm-attention-map ckpt=outputs/<run>/checkpoints/best.ckpt prompt="To be, or not"
    minillm-attention-map ckpt=... prompt="..." layer=2 head=1 out=map.png
    minillm-attention-map ckpt=<exported folder> prompt="..." layer=-1      # all heads
    minillm-attention-map ckpt=<vit run>/checkpoints/best.ckpt index=7      # test image 7
    minillm-attention-map ckpt=<vit checkpoint or folder> image=photo.png layer=-1

``prompt=`` and ``image=`` are taken verbatim (commas, colons, brackets and quotes included),
so they cannot be swept with ``-m``. The block's input is captured with a forward hook on
``blocks[layer].attn`` during one forward, then the kind's ``attention_weights`` gives the
(T, T) token-mixing weights: softmax weights for softmax kinds (``mha``/``mqa``/``gqa``,
``local`` within its window), phi(q_t) . phi(k_s) normalised over the keys for ``linear``, and
the decayed q_t . (prod alpha) . k_s for ``gated_linear`` (not a distribution: a diverging
colour map centred on 0 is used when weights are negative).

A ViT's map is one row of those weights per head, laid over the image on the patch grid:
with ``pool=cls`` the class token's row (what the classifier's input attends to; the class
token's weight on itself is left out, so a softmax row sums to 1 minus it), with
``pool=mean`` the mean over every patch's row (the attention each patch receives on
average, the mean-pooled state being the mean of every patch's output). The image is
``image=<file>``, converted and resized to the model's channels and size as
``data=imagefolder`` does, or ``index=<N>``: image N of ``split=`` (default test) of the data
set a ``.ckpt`` was trained on (an exported folder carries no data config).
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
from tokenizers import Tokenizer
from torch import Tensor, nn

from minillm import checks
from minillm.checkpoint import load_pretrained
from minillm.cli.app import hydra_app
from minillm.cli.attention_map_images import DPI, image_input, patch_weights, plot_patches
from minillm.evaluation.charts import pyplot

SPLITS = ("train", "validation", "test")


@dataclass
class AttentionMapConfig:
    """conf/attention_map.yaml."""

    ckpt: str = MISSING  # a .ckpt file or an exported folder
    prompt: str | None = None  # a language model's input, taken verbatim
    image: str | None = None  # a ViT's input: an image file (png, jpg, ...)
    index: int | None = None  # ... or image N of the .ckpt's data set, split ``split``
    split: str = "test"  # with index=: train, validation or test
    layer: int = 0  # block index; negative counts from the end
    head: int | None = None  # None: every head, one panel each
    out: str | None = None  # PNG path; default <ckpt>.attn_L<layer>_H<head>.png beside it
    labels: int = 64  # label the axes with the tokens when the prompt has at most this many

    def __post_init__(self) -> None:
        checks.integer("head", self.head, low=0, optional=True)
        checks.integer("labels", self.labels, low=0)
        checks.integer("index", self.index, low=0, optional=True)
        checks.choice("split", self.split, SPLITS)
        given = [k for k in ("prompt", "image", "index") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(
                f"prompt is required: pass prompt=<text> for a language model, or image=<file> "
                f"or index=<N> for a ViT (one of them; given: {', '.join(given) or 'none'})"
            )
        if self.image is not None and not Path(self.image).is_file():
            raise FileNotFoundError(
                f"image={self.image}: no such file; pass image=<an image file> (png, jpg, ...) "
                "or index=<N> for image N of the checkpoint's test split"
            )


def capture_weights(model: nn.Module, ids: Tensor, layer: int) -> Tensor:
    """Mixing weights (H, T, T) of block ``layer``'s self-attention for one input: a prompt
    (1, T), or an image (1, C, S, S) whose T tokens are the ViT's (class token first)."""
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
    plt = pyplot()

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
    fig.savefig(path, dpi=DPI)
    plt.close(fig)


def attention_map(args: AttentionMapConfig) -> Path:
    """Draw the map of ``args.layer`` (``args.head`` or every head); returns the PNG path."""
    model, tokenizer = load_pretrained(args.ckpt)
    n_layers = len(model.blocks)
    if not -n_layers <= args.layer < n_layers:
        raise ValueError(f"layer={args.layer}: the model has {n_layers} blocks")
    vit = model.cfg.arch == "vit"
    if vit == (args.prompt is not None):
        given = "prompt=" if args.prompt is not None else "image=/index="
        wanted = "image=<file> or index=<N>" if vit else "prompt=<text>"
        raise ValueError(f"{given}: the checkpoint is model.arch={model.cfg.arch}; pass {wanted}")
    out = (image_map if vit else text_map)(args, model, tokenizer, args.layer % n_layers)
    print(f"wrote {out}")
    return out


def _heads(args: AttentionMapConfig, weights: Tensor, layer: int) -> list[int]:
    n_heads = weights.shape[0]
    if args.head is not None and args.head >= n_heads:
        raise ValueError(f"head={args.head}: layer {layer} has {n_heads} heads")
    return list(range(n_heads)) if args.head is None else [args.head]


def _out(args: AttentionMapConfig, layer: int, source: str = "") -> Path:
    which = "all" if args.head is None else args.head
    return Path(args.out or f"{args.ckpt.rstrip('/')}.attn_L{layer}_H{which}{source}.png")


def text_map(args: AttentionMapConfig, model: nn.Module, tokenizer: Tokenizer, layer: int) -> Path:
    """The (T, T) weights of the prompt, one panel per head; returns the PNG path."""
    ids = tokenizer.encode(args.prompt, add_special_tokens=False).ids
    if not ids:
        raise ValueError(f"prompt={args.prompt!r} encodes to no tokens")
    weights = capture_weights(model, torch.tensor([ids]), layer)  # (H, T, T)
    heads = _heads(args, weights, layer)
    tokens = [tokenizer.decode([i]).replace("\n", "\\n").replace(" ", "\u2423") for i in ids]
    tokens = tokens if len(ids) <= args.labels else []
    title = f"{model.cfg.attn_label}: layer {layer}, {len(ids)} tokens"
    out = _out(args, layer)
    plot(weights, heads, tokens, title, out)
    return out


def image_map(args: AttentionMapConfig, model: nn.Module, tokenizer: Tokenizer, layer: int) -> Path:
    """A ViT's weights on the patch grid over the image (module docstring); the PNG path."""
    pixels, caption, source = image_input(args, model.cfg, tokenizer)  # (1, C, S, S)
    weights = capture_weights(model, pixels, layer)  # (H, T, T)
    heads = _heads(args, weights, layer)
    with torch.no_grad():
        predicted = tokenizer.id_to_token(int(model(pixels).argmax()))
    grid = patch_weights(weights, model.cfg.pool, model.grid)  # (H, g, g)
    how = "class token" if model.cfg.pool == "cls" else "mean over queries"
    title = f"{model.cfg.attn_label}: layer {layer}, {how}; {caption}predicted {predicted}"
    out = _out(args, layer, source)
    plot_patches(grid, pixels[0], heads, title, out)
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
    """The command, ``prompt=`` and ``image=`` taken verbatim."""
    sys.argv[1:] = verbatim(verbatim(sys.argv[1:], "prompt"), "image")
    _command()


ConfigStore.instance().store(name="attention_map_schema", node=AttentionMapConfig)
