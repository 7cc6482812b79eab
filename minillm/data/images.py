"""Image classification data for ``model.arch=vit``: scikit-learn's 8x8 digits, or a folder.

- ``data=digits``: ``sklearn.datasets.load_digits`` (1,797 grayscale 8x8 images, 10 classes,
  bundled with scikit-learn, no download). Pixels 0..16 are scaled to [0, 1].
- ``data=imagefolder data.path=<dir>``: a folder of class sub-folders
  (``minillm/data/imagefolder.py``).

Batches are ``{"pixels": (B, C, S, S) float in [0, 1], "labels": (B, 1)}``: the ViT's
``hidden_states`` returns one pooled state per image, so the LM loss of ``LMModule`` is the
classification cross-entropy and ``val/ppl`` is exp(validation cross-entropy).

Split: a permutation seeded by ``data.seed`` puts the first ``test_fraction`` of the images in
test, the next ``valid_fraction`` in validation and the rest in train (not stratified). The
run's ``seed`` orders the training images (``ResumableBatchSampler``, exact resume).

Augmentation (training only): each image is shifted by (dy, dx), each uniform in
[-``shift``, ``shift``] pixels, zeros filling the uncovered border. The shifts of a batch are
a pure function of (run seed, rank, global batch position), so a resumed run draws what an
uninterrupted one would. ``shift=0`` turns it off.

The tokenizer is the class names as a WordLevel vocabulary (token id i = class i): every
minillm checkpoint carries a tokenizer, and this one names the classes of the logits.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from tokenizers import Tokenizer, models
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Subset

from minillm import checks
from minillm.data.base import TrainingDataModule, ValidationCounts, coerce_config
from minillm.data.sampler import ResumableBatchSampler

DIGIT_CLASSES = 10


@dataclass
class ImageSplitConfig:
    """Keys shared by the image tasks: the split, the augmentation, the eval batch size."""

    valid_fraction: float = 0.1
    test_fraction: float = 0.2
    seed: int = 1234  # the split; the run's seed orders the training images
    shift: int = 1  # training augmentation: random shift by up to this many pixels
    eval_batch_size: int | None = None

    def __post_init__(self) -> None:
        for key in ("valid_fraction", "test_fraction"):
            checks.number(f"data.{key}", getattr(self, key), 0, 1, low_open=True, high_open=True)
        if self.valid_fraction + self.test_fraction >= 1:
            raise ValueError(
                f"data.test_fraction={self.test_fraction}: with data.valid_fraction="
                f"{self.valid_fraction} nothing is left to train on; keep their sum below 1"
            )
        checks.integer("data.seed", self.seed, 0)
        checks.integer("data.shift", self.shift, 0)
        checks.integer("data.eval_batch_size", self.eval_batch_size, optional=True)

    @classmethod
    def coerce(cls, cfg: Any) -> Any:
        return coerce_config(cls, cfg)


@dataclass
class DigitsConfig(ImageSplitConfig):
    """The schema of conf/data/digits.yaml."""

    task: str = "digits"  # selects DigitsDataModule (training/run.py DATA_MODULES)

    @property
    def vocab_size(self) -> int:
        """The number of classes (what ``train`` passes to the model as vocab_size)."""
        return DIGIT_CLASSES


def class_tokenizer(names: list[str]) -> Tokenizer:
    """Class names as tokens: id i is class i (``tokenizer.id_to_token(i)``)."""
    return Tokenizer(models.WordLevel({name: i for i, name in enumerate(names)}, unk_token=None))


def split_indices(n: int, cfg: ImageSplitConfig) -> dict[str, Tensor]:
    """Seeded, disjoint index sets {"train", "validation", "test"} covering range(n)."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(cfg.seed))
    n_test, n_valid = round(n * cfg.test_fraction), round(n * cfg.valid_fraction)
    if min(n_test, n_valid, n - n_test - n_valid) < 1:
        raise ValueError(
            f"data.valid_fraction={cfg.valid_fraction}, data.test_fraction={cfg.test_fraction}: "
            f"{n} images leave an empty split; change the fractions or add images"
        )
    return {
        "test": perm[:n_test],
        "validation": perm[n_test : n_test + n_valid],
        "train": perm[n_test + n_valid :],
    }


