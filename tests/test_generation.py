"""Generation: cached decoding = the full-forward twin for every registered kind, left-padded
batches = one-by-one, cache sizes, sampling filters, stop conditions, context limits, CLI."""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from minillm.attention import (
    ATTENTION,
    KVCache,
    RecurrentState,
    RollingKVCache,
    attention_config,
)
from minillm.generation import (
    GenerationConfig,
    SamplingConfig,
    TextStream,
    complete,
    context_limit,
    decode_steps,
    generate,
    generate_ids,
    left_pad,
    sample,
    top_k_filter,
    top_p_filter,
)
from minillm.generation.sampling import apply_repetition_penalty, mark_seen
from minillm.models import build_model

ROOT = Path(__file__).resolve().parents[1]
KINDS = sorted(ATTENTION)
WINDOW = 8  # small window for kinds that have one, so prompts run past it
VOCAB = 300
TEXTS = [
    "The Congress shall make no law respecting an establishment of religion.",
    "We the People of the United States, in Order to form a more perfect Union,",
    "héllo wörld, 日本語のテキスト, ünïcödé — and more text to learn merges from.",
]


def attn_cfg(kind: str) -> dict:
    """{"kind": kind} plus a small window for kinds whose Config has one."""
    _, config = attention_config(kind)
    has_window = "window" in {f.name for f in dataclasses.fields(config)}
    return {"kind": kind, **({"window": WINDOW} if has_window else {})}


