"""The ViT front end: shapes, every bidirectional kind, pooling, config errors, the image data
modules (seeded disjoint split, position-keyed augmentation), and a tiny training run whose
checkpoint reloads and scores with ``metric=accuracy``."""

from __future__ import annotations

import csv
import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import compose

import minillm.cli.evaluate as evaluate_cli
from minillm import load_checkpoint
from minillm.attention import kinds_for_role
from minillm.checkpoint import read_checkpoint
from minillm.cli.app import compose as compose_command
from minillm.data.imagefolder import ImageFolderDataModule
from minillm.data.images import DigitsConfig, DigitsDataModule, ShiftedImageSet, split_indices
from minillm.models import ModelConfig, build_model
from minillm.training.module import LMModule
from minillm.training.run import train

BIDIRECTIONAL = kinds_for_role("bidirectional")
CAUSAL_ONLY = [k for k in kinds_for_role("causal") if k not in BIDIRECTIONAL]
VIT = {"arch": "vit", "dim": 32, "n_layers": 2, "n_heads": 4, "image_size": 8}
VIT |= {"patch_size": 2, "channels": 1, "n_classes": 10}


def vit(kind: str = "mha", **changes: object) -> torch.nn.Module:
    torch.manual_seed(0)
    attn = {"kind": kind, **({"window": 5} if kind == "local" else {})}
    return build_model({**VIT, "attn": attn, **changes})


@pytest.mark.parametrize("pool", ["mean", "cls"])
def test_forward_shapes(pool: str) -> None:
    model = vit(pool=pool)
    pixels = torch.rand(3, 1, 8, 8)
    assert model(pixels).shape == (3, 10)
    assert model.hidden_states(pixels).shape == (3, 1, 32)
    assert model.n_tokens == 16 + (pool == "cls")
    assert (model.cls_token is not None) == (pool == "cls")
    mean = sum(p.numel() for p in vit(pool="mean").parameters())
    assert sum(p.numel() for p in model.parameters()) == mean + 32 * (pool == "cls")


@pytest.mark.parametrize("kind", BIDIRECTIONAL)
def test_every_bidirectional_kind_trains(kind: str) -> None:
    model = vit(kind)
    pixels, labels = torch.rand(4, 1, 8, 8), torch.tensor([0, 3, 9, 3])
    F.cross_entropy(model(pixels), labels).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.isfinite().all(), name
    assert model.patch_emb.weight.grad.abs().sum() > 0
    assert model.blocks[0].attn.q_proj.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("kind", CAUSAL_ONLY)
def test_causal_only_kind_is_refused_with_the_role_error(kind: str) -> None:
    with pytest.raises(ValueError, match=f"'{kind}' cannot serve as bidirectional attention"):
        vit(kind)


def test_cls_pooling_reads_the_class_token_and_mean_pooling_every_patch() -> None:
    pixels = torch.rand(2, 1, 8, 8)
    cls = vit(pool="cls")
    cls.cls_token.grad = None
    cls(pixels).sum().backward()
    assert cls.cls_token.grad.abs().sum() > 0
    mean = vit(pool="mean").eval()
    # the mean of the last block's states, then the final norm, then the head
    x = mean.embed(pixels)
    positions = torch.arange(16).expand(2, 16)
    for block in mean.blocks:
        x = block(x, positions=positions)
    expected = mean.lm_head(mean.norm(x.mean(1)))
    torch.testing.assert_close(mean(pixels), expected)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"patch_size": 3}, r"^model.patch_size=3: must divide model.image_size=8 \(e.g. "),
        ({"pool": "max"}, r"^model.pool='max': choose one of mean, cls$"),
        ({"n_classes": 1}, r"^model.n_classes=1: must be an integer >= 2"),
    ],
)
def test_bad_vit_config_is_one_line(changes: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message) as err:
        ModelConfig(**{**VIT, **changes})
    assert "\n" not in str(err.value)


