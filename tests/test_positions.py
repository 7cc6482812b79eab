"""Positions as a registry (``model.positions``): every kind with every attention kind that
accepts it, parametrized over both registries.

Attention level: fast path = slow twin (explicit loops that rotate per position or add the bias
per (query, key) pair), prefill + decode = full forward (eager and fixed-shape, left padding,
chunked prefill, local's rolling window). Kind level: ALiBi's slopes, T5's buckets, the learned
table's length limit. Model level: the build-time check, a shared T5 table, training and
generation with each kind, old ``rope_base`` configs, HF export, the CLI.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch._dynamo
from conftest import ROOT
from torch import Tensor, nn
from torch._dynamo.testing import CompileCounter

from minillm import load_checkpoint
from minillm.attention import ATTENTION, build_attention, fixed_shape_decoding
from minillm.attention.reference import REFERENCES
from minillm.generation import (
    GenerationConfig,
    generate_ids,
    generate_scored,
    left_pad,
    pad_right,
)
from minillm.generation.loop import COMPILE_OPTIONS
from minillm.hf.export import check_exportable
from minillm.models import ModelConfig, build_model
from minillm.models.block import positions_from_mask
from minillm.positions import (
    POSITIONS,
    alibi_slopes,
    build_positions,
    positions_kind,
    relative_bucket,
)
from minillm.positions.alibi import ALiBiPositions
from minillm.positions.none import NoPositions
from minillm.positions.rope import RotaryPositions

DIM, HEADS, SMALL, MAX_LEN = 32, 4, 8, 64
# every registry key, plus RoPE with its long-context knob on
POSITION_CFGS = {key: key for key in POSITIONS} | {"rope_ntk": {"kind": "rope", "ntk_factor": 4.0}}


def accepts(kind: str, pos: str) -> bool:
    cls = POSITIONS[positions_kind(POSITION_CFGS[pos])]
    return cls.mechanism in ATTENTION[kind][0].positions_accepted


def changes_attention(kind: str, pos: str) -> bool:
    """Whether ``pos`` changes what ``kind`` computes: a rotation or a bias, or ``none`` for a
    kind that rotates by default. ``learned`` acts at the model's input and ``none`` leaves
    the other kinds as tests/test_attention.py already checks them; the model-level tests
    below cover ``learned``."""
    mechanism = POSITIONS[positions_kind(POSITION_CFGS[pos])].mechanism
    rotates = "rotary" in ATTENTION[kind][0].positions_accepted
    return mechanism in ("rotary", "bias") or (mechanism == "none" and rotates)


SELF = [
    (k, r, p)
    for k, (cls, _) in ATTENTION.items()
    for r in cls.roles
    if r != "cross"  # cross-attention keeps no positions
    for p in POSITION_CFGS
    if accepts(k, p) and changes_attention(k, p)
]
DECODING = [(k, r, p) for k, r, p in SELF if r == "causal"]


def make(kind: str, role: str, pos: str) -> nn.Module:
    """A tiny ``kind`` using positions ``pos``, weights (the T5 table included) far from 0."""
    names = {f.name for f in dataclasses.fields(ATTENTION[kind][0].Config)}
    cfg = {"kind": kind, **{n: SMALL for n in ("window", "chunk_size") if n in names}}
    torch.manual_seed(0)
    attn = build_attention(cfg, DIM, HEADS, role)
    module = build_positions(POSITION_CFGS[pos], DIM, HEADS, MAX_LEN, role == "causal")
    attn.use_positions(module)
    attn.owned_positions = module  # registered here, so the tests see its parameters
    with torch.no_grad():
        for p in attn.parameters():
            p.normal_(0.0, 0.3)
    return attn


def inputs(b: int, t: int, pads: tuple[int, ...] = ()) -> dict:
    torch.manual_seed(1)
    mask = torch.ones(b, t, dtype=torch.bool)
    for row, n in enumerate(pads):
        mask[row, :n] = False
    return {
        "x": torch.randn(b, t, DIM),
        "positions": positions_from_mask(mask, b, t, torch.device("cpu")),
        "mask": mask if pads else None,
    }


def rel_err(a: Tensor, b: Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp_min(1e-12)).item()


@pytest.mark.parametrize("padded", [False, True], ids=["nopad", "leftpad"])
@pytest.mark.parametrize("t", [5, 21])
@pytest.mark.parametrize("kind, role, pos", SELF)
def test_matches_reference(kind: str, role: str, pos: str, t: int, padded: bool) -> None:
    """Fast path (SDPA float mask, banded blocks) = slow twin, outputs and gradients (inputs,
    attention weights and the positions' own table)."""
    attn = make(kind, role, pos)
    inp = inputs(2, t, pads=(0, 3) if padded else ())
    inp["x"].requires_grad_(True)
    weight = torch.randn(2, t, DIM)
    params = list(attn.parameters())
    results = []
    for fn in (attn, functools.partial(REFERENCES[type(attn)], attn)):
        y = fn(**inp)
        grads = torch.autograd.grad((y * weight).sum(), [inp["x"], *params], allow_unused=True)
        results.append((y, grads))  # unused: the learned table (the model adds it, not attention)
    (y, grads), (y_ref, grads_ref) = results
    assert rel_err(y, y_ref) <= 1e-4
    for g, g_ref in zip(grads, grads_ref, strict=True):
        assert (g is None) == (g_ref is None)
        assert g is None or rel_err(g, g_ref) <= 1e-4


@pytest.mark.parametrize("fixed", [False, True], ids=["eager", "fixed_shape"])
@pytest.mark.parametrize("pieces", [(12,), (5, 12)], ids=["prefill", "chunked_prefill"])
@pytest.mark.parametrize("kind, role, pos", DECODING)
def test_prefill_then_decode_equals_full_forward(
    kind: str, role: str, pos: str, pieces: tuple, fixed: bool
) -> None:
    """Prefill (past local's window; or in 2 pieces), then one token at a time, left-padded
    rows included: a decode step adds the bias (or rotation) the full forward does, reading
    the cache eagerly or with fixed shapes."""
    attn, t = make(kind, role, pos).eval(), 21
    inp = inputs(3, t, pads=(0, 3, 6))
    x, positions, mask = inp["x"], inp["positions"], inp["mask"]
    cache = attn.init_cache(3, t, "cpu", torch.float32)
    with torch.no_grad(), fixed_shape_decoding() if fixed else contextlib.nullcontext():
        full = attn(x, positions=positions, mask=mask)
        bounds = [0, *pieces, *range(pieces[-1] + 1, t + 1)]
        outs = []
        for lo, hi in zip(bounds[:-1], bounds[1:], strict=True):
            part = mask[:, lo:hi] if lo < max(pieces) else None  # decode steps: all real
            outs.append(attn(x[:, lo:hi], positions=positions[:, lo:hi], cache=cache, mask=part))
    torch.testing.assert_close(torch.cat(outs, 1), full, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("pos", ["alibi", "t5"])
def test_bias_depends_on_distance_only(pos: str) -> None:
    """Shifting every position by the same amount changes nothing (relative positions)."""
    attn = make("mha", "causal", pos).eval()
    inp = inputs(2, 13)
    with torch.no_grad():
        y = attn(**inp)
        y_shifted = attn(**{**inp, "positions": inp["positions"] + 50})
    torch.testing.assert_close(y_shifted, y, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("pos", ["alibi", "t5"])
def test_one_bias_for_rows_alike_equals_one_per_row(pos: str) -> None:
    """Unpadded batches (positions an expanded arange) build one (1, H, T, T) bias."""
    attn = make("mha", "causal", pos).eval()
    inp = {**inputs(3, 13), "positions": positions_from_mask(None, 3, 13, torch.device("cpu"))}
    assert inp["positions"].stride(0) == 0
    with torch.no_grad():
        y = attn(**inp)
        y_rows = attn(**{**inp, "positions": inp["positions"].contiguous()})
    torch.testing.assert_close(y, y_rows, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("kind", ["mha", "local"])
@pytest.mark.parametrize("pos", list(POSITION_CFGS))
def test_attention_weights_include_the_positions(kind: str, pos: str) -> None:
    """``attention_weights`` (attention maps) @ values = the output before ``o_proj``."""
    attn = make(kind, "causal", pos).eval()
    inp = inputs(1, 13)
    with torch.no_grad():
        weights = attn.attention_weights(inp["x"], positions=inp["positions"])  # (1, H, T, T)
        v = attn.v_proj(inp["x"]).view(1, 13, HEADS, -1).transpose(1, 2)  # (1, H, T, D)
        y = (weights @ v).transpose(1, 2).reshape(1, 13, DIM)
        torch.testing.assert_close(attn.o_proj(y), attn(**inp), rtol=1e-4, atol=1e-5)


def test_alibi_slopes_are_the_papers() -> None:
    """8 heads: 2^-1 ... 2^-8. 6 heads (not a power of two): the 4-head slopes, then every
    other 8-head slope (Press et al.'s get_slopes)."""
    assert alibi_slopes(8) == [2.0**-i for i in range(1, 9)]
    assert alibi_slopes(6) == [2.0**-2, 2.0**-4, 2.0**-6, 2.0**-8, 2.0**-1, 2.0**-3]
    module = build_positions("alibi", 64, 8, MAX_LEN, True)
    bias = module.bias(torch.arange(4)[None], torch.arange(4)[None])  # (1, 8, 4, 4)
    assert bias[0, 0, 3, 0] == -0.5 * 3 and bias[0, 7, 2, 1] == -(2.0**-8)


def test_t5_buckets_match_a_hand_computed_table() -> None:
    """8 buckets, max_distance 16. Causal: distances 0-3 exact, then 4 + floor(4 log4(d / 4))
    up to bucket 7; keys ahead share bucket 0. Bidirectional: 4 buckets a side (keys ahead
    +4), distances 0-1 exact, then 2 + floor(2 log8(d / 2)) up to 3."""
    behind = torch.tensor([0, 1, 2, 3, 4, 5, 6, 8, 11, 12, 16, 100])
    causal = relative_bucket(-behind, False, 8, 16)
    assert causal.tolist() == [0, 1, 2, 3, 4, 4, 5, 6, 6, 7, 7, 7]
    assert relative_bucket(torch.tensor([1, 5]), False, 8, 16).tolist() == [0, 0]
    both = relative_bucket(-behind, True, 8, 16)
    assert both.tolist() == [0, 1, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3]
    ahead = relative_bucket(behind[1:], True, 8, 16)
    assert ahead.tolist() == [5, 6, 6, 6, 6, 7, 7, 7, 7, 7, 7]


def test_learned_table_refuses_a_longer_input() -> None:
    module = build_positions("learned", DIM, HEADS, MAX_LEN, True)
    x = torch.zeros(1, MAX_LEN + 1, DIM)
    with pytest.raises(ValueError, match=f"{MAX_LEN + 1} tokens.*max_len={MAX_LEN}"):
        module.embed(x, torch.arange(MAX_LEN + 1)[None])
    assert module.embed(x[:, :MAX_LEN], torch.arange(MAX_LEN)[None]).shape == (1, MAX_LEN, DIM)


def test_an_impossible_pair_names_the_positions_that_work() -> None:
    attn = build_attention("linear", DIM, HEADS, "causal")
    with pytest.raises(ValueError, match="'alibi'.*'linear'.*: learned, none$"):
        attn.use_positions(build_positions("alibi", DIM, HEADS, MAX_LEN, True))


def test_unknown_positions_and_knobs_name_what_is_valid() -> None:
    with pytest.raises(ValueError, match="'nope'; valid: rope, alibi, t5, learned, none"):
        build_positions("nope", DIM, HEADS, MAX_LEN, True)
    with pytest.raises(ValueError, match=r"no option\(s\) \['window'\].*'n_buckets'"):
        build_positions({"kind": "t5", "window": 3}, DIM, HEADS, MAX_LEN, True)
    with pytest.raises(ValueError, match="ntk_factor=0.5: must be >= 1"):
        build_positions({"kind": "rope", "ntk_factor": 0.5}, DIM, HEADS, MAX_LEN, True)


# ---- model level --------------------------------------------------------------------------

VOCAB = 300
PROMPTS = [[5, 9, 40, 7, 100, 23, 11, 60, 61, 62, 63, 64, 65], [17, 18, 200], [30, 31, 32, 33, 34]]
SOURCES = [[40, 41, 42, 43, 44, 45, 46], [50, 51, 52], [60, 61, 62, 63, 64]]
# (arch, self-attention kind): mha and local decoders (local's window of 8 is shorter than
# the prompts), an encoder-decoder (bidirectional encoder, cross-attention without positions)
MODELS = [("decoder", "mha"), ("decoder", "local"), ("encoder_decoder", "mha")]
MODEL_CASES = [(a, k, p) for a, k in MODELS for p in POSITION_CFGS]


def tiny_model(arch: str, kind: str, pos: str | None, max_len: int = 64) -> nn.Module:
    torch.manual_seed(0)
    attn = {"kind": kind, **({"window": SMALL} if kind == "local" else {})}
    cfg = {"arch": arch, "vocab_size": VOCAB, "dim": DIM, "n_layers": 2, "n_heads": HEADS}
    cfg |= {"max_len": max_len, "attn": attn, "tie_embeddings": False, "init_std": 0.3}
    cfg |= {"positions": None if pos is None else POSITION_CFGS[pos]}
    if arch == "encoder_decoder":
        cfg |= {"encoder_attn": attn, "init_std": 0.2}
    return build_model(cfg).eval()


def batch(arch: str) -> tuple[Tensor, dict]:
    """Left-padded decoder prompts and, for an encoder-decoder, right-padded sources."""
    ids, mask = left_pad(PROMPTS, 0, "cpu")
    if arch == "decoder":
        return ids, {"mask": mask}
    src, src_mask = pad_right(SOURCES, 0, "cpu")
    return ids, {"mask": mask, "src_ids": src, "src_mask": src_mask}


@torch.no_grad()
def full_logits(model: nn.Module, tokens: list[int], source: list[int] | None) -> Tensor:
    """Logits (T, V) of one unpadded row by the plain forward: the slow twin."""
    ids = torch.tensor([tokens])
    return (model(ids) if source is None else model(torch.tensor([source]), ids))[0]


@pytest.mark.parametrize("fixed", [False, True], ids=["eager", "fixed_shape"])
@pytest.mark.parametrize("arch, kind, pos", MODEL_CASES)
def test_model_start_and_steps_equal_full_forward(arch: str, kind: str, pos: str, fixed: bool):
    """A left-padded batch prefilled, then one- and two-token steps: each row's logits are its
    unpadded full forward's (positions start at each row's first real token)."""
    model = tiny_model(arch, kind, pos)
    ids, inputs = batch(arch)
    feed = torch.randint(4, VOCAB, (3, 5), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode(), fixed_shape_decoding() if fixed else contextlib.nullcontext():
        first, state = model.start(ids, max_new_tokens=5, **inputs)
        steps = [model.step(feed[:, i : i + 1], state) for i in range(3)]
        steps.append(model.step(feed[:, 3:], state))  # two tokens at once
        got = torch.cat((first[:, None], *steps), dim=1)  # (3, 6, V)
    for r, prompt in enumerate(PROMPTS):
        source = None if arch == "decoder" else SOURCES[r]
        full = full_logits(model, prompt + feed[r].tolist(), source)
        torch.testing.assert_close(got[r], full[-6:], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("arch, kind, pos", MODEL_CASES)
def test_model_trains_and_generates(arch: str, kind: str, pos: str) -> None:
    """A few AdamW steps lower the loss (the positions' table learns too); then greedy and
    beam generation with the cache equal the uncached slow twin."""
    model = tiny_model(arch, kind, pos).train()
    ids, inputs = batch(arch)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    table = next((p for n, p in model.named_parameters() if "pos_encoding" in n), None)
    before = None if table is None else table.detach().clone()
    losses = []
    for _ in range(8):
        if arch == "decoder":
            logits = model(ids, mask=inputs["mask"])
        else:
            logits = model(inputs["src_ids"], ids, **without(inputs, "src_ids"))
        targets = ids[:, 1:].masked_fill(~inputs["mask"][:, 1:], -100)  # no loss on pads
        loss = nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), targets.flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0]
    if table is not None:
        assert not torch.equal(table, before)
    model.eval()
    sources = None if arch == "decoder" else SOURCES
    for options in ({"temperature": 0}, {"num_beams": 3}):
        cfg = GenerationConfig(max_new_tokens=6, **options)
        cached = generate_scored(model, PROMPTS, cfg, sources=sources)
        slow = generate_scored(
            model, PROMPTS, dataclasses.replace(cfg, use_cache=False), sources=sources
        )
        assert cached[0] == slow[0] and all(len(row) == 6 for row in cached[0])


def without(d: dict, key: str) -> dict:
    return {k: v for k, v in d.items() if k != key}


@pytest.mark.parametrize("pos", ["alibi", "t5"])
def test_compiled_decode_with_a_bias_compiles_once_and_equals_eager(pos: str, monkeypatch):
    """The bias of a decode step (key positions from the cache's slots) traces into one graph."""
    model = tiny_model("decoder", "mha", pos, max_len=128)
    torch._dynamo.reset()
    counter = CompileCounter()
    monkeypatch.setitem(COMPILE_OPTIONS, "cpu", {"backend": counter})
    cfg = GenerationConfig(max_new_tokens=40, temperature=0)
    eager = generate_scored(model, PROMPTS, cfg)
    assert generate_scored(model, PROMPTS, dataclasses.replace(cfg, compile=True)) == eager
    assert counter.frame_count == 1


def test_t5_table_is_one_per_stack_and_saved_once() -> None:
    """Every layer of a stack reads the same table; the state dict holds it once per stack
    (the encoder's bidirectional, the decoder's causal)."""
    model = tiny_model("encoder_decoder", "mha", "t5")
    tables = [k for k in model.state_dict() if "table" in k]
    assert tables == ["encoder_pos_encoding.table.weight", "pos_encoding.table.weight"]
    assert all(b.attn.pos_encoding is model.pos_encoding for b in model.decoder)
    assert all(b.attn.pos_encoding is model.encoder_pos_encoding for b in model.encoder)
    assert not model.encoder_pos_encoding.causal and model.pos_encoding.causal
    assert model.decoder[0].cross_attn.pos_encoding is not model.pos_encoding  # cross: none
    decoder = tiny_model("decoder", "mha", "t5")
    assert [k for k in decoder.state_dict() if "table" in k] == ["pos_encoding.table.weight"]


def test_null_positions_keep_each_kinds_default() -> None:
    """model.positions null: mha keeps RoPE (base 10000), linear none; explicit rope equals it."""
    default, explicit = tiny_model("decoder", "mha", None), tiny_model("decoder", "mha", "rope")
    assert isinstance(default.blocks[0].attn.pos_encoding, RotaryPositions)
    ids = torch.tensor([PROMPTS[0]])
    with torch.no_grad():
        torch.testing.assert_close(default(ids), explicit(ids), rtol=0, atol=0)
    linear = build_model({"vocab_size": VOCAB, "dim": DIM, "n_heads": HEADS, "attn": "linear"})
    assert isinstance(linear.blocks[0].attn.pos_encoding, NoPositions)


def test_impossible_pair_fails_at_build_naming_what_works() -> None:
    cfg = {"vocab_size": VOCAB, "dim": DIM, "n_heads": HEADS, "positions": "alibi"}
    with pytest.raises(ValueError, match="'alibi'.*'linear'; positions that work with it: "):
        ModelConfig.from_dict({**cfg, "attn": {"kind": "linear"}})
    ModelConfig.from_dict({**cfg, "attn": {"kind": "linear"}, "positions": "learned"})
    with pytest.raises(ValueError, match="model.positions.*vit"):
        ModelConfig.from_dict({"arch": "vit", "dim": DIM, "n_heads": HEADS, "positions": "t5"})


def test_old_configs_with_rope_base_still_load() -> None:
    """Checkpoints from before model.positions kept RoPE's base in the attention config."""
    old = {"vocab_size": VOCAB, "dim": DIM, "n_heads": HEADS}
    cfg = ModelConfig.from_dict({**old, "attn": {"kind": "gqa", "rope_base": 500.0}})
    assert cfg.attn == {"kind": "gqa"} and cfg.positions == {"kind": "rope", "base": 500.0}
    cfg = ModelConfig.from_dict({**old, "attn": {"kind": "mha", "rope_base": 10000.0}})
    assert cfg.attn == {"kind": "mha"} and cfg.positions is None
    cross = {"kind": "mha", "rope_base": 123.0}  # cross-attention never rotated: dropped
    cfg = ModelConfig.from_dict({**old, "arch": "encoder_decoder", "cross_attn": cross})
    assert cfg.cross_attn == {"kind": "mha"} and cfg.positions is None
    with pytest.raises(ValueError, match=r"rope_base=\[500.0\].*model.positions='alibi'"):
        ModelConfig.from_dict(
            {**old, "attn": {"kind": "mha", "rope_base": 500.0}, "positions": "alibi"}
        )
    torch.manual_seed(0)
    a = build_model({**old, "attn": {"kind": "mha", "rope_base": 500.0}}).eval()
    torch.manual_seed(0)
    b = build_model({**old, "attn": "mha", "positions": {"kind": "rope", "base": 500.0}}).eval()
    ids = torch.tensor([PROMPTS[0]])
    with torch.no_grad():
        torch.testing.assert_close(a(ids), b(ids), rtol=0, atol=0)


def test_learned_positions_bound_inputs_and_generation() -> None:
    """A longer input than the table is an error naming both lengths; generation stops at
    max_len even with local's rolling cache (which alone would decode past it)."""
    model = tiny_model("decoder", "local", "learned", max_len=16)
    with pytest.raises(ValueError, match="17 tokens.*max_len=16"):
        model(torch.randint(4, VOCAB, (1, 17)))
    assert model.start(torch.tensor([[5]]), max_new_tokens=1)[1].capacity == 16
    assert (
        tiny_model("decoder", "local", "alibi", 16).start(torch.tensor([[5]]))[1].capacity is None
    )


@pytest.mark.parametrize(
    ("positions", "named"),
    [("alibi", "model.positions='alibi'"), ({"kind": "rope", "ntk_factor": 2.0}, "ntk_factor")],
)
def test_hf_export_takes_plain_rope_only(positions: object, named: str) -> None:
    cfg = {"vocab_size": VOCAB, "dim": DIM, "n_heads": HEADS, "positions": positions}
    with pytest.raises(ValueError, match="format=minillm") as err:
        check_exportable(ModelConfig.from_dict(cfg))
    assert named in str(err.value)
    check_exportable(ModelConfig.from_dict({**cfg, "positions": {"kind": "rope", "base": 5e5}}))


def test_train_py_with_alibi_and_an_unknown_kind(tmp_path) -> None:
    """The real entry point: model.positions=alibi trains and saves a checkpoint that loads
    with its positions; model.positions=nope is one line naming the valid kinds, exit 2."""
    common = ["experiment=debug", "trainer.max_steps=2", "trainer.enable_progress_bar=false"]
    proc = train_py(tmp_path / "run", "model.positions=alibi", *common)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    model, _ = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.ckpt")
    assert model.cfg.positions == "alibi"
    assert isinstance(model.blocks[0].attn.pos_encoding, ALiBiPositions)
    (tmp_path / "bad").mkdir()
    proc = train_py(tmp_path / "bad", "model.positions=nope", *common, cwd=tmp_path / "bad")
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.count("\n") == 1 and "rope, alibi, t5, learned, none" in proc.stderr


def train_py(run_dir: Path, *overrides: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(ROOT / "train.py"), *overrides, f"hydra.run.dir={run_dir}"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize("kind", ["mha", "local"])
@pytest.mark.parametrize("pos", ["alibi", "t5"])
def test_speculative_greedy_with_a_bias_equals_greedy(kind: str, pos: str) -> None:
    """Rolled-back caches (a KV cache, a rolling window) keep the key positions a bias reads:
    a draft with other positions (and its deep copy, which keeps one shared table) changes
    nothing."""
    target = tiny_model("decoder", kind, pos)
    copied = copy.deepcopy(target)
    assert copied.blocks[1].attn.pos_encoding is copied.pos_encoding is not target.pos_encoding
    draft = tiny_model("decoder", kind, "rope")
    greedy = generate_ids(target, PROMPTS, temperature=0, max_new_tokens=20)
    for k in (1, 3):
        spec = generate_ids(
            target, PROMPTS, temperature=0, max_new_tokens=20, draft_model=draft, draft_k=k
        )
        assert spec == greedy
    assert (
        generate_ids(target, PROMPTS, temperature=0, max_new_tokens=20, draft_model=copied)
        == greedy
    )
