"""Transformer-XL segment recurrence (``model.memory_len``).

Model: the segment-wise forward with memory equals its slow twin, the same weights applied to
the whole concatenation under a banded causal mask; no gradient reaches the memory; rows
with an empty memory equal a plain forward (every causal kind). Data: streams of
consecutive segments, in order, each validation block once. Training: ``memory_len`` trains
through the composed config, wrong combinations are one clear line. Evaluation: ``mode=memory``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import compose, tiny_overrides
from tokenizers import Tokenizer, models, pre_tokenizers
from torch import Tensor

import minillm.cli.evaluate as cli
from minillm.attention import ATTENTION
from minillm.cli.app import compose as compose_command
from minillm.data import SPECIAL_TOKENS, LMDataModule
from minillm.data.sampler import SegmentBatchSampler
from minillm.evaluation import perplexity
from minillm.models import ModelConfig, build_model
from minillm.models.decoder import DecoderLM
from minillm.training.run import train

DIM, HEADS, VOCAB = 32, 4, 64


def xl_model(memory_len: int, positions=None, attn="mha", seed: int = 0) -> DecoderLM:
    torch.manual_seed(seed)
    cfg = ModelConfig(
        vocab_size=VOCAB,
        dim=DIM,
        n_layers=2,
        n_heads=HEADS,
        max_len=64,
        attn={"kind": attn},
        positions=positions,
        memory_len=memory_len,
    )
    return build_model(cfg).eval()


def banded_hidden(model: DecoderLM, ids: Tensor, t: int, m: int) -> Tensor:
    """Slow twin: the concatenation (B, N) of segments of ``t`` tokens through the same
    weights (mha written out), a query of the segment starting at j*t seeing the keys from
    j*t - m up to itself, at positions 0 .. N-1."""
    b, n = ids.shape
    pos = torch.arange(n)
    start = pos // t * t  # (N,) first position of each token's segment
    allowed = (pos[None, :] <= pos[:, None]) & (pos[None, :] >= start[:, None] - m)  # (N, N)
    positions = pos.expand(b, n)
    x = model.tok_emb(ids)  # (B, N, dim)
    for block in model.blocks:
        attn, h = block.attn, block.attn_norm(x)
        q, k, v = (
            p(h).view(b, n, HEADS, -1).transpose(1, 2)
            for p in (attn.q_proj, attn.k_proj, attn.v_proj)
        )
        q, k = attn.pos_encoding.rotate(q, k, positions)  # (B, H, N, D)
        scores = q @ k.transpose(-1, -2) * attn.head_dim**-0.5  # (B, H, N, N)
        bias = attn.pos_encoding.bias(positions, positions)
        if bias is not None:
            scores = scores + bias
        y = scores.masked_fill(~allowed, float("-inf")).softmax(-1) @ v  # (B, H, N, D)
        x = x + attn.o_proj(y.transpose(1, 2).reshape(b, n, DIM))
        x = x + block.mlp(block.mlp_norm(x))
    return model.norm(x)


def segment_wise(model: DecoderLM, ids: Tensor, t: int) -> Tensor:
    memory, out = None, []
    for a in range(0, ids.shape[1], t):
        h, memory = model.hidden_states_with_memory(ids[:, a : a + t], memory)
        out.append(h)
    return torch.cat(out, dim=1)


@pytest.mark.parametrize("positions", [None, "alibi", "t5"])  # None: mha's RoPE
@pytest.mark.parametrize("t,m", [(8, 8), (8, 3), (8, 13)])
def test_segment_wise_with_memory_equals_the_banded_concatenation(positions, t: int, m: int):
    model = xl_model(m, positions)
    ids = torch.randint(0, VOCAB, (2, 3 * t))
    with torch.no_grad():
        fast, slow = segment_wise(model, ids, t), banded_hidden(model, ids, t, m)
    torch.testing.assert_close(fast, slow, rtol=1e-4, atol=1e-5)
    # the memory matters: without it the later segments differ
    plain = torch.cat([model.hidden_states(ids[:, a : a + t]) for a in range(0, 3 * t, t)], 1)
    assert (plain[:, t:] - slow[:, t:]).abs().max() > 1e-3


def test_no_gradient_flows_into_the_memory():
    model = xl_model(8).train()
    first, second = torch.arange(0, 8)[None], torch.arange(8, 16)[None]  # disjoint tokens
    _, memory = model.hidden_states_with_memory(first)
    assert not any(s.requires_grad for s in memory.states)
    h, _ = model.hidden_states_with_memory(second, memory)
    h.sum().backward()
    grad = model.tok_emb.weight.grad  # the tied head reads every row: compare to a plain run
    model.zero_grad()
    model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone())  # untie
    h, _ = model.hidden_states_with_memory(second, memory)
    h.sum().backward()
    emb = model.tok_emb.weight.grad
    assert emb[:8].abs().max() == 0, "segment 1's tokens got a gradient through the memory"
    assert emb[8:16].abs().max() > 0 and grad is not None


@pytest.mark.parametrize("kind", [k for k, (cls, _) in ATTENTION.items() if "causal" in cls.roles])
def test_rows_with_an_empty_memory_equal_a_forward_without_memory(kind: str):
    model = xl_model(6, attn=kind)
    ids = torch.randint(0, VOCAB, (3, 10))
    with torch.no_grad():
        _, memory = model.hidden_states_with_memory(torch.randint(0, VOCAB, (3, 10)))
        memory = memory.clear(torch.tensor([True, False, True]))
        h, _ = model.hidden_states_with_memory(ids, memory)
        plain = model.hidden_states(ids)
    torch.testing.assert_close(h[[0, 2]], plain[[0, 2]], rtol=1e-4, atol=1e-5)
    assert (h[1] - plain[1]).abs().max() > 1e-4  # the row with memory uses it


@pytest.mark.slow
def test_compiled_memory_path_equals_eager():
    """``compile=true`` compiles ``hidden_states_with_memory`` (LMModule): same numbers."""
    model = xl_model(8, "alibi")
    compiled = torch.compile(model.hidden_states_with_memory)
    ids = torch.randint(0, VOCAB, (2, 3, 16))
    memory = eager = model.init_memory(2)
    for j, rows in enumerate(([True, True], [False, True], [False, False])):
        h, memory = compiled(ids[:, j], memory.clear(torch.tensor(rows)))
        e, eager = model.hidden_states_with_memory(ids[:, j], eager.clear(torch.tensor(rows)))
        torch.testing.assert_close(h, e, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(memory.mask, eager.mask)


def test_memory_is_the_last_m_states_and_fills_from_the_right():
    model = xl_model(12)
    _, memory = model.hidden_states_with_memory(torch.randint(0, VOCAB, (2, 8)))
    assert memory.mask.tolist() == [[False] * 4 + [True] * 8] * 2
    _, memory = model.hidden_states_with_memory(torch.randint(0, VOCAB, (2, 8)), memory)
    assert memory.mask.all() and memory.states[0].shape == (2, 12, DIM)


@pytest.mark.parametrize(
    "changes,match",
    [
        ({"memory_len": -1}, r"model.memory_len=-1"),
        (
            {"memory_len": 8, "positions": "learned"},
            r"memory_len=8 cannot use .*rope, alibi, t5 or none",
        ),
        ({"memory_len": 8, "arch": "encoder_decoder"}, r"memory_len=8 needs model.arch=decoder"),
    ],
)
def test_wrong_combinations_are_one_clear_line(changes: dict, match: str):
    with pytest.raises(ValueError, match=match) as err:
        ModelConfig(vocab_size=VOCAB, dim=DIM, n_heads=HEADS, **changes)
    assert "\n" not in str(err.value)


def test_segment_sampler_continues_each_stream_and_resumes_exactly():
    sampler = SegmentBatchSampler(20, 2, world_size=2, rank=1, num_batches=12)
    batches = list(sampler.batches(0, 12))
    assert batches[0] == [10, 15] and batches[1] == [11, 16] and batches[5] == [10, 15]
    assert list(sampler.batches(7, 9)) == batches[7:9]
    assert [sampler.segment_of(i) for i in batches[6]] == [1, 1]


def lm_data(corpus: Path, batch_size: int = 3) -> LMDataModule:
    cfg = compose(tiny_overrides(corpus))["data"]
    data = LMDataModule(cfg, max_len=16, batch_size=batch_size, segments=True)
    data.setup()
    return data


def test_training_batches_are_consecutive_segments_of_streams(corpus_file: Path):
    data = lm_data(corpus_file)
    stream = np.concatenate([b[:-1] for b in data.train_blocks])  # the blocks' inputs in order
    length = len(data.train_blocks) // 3
    data.total_steps = length + 2  # runs past the end of the streams: they start again
    batches = list(data.train_dataloader())
    assert len(batches) == length + 2
    for g, batch in enumerate(batches):
        assert batch["segment"].tolist() == [g % length] * 3
        for row in range(3):
            at = (row * length + g % length) * 16
            assert batch["input_ids"][row].tolist() == stream[at : at + 16].tolist()


def test_validation_streams_score_every_block_once(corpus_file: Path):
    data = lm_data(corpus_file)
    data.eval_batch_size = 4
    batches = list(data.val_dataloader())
    labels = torch.cat([b["labels"].flatten() for b in batches])
    scored = labels[labels != -100]
    assert sorted(scored.tolist()) == sorted(data.valid_blocks[:, 1:].ravel().tolist())
    assert [b["segment"].tolist() for b in batches[:2]] == [[0] * 4, [1] * 4]


@pytest.fixture(scope="module")
def xl_run(corpus_file: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    overrides = tiny_overrides(corpus_file, "model.memory_len=16", "model.positions=alibi")
    return train(compose(overrides), tmp_path_factory.mktemp("xl"))


def test_train_with_memory_len_trains_and_the_checkpoint_keeps_the_memory(xl_run: dict):
    summary = xl_run
    assert summary["global_step"] == 4 and np.isfinite(summary["val_ppl"])
    ckpt = torch.load(summary["last_ckpt"], weights_only=True)
    memory = ckpt["xl_memory"]
    assert memory["mask"].shape == (4, 16) and memory["mask"].all()
    assert len(memory["states"]) == ckpt["hyper_parameters"]["model"]["n_layers"]


def test_train_refuses_memory_with_learned_positions_in_one_line(corpus_file: Path, tmp_path):
    overrides = tiny_overrides(corpus_file, "model.memory_len=16", "model.positions=learned")
    with pytest.raises(ValueError, match="cannot use model.positions=learned") as err:
        train(compose(overrides), tmp_path)
    assert "\n" not in str(err.value)


DOCS = ["the quick brown fox jumps over the lazy dog " * 3, "hello world", "a b c d e f g h"]


@pytest.fixture(scope="module")
def char_tokenizer() -> Tokenizer:
    chars = sorted(set("".join(DOCS)))
    vocab = {tok: i for i, tok in enumerate([*SPECIAL_TOKENS, *chars])}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    return tokenizer


def char_model(tokenizer: Tokenizer) -> DecoderLM:
    torch.manual_seed(0)
    cfg = ModelConfig(
        vocab_size=tokenizer.get_vocab_size(),
        dim=DIM,
        n_layers=2,
        n_heads=HEADS,
        max_len=256,
        init_std=0.3,  # far from uniform: the memory shows
    )
    cfg.memory_len, cfg.positions = 12, "t5"
    return build_model(ModelConfig(**cfg.to_dict())).eval()


def test_memory_mode_equals_window_mode_when_a_document_fits_one_segment(char_tokenizer):
    model = char_model(char_tokenizer)
    windowed = perplexity(model, char_tokenizer, DOCS, mode="window", window=256, batch_size=2)
    memory = perplexity(model, char_tokenizer, DOCS, mode="memory", window=256, batch_size=2)
    assert memory.tokens == windowed.tokens
    assert memory.nll == pytest.approx(windowed.nll, rel=1e-5)


def test_memory_mode_on_long_documents_is_finite_differs_and_ignores_batching(char_tokenizer):
    model = char_model(char_tokenizer)
    windowed = perplexity(model, char_tokenizer, DOCS, mode="window", window=8, stride=8)
    memory = perplexity(model, char_tokenizer, DOCS, mode="memory", window=8, batch_size=3)
    one_by_one = perplexity(model, char_tokenizer, DOCS, mode="memory", window=8, batch_size=1)
    assert np.isfinite(memory.nll) and memory.tokens == windowed.tokens
    assert abs(memory.nll - windowed.nll) > 1e-3 * windowed.nll  # the memory is used
    assert memory.nll == pytest.approx(one_by_one.nll, rel=1e-5)  # right padding never leaks


def test_memory_mode_needs_a_model_with_memory(char_tokenizer):
    model = char_model(char_tokenizer)
    model.cfg.memory_len = 0
    with pytest.raises(ValueError, match="mode=memory needs a model trained with model.memory_len"):
        perplexity(model, char_tokenizer, DOCS, mode="memory")


def test_evaluate_command_mode_memory_scores_the_xl_checkpoint(xl_run: dict, tmp_path: Path):
    out = tmp_path / "result.json"
    argv = [f"ckpt={xl_run['last_ckpt']}", f"out={out}", "device=cpu", "mode=memory"]
    window = cli.evaluate(cli.validate(compose_command("evaluate", argv[:3])))
    memory = cli.evaluate(cli.validate(compose_command("evaluate", argv)))
    assert memory["mode"] == "memory" and memory["tokens"] == window["tokens"]
    assert np.isfinite(memory["ppl"]) and memory["ppl"] != window["ppl"]
