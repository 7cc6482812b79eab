"""Generation: one loop over every architecture's ``start``/``step``, for every registered
kind. Cached = the full-forward twin, one beam = greedy, beams ranked by their true scores,
left-padded batches = one-by-one, fixed-shape compiled steps = eager (one compilation),
sampling filters, stop conditions, context limits, text API, CLI."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import re
from pathlib import Path
from typing import NamedTuple

import pytest
import torch
import torch._dynamo
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from torch._dynamo.testing import CompileCounter

from minillm.attention import attention_config, fixed_shape_decoding, kinds_for_role
from minillm.generation import (
    GenerationConfig,
    SamplingConfig,
    TextStream,
    complete,
    generate,
    generate_ids,
    generate_scored,
    left_pad,
    pad_right,
    sample,
    top_k_filter,
    top_p_filter,
    translate,
)
from minillm.generation.loop import COMPILE_OPTIONS
from minillm.generation.sampling import apply_repetition_penalty, mark_seen
from minillm.models import build_model

ROOT = Path(__file__).resolve().parents[1]
WINDOW = 8  # small window for kinds that have one, so prompts run past it
VOCAB = 300
TEXTS = [
    "The Congress shall make no law respecting an establishment of religion.",
    "We the People of the United States, in Order to form a more perfect Union,",
    "héllo wörld, 日本語のテキスト, ünïcödé — and more text to learn merges from.",
]
PROMPTS = [[5, 9, 40, 7, 100, 23, 11, 60, 61, 62, 63, 64, 65], [17, 18, 200], [30, 31, 32, 33, 34]]
BOS = 1


def attn_cfg(kind: str) -> dict:
    """{"kind": kind} plus a small window for kinds whose Config has one."""
    _, config = attention_config(kind)
    has_window = "window" in {f.name for f in dataclasses.fields(config)}
    return {"kind": kind, **({"window": WINDOW} if has_window else {})}


def tiny_model(
    kind: str = "mha", max_len: int = 64, seed: int = 0, arch: str = "decoder", cross: str = "mha"
) -> torch.nn.Module:
    """Two layers of ``kind``; ``a+b`` is a hybrid (``model.layers``): layer 0 a, layer 1 b."""
    torch.manual_seed(seed)  # untied, wide init: greedy output varies with the context
    cfg = dict(vocab_size=VOCAB, dim=32, n_layers=2, n_heads=4, max_len=max_len)
    cfg |= {"attn": attn_cfg(kind.split("+")[0]), "tie_embeddings": False, "init_std": 0.3}
    if "+" in kind:
        cfg["layers"] = [attn_cfg(k) for k in kind.split("+")]
    if arch == "encoder_decoder":
        cfg |= {"arch": arch, "cross_attn": attn_cfg(cross), "init_std": 0.2}
    return build_model(cfg).eval()


class Case(NamedTuple):
    """A model and a batch of inputs: decoder prompts (left-padded) and, for an
    encoder-decoder, sources (the decoder prompts are then <bos> plus a forced prefix)."""

    model: torch.nn.Module
    prompts: list[list[int]]
    sources: list[list[int]] | None


# (architecture, decoder self-attention kind, cross kind): every causal kind in each
# architecture, and every kind that can fill the cross role
CASES = [("decoder", k, None) for k in kinds_for_role("causal")]
CASES += [("encoder_decoder", k, "mha") for k in kinds_for_role("causal")]
CASES += [("encoder_decoder", "mha", c) for c in kinds_for_role("cross") if c != "mha"]
HYBRIDS = ["gated_linear+mha", "local+linear"]  # per-layer kinds: their caches side by side
CASES += [("decoder", k, None) for k in HYBRIDS] + [("encoder_decoder", HYBRIDS[0], "mha")]
IDS = [f"{a}-{k}" + (f"-x{c}" if c else "") for a, k, c in CASES]


def make_case(arch: str, kind: str, cross: str | None, max_len: int = 64) -> Case:
    if arch == "decoder":
        return Case(tiny_model(kind, max_len), PROMPTS, None)
    model = tiny_model(kind, max_len, arch=arch, cross=cross)
    return Case(model, [[BOS], [BOS, 7, 8], [BOS, 9]], PROMPTS)


def run(case: Case, eos_id: int | None = None, **options) -> tuple[list, list]:
    """(token rows, beam scores) of the case's batch; 8 new tokens unless told."""
    cfg = GenerationConfig(**{"max_new_tokens": 8, **options})
    return generate_scored(case.model, case.prompts, cfg, sources=case.sources, eos_id=eos_id)