def test_vocab_size_is_not_demanded_and_sizes_the_head_without_n_classes() -> None:
    ModelConfig(**{**VIT, "vocab_size": None})  # images have no tokenizer vocabulary
    model = build_model({**VIT, "n_classes": None, "vocab_size": 7})
    assert model(torch.rand(1, 1, 8, 8)).shape == (1, 7)


def test_wrong_image_shape_is_one_line() -> None:
    with pytest.raises(
        ValueError, match=r"pixels of shape \(3, 8, 8\) do not fit model.channels=1"
    ):
        vit()(torch.rand(1, 3, 8, 8))


def test_lm_loss_is_the_classification_cross_entropy() -> None:
    """LMModule's fused loss over hidden_states (B, 1, dim) and lm_head equals plain CE."""
    module = LMModule({**VIT, "attn": {"kind": "mha"}})
    pixels, labels = torch.rand(5, 1, 8, 8), torch.tensor([[1], [0], [9], [4], [4]])
    loss_sum, n = module._loss_sum({"pixels": pixels, "labels": labels}, 0.0)
    expected = F.cross_entropy(module.model(pixels), labels[:, 0], reduction="sum")
    torch.testing.assert_close(loss_sum, expected)
    assert n == 5


def digits(**changes: object) -> DigitsDataModule:
    data = DigitsDataModule(DigitsConfig(**changes), max_len=1, batch_size=16, total_steps=4)
    data.setup()
    return data


def test_digits_split_is_seeded_disjoint_and_complete() -> None:
    cfg = DigitsConfig()
    parts = split_indices(1797, cfg)
    assert [len(parts[s]) for s in ("train", "validation", "test")] == [1258, 180, 359]
    joined = torch.cat(list(parts.values()))
    assert sorted(joined.tolist()) == list(range(1797))  # disjoint and covering
    again = split_indices(1797, cfg)
    assert all(torch.equal(parts[s], again[s]) for s in parts)
    other = split_indices(1797, dataclasses.replace(cfg, seed=7))
    assert not torch.equal(parts["test"], other["test"])
    data = digits()
    assert data.vocab_size == 10 and data.class_names == [str(i) for i in range(10)]
    assert data.tokenizer.id_to_token(3) == "3"
    batch = next(iter(data.val_dataloader()))
    assert batch["pixels"].shape == (16, 1, 8, 8) and batch["labels"].shape == (16, 1)
    assert 0 <= batch["pixels"].min() and batch["pixels"].max() <= 1


def test_augmentation_is_a_function_of_batch_position() -> None:
    data = digits(shift=1)
    images, labels = data.sets["train"]
    shifted = ShiftedImageSet(images, labels, data.scale, 1, seed=5, rank=0)
    items = [(12, i) for i in range(32)]
    a, b = shifted.__getitems__(items), shifted.__getitems__(items)
    assert torch.equal(a["pixels"], b["pixels"])  # same position, same shifts
    other = shifted.__getitems__([(13, i) for i in range(32)])["pixels"]
    assert not torch.equal(a["pixels"], other)
    plain = ShiftedImageSet(images, labels, data.scale, 0, seed=5, rank=0).__getitems__(items)
    assert not torch.equal(a["pixels"], plain["pixels"])
    assert a["pixels"].sum() <= plain["pixels"].sum()  # a shift only drops border pixels
    first, again = ([b["labels"] for b in data.train_dataloader()] for _ in range(2))
    assert len(first) == 4 and all(map(torch.equal, first, again))  # fresh loaders: same order


