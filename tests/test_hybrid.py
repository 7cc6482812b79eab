"""Per-layer hybrids (``model.layers``): each block gets its own kind, and everything that
depends on the kind (caches, FLOPs, labels, checkpoints, export refusal) follows the layers.
Generation (cached = uncached, beams, speculative) runs over hybrids in test_generation.py."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import CONF, compose, tiny_overrides

from minillm import load_checkpoint
from minillm.attention import ATTENTION, KVCache, RecurrentState, RollingKVCache
from minillm.hf.export import check_exportable
from minillm.models import ModelConfig, build_model
from minillm.models.flops import forward_flops_per_token
from minillm.training.run import train

TINY = {"vocab_size": 64, "dim": 32, "n_heads": 4, "max_len": 32}


def kinds(model: torch.nn.Module) -> list[type]:
    return [type(block.attn) for block in model.blocks]


def test_a_pattern_repeats_over_the_layers() -> None:
    cfg = ModelConfig(**TINY, n_layers=4, layers=["gated_linear", {"kind": "local", "window": 8}])
    model = build_model(cfg.to_dict())
    gated, local = ATTENTION["gated_linear"][0], ATTENTION["local"][0]
    assert kinds(model) == [gated, local, gated, local]
    assert model.blocks[1].attn.cfg.window == 8
    assert cfg.attn_label == "gated_linear+local"
    three_one = ModelConfig(**TINY, n_layers=4, layers=["gated_linear"] * 3 + ["mha"])
    assert three_one.attn_label == "3xgated_linear+mha"
    assert ModelConfig(**TINY, n_layers=4).attn_label == "mha"


@pytest.mark.parametrize(
    "overrides, label",
    [
        ([], "mha"),
        (["attn=linear"], "linear"),
        (["model.layers=[linear,linear,mha]"], "2xlinear+mha"),
    ],
)
def test_run_directories_are_named_by_the_label(overrides: list[str], label: str) -> None:
    """outputs/<date>/<time>_<label> and a sweep's <n>_<label>: a hybrid is not named 'mha'."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from minillm.cli import schema

    schema.register()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = hydra_compose("train", overrides, return_hydra_config=True)
        cfg.hydra.job.num = 3
        assert cfg.hydra.run.dir.endswith(f"_{label}") and cfg.hydra.sweep.subdir == f"3_{label}"


@pytest.mark.parametrize("layers", [[], ["mha"] * 3, ["mha"] * 5])
def test_a_pattern_must_divide_n_layers(layers: list[str]) -> None:
    with pytest.raises(ValueError, match=rf"model.layers has {len(layers)} entries .*n_layers=4"):
        ModelConfig(**TINY, n_layers=4, layers=layers)


def test_each_layer_is_checked_like_attn() -> None:
    with pytest.raises(ValueError, match="unknown attention kind 'nope'; valid kinds"):
        ModelConfig(**TINY, n_layers=2, layers=["mha", "nope"])
    with pytest.raises(ValueError, match="n_kv_heads=3"):
        ModelConfig(**TINY, n_layers=2, layers=["mha", {"kind": "gqa", "n_kv_heads": 3}])


def test_each_layer_decodes_with_its_own_cache() -> None:
    cfg = {**TINY, "n_layers": 3, "layers": ["gated_linear", {"kind": "local", "window": 4}, "mha"]}
    model = build_model(cfg).eval()
    _, state = model.start(torch.tensor([[5, 6, 7, 8, 9, 10]]), max_new_tokens=2)
    caches = [self_cache for self_cache, _ in state.caches]
    assert [type(c) for c in caches] == [RecurrentState, RollingKVCache, KVCache]
    assert state.capacity == TINY["max_len"]  # the mha layer's cache fills up


def test_flops_are_the_sum_over_the_layers_kinds() -> None:
    def flops(**cfg: object) -> float:
        return forward_flops_per_token(build_model({**TINY, "n_layers": 4, **cfg}), 32)

    mha, gated = flops(), flops(attn={"kind": "gated_linear"})
    assert flops(layers=["gated_linear", "mha"]) == pytest.approx((mha + gated) / 2)


def test_export_refuses_a_hybrid_by_name() -> None:
    cfg = ModelConfig(**TINY, n_layers=2, layers=["mha", "gqa"])
    with pytest.raises(ValueError, match=r"format=hf: .*model\.layers="):
        check_exportable(cfg)


def test_train_py_trains_a_hybrid_and_the_checkpoint_keeps_its_layers(
    corpus_file: Path, tmp_path: Path
) -> None:
    cfg = compose(tiny_overrides(corpus_file, "model.layers=[gated_linear,mha]"))
    summary = train(cfg, tmp_path)
    assert math.isfinite(summary["val_ppl"])
    model, _ = load_checkpoint(summary["last_ckpt"])
    gated, mha = ATTENTION["gated_linear"][0], ATTENTION["mha"][0]
    assert kinds(model) == [gated, mha] * (model.cfg.n_layers // 2)
    assert json.loads((tmp_path / "metrics.json").read_text())["kind"] == "gated_linear+mha"


def test_match_params_sizes_a_hybrid_like_mha() -> None:
    from minillm.models.sizing import match_params

    cfg = {**TINY, "n_layers": 4, "layers": ["gated_linear", "gated_linear", "gated_linear", "mha"]}
    matched = build_model(match_params(cfg, "mha"))
    reference = build_model({**TINY, "n_layers": 4}).num_params()
    unmatched = build_model(cfg).num_params()
    assert (
        abs(matched.num_params() - reference) <= 4 * 1.5 * TINY["dim"] < abs(unmatched - reference)
    )