def shift_images(pixels: Tensor, offsets: Tensor, pad: int) -> Tensor:
    """pixels (B, C, S, S) moved by offsets (B, 2) = (dy, dx) in [-pad, pad], zero-filled."""
    s = pixels.shape[-1]
    padded = F.pad(pixels, (pad, pad, pad, pad))  # (B, C, S + 2 pad, S + 2 pad)
    top, left = (pad - offsets).unbind(1)  # (B,) each
    crops = [img[:, y : y + s, x : x + s] for img, y, x in zip(padded, top, left, strict=True)]
    return torch.stack(crops)  # (B, C, S, S)


class ImageSet(Dataset):
    """Images (N, C, S, S) uint8 with labels (N,); ``__getitems__`` makes a whole batch."""

    def __init__(self, images: Tensor, labels: Tensor, scale: float) -> None:
        self.images, self.labels, self.scale = images, labels, scale

    def __len__(self) -> int:
        return len(self.labels)

    def __getitems__(self, indices: list[int]) -> dict[str, Tensor]:
        idx = torch.as_tensor(indices, dtype=torch.long)
        pixels = self.images[idx].float() / self.scale  # (B, C, S, S) in [0, 1]
        return {"pixels": pixels, "labels": self.labels[idx, None]}  # labels (B, 1)

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        return {k: v[0] for k, v in self.__getitems__([index]).items()}


class ShiftedImageSet(ImageSet):
    """Training images: items are (global batch position, index) pairs from
    ``PositionedBatchSampler``; the batch's shifts are drawn from (seed, rank, position)."""

    def __init__(
        self, images: Tensor, labels: Tensor, scale: float, shift: int, seed: int, rank: int
    ) -> None:
        super().__init__(images, labels, scale)
        self.shift, self.seed, self.rank = shift, seed, rank

    def __getitems__(self, items: list[tuple[int, int]]) -> dict[str, Tensor]:
        batch = super().__getitems__([index for _, index in items])
        if self.shift:
            key = np.random.SeedSequence([self.seed, self.rank, items[0][0]]).generate_state(1)
            rng = torch.Generator().manual_seed(int(key[0]))
            offsets = torch.randint(-self.shift, self.shift + 1, (len(items), 2), generator=rng)
            batch["pixels"] = shift_images(batch["pixels"], offsets, self.shift)
        return batch


class PositionedBatchSampler(ResumableBatchSampler):
    """``ResumableBatchSampler`` batches as [(global batch position, index), ...]."""

    def batches(self, start: int, stop: int) -> Iterator[list[tuple[int, int]]]:
        for position, batch in enumerate(super().batches(start, stop), start):
            yield [(position, index) for index in batch]


def _batch(batch: dict[str, Tensor]) -> dict[str, Tensor]:
    return batch  # __getitems__ made the batch already


