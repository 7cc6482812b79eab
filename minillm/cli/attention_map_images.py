"""The ViT half of ``minillm-attention-map`` (``minillm/cli/attention_map.py``): the input image
(a file, or image N of the checkpoint's data split), each head's weights laid on the patch
grid, and the panels drawn over the image."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from tokenizers import Tokenizer
from torch import Tensor

from minillm.evaluation.charts import pyplot

if TYPE_CHECKING:
    from minillm.cli.attention_map import AttentionMapConfig

DPI = 110
PANEL = 3.0  # inches a side of one head's panel in a ViT map (330 pixels at DPI)


def image_input(
    args: AttentionMapConfig, cfg: Any, tokenizer: Tokenizer
) -> tuple[Tensor, str, str]:
    """(pixels (1, C, S, S) in [0, 1], "label <name>, " or "", a file-name suffix)."""
    if args.image is not None:
        from PIL import Image, UnidentifiedImageError

        mode, size = ("L" if cfg.channels == 1 else "RGB"), cfg.image_size
        try:
            with Image.open(args.image) as img:
                img = img.convert(mode).resize((size, size), Image.Resampling.BILINEAR)
                pixels = torch.from_numpy(np.array(img, dtype=np.uint8).reshape(size, size, -1))
        except UnidentifiedImageError as err:
            raise ValueError(f"image={args.image}: not an image file PIL can read") from err
        pixels = pixels.permute(2, 0, 1).float() / 255.0  # (C, S, S), as data=imagefolder
        return pixels[None], "", f"_{Path(args.image).stem}"
    from minillm.cli.evaluate_images import IMAGE_TASKS, image_data_config
    from minillm.evaluation.documents import checkpoint_data

    if Path(args.ckpt).is_dir():
        raise ValueError(
            f"index={args.index}: {args.ckpt} is an exported folder, which carries no data "
            "config; pass its .ckpt, or image=<file>"
        )
    data_cfg = image_data_config(checkpoint_data(args.ckpt, "image=<file>"))
    data = IMAGE_TASKS[data_cfg.task](data_cfg, max_len=1, batch_size=1, tokenizer=tokenizer)
    data.setup("test")
    images, labels = data.sets[args.split]
    if args.index >= len(labels):
        raise ValueError(
            f"index={args.index}: the {args.split} split has {len(labels)} images "
            f"(index=0 to {len(labels) - 1})"
        )
    pixels = images[args.index].float() / data.scale  # (C, S, S) in [0, 1]
    label = tokenizer.id_to_token(int(labels[args.index]))
    return pixels[None], f"label {label}, ", f"_{args.split}{args.index}"


def patch_weights(weights: Tensor, pool: str, grid: int) -> Tensor:
    """(H, T, T) ViT weights -> (H, g, g): the class token's row over the patches (cls), or
    the mean over every query of the weight on each patch (mean)."""
    if pool == "cls":
        rows = weights[:, 0, 1:]  # (H, g*g)
    else:
        rows = weights.mean(dim=1)  # (H, g*g)
    return rows.reshape(-1, grid, grid)  # (H, g, g), raster order


def plot_patches(grid: Tensor, image: Tensor, heads: list[int], title: str, path: Path) -> None:
    """One panel per head: ``image`` (C, S, S) with the head's (g, g) weights over it, each
    patch's weight filling its square, and the image's outline (cyan contour) on top.
    ``PANEL`` inches a panel at ``DPI``."""
    plt = pyplot()

    grid, image = grid.float().cpu(), image.float().cpu()
    signed = bool((grid < 0).any())
    limit = float(grid.abs().max()) or 1.0
    style = dict(cmap="RdBu_r", vmin=-limit, vmax=limit) if signed else dict(cmap="inferno")
    size = image.shape[-1]
    picture = image[0] if image.shape[0] == 1 else image.permute(1, 2, 0)  # (S, S) or (S, S, 3)
    gray = image.mean(0)  # (S, S): its mid-level contour outlines the image over the heat map
    level = float(gray.min() + gray.max()) / 2
    cols = min(len(heads), 4)
    rows = -(-len(heads) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(PANEL * cols, PANEL * rows), squeeze=False)
    for ax in axes.flat[len(heads) :]:
        ax.axis("off")
    extent = (0, size, size, 0)
    for ax, h in zip(axes.flat, heads, strict=False):
        ax.imshow(picture, cmap="gray", vmin=0, vmax=1, extent=extent, interpolation="nearest")
        heat = ax.imshow(grid[h], alpha=0.6, extent=extent, interpolation="nearest", **style)
        if gray.max() > gray.min():  # a blank image has no outline
            ax.contour(gray, [level], colors="cyan", linewidths=1, extent=extent, origin="upper")
        ax.set(title=f"head {h}", xticks=[], yticks=[])
        fig.colorbar(heat, ax=ax, fraction=0.046, pad=0.04)
    fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
