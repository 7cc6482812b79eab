"""Mixture-of-experts feed-forward (``mlp=moe``, the ``mlp`` group): the sorted dispatch equals
a per-token loop over the chosen experts (outputs and gradients), the router losses reach the
training loss, and every model, attention kind, checkpoint, export and generation path works
with it; checkpoints from before the group (``mlp="swiglu"``) resume and export alike."""

from __future__ import annotations

import csv
import math
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import compose, tiny_overrides
from torch.utils.flop_counter import FlopCounterMode

from minillm import load_checkpoint, load_pretrained, save_pretrained
from minillm.attention import kinds_for_role
from minillm.cli.app import check_command_line
from minillm.cli.train import validate
from minillm.hf.export import check_exportable
from minillm.models import ModelConfig, build_model
from minillm.models.flops import forward_flops_per_token
from minillm.models.mlp import MLPS, build_mlp
from minillm.models.moe import MoEMLP
from minillm.models.sizing import match_params
from minillm.training.finetune import check_resume, differences, is_explicit
from minillm.training.module import LMModule
from minillm.training.run import train

TINY = {"vocab_size": 64, "dim": 32, "n_layers": 2, "n_heads": 4, "max_len": 32}


def loop_moe(moe: MoEMLP, x: torch.Tensor) -> torch.Tensor:
    """Slow twin: each token through each of its chosen experts, one at a time."""
    flat = x.reshape(-1, x.shape[-1])  # (N, dim)
    _, weights, experts = moe.route(flat)  # (N, k)
    rows = []
    for t in range(flat.shape[0]):
        y = torch.zeros_like(flat[t])
        for w, e in zip(weights[t], experts[t], strict=True):
            y = y + w * moe.expert(int(e), flat[t : t + 1])[0]
        if moe.config.shared_expert:
            y = y + moe.expert(moe.config.n_experts, flat[t : t + 1])[0]
        rows.append(y)
    return torch.stack(rows).reshape(x.shape)


@pytest.mark.parametrize(
    "knobs",
    [
        {},
        {"n_experts": 4, "top_k": 1},
        {"n_experts": 3, "top_k": 3, "shared_expert": True},
        {"n_experts": 5, "top_k": 2, "renormalize": False},
    ],
)
def test_sorted_dispatch_equals_per_token_loop(knobs: dict) -> None:
    torch.manual_seed(0)
    moe = build_mlp({"kind": "moe", **knobs}, 16, 64)
    x = torch.randn(3, 7, 16, requires_grad=True)
    fast = moe(x)
    grads = torch.autograd.grad(fast.square().sum(), [x, *moe.parameters()])
    slow = loop_moe(moe, x)
    slow_grads = torch.autograd.grad(slow.square().sum(), [x, *moe.parameters()])
    torch.testing.assert_close(fast, slow, rtol=1e-5, atol=1e-5)
    for g, s in zip(grads, slow_grads, strict=True):
        torch.testing.assert_close(g, s, rtol=1e-5, atol=1e-5)


def test_experts_start_like_swiglu_and_the_router_keeps_its_default() -> None:
    """Every expert (the shared one too): gate and up N(0, init_std), down N(0, init_std /
    sqrt(2 n_layers)), as SwiGLU; the router keeps nn.Linear's U(+-1/sqrt(dim))."""
    cfg = {**TINY, "dim": 64, "init_std": 0.05, "mlp": {"kind": "moe", "shared_expert": True}}
    moe = build_model(cfg).blocks[0].mlp
    down_std = 0.05 / (2 * TINY["n_layers"]) ** 0.5
    for weight, std in ((moe.gate_proj.weight, 0.05), (moe.up_proj.weight, 0.05)):
        assert weight.std().item() == pytest.approx(std, rel=0.05)
    assert moe.down_proj.weight.std().item() == pytest.approx(down_std, rel=0.05)
    assert moe.down_proj.weight[-1].std().item() == pytest.approx(down_std, rel=0.1)  # shared
    assert moe.router.weight.abs().max() <= 64**-0.5
    assert moe.router.weight.std().item() == pytest.approx((3 * 64) ** -0.5, rel=0.1)


