"""Attention maps: every kind's ``attention_weights`` is the mixing its forward really does,
softmax kinds give causal distributions, and the attention_map command writes the PNG."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from minillm.attention import ATTENTION, build_attention
from minillm.attention.gated_linear import GatedLinearAttention
from minillm.attention.local import LocalAttention
from minillm.attention.mha import MultiHeadAttention
from minillm.checkpoint import save_pretrained
from minillm.cli import attention_map
from minillm.cli.app import compose
from minillm.data.tokenizer import build_tokenizer
from minillm.models import build_model

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