def tiny_model(kind: str = "mha", max_len: int = 64, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)  # untied, wide init: greedy output varies with the context
    cfg = dict(vocab_size=VOCAB, dim=32, n_layers=2, n_heads=4, max_len=max_len)
    return build_model({**cfg, "attn": attn_cfg(kind), "tie_embeddings": False, "init_std": 0.3})


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB,
        special_tokens=["<pad>", "<bos>", "<eos>", "<unk>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(TEXTS, trainer=trainer)
    return tok


def steps(model, prompts, **options) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy tokens (B, N) and raw step logits (B, N, V) of a left-padded batch."""
    ids, mask = left_pad(prompts, 0, "cpu")
    cfg = GenerationConfig(temperature=0, **options)
    with torch.inference_mode():
        out = list(decode_steps(model.eval(), ids, mask, cfg))
    return torch.stack([t for _, t in out], 1), torch.stack([lg for lg, _ in out], 1)


PROMPTS = [[5, 9, 40, 7, 100, 23, 11, 60, 61, 62, 63, 64, 65], [17, 18, 200], [30, 31, 32, 33, 34]]


@pytest.mark.parametrize("kind", KINDS)
def test_cached_decoding_equals_full_forward(kind: str) -> None:
    model = tiny_model(kind)
    prompt = PROMPTS[:1]  # 13 tokens: longer than WINDOW
    cached, cached_logits = steps(model, prompt, max_new_tokens=20)
    full, full_logits = steps(model, prompt, max_new_tokens=20, use_cache=False)
    assert cached.tolist() == full.tolist()
    torch.testing.assert_close(cached_logits, full_logits, atol=1e-5, rtol=1e-5)
    assert len(set(cached[0].tolist())) > 3  # a real test: the output varies


@pytest.mark.parametrize("kind", KINDS)
def test_left_padded_batch_equals_one_by_one(kind: str) -> None:
    model = tiny_model(kind)
    batch, batch_logits = steps(model, PROMPTS, max_new_tokens=12)
    for row, prompt in enumerate(PROMPTS):
        alone, alone_logits = steps(model, [prompt], max_new_tokens=12)
        assert batch[row].tolist() == alone[0].tolist()
        torch.testing.assert_close(batch_logits[row], alone_logits[0], atol=1e-5, rtol=1e-5)
    # the slow twin pads the same way
    full, _ = steps(model, PROMPTS, max_new_tokens=12, use_cache=False)
    assert full.tolist() == batch.tolist()


@pytest.mark.parametrize("kind", KINDS)
def test_cache_memory(kind: str) -> None:
    """KV caches grow with max_len; every other cache is independent of it."""
    model = tiny_model(kind)
    sizes = {n: sum(c[0].nbytes for c in model.init_caches(2, n)) for n in (64, 128, 1024)}
    self_cache = model.init_caches(2, 64)[0][0]
    if isinstance(self_cache, KVCache):
        assert sizes[128] == 2 * sizes[64] and sizes[1024] == 16 * sizes[64]
        assert self_cache.k.shape[2] == 64
    else:
        assert sizes[64] == sizes[128] == sizes[1024]
    if isinstance(self_cache, RollingKVCache):
        assert self_cache.k.shape[2] == WINDOW
    if isinstance(self_cache, RecurrentState):  # (B, H, D_k, D_v): nothing grows with length
        assert self_cache.state.shape[0] == 2 and self_cache.state.dim() == 4


def test_mqa_cache_is_n_heads_times_smaller() -> None:
    kv = {k: tiny_model(k).init_caches(1, 64)[0][0] for k in ("mha", "mqa")}
    assert kv["mha"].k.numel() == 4 * kv["mqa"].k.numel()


@pytest.mark.parametrize("kind", KINDS)
def test_context_limit_only_for_kv_caches(kind: str) -> None:
    model = tiny_model(kind, max_len=16)
    greedy = dict(temperature=0, max_new_tokens=6)
    long, short = list(range(10, 30)), list(range(40, 54))  # 20 and 14 tokens
    if context_limit(model) is None:  # O(window) / O(1) caches decode past max_len
        assert [len(o) for o in generate_ids(model, [long, short], **greedy)] == [6, 6]
        return
    with pytest.raises(ValueError, match=r"prompt 0 has 20 tokens.*context is 16 tokens"):
        generate_ids(model, [long], **greedy)
    with pytest.warns(UserWarning, match="stopped at the model's context of 16"):
        cut = generate_ids(model, [long], truncate="left", **greedy)
        assert cut == generate_ids(model, [long[-15:]], **greedy) and len(cut[0]) == 1
    with pytest.warns(UserWarning, match="stopped at the model's context of 16"):
        batch = generate_ids(model, [short, short[:3]], **greedy)
    assert [len(o) for o in batch] == [2, 6]  # each row stops at its own limit
    assert batch[1] == generate_ids(model, [short[:3]], **greedy)[0]


def test_top_k_keeps_exactly_k() -> None:
    logits = torch.tensor([[1.0, 3.0, 3.0, 3.0, 0.0, 2.0], [5.0, 4.0, 3.0, 2.0, 1.0, 0.0]])
    for k in (1, 2, 3, 5):
        kept = top_k_filter(logits, k).isfinite()
        assert kept.sum(-1).tolist() == [k, k]
    assert top_k_filter(logits, 3).isfinite()[1].tolist() == [True] * 3 + [False] * 3


def test_top_p_keeps_smallest_set_with_mass_p() -> None:
    probs = torch.tensor([0.125, 0.5, 0.125, 0.25])  # exact in binary
    logits = probs.log()[None]
    for p, expect in ((0.3, 1), (0.5, 1), (0.51, 2), (0.75, 2), (0.76, 3), (1.0, 4)):
        assert top_p_filter(logits, p).isfinite().sum().item() == expect, p
    assert top_p_filter(logits, 0.6).isfinite()[0].tolist() == [False, True, False, True]
    # random rows against a brute-force float64 answer
    torch.manual_seed(0)
    logits = torch.randn(50, 40) * 2
    kept = top_p_filter(logits, 0.9).isfinite()
    for row, keep in zip(logits.double().softmax(-1), kept, strict=True):
        sorted_probs = row.sort(descending=True).values
        need = int((sorted_probs.cumsum(0) < 0.9).sum()) + 1
        assert keep.sum().item() == need
        assert row[keep].min() >= row[~keep].max() if (~keep).any() else True


def test_sampling_matches_probabilities_and_seed_reproduces() -> None:
    probs = torch.tensor([0.1, 0.2, 0.3, 0.4])
    logits = probs.log().expand(40000, 4)
    cfg = SamplingConfig(temperature=1.0)
    draws = sample(logits, cfg, torch.Generator().manual_seed(0))
    freq = torch.bincount(draws, minlength=4).float() / draws.numel()
    torch.testing.assert_close(freq, probs, atol=0.01, rtol=0)
    again = sample(logits, cfg, torch.Generator().manual_seed(0))
    assert torch.equal(draws, again)
    model = tiny_model()
    opts = dict(max_new_tokens=10, temperature=0.9, top_k=50, top_p=0.95, num_samples=2)
    first = generate_ids(model, PROMPTS, seed=1, **opts)
    assert generate_ids(model, PROMPTS, seed=1, **opts) == first
    assert generate_ids(model, PROMPTS, seed=2, **opts) != first
    assert first[0] != first[1]  # two samples of one prompt differ


def test_repetition_penalty_and_seen_tokens() -> None:
    seen = torch.zeros(2, 6, dtype=torch.bool)
    mark_seen(seen, torch.tensor([[0, 1, 1], [2, 3, 4]]), torch.tensor([[False, True, True]] * 2))
    assert seen.tolist() == [[0, 1, 0, 0, 0, 0], [0, 0, 0, 1, 1, 0]]
    logits = torch.tensor([[2.0, 2.0, -2.0, -2.0, 1.0, 1.0]] * 2)
    out = apply_repetition_penalty(logits, seen, 2.0)
    assert out[0].tolist() == [2.0, 1.0, -2.0, -2.0, 1.0, 1.0]
    assert out[1].tolist() == [2.0, 2.0, -2.0, -4.0, 0.5, 1.0]
    model = tiny_model()
    plain = generate_ids(model, PROMPTS[:1], temperature=0, max_new_tokens=30)[0]
    penalized = generate_ids(
        model, PROMPTS[:1], temperature=0, max_new_tokens=30, repetition_penalty=100.0
    )[0]
    assert len(set(penalized)) == 30 and not set(penalized) & set(PROMPTS[0])
    assert plain != penalized


def test_eos_and_stop_strings(tokenizer: Tokenizer) -> None:
    model = tiny_model()
    free = generate_ids(model, PROMPTS[:1], temperature=0, max_new_tokens=20)[0]
    cut = next(i for i in range(2, 20) if free[i] not in free[:i])
    assert generate_ids(model, PROMPTS[:1], temperature=0, max_new_tokens=20, eos_id=free[cut]) == [
        free[:cut]
    ]
    prompt = "The Congress"
    text = generate(model, tokenizer, prompt, temperature=0, max_new_tokens=20)[0]
    stop = text[len(text) // 2 : len(text) // 2 + 2]
    pieces: list[str] = []
    out = complete(
        model,
        tokenizer,
        [prompt],
        temperature=0,
        max_new_tokens=20,
        stop=[stop, "\x00never"],
        on_text=lambda row, piece: pieces.append(piece),
    )[0]
    assert out.text == text[: text.index(stop)]
    assert "".join(pieces) == out.text  # what streamed is exactly what is returned
    assert len(out.token_ids) < 20


def test_text_stream_multibyte(tokenizer: Tokenizer) -> None:
    ids = tokenizer.encode("日本語 ünïcödé").ids
    pieces: list[str] = []
    stream = TextStream(tokenizer, on_text=pieces.append)
    for i in range(1, len(ids) + 1):
        stream.push(ids[:i])
    assert stream.finish(ids) == "日本語 ünïcödé"
    assert "".join(pieces) == "日本語 ünïcödé" and not any("\ufffd" in p for p in pieces)


def test_generate_text_api(tokenizer: Tokenizer) -> None:
    model = tiny_model()
    texts = generate(model, tokenizer, ["The", "", "We the People"], seed=0, max_new_tokens=8)
    assert len(texts) == 3 and all(isinstance(t, str) for t in texts)
    with pytest.raises(ValueError, match="unknown generation option.*valid"):
        generate(model, tokenizer, "x", max_tokens=3)
    with pytest.raises(ValueError, match="truncate"):
        generate(model, tokenizer, "x", truncate="right")


@pytest.mark.slow
def test_compiled_decode_step_matches_eager() -> None:
    model = tiny_model()
    eager = generate_ids(model, PROMPTS, temperature=0, max_new_tokens=6)
    assert generate_ids(model, PROMPTS, temperature=0, max_new_tokens=6, compile=True) == eager


# --- CLI -----------------------------------------------------------------------------------


def load_cli():
    spec = importlib.util.spec_from_file_location("generate_cli", ROOT / "scripts/generate.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


def test_cli_parser() -> None:
    cli = load_cli()
    args = cli.parse_args(
        ["ckpt=x.ckpt", "prompt=123", 'stop=["\\n\\n", "END"]', "top_k=none", "use_cache=false"]
    )
    assert args.prompt == "123" and args.stop == ["\n\n", "END"] and args.top_k is None
    assert args.use_cache is False
    assert cli.parse_args(["ckpt=x", "prompt=a", "stop=\\n"]).stop == ["\n"]
    with pytest.raises(SystemExit, match="unknown argument 'tempreature=1'.*temperature"):
        cli.parse_args(["ckpt=x", "prompt=a", "tempreature=1"])
    with pytest.raises(SystemExit, match="max_new_tokens='many'"):
        cli.parse_args(["ckpt=x", "prompt=a", "max_new_tokens=many"])
    with pytest.raises(SystemExit, match="exactly one of prompt"):
        cli.parse_args(["ckpt=x"])


@pytest.fixture(scope="module")
def trained_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A checkpoint from two ``python train.py experiment=debug`` steps (~7 s)."""
    run_dir = tmp_path_factory.mktemp("run")
    cmd = [
        sys.executable, "train.py", "experiment=debug", "trainer.max_steps=2",
        f"hydra.run.dir={run_dir}", "trainer.enable_progress_bar=false",
    ]  # fmt: skip
    run = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return run_dir / "checkpoints" / "last.ckpt"


@pytest.mark.slow
def test_cli_on_a_train_py_checkpoint(trained_ckpt: Path, tmp_path: Path, capsys) -> None:
    cli = load_cli()
    out = cli.main([f"ckpt={trained_ckpt}", "prompt=The Congress", "max_new_tokens=5"])
    assert len(out) == 1 and capsys.readouterr().out == f"The Congress{out[0].text}\n"
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("The Congress\n\nWe the People\n", encoding="utf-8")
    args = [f"ckpt={trained_ckpt}", f"prompts_file={prompts}", "max_new_tokens=4"]
    out = cli.main([*args, "num_samples=2", "seed=1", "top_p=0.9", "use_cache=false"])
    printed = capsys.readouterr().out
    assert len(out) == 4 and "=== prompt 2, sample 2" in printed and "tokens/s" in printed
    cmd = [sys.executable, "scripts/generate.py", f"ckpt={trained_ckpt}", "prompt=We"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    run = subprocess.run([*cmd, "max_new_tokens=3", "temperature=0"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=300)  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert run.stdout.startswith("We") and "tokens/s" in run.stderr


@pytest.mark.parametrize("kind", KINDS)
def test_cli_every_kind(kind: str, tokenizer: Tokenizer, tmp_path: Path, capsys) -> None:
    """A checkpoint in the format ``minillm.checkpoint`` reads, for each registered kind."""
    model = tiny_model(kind, max_len=32)
    ckpt = {
        "hyper_parameters": {"model": model.cfg.to_dict()},
        "state_dict": {f"model.{k}": v for k, v in model.state_dict().items()},
        "tokenizer": tokenizer.to_str(),
    }
    torch.save(ckpt, tmp_path / "m.ckpt")
    args = [f"ckpt={tmp_path / 'm.ckpt'}", "prompt=The Congress", "max_new_tokens=6"]
    out = load_cli().main([*args, "temperature=0", "stop=[]"])
    expect = generate(model, tokenizer, "The Congress", temperature=0, max_new_tokens=6)
    assert out[0].text == expect[0]
    assert capsys.readouterr().out == f"The Congress{expect[0]}\n"