def test_router_losses_and_load() -> None:
    moe = build_mlp({"kind": "moe", "n_experts": 4, "top_k": 2}, 8, 32)
    x = torch.randn(10, 8)
    torch.nn.init.zeros_(moe.router.weight)  # uniform probabilities: the balanced optimum
    moe(x)
    assert moe.balance_loss.item() == pytest.approx(1.0)
    assert moe.z_loss.item() == pytest.approx(math.log(4) ** 2)
    assert moe.load.sum().item() == pytest.approx(1.0) and moe.dropped == 0.0
    with torch.no_grad():  # every token prefers experts 0 and 1, almost surely
        moe.router.weight.zero_()
        moe.router.weight[:2, 0] = 100.0
    moe(torch.cat([torch.ones(10, 1), torch.zeros(10, 7)], dim=1))
    torch.testing.assert_close(moe.load, torch.tensor([0.5, 0.5, 0.0, 0.0]))
    assert moe.balance_loss.item() == pytest.approx(4 * 0.5, rel=1e-4)  # 4 * (0.5*0.5 + 0.5*0.5)
    weighted = moe.config.aux_loss_weight * moe.balance_loss + moe.config.z_loss_weight * (
        moe.z_loss
    )
    torch.testing.assert_close(moe.aux_loss, weighted)


def test_expert_width_keeps_active_params_and_flops_are_active_only() -> None:
    dense = build_model({**TINY, "mlp_hidden": 64})
    for knobs in ({"n_experts": 8, "top_k": 2}, {"n_experts": 3, "top_k": 1, "shared_expert": 1}):
        moe_cfg = {"kind": "moe", **knobs, "shared_expert": bool(knobs.get("shared_expert"))}
        model = build_model({**TINY, "mlp_hidden": 64, "mlp": moe_cfg})
        moe = model.blocks[0].mlp
        active = knobs["top_k"] + int(moe.config.shared_expert)
        assert moe.expert_hidden * active == 64
        router = 2 * TINY["dim"] * knobs["n_experts"] * TINY["n_layers"]
        assert forward_flops_per_token(model, 16) == forward_flops_per_token(dense, 16) + router
        x = torch.randn(2, 16, TINY["dim"])
        with FlopCounterMode(display=False) as counter:  # what the dispatch really multiplies
            moe(x)
        assert counter.get_total_flops() == 32 * moe.flops_per_token()


@pytest.mark.parametrize(
    ("mlp", "error"),
    [
        ("nope", "model.mlp='nope': choose one of swiglu, moe"),
        ({"n_experts": 4}, "model.mlp={'n_experts': 4}: needs a kind (swiglu, moe, gelu)"),
        ({"kind": "moe", "n_experts": 0}, "model.mlp.n_experts=0: must be a positive integer"),
        ({"kind": "moe", "top_k": 9}, "model.mlp.top_k=9: must be at most"),
        ({"kind": "moe", "z_loss_weight": -1}, "model.mlp.z_loss_weight=-1: must be a number"),
        ({"kind": "moe", "experts": 4}, "model.mlp: kind 'moe' has no option(s) ['experts']"),
    ],
)
def test_bad_mlp_config_is_one_line_error_at_config_build(mlp, error: str) -> None:
    with pytest.raises(ValueError, match="^" + re.escape(error)):
        ModelConfig(**TINY, mlp=mlp)


@pytest.mark.parametrize("kind", sorted(kinds_for_role("causal")))
def test_decoder_with_moe_and_every_attention_kind(kind: str) -> None:
    torch.manual_seed(0)
    model = build_model({**TINY, "attn": {"kind": kind}, "mlp": "moe"})
    logits = model(torch.randint(0, 64, (2, 12)))  # (B, T, vocab)
    logits.float().square().mean().backward()
    assert logits.isfinite().all()
    assert all(p.grad is not None and p.grad.isfinite().all() for p in model.parameters())


@pytest.mark.parametrize("kind", sorted(kinds_for_role("bidirectional")))
def test_encoder_decoder_with_moe(kind: str) -> None:
    cross = kind if kind in kinds_for_role("cross") else "mha"
    cfg = {**TINY, "arch": "encoder_decoder", "encoder_attn": kind, "cross_attn": cross}
    model = build_model({**cfg, "mlp": {"kind": "moe", "n_experts": 4, "top_k": 1}})
    src, tgt = torch.randint(0, 64, (2, 10)), torch.randint(0, 64, (2, 7))
    logits = model(src, tgt)
    logits.square().mean().backward()
    assert logits.shape == (2, 7, 64) and logits.isfinite().all()
    assert sum(isinstance(m, MoEMLP) for m in model.modules()) == 4  # 2 encoder + 2 decoder