def test_imagefolder_reads_classes_resizes_and_converts(tmp_path: Path) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    for name in ("cat", "dog"):
        (tmp_path / name).mkdir()
        for i in range(6):
            array = rng.integers(0, 256, (12, 10, 3), dtype=np.uint8)
            Image.fromarray(array).save(tmp_path / name / f"{i}.png")
    cfg = {"path": str(tmp_path), "image_size": 8, "channels": 1, "valid_fraction": 0.25}
    data = ImageFolderDataModule(cfg, max_len=1, batch_size=4)
    data.setup()
    assert data.class_names == ["cat", "dog"] and data.vocab_size == 2
    assert sum(len(labels) for _, labels in data.sets.values()) == 12
    batch = next(iter(data.test_dataloader()))
    assert batch["pixels"].shape[1:] == (1, 8, 8)
    with pytest.raises(ValueError, match=r"^data.path=.*nope: name a folder"):
        ImageFolderDataModule({"path": str(tmp_path / "nope")}, max_len=1, batch_size=4)


@pytest.fixture(scope="module")
def vit_run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    run_dir = tmp_path_factory.mktemp("vit_run")
    cfg = compose(
        [
            "experiment=vit",
            "model.dim=32",
            "model.n_layers=1",
            "batch_size=16",
            "trainer=cpu",
            "trainer.max_steps=3",
            "trainer.val_check_interval=3",
            "trainer.enable_progress_bar=false",
            "optim.warmup_steps=1",
        ]
    )
    return train(cfg, run_dir)


def test_tiny_training_logs_accuracy_and_reloads_with_equal_logits(vit_run: dict) -> None:
    rows = list(csv.DictReader(open(Path(vit_run["run_dir"]) / "logs" / "metrics.csv")))
    accuracy = [float(r["val/accuracy"]) for r in rows if r.get("val/accuracy")]
    top5 = [float(r["val/top5_accuracy"]) for r in rows if r.get("val/top5_accuracy")]
    assert accuracy and 0 <= accuracy[-1] <= top5[-1] <= 1
    ckpt = read_checkpoint(vit_run["last_ckpt"])
    module = LMModule(**ckpt["hyper_parameters"])
    module.load_state_dict(ckpt["state_dict"])
    model, tokenizer = load_checkpoint(vit_run["last_ckpt"])
    assert tokenizer.id_to_token(9) == "9"
    pixels = torch.rand(4, 1, 8, 8)
    torch.testing.assert_close(model(pixels), module.model.eval()(pixels), rtol=0, atol=0)


def test_evaluate_accuracy_scores_the_test_split(vit_run: dict, tmp_path: Path) -> None:
    out = tmp_path / "acc.json"
    argv = ["metric=accuracy", f"ckpt={vit_run['last_ckpt']}", f"out={out}", "device=cpu"]
    summary = evaluate_cli.evaluate(evaluate_cli.validate(compose_command("evaluate", argv)))
    assert summary["split"] == "test" and summary["images"] == 359
    assert 0 <= summary["accuracy"] <= summary["top5_accuracy"] <= 1
    with pytest.raises(ValueError, match=r"^stride=4 is not an option of metric=accuracy"):
        evaluate_cli.validate(compose_command("evaluate", [*argv, "stride=4"]))
    with pytest.raises(ValueError, match=r"^split='all': choose one of"):
        evaluate_cli.validate(compose_command("evaluate", [*argv, "split=all"]))


def test_metrics_json_carries_the_final_accuracy(vit_run: dict) -> None:
    """Like val ppl for an LM: the run's summary file holds its final accuracy and top-5."""
    metrics = json.loads((Path(vit_run["run_dir"]) / "metrics.json").read_text())
    rows = list(csv.DictReader(open(Path(vit_run["run_dir"]) / "logs" / "metrics.csv")))
    last = [r for r in rows if r.get("val/accuracy")][-1]
    assert metrics["val_accuracy"] == pytest.approx(float(last["val/accuracy"]))
    assert metrics["val_top5_accuracy"] == pytest.approx(float(last["val/top5_accuracy"]))
    assert 0 <= metrics["val_accuracy"] <= metrics["val_top5_accuracy"] <= 1
    assert metrics["recall_acc"] is None and metrics["bits_per_byte"] is None
