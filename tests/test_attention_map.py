"""Attention maps: every kind's ``attention_weights`` is the mixing its forward really does,
softmax kinds give causal distributions, and the attention_map command writes the PNG, for a
prompt or, with a ViT, for an image (a file, or image N of the checkpoint's data set)."""

from __future__ import annotations

import os
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ROOT
from conftest import compose as compose_train

from minillm.attention import ATTENTION, build_attention
from minillm.attention.gated_linear import GatedLinearAttention
from minillm.attention.local import LocalAttention
from minillm.attention.mha import MultiHeadAttention
from minillm.checkpoint import save_pretrained
from minillm.cli import attention_map, attention_map_images
from minillm.cli.app import compose
from minillm.data.images import class_tokenizer
from minillm.data.tokenizer import build_tokenizer
from minillm.models import build_model
from minillm.training.run import train

SOFTMAX = (MultiHeadAttention, LocalAttention)
MIXED_AT = {GatedLinearAttention: "o_norm"}  # the module whose input is weights @ v; else o_proj
KNOBS = {"local": {"window": 5}, "linear": {"chunk_size": 4}, "gated_linear": {"chunk_size": 4}}
CASES = [
    (kind, role)
    for kind, (cls, _) in sorted(ATTENTION.items())
    for role in ("causal", "bidirectional")
    if role in cls.roles
]
T = 11