@torch.no_grad()
def full_logits(model: torch.nn.Module, tokens: list[int], source: list[int] | None):
    """Logits (T, V) of one unpadded row by the plain forward (no cache): the slow twin."""
    ids = torch.tensor([tokens])
    return (model(ids) if source is None else model(torch.tensor([source]), ids))[0]


def an_eos(case: Case) -> int:
    """A token greedy decoding of prompt 0 emits at step 3: using it as EOS ends rows early."""
    return run(case, temperature=0)[0][0][3]


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


MODES = {
    "greedy": dict(temperature=0),
    "sample": dict(temperature=0.9, top_k=50, top_p=0.95, seed=1, num_samples=2),
    "beam": dict(num_beams=3, n_best=2, length_penalty=0.8, repetition_penalty=1.3),
}


def assert_same(got: tuple[list, list], expect: tuple[list, list]) -> None:
    """Same tokens; same beam scores up to float noise (None when sampling)."""
    assert got[0] == expect[0]
    assert [s is None for s in got[1]] == [s is None for s in expect[1]]
    assert [s for s in got[1] if s is not None] == pytest.approx(
        [s for s in expect[1] if s is not None], abs=1e-4
    )


@pytest.fixture(params=CASES, ids=IDS, scope="module")
def case(request: pytest.FixtureRequest) -> Case:
    return make_case(*request.param)


@pytest.mark.parametrize("mode", list(MODES))
def test_cached_equals_uncached(case: Case, mode: str) -> None:
    eos = an_eos(case)
    cached = run(case, eos_id=eos, **MODES[mode])
    assert_same(run(case, eos_id=eos, use_cache=False, **MODES[mode]), cached)
    assert len({tuple(t) for t in cached[0]}) > 1  # a real test: rows differ


def test_one_beam_equals_greedy_and_beams_rank_by_their_scores(case: Case) -> None:
    eos = an_eos(case)
    greedy, _ = run(case, eos_id=eos, temperature=0)
    assert run(case, eos_id=eos, num_beams=1, temperature=0)[0] == greedy
    assert any(len(row) < 8 for row in greedy)  # EOS ended a row
    k, penalty = 4, 0.7
    tokens, scores = run(case, eos_id=eos, num_beams=k, n_best=k, length_penalty=penalty)
    for i in range(len(case.prompts)):
        hyps = list(zip(scores[i * k : (i + 1) * k], tokens[i * k : (i + 1) * k], strict=True))
        assert [s for s, _ in hyps] == sorted((s for s, _ in hyps), reverse=True)
        for score, hyp in hyps:  # each score is the hypothesis' own log-prob / length ** lp
            ended = len(hyp) < 8
            seq = case.prompts[i] + hyp + ([eos] if ended else [])
            source = None if case.sources is None else case.sources[i]
            logp = full_logits(case.model, seq[:-1], source).log_softmax(-1)
            new = torch.tensor(seq[len(case.prompts[i]) :])
            total = logp[len(case.prompts[i]) - 1 :].gather(1, new[:, None]).sum()
            assert score == pytest.approx(float(total) / len(new) ** penalty, abs=1e-4)


@pytest.mark.parametrize("mode", ["greedy", "beam"])
def test_left_padded_batch_equals_one_by_one(case: Case, mode: str) -> None:
    eos = an_eos(case)
    batch, batch_scores = run(case, eos_id=eos, **MODES[mode])
    per_prompt = len(batch) // len(case.prompts)
    for i, prompt in enumerate(case.prompts):
        source = None if case.sources is None else case.sources[i : i + 1]
        alone = run(Case(case.model, [prompt], source), eos_id=eos, **MODES[mode])
        rows = slice(i * per_prompt, (i + 1) * per_prompt)
        assert_same(alone, (batch[rows], batch_scores[rows]))


