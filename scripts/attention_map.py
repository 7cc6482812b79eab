"""Save a heatmap of what one attention layer attends to for a prompt.

    python scripts/attention_map.py ckpt=outputs/<run>/checkpoints/best.ckpt prompt="To be, or not"
    python scripts/attention_map.py ckpt=... prompt="..." layer=2 head=1 out=map.png
    python scripts/attention_map.py ckpt=<exported folder> prompt="..." layer=-1   # all heads

Arguments are ``key=value`` (``MapArgs``). The block's input is captured with a forward hook
on ``blocks[layer].attn`` during one forward of the prompt, then the kind's
``attention_weights`` gives the (T, T) token-mixing weights: softmax weights for softmax kinds
(``mha``/``mqa``/``gqa``, ``local`` within its window), phi(q_t) . phi(k_s) normalised over
the keys for ``linear``, and the decayed q_t . (prod alpha) . k_s for ``gated_linear`` (not a
distribution: a diverging colour map centred on 0 is used when weights are negative).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf
from torch import Tensor, nn

from minillm.checkpoint import load_pretrained


@dataclass
class MapArgs:
    ckpt: str = "???"  # a .ckpt file or an exported folder
    prompt: str = "???"
    layer: int = 0  # block index; negative counts from the end
    head: int | None = None  # None: every head, one panel each
    out: str | None = None  # PNG path; default <ckpt>.attn_L<layer>_H<head>.png beside it
    labels: int = 64  # label the axes with the tokens when the prompt has at most this many


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


def parse_args(argv: list[str]) -> MapArgs:
    """``key=value`` arguments; ``prompt=`` is taken verbatim (YAML would read "a: b" as a map)."""
    texts = [a.partition("=")[2] for a in argv if a.startswith("prompt=")]
    opts = OmegaConf.to_container(
        OmegaConf.from_cli([a for a in argv if not a.startswith("prompt=")])
    )
    opts.update({"prompt": texts[-1]} if texts else {})
    names = [f.name for f in fields(MapArgs)]
    unknown = sorted(set(opts) - set(names))
    if unknown:
        raise SystemExit(f"unknown argument(s) {unknown}; valid: {names}")
    args = MapArgs(**opts)
    missing = [n for n in ("ckpt", "prompt") if getattr(args, n) == "???"]
    if missing:
        raise SystemExit(f"pass {' and '.join(f'{n}=...' for n in missing)}")
    return args


def main(argv: list[str]) -> Path:
    args = parse_args(argv)
    model, tokenizer = load_pretrained(args.ckpt)
    model.eval()
    n_layers = len(model.blocks)
    if not -n_layers <= args.layer < n_layers:
        raise SystemExit(f"layer={args.layer} but the model has {n_layers} blocks")
    layer = args.layer % n_layers
    ids = tokenizer.encode(args.prompt, add_special_tokens=False).ids
    if not ids:
        raise SystemExit("the prompt encodes to no tokens")
    weights = capture_weights(model, torch.tensor([ids]), layer)  # (H, T, T)
    n_heads = weights.shape[0]
    if args.head is not None and not 0 <= args.head < n_heads:
        raise SystemExit(f"head={args.head} but layer {layer} has {n_heads} heads")
    heads = list(range(n_heads)) if args.head is None else [args.head]
    tokens = [tokenizer.decode([i]).replace("\n", "\\n").replace(" ", "\u2423") for i in ids]
    tokens = tokens if len(ids) <= args.labels else []
    kind = model.cfg.attn.get("kind", "?")
    which = "all" if args.head is None else args.head
    out = Path(args.out or f"{args.ckpt.rstrip('/')}.attn_L{layer}_H{which}.png")
    plot(weights, heads, tokens, f"{kind}: layer {layer}, {len(ids)} tokens", out)
    print(f"wrote {out}")
    return out


if __name__ == "__main__":
    main(sys.argv[1:])