def weights_and_mixing(kind: str, role: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(weights, weights @ v, what the forward fed to the module after the mixing), all
    (B, H, T, *), in float64 with weights large enough to give peaked distributions."""
    torch.manual_seed(0)
    attn = build_attention({"kind": kind, **KNOBS.get(kind, {})}, 32, 4, role).double()
    for p in attn.parameters():
        torch.nn.init.normal_(p, 0.0, 0.3)
    x = torch.randn(2, T, 32, dtype=torch.float64)
    positions = torch.arange(T).expand(2, T)
    seen = {}
    after = getattr(attn, MIXED_AT.get(type(attn), "o_proj"))
    handle = after.register_forward_pre_hook(lambda m, args: seen.update(y=args[0]))
    with torch.no_grad():
        attn(x, positions=positions)
        handle.remove()
        try:
            weights = attn.attention_weights(x, positions=positions)  # (B, H, T, T)
        except NotImplementedError as err:
            pytest.skip(f"{kind} provides no attention_weights: {err}")
        n_kv = getattr(attn, "n_kv_heads", attn.n_heads)
        v = attn.v_proj(x).view(2, T, n_kv, -1).transpose(1, 2)  # (B, H_kv, T, D_v)
        v = v.repeat_interleave(attn.n_heads // n_kv, dim=1)  # (B, H, T, D_v)
        mixed = weights.to(v.dtype) @ v  # (B, H, T, D_v)
    return weights, mixed, seen["y"].reshape(2, T, attn.n_heads, -1).transpose(1, 2)


@pytest.mark.parametrize(("kind", "role"), CASES, ids=[f"{k}-{r}" for k, r in CASES])
def test_weights_times_values_is_the_forward_mixing(kind: str, role: str) -> None:
    weights, mixed, forward = weights_and_mixing(kind, role)
    assert weights.shape == (2, 4, T, T)
    torch.testing.assert_close(mixed, forward, rtol=1e-9, atol=1e-9)
    if role == "causal":
        assert (weights.triu(1) == 0).all()


@pytest.mark.parametrize(
    ("kind", "role"), [c for c in CASES if issubclass(ATTENTION[c[0]][0], SOFTMAX)]
)
def test_softmax_weights_are_causal_distributions(kind: str, role: str) -> None:
    weights, _, _ = weights_and_mixing(kind, role)
    assert (weights >= 0).all()
    torch.testing.assert_close(weights.sum(-1), torch.ones(2, 4, T, dtype=weights.dtype))
    if kind == "local":  # nothing outside the window
        ahead = torch.arange(T)[None, :] - torch.arange(T)[:, None]  # key minus query index
        outside = ahead < -4 if role == "causal" else ahead.abs() > 2
        assert (weights[..., outside] == 0).all()


def run_command(argv: list[str]) -> Path:
    """The command in-process, as ``main`` runs it: prompt verbatim, composed, validated."""
    argv = attention_map.verbatim(argv, "prompt")
    return attention_map.attention_map(attention_map.validate(compose("attention_map", argv)))


@pytest.mark.parametrize(("kind", "head"), [("mha", "1"), ("gated_linear", None)])
def test_attention_map_command_writes_a_png(kind: str, head: str | None, tmp_path: Path) -> None:
    prompt = "To be, or not to be: that is the question."
    tokenizer = build_tokenizer([prompt], kind="char")
    cfg = {"vocab_size": tokenizer.get_vocab_size(), "dim": 32, "n_layers": 2, "n_heads": 4}
    model = build_model({**cfg, "max_len": 64, "attn": {"kind": kind}})
    folder = save_pretrained(model, tokenizer, tmp_path / "model")
    out = tmp_path / "map.png"
    args = [f"ckpt={folder}", f"prompt={prompt}", "layer=-1", f"out={out}"]
    assert run_command(args + ([f"head={head}"] if head else [])) == out
    assert out.read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize(
    "text",
    ["To be, or not: [that] = 'it'", "${x} {y} $z", "end \\", "a\\'b", "  ", "", "null", "[1]"],
)
def test_prompt_is_taken_verbatim(text: str) -> None:
    """Hydra would split a comma, parse brackets and quotes, resolve ${...}: not here."""
    argv = attention_map.verbatim(["ckpt=m", f"prompt={text}", "layer=1"], "prompt")
    args = attention_map.validate(compose("attention_map", argv))
    assert args.prompt == text and args.layer == 1 and args.head is None


VIT = {"arch": "vit", "dim": 32, "n_layers": 2, "n_heads": 4, "image_size": 8}
VIT |= {"patch_size": 2, "channels": 1, "n_classes": 10}
PANEL_PX = round(attention_map_images.PANEL * attention_map_images.DPI)  # a panel, pixels a side


def png_size(path: Path) -> tuple[int, int]:
    """(width, height) from the PNG's IHDR chunk."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", data[16:24])


@pytest.fixture(scope="module")
def vit_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A ViT trained 2 steps on the digits: a .ckpt that carries its data config."""
    run_dir = tmp_path_factory.mktemp("vit_map")
    overrides = ["experiment=vit", "model.dim=32", "model.n_layers=2", "batch_size=8"]
    overrides += ["trainer=cpu", "trainer.max_steps=2", "trainer.val_check_interval=2"]
    overrides += ["trainer.enable_progress_bar=false", "optim.warmup_steps=1"]
    return Path(train(compose_train(overrides), run_dir)["last_ckpt"])


@pytest.fixture(scope="module")
def vit_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An untrained class-token ViT as an exported folder (no data config)."""
    torch.manual_seed(0)
    model = build_model({**VIT, "pool": "cls"})
    tokenizer = class_tokenizer([str(i) for i in range(10)])
    return save_pretrained(model, tokenizer, tmp_path_factory.mktemp("vit") / "exported")


@pytest.mark.parametrize(("head", "panels"), [(None, (4, 1)), ("1", (1, 1))])
def test_vit_map_of_a_data_set_image_is_one_panel_per_head(
    vit_ckpt: Path, head: str | None, panels: tuple[int, int], tmp_path: Path
) -> None:
    out = tmp_path / "map.png"
    args = [f"ckpt={vit_ckpt}", "index=7", "layer=-1", f"out={out}"]
    assert run_command(args + ([f"head={head}"] if head else [])) == out
    assert png_size(out) == (panels[0] * PANEL_PX, panels[1] * PANEL_PX)


def test_vit_map_of_an_image_file_and_its_default_name(vit_folder: Path, tmp_path: Path) -> None:
    """Any size and mode is converted to the model's (8x8 grayscale here), as imagefolder."""
    from PIL import Image

    image = tmp_path / "my digit.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (20, 30, 3), np.uint8)).save(image)
    out = run_command([f"ckpt={vit_folder}", f"image={image}", "head=0"])
    assert out == Path(f"{vit_folder}.attn_L0_H0_my digit.png")
    assert png_size(out) == (PANEL_PX, PANEL_PX)


def test_vit_input_errors_are_one_line_value_errors(vit_ckpt: Path, vit_folder: Path) -> None:
    with pytest.raises(ValueError, match=r"^index=359: the test split has 359 images"):
        run_command([f"ckpt={vit_ckpt}", "index=359"])
    with pytest.raises(ValueError, match=r"is an exported folder, which carries no data config"):
        run_command([f"ckpt={vit_folder}", "index=0"])
    with pytest.raises(
        ValueError, match=r"^prompt=: the checkpoint is model.arch=vit; pass image="
    ):
        run_command([f"ckpt={vit_folder}", "prompt=a digit"])
    with pytest.raises(ValueError, match=r"^prompt is required: .* or index=<N> for a ViT"):
        run_command([f"ckpt={vit_folder}", "index=0", "image=x.png"])


def test_patch_weights_put_each_patch_weight_on_its_grid_square() -> None:
    """Raster order: token 1 + 4 * row + col is patch (row, col) of a 4x4 grid (class token
    first); cls reads the class token's row, mean averages every query's row."""
    weights = torch.zeros(2, 17, 17)  # (H, 1 + 16, 1 + 16)
    weights[0, 0, 1 + 4 * 2 + 3] = 1.0  # head 0: the class token looks at patch (2, 3)
    weights[1, 5, 0] = 1.0  # head 1: a patch looks at the class token, not drawn
    grid = attention_map.patch_weights(weights, "cls", 4)  # (H, 4, 4)
    assert grid.shape == (2, 4, 4) and grid[0, 2, 3] == 1 and grid.sum() == 1
    weights = torch.zeros(1, 16, 16)
    weights[0, :, 4 * 1 + 0] = 1.0  # every query looks at patch (1, 0)
    weights[0, 3, 4 * 3 + 3] = 16.0  # one query only at patch (3, 3)
    grid = attention_map.patch_weights(weights, "mean", 4)
    assert grid[0, 1, 0] == 1 and grid[0, 3, 3] == 1 and grid.sum() == 2


def test_bad_image_path_exits_2_with_one_line(vit_folder: Path, tmp_path: Path) -> None:
    cmd = [sys.executable, str(ROOT / "scripts" / "attention_map.py"), f"ckpt={vit_folder}"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    missing = tmp_path / "no such.png"
    proc = subprocess.run(
        [*cmd, f"image={missing}"], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert (
        proc.stderr == f"error: image={missing}: no such file; pass image=<an image file> "
        "(png, jpg, ...) or index=<N> for image N of the checkpoint's test split\n"
    )
    assert list(tmp_path.iterdir()) == []  # nothing written
