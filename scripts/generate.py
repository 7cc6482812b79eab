r"""Generate text from a minillm checkpoint.

    python scripts/generate.py ckpt=run/checkpoints/last.ckpt prompt="The Congress"
    python scripts/generate.py ckpt=... prompts_file=prompts.txt temperature=0.8 top_p=0.95
    python scripts/generate.py ckpt=... prompt="..." temperature=0      # greedy
    python scripts/generate.py ckpt=<instruction-tuned> prompt="..." template=ckpt
    python scripts/generate.py ckpt=<translation ckpt> prompt="Select the text." num_beams=5

Arguments are ``key=value``: ``ckpt``, ``prompt`` or ``prompts_file`` (one prompt per non-empty
line), ``device`` (auto|cpu|cuda|...), ``dtype`` (auto|float32|bfloat16|float16) and every
field of ``GenerationConfig`` (``max_new_tokens temperature top_k top_p repetition_penalty seed
num_samples stop use_cache compile truncate batch_size``). ``template=ckpt`` formats prompts with
the template an instruction-tuned checkpoint was trained with (or give the template text, with
``{prompt}``). An encoder-decoder (translation) checkpoint translates each prompt with beam
search (``num_beams``, ``length_penalty``; ``max_new_tokens`` only if given, else 1.5x the
source length + 10). ``stop`` takes a JSON list
(``stop='["\n\n"]'``) or one string (backslash escapes such as ``\n`` are read). Values
``none``/``null`` unset optional fields. One completion streams to stdout as it is produced;
several are printed one after another, then a line with tokens/s.
"""

from __future__ import annotations

import codecs
import json
import sys
import time
import typing
from dataclasses import dataclass, fields
from typing import Any

import torch

from minillm.checkpoint import load_checkpoint
from minillm.data.instructions import format_prompt, saved_template
from minillm.generation import Completion, GenerationConfig, complete
from minillm.generation.seq2seq import translate

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class GenerateArgs(GenerationConfig):
    """Command-line options: the generation options plus where the model and prompts are."""

    ckpt: str = ""
    prompt: str | None = None
    prompts_file: str | None = None
    device: str = "auto"
    dtype: str = "auto"
    template: str | None = None  # "ckpt": the checkpoint's instruction template; or its text
    num_beams: int = 5  # encoder-decoder checkpoints only
    length_penalty: float = 1.0  # encoder-decoder checkpoints only

    def generation_options(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(GenerationConfig)}