def test_training_loss_adds_every_router_loss() -> None:
    module = LMModule({**TINY, "mlp": {"kind": "moe", "aux_loss_weight": 1.0}})
    ids = torch.randint(0, 64, (2, 9))
    batch = {"input_ids": ids[:, :-1], "labels": ids[:, 1:]}
    loss = module.training_step(batch, 0)
    ce = F.cross_entropy(module.model(ids[:, :-1]).flatten(0, 1), ids[:, 1:].flatten())
    aux = sum(m.aux_loss for m in module.model.modules() if isinstance(m, MoEMLP))
    assert len(module._moe) == TINY["n_layers"] and aux > 0.01
    torch.testing.assert_close(loss, ce + aux)


def test_match_params_matches_active_params_for_moe() -> None:
    """Dense: total parameters match (tests/test_attention's job). MoE: the expert width
    follows ``mlp_hidden``, so the active parameters per token match the reference's."""
    dense = {**TINY, "attn": {"kind": "mha"}}
    matched = match_params({**TINY, "attn": {"kind": "mqa"}, "mlp": "moe"}, "mha")
    reference = build_model(dense)
    model = build_model(matched)
    moe = [m for m in model.modules() if isinstance(m, MoEMLP)]
    inactive = sum(
        (m.config.n_experts - m.config.top_k) * m.gate_proj.weight[0].numel() * 3 for m in moe
    )
    router = sum(m.router.weight.numel() for m in moe)
    gap = model.num_params() - inactive - router - reference.num_params()
    assert abs(gap) <= TINY["n_layers"] * 3 * TINY["dim"] * 2  # rounding of hidden to top_k


def test_mlp_group_takes_knob_overrides_and_model_mlp_still_works() -> None:
    assert compose([])["model"]["mlp"] == {"kind": "swiglu"}
    cfg = compose(["mlp=moe", "mlp.n_experts=4", "mlp.top_k=1"])["model"]["mlp"]
    assert (cfg["kind"], cfg["n_experts"], cfg["top_k"]) == ("moe", 4, 1)
    assert cfg["shared_expert"] is False  # the knobs not given: MoEMLP.Config's defaults
    # the form used before the group: replaces the node with the kind (its defaults)
    assert compose(["model.mlp=moe"])["model"]["mlp"] == "moe"
    cfg = compose(["model.mlp={kind:moe,n_experts:4,top_k:1}"])["model"]["mlp"]
    assert cfg == {"kind": "moe", "n_experts": 4, "top_k": 1}
    assert set(MLPS) == {"swiglu", "moe", "gelu"}