class ImageDataModule(TrainingDataModule):
    """Base of the image tasks; a subclass gives ``Config`` and ``load``. Built like
    ``LMDataModule`` (``max_len`` is unused); after ``setup()`` also ``class_names``."""

    def __init__(self, data: Any, **kwargs: Any) -> None:
        super().__init__(data, **kwargs)
        self.sets: dict[str, tuple[Tensor, Tensor]] | None = None  # split -> images, labels

    def load(self) -> tuple[Tensor, Tensor, list[str], float]:
        """(images (N, C, S, S) uint8, labels (N,) long, class names, pixel scale)."""
        raise NotImplementedError

    def setup(self, stage: str | None = None) -> None:
        if self.sets is not None:
            return
        images, labels, names, scale = self.load()
        if self.tokenizer is None:
            self.tokenizer = class_tokenizer(names)
        given = [self.tokenizer.id_to_token(i) for i in range(self.tokenizer.get_vocab_size())]
        if given != names:
            raise ValueError(
                f"data.task={self.cfg.task}: the classes {names[:5]}... differ from the "
                f"checkpoint's {given[:5]}...; a model is trained and scored on its own classes"
            )
        self.class_names, self.vocab_size, self.scale = names, len(names), scale
        self.sets = {
            split: (images[idx], labels[idx])
            for split, idx in split_indices(len(labels), self.cfg).items()
        }
        self.num_train_tokens = len(self.sets["train"][1])  # one scored label per image

    def train_dataloader(self) -> DataLoader:
        rank, world_size, step = self._position()
        images, labels = self.sets["train"]
        sampler = PositionedBatchSampler(
            len(labels),
            self.batch_size,
            seed=self.seed,
            rank=rank,
            world_size=world_size,
            start_batch=step * self.accumulate,
            num_batches=self.total_steps * self.accumulate if self.total_steps else None,
        )
        dataset = ShiftedImageSet(images, labels, self.scale, self.cfg.shift, self.seed, rank)
        return self._loader(dataset, batch_sampler=sampler)

    def eval_dataloader(self, split: str) -> DataLoader:
        """Every image of ``split`` in order; under DDP rank r takes r::world_size."""
        rank, world_size, _ = self._position()
        dataset = ImageSet(*self.sets[split], self.scale)
        shard = Subset(dataset, range(rank, len(dataset), world_size))
        return self._loader(shard, batch_size=self.eval_batch_size, shuffle=False)

    def val_dataloader(self) -> DataLoader:
        return self.eval_dataloader("validation")

    def test_dataloader(self) -> DataLoader:
        return self.eval_dataloader("test")

    def _loader(self, dataset: Dataset, **kwargs: Any) -> DataLoader:
        return DataLoader(
            dataset,
            collate_fn=_batch,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.num_workers > 0,
            **kwargs,
        )

    def unigram_perplexity(self) -> float:
        """exp(entropy) of the training class frequencies: the perplexity of a model that
        knows only how common each class is (10 for balanced digits)."""
        counts = torch.bincount(self.sets["train"][1], minlength=self.vocab_size).double()
        p = counts[counts > 0] / counts.sum()
        return math.exp(float(-(p * p.log()).sum()))

    def callbacks(self) -> list[Callback]:
        return [ClassAccuracy()]


class DigitsDataModule(ImageDataModule):
    """scikit-learn's 8x8 digits (module docstring)."""

    Config = DigitsConfig

    def load(self) -> tuple[Tensor, Tensor, list[str], float]:
        from sklearn.datasets import load_digits  # bundled data; imported only when used

        digits = load_digits()
        images = torch.from_numpy(digits.images.astype(np.uint8))[:, None]  # (N, 1, 8, 8)
        labels = torch.from_numpy(digits.target.astype(np.int64))  # (N,)
        return images, labels, [str(c) for c in digits.target_names], 16.0


def class_hits(model: nn.Module, batch: Mapping[str, Tensor]) -> Tensor:
    """[top-1 hits, top-5 hits, images] of a batch (top-k: k = min(5, classes))."""
    logits = model(batch["pixels"])  # (B, n_classes)
    labels = batch["labels"][:, 0]  # (B,)
    top = logits.topk(min(5, logits.shape[-1]), dim=-1).indices  # (B, k)
    hits = top == labels[:, None]  # (B, k)
    return torch.stack([hits[:, 0].sum(), hits.any(-1).sum(), labels.new_tensor(len(labels))])


class ClassAccuracy(ValidationCounts):
    """Logs ``val/accuracy`` and ``val/top5_accuracy`` over the whole validation split."""

    size = 3  # [top-1 hits, top-5 hits, images]

    def count(self, model: nn.Module, batch: Mapping[str, Tensor]) -> Tensor:
        return class_hits(model, batch)

    def report(self, pl_module: L.LightningModule, counts: Tensor) -> None:
        top1, top5 = (counts[:2].double() / counts[2].clamp(min=1)).float()
        pl_module.log("val/accuracy", top1, prog_bar=True, sync_dist=False)
        pl_module.log("val/top5_accuracy", top5, sync_dist=False)