@pytest.mark.parametrize("fixed", [False, True], ids=["eager", "fixed_shape"])
def test_start_and_steps_equal_full_forward_through_reorder(case: Case, fixed: bool) -> None:
    """Prefill, expand and permute rows (as samples and beams do), then one- and two-token
    steps: every row's logits are its unpadded full forward's."""
    model = case.model
    ids, mask = left_pad(case.prompts, 0, "cpu")
    inputs = {"mask": mask}
    if case.sources is not None:
        inputs |= dict(zip(("src_ids", "src_mask"), pad_right(case.sources, 0, "cpu"), strict=True))
    rows = torch.tensor([2, 0, 0, 1])
    feed = torch.randint(4, VOCAB, (4, 5), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode(), fixed_shape_decoding() if fixed else contextlib.nullcontext():
        first, state = model.start(ids, max_new_tokens=5, **inputs)
        state.reorder(rows)
        steps = [model.step(feed[:, i : i + 1], state) for i in range(3)]
        steps.append(model.step(feed[:, 3:], state))  # (4, 2, V) two tokens at once
        got = torch.cat((first[rows, None], *steps), dim=1)  # (4, 6, V)
        for j, r in enumerate(rows.tolist()):
            source = None if case.sources is None else case.sources[r]
            full = full_logits(model, case.prompts[r] + feed[j].tolist(), source)
            torch.testing.assert_close(got[j], full[-6:], atol=1e-4, rtol=1e-4)


# one compilation for 200 steps: every causal kind as decoder-only, and the cross kinds
COMPILED = [c for c in CASES if c[0] == "decoder" or c[1:] in (("mha", "mha"), ("mha", "linear"))]


@pytest.mark.parametrize("arch, kind, cross", COMPILED, ids=[IDS[CASES.index(c)] for c in COMPILED])
def test_compiled_decode_compiles_once_and_equals_eager(arch, kind, cross, monkeypatch) -> None:
    case = make_case(arch, kind, cross, max_len=256)
    torch._dynamo.reset()
    counter = CompileCounter()
    monkeypatch.setitem(COMPILE_OPTIONS, "cpu", {"backend": counter})
    eager = run(case, temperature=0, max_new_tokens=200)
    assert run(case, temperature=0, max_new_tokens=200, compile=True) == eager
    assert counter.frame_count == 1 and all(len(row) == 200 for row in eager[0])


def test_compiled_beam_search_equals_eager(monkeypatch) -> None:
    """aot_eager functionalizes the in-place cache writes as inductor does, cheaply; beams
    reorder the caches between compiled steps; ``local``'s ring wraps around."""
    torch._dynamo.reset()
    monkeypatch.setitem(COMPILE_OPTIONS, "cpu", {"backend": "aot_eager"})
    case = make_case("decoder", "local", None)
    eager = run(case, max_new_tokens=12, **MODES["beam"])
    assert_same(run(case, max_new_tokens=12, compile=True, **MODES["beam"]), eager)


def perturbed(model: torch.nn.Module, noise: float = 0.01) -> torch.nn.Module:
    """A draft that mostly agrees with ``model``: its weights plus a little noise."""
    draft = copy.deepcopy(model)
    with torch.no_grad():
        for p in draft.parameters():
            p.add_(torch.randn_like(p) * noise)
    return draft


CAUSAL = kinds_for_role("causal")
SPEC = [(k, k) for k in CAUSAL] + [("mha", k) for k in CAUSAL if k != "mha"]
SPEC += [(k, k) for k in HYBRIDS] + [(HYBRIDS[0], "mha")]


@pytest.mark.parametrize("target_kind, draft_kind", SPEC, ids=[f"{t}<-{d}" for t, d in SPEC])
def test_speculative_greedy_equals_target_greedy(target_kind: str, draft_kind: str) -> None:
    """Every causal kind as target and as draft: rolled-back KV caches, rolling windows and
    recurrent states (returned to a saved point, then re-fed) leave the output unchanged."""
    target = tiny_model(target_kind)
    draft = perturbed(target) if draft_kind == target_kind else tiny_model(draft_kind, seed=1)
    eos = run(Case(target, PROMPTS, None), temperature=0, max_new_tokens=24)[0][1][20]
    greedy = generate_ids(target, PROMPTS, temperature=0, max_new_tokens=24, eos_id=eos)
    for k in (1, 3):
        spec = dict(draft_model=draft, draft_k=k, eos_id=eos)
        assert generate_ids(target, PROMPTS, temperature=0, max_new_tokens=24, **spec) == greedy


@pytest.mark.parametrize("arch, kind", [("decoder", "mha"), ("decoder", "gated_linear"),
                                        ("encoder_decoder", "local")])  # fmt: skip
def test_speculative_with_its_own_copy_accepts_every_draft(arch: str, kind: str) -> None:
    """All k proposals accepted each round: one target step of k + 1 tokens per k + 1 new
    tokens, no rollback, no re-feeding."""
    case = make_case(arch, kind, "mha")
    greedy = run(case, temperature=0, max_new_tokens=24)[0]
    draft, step, lengths = copy.deepcopy(case.model), case.model.step, []
    case.model.step = lambda tokens, state: lengths.append(tokens.shape[1]) or step(tokens, state)
    cfg = GenerationConfig(temperature=0, max_new_tokens=24, draft_k=3)
    try:
        spec = generate_scored(
            case.model, case.prompts, cfg, sources=case.sources, draft_model=draft
        )
    finally:
        del case.model.step
    assert spec[0] == greedy and lengths == [4] * 6  # 1 + 6 rounds x 4 tokens >= 24


def capacity(model: torch.nn.Module) -> int | None:
    return model.start(torch.tensor([[5]]), max_new_tokens=1)[1].capacity


@pytest.mark.parametrize("kind", kinds_for_role("causal"))
def test_context_limit_only_where_a_cache_fills(kind: str) -> None:
    model = tiny_model(kind, max_len=16)
    greedy = dict(temperature=0, max_new_tokens=6)
    long, short = list(range(10, 30)), list(range(40, 54))  # 20 and 14 tokens
    if capacity(model) is None:  # O(window) / O(1) caches decode past max_len
        assert [len(o) for o in generate_ids(model, [long, short], **greedy)] == [6, 6]
        assert [len(o) for o in generate_ids(model, [long], num_beams=2, **greedy)] == [6]
        return
    assert capacity(model) == 16
    with pytest.raises(ValueError, match=r"prompt 0 has 20 tokens.*context is 16 tokens"):
        generate_ids(model, [long], **greedy)
    with pytest.warns(UserWarning, match="stopped at the model's context of 16"):
        cut = generate_ids(model, [long], truncate="left", **greedy)
        assert cut == generate_ids(model, [long[-15:]], **greedy) and len(cut[0]) == 1
    with pytest.warns(UserWarning, match="stopped at the model's context of 16"):
        batch = generate_ids(model, [short, short[:3]], **greedy)
    assert [len(o) for o in batch] == [2, 6]  # each row stops at its own limit
    assert batch[1] == generate_ids(model, [short[:3]], **greedy)[0]
    with pytest.warns(UserWarning, match="stopped at the model's context of 16"):
        beams = generate_ids(model, [short, short[:3]], num_beams=2, **greedy)
    assert [len(o) for o in beams] == [2, 6]


def test_generation_config_errors_name_key_value_and_what_works() -> None:
    cases = {
        "num_beams=0: must be >= 1": dict(num_beams=0),
        "n_best=3: must be in [1, num_beams]": dict(num_beams=2, n_best=3),
        "num_samples=2: must be 1 with num_beams > 1": dict(num_beams=2, num_samples=2),
        "max_new_tokens=-1: must be >= 0": dict(max_new_tokens=-1),
        "top_p=1.5: must be in (0, 1]": dict(top_p=1.5),
        "temperature=-1: must be >= 0": dict(temperature=-1),
    }
    for message, options in cases.items():
        with pytest.raises(ValueError, match="^" + re.escape(message)):
            GenerationConfig(**options)


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


def test_complete_sampling_and_beams_with_an_encoder_decoder(tokenizer: Tokenizer) -> None:
    """For a translation model the prompt is the source; complete() and translate() agree."""
    model = tiny_model("mha", arch="encoder_decoder")
    sources = ["The Congress", "We the People"]
    beams = complete(model, tokenizer, sources, num_beams=3, n_best=2, max_new_tokens=6)
    assert len(beams) == 4 and beams[0].score >= beams[1].score
    src = [tokenizer.encode(s, add_special_tokens=False).ids + [2] for s in sources]
    opts = dict(sources=src, eos_id=2, num_beams=3, n_best=2, max_new_tokens=6)
    assert [c.token_ids for c in beams] == generate_ids(model, [[BOS]] * 2, **opts)
    texts = translate(model, tokenizer, sources, num_beams=3, max_new_tokens=6)
    assert texts == [beams[0].text.strip(), beams[2].text.strip()]
    pieces: dict[int, str] = {0: "", 1: "", 2: "", 3: ""}
    samples = complete(
        model, tokenizer, sources, seed=0, num_samples=2, max_new_tokens=6,
        on_text=lambda row, piece: pieces.__setitem__(row, pieces[row] + piece),
    )  # fmt: skip
    assert [c.text for c in samples] == list(pieces.values()) and samples[0].score is None
    again = complete(model, tokenizer, sources, seed=0, num_samples=2, max_new_tokens=6)
    assert [c.token_ids for c in again] == [c.token_ids for c in samples]


def test_beam_search_on_text_streams_the_chosen_text_once(tokenizer: Tokenizer) -> None:
    model = tiny_model()
    pieces: list[tuple[int, str]] = []
    out = complete(model, tokenizer, "The Congress", num_beams=2, max_new_tokens=8,
                   on_text=lambda row, piece: pieces.append((row, piece)))  # fmt: skip
    assert pieces == [(0, out[0].text)] and out[0].score is not None