@pytest.mark.parametrize(
    ("overrides", "error"),
    [
        (["mlp.n_experts=4"], "unknown option mlp.n_experts"),  # swiglu has no knobs
        (["mlp=nope"], "Could not find 'mlp/nope'; valid choices for mlp: gelu, moe, swiglu"),
        (["mlp=moe", "mlp.top_k=9"], "model.mlp.top_k=9: must be at most"),
    ],
)
def test_bad_mlp_group_override_exits_2_with_one_line(
    overrides: list[str], error: str, capsys: pytest.CaptureFixture
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        check_command_line("train", validate, ["model=tiny", *overrides])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and error in err and err.count("\n") == 1


def test_string_mlp_of_older_checkpoints_equals_the_group_dict() -> None:
    """Checkpoints written before the mlp group store ``mlp="swiglu"``: they resume, fine-tune
    and export as the ``{"kind": "swiglu"}`` the group now stores."""
    old, new = ModelConfig(**TINY, mlp="swiglu"), ModelConfig(**TINY, mlp={"kind": "swiglu"})
    assert differences(old, new, ()) == []
    ckpt = {"hyper_parameters": {"model": old.to_dict(), "optim": {}}, "tokenizer": "{}"}
    check_resume("old.ckpt", ckpt, new.to_dict(), {})  # no error
    moe = compose(["model=tiny", "mlp=moe", "mlp.n_experts=4"])["model"]
    with pytest.raises(
        ValueError, match=r"mlp\.kind: 'swiglu' \(checkpoint\) vs 'moe'.*\bmlp=swiglu"
    ):
        check_resume("old.ckpt", ckpt, {**moe, **TINY}, {})
    ckpt["hyper_parameters"]["model"] = {**moe, **TINY}
    with pytest.raises(
        ValueError, match=r"mlp\.n_experts: 4 \(checkpoint\) vs 8.*mlp\.n_experts=4"
    ):
        check_resume("moe.ckpt", ckpt, {**moe, **TINY, "mlp": {"kind": "moe"}}, {})
    for cfg in (old, new):
        check_exportable(cfg)  # the plain SwiGLU is a Llama MLP in either form
    with pytest.raises(ValueError, match=r"cannot express mlp\.kind='moe'"):
        check_exportable(ModelConfig(**TINY, mlp={"kind": "moe"}))


def test_mlp_overrides_count_as_set_for_fine_tuning() -> None:
    assert is_explicit("mlp.n_experts", ["mlp.n_experts=8"])
    assert is_explicit("mlp.n_experts", ["mlp=moe"]) and is_explicit("mlp.kind", ["model.mlp=moe"])
    assert not is_explicit("mlp.kind", ["model=tiny"])  # a model preset leaves the mlp group


@pytest.fixture(scope="module")
def moe_run(corpus_file: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    run_dir = tmp_path_factory.mktemp("moe_run")
    overrides = tiny_overrides(corpus_file, "mlp=moe", "mlp.n_experts=4")
    return run_dir, train(compose(overrides), run_dir)


def test_training_logs_router_losses_and_load(moe_run: tuple[Path, dict]) -> None:
    run_dir, _ = moe_run
    rows = list(csv.DictReader((run_dir / "logs" / "metrics.csv").open()))
    logged = [r for r in rows if r.get("train/aux_loss")]
    assert logged, rows[0].keys()
    last = logged[-1]
    loads = [float(last[f"moe/load_{i}"]) for i in range(4)]
    assert sum(loads) == pytest.approx(1.0, abs=1e-5) and float(last["moe/dropped"]) == 0.0
    assert float(last["moe/load_min"]) <= min(loads) and float(last["moe/load_max"]) >= max(loads)
    assert float(last["train/z_loss"]) > 0 and float(last["train/aux_loss"]) >= 1.0 - 1e-5


def test_checkpoint_export_resume_and_generation(
    moe_run: tuple[Path, dict], corpus_file: Path, tmp_path: Path
) -> None:
    run_dir, summary = moe_run
    model, tokenizer = load_checkpoint(summary["last_ckpt"])
    assert isinstance(model.blocks[0].mlp, MoEMLP)
    save_pretrained(model, tokenizer, tmp_path / "export")
    loaded, _ = load_pretrained(tmp_path / "export")
    ids = torch.tensor([tokenizer.encode("The Congress of the United States").ids])
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids), model(ids), rtol=0, atol=0)
    overrides = tiny_overrides(corpus_file, "mlp=moe", "mlp.n_experts=4")
    resumed = train(compose([*overrides, "ckpt_path=last", "trainer.max_steps=6"]), run_dir)
    assert resumed["global_step"] == 6

    from minillm.generation import complete

    (out,) = complete(model, tokenizer, ["x"], temperature=0, max_new_tokens=4)
    seq = torch.tensor([tokenizer.encode("x", add_special_tokens=False).ids])
    with torch.no_grad():  # greedy by full forwards: the cached path must agree
        for _ in range(len(out.token_ids)):
            seq = torch.cat([seq, model(seq)[:, -1:].argmax(-1)], dim=1)
    assert out.token_ids == seq[0, -len(out.token_ids) :].tolist()


def test_bf16_autocast_forward_and_backward() -> None:
    model = build_model({**TINY, "mlp": "moe"})
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(torch.randint(0, 64, (2, 8)))  # (B, T, vocab)
    logits.float().square().mean().backward()
    assert logits.isfinite().all()
    assert all(p.grad.isfinite().all() for p in model.parameters())


def test_top_k_weights_renormalised_except_for_top_1() -> None:
    x = torch.randn(6, 8)
    for top_k, renormalize in ((2, True), (2, False), (1, True)):
        moe = build_mlp({"kind": "moe", "top_k": top_k, "renormalize": renormalize}, 8, 32)
        logits, weights, _ = moe.route(x)
        top = logits.softmax(-1).topk(top_k, dim=-1).values  # (N, k)
        expected = top / top.sum(-1, keepdim=True) if renormalize and top_k > 1 else top
        torch.testing.assert_close(weights, expected)