def parse_value(name: str, raw: str, hint: Any) -> Any:
    """Convert ``raw`` to the field's type; clear error naming the key when it does not fit."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    optional = type(None) in typing.get_args(hint)
    base = args[0] if optional and len(args) == 1 else hint
    if optional and raw.lower() in ("none", "null"):
        return None
    try:
        if base is bool:
            if raw.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError("expected true or false")
            return raw.lower() in ("true", "1", "yes")
        if base in (int, float):
            return base(raw)
        if typing.get_origin(base) is list:
            if raw.lstrip().startswith("["):
                value = json.loads(raw)
                if not all(isinstance(v, str) for v in value):
                    raise ValueError("expected a list of strings")
                return value
            return [codecs.decode(raw, "unicode_escape")] if raw else []
        return raw
    except ValueError as err:
        raise SystemExit(f"bad value for {name}={raw!r}: {err}") from None


def parse_args(argv: list[str]) -> GenerateArgs:
    hints = typing.get_type_hints(GenerateArgs)
    valid = sorted(hints)
    values: dict[str, Any] = {}
    for arg in argv:
        key, eq, raw = arg.partition("=")
        key = key.lstrip("-").replace("-", "_")
        if not eq or key not in hints:
            raise SystemExit(
                f"unknown argument {arg!r}; use key=value with key one of: {', '.join(valid)}"
            )
        values[key] = parse_value(key, raw, hints[key])
    try:
        args = GenerateArgs(**values)
    except (TypeError, ValueError) as err:
        raise SystemExit(f"invalid options: {err}") from None
    args.given = frozenset(values)  # which options the user set (translation defaults differ)
    if not args.ckpt:
        raise SystemExit("ckpt=<path to a .ckpt> is required")
    if (args.prompt is None) == (args.prompts_file is None):
        raise SystemExit("give exactly one of prompt=... or prompts_file=...")
    return args


def pick_device(device: str, dtype: str) -> tuple[torch.device, torch.dtype]:
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dtype == "auto":
        bf16 = dev.type == "cuda" and torch.cuda.is_bf16_supported()
        return dev, torch.bfloat16 if bf16 else torch.float32
    if dtype not in DTYPES:
        raise SystemExit(f"unknown dtype {dtype!r}; choose auto or one of {sorted(DTYPES)}")
    return dev, DTYPES[dtype]


def read_prompts(args: GenerateArgs) -> list[str]:
    if args.prompt is not None:
        prompts = [args.prompt]
    else:
        with open(args.prompts_file, encoding="utf-8") as f:
            prompts = [line.rstrip("\n") for line in f if line.strip()]
        if not prompts:
            raise SystemExit(f"no prompts in {args.prompts_file}")
    if args.template:
        template = saved_template(args.ckpt) if args.template == "ckpt" else args.template
        prompts = [format_prompt(p, template) for p in prompts]
    return prompts


def main(argv: list[str] | None = None) -> list[Completion] | list[str]:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    prompts = read_prompts(args)
    device, dtype = pick_device(args.device, args.dtype)
    model, tokenizer = load_checkpoint(args.ckpt, map_location=device)
    model.to(device=device, dtype=dtype)
    return RUNNERS[model.cfg.arch](args, model, tokenizer, prompts)


def translate_prompts(
    args: GenerateArgs, model: torch.nn.Module, tokenizer: Any, prompts: list[str]
) -> list[str]:
    """Encoder-decoder checkpoints: one translation per prompt, by beam search."""
    start = time.perf_counter()
    texts = translate(
        model,
        tokenizer,
        prompts,
        num_beams=args.num_beams,
        length_penalty=args.length_penalty,
        max_new_tokens=args.max_new_tokens if "max_new_tokens" in args.given else None,
        batch_size=args.batch_size,
        use_cache=args.use_cache,
    )
    for text in texts:
        print(text)
    seconds = time.perf_counter() - start
    print(f"{len(texts)} translation(s) in {seconds:.2f}s", file=sys.stderr)
    return texts


def complete_prompts(
    args: GenerateArgs, model: torch.nn.Module, tokenizer: Any, prompts: list[str]
) -> list[Completion]:
    """Decoder-only checkpoints: continue each prompt, streaming when there is one."""
    options = args.generation_options()
    start = time.perf_counter()
    if len(prompts) * args.num_samples == 1:  # stream the one completion
        print(prompts[0], end="", flush=True)
        stream = lambda _, piece: print(piece, end="", flush=True)
        completions = complete(model, tokenizer, prompts, on_text=stream, **options)
        print()
    else:
        completions = complete(model, tokenizer, prompts, **options)
        for row, c in enumerate(completions):
            i, s = divmod(row, args.num_samples)
            print(f"=== prompt {i + 1}" + (f", sample {s + 1}" if args.num_samples > 1 else ""))
            print(prompts[i] + c.text)
    seconds = time.perf_counter() - start
    n_tokens = sum(len(c.token_ids) for c in completions)
    print(
        f"{len(completions)} completion(s), {n_tokens} tokens in {seconds:.2f}s: "
        f"{n_tokens / seconds:.1f} tokens/s",
        file=sys.stderr if len(completions) == 1 else sys.stdout,
    )
    return completions


RUNNERS = {"decoder": complete_prompts, "encoder_decoder": translate_prompts}  # by model.cfg.arch

if __name__ == "__main__":
    main()
