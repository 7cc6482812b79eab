"""``data=imagefolder data.path=<dir>``: one sub-folder per class (sorted names = class ids),
every image file in it read with PIL, converted to ``data.channels`` (1: grayscale, 3: RGB) and
resized to ``data.image_size`` (bilinear; the YAML ties both to the model's). The whole folder
is decoded once and held in memory as uint8: meant for small data sets. Split, augmentation,
batches and tokenizer as every image task (``minillm/data/images.py``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from minillm import checks
from minillm.data.images import ImageDataModule, ImageSplitConfig

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")


@dataclass
class ImageFolderConfig(ImageSplitConfig):
    """The schema of conf/data/imagefolder.yaml."""

    task: str = "imagefolder"  # selects ImageFolderDataModule
    path: str | None = None  # a folder with one sub-folder of images per class
    image_size: int = 32  # pixels a side after resizing; the YAML sets ${model.image_size}
    channels: int = 3  # 1: grayscale, 3: RGB; the YAML sets ${model.channels}

    def __post_init__(self) -> None:
        super().__post_init__()
        checks.integer("data.image_size", self.image_size)
        checks.choice("data.channels", self.channels, (1, 3))

    @property
    def vocab_size(self) -> int | None:
        """The number of classes (sub-folders), None while ``path`` is not a folder."""
        folder = Path(self.path) if self.path else None
        return len(class_folders(folder)) if folder and folder.is_dir() else None


def class_folders(root: Path) -> list[Path]:
    return sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


class ImageFolderDataModule(ImageDataModule):
    """A folder of class sub-folders (module docstring)."""

    Config = ImageFolderConfig

    def __init__(self, data: ImageFolderConfig | Mapping[str, Any], **kwargs: Any) -> None:
        super().__init__(data, **kwargs)
        path = self.cfg.path
        if not path or not Path(path).is_dir():
            raise ValueError(
                f"data.path={path}: name a folder with one sub-folder of images per class, "
                "e.g. data.path=data/shapes"
            )

    def load(self) -> tuple[Tensor, Tensor, list[str], float]:
        from PIL import Image

        folders = class_folders(Path(self.cfg.path))
        mode, size = ("L" if self.cfg.channels == 1 else "RGB"), self.cfg.image_size
        images, labels = [], []
        for label, folder in enumerate(folders):
            files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
            for file in files:
                with Image.open(file) as img:
                    img = img.convert(mode).resize((size, size), Image.Resampling.BILINEAR)
                    images.append(np.asarray(img, dtype=np.uint8).reshape(size, size, -1))
                labels.append(label)
        if len(folders) < 2 or len(set(labels)) < len(folders):
            raise ValueError(
                f"data.path={self.cfg.path}: needs 2+ class sub-folders, each with images "
                f"({', '.join(IMAGE_SUFFIXES)}); found {len(folders)} folders, {len(labels)} images"
            )
        pixels = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()  # (N, C, S, S)
        return pixels, torch.tensor(labels), [f.name for f in folders], 255.0
