r"""``python scripts/generate.py`` / ``minillm-generate``: text from a checkpoint, any architecture.

    minillm-generate ckpt=run/checkpoints/last.ckpt prompt="The Congress"
    minillm-generate ckpt=... prompts_file=prompts.txt temperature=0.8 top_p=0.95
    minillm-generate ckpt=... prompt="..." num_beams=4 n_best=2          # beam search
    minillm-generate ckpt=<translation ckpt> prompt="Select the text." temperature=0.8 seed=1
    minillm-generate ckpt=<instruction-tuned> prompt="..." template=ckpt
    minillm-generate ckpt=<target> draft=<small ckpt> draft_k=4 prompt="..."   # speculative

A decoder-only checkpoint continues each prompt; an encoder-decoder (translation) checkpoint
translates it (``max_new_tokens`` unset: 1.5x the source length + 10). Every option of
``GenerationConfig`` applies to both: greedy (``temperature=0``), sampling, beam search.
``stop=["\n\n"]`` takes a list; backslash escapes (``\n``) are read. One completion streams to
stdout as it is produced; several are printed one after another, then a line with tokens/s.
"""

from __future__ import annotations

import codecs
import sys
import time
from dataclasses import dataclass, field, fields
from typing import Any

import torch
from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from minillm import checks
from minillm.checkpoint import load_pretrained
from minillm.cli.app import hydra_app
from minillm.cli.devices import resolve_device
from minillm.data.instructions import format_prompt, saved_template
from minillm.generation import Completion, GenerationConfig, complete
from minillm.generation.seq2seq import default_max_new_tokens, encode_sources

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class GenerateConfig(GenerationConfig):
    """conf/generate.yaml: the generation options plus where the model and prompts are."""

    ckpt: str = MISSING  # a .ckpt file, a run directory's checkpoint or an exported folder
    prompt: str | None = None
    prompts_file: str | None = None  # one prompt per non-empty line
    device: str = "auto"  # auto | cpu | cuda | cuda:1 ...
    dtype: str = "auto"  # auto (bf16 on CUDA if supported, else fp32) | float32 | bfloat16 ...
    template: str | None = None  # "ckpt": the checkpoint's instruction template; or its text
    draft: str | None = None  # a small checkpoint of the same tokenizer: speculative decoding
    max_new_tokens: int | None = None  # None: 64, or 1.5x source + 10 for translation
    stop: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.stop = [codecs.decode(s, "unicode_escape") for s in self.stop]
        limit = self.max_new_tokens
        checks.integer("max_new_tokens", limit, 0, optional=True)
        self.max_new_tokens = 0 if limit is None else limit  # the parent checks an int
        try:
            super().__post_init__()
        finally:
            self.max_new_tokens = limit
        checks.choice("dtype", self.dtype, ["auto", *DTYPES])
        if (self.prompt is None) == (self.prompts_file is None):
            raise ValueError("give exactly one of prompt=... or prompts_file=...")

    def options(self) -> dict[str, Any]:
        """The ``GenerationConfig`` fields, for ``complete``."""
        names = {f.name for f in fields(GenerationConfig)}
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name in names}
        if out["max_new_tokens"] is None:
            del out["max_new_tokens"]
        return out


ConfigStore.instance().store(name="generate_schema", node=GenerateConfig)


def validate(cfg: dict[str, Any]) -> GenerateConfig:
    return GenerateConfig(**cfg)


def pick_dtype(device: torch.device, dtype: str) -> torch.dtype:
    if dtype == "auto":
        bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if bf16 else torch.float32
    return DTYPES[dtype]


def read_prompts(args: GenerateConfig) -> list[str]:
    if args.prompt is not None:
        prompts = [args.prompt]
    else:
        with open(args.prompts_file, encoding="utf-8") as f:
            prompts = [line.rstrip("\n") for line in f if line.strip()]
        if not prompts:
            raise ValueError(f"prompts_file={args.prompts_file}: the file has no prompts")
    if args.template:
        template = saved_template(args.ckpt) if args.template == "ckpt" else args.template
        prompts = [format_prompt(p, template) for p in prompts]
    return prompts


def load(path: str, device: torch.device, dtype: torch.dtype) -> tuple[torch.nn.Module, Any]:
    model, tokenizer = load_pretrained(path, map_location=device)
    return model.to(device=device, dtype=dtype), tokenizer


def generation_options(args: GenerateConfig, model: torch.nn.Module, tokenizer: Any, prompts):
    options = args.options()
    if "max_new_tokens" not in options and model.cfg.arch == "encoder_decoder":
        longest = max(len(ids) for ids in encode_sources(tokenizer, prompts))
        options["max_new_tokens"] = default_max_new_tokens(longest)
    return options


def run(args: GenerateConfig) -> list[Completion]:
    prompts = read_prompts(args)
    device = resolve_device(args.device)
    dtype = pick_dtype(device, args.dtype)
    model, tokenizer = load(args.ckpt, device, dtype)
    extra = {}
    if args.draft:
        extra["draft_model"], _ = load(args.draft, device, dtype)
    options = generation_options(args, model, tokenizer, prompts)
    start = time.perf_counter()
    per_prompt = args.outputs_per_prompt
    if len(prompts) * per_prompt == 1:  # stream the one completion
        if model.cfg.arch == "decoder":
            print(prompts[0], end="", flush=True)
        stream = lambda _, piece: print(piece, end="", flush=True)
        completions = complete(model, tokenizer, prompts, on_text=stream, **options, **extra)
        print()
    else:
        completions = complete(model, tokenizer, prompts, **options, **extra)
        for row, c in enumerate(completions):
            i, s = divmod(row, per_prompt)
            what = "hypothesis" if args.num_beams > 1 else "sample"
            score = f" (score {c.score:.3f})" if c.score is not None else ""
            print(f"=== prompt {i + 1}" + (f", {what} {s + 1}{score}" if per_prompt > 1 else ""))
            print((prompts[i] if model.cfg.arch == "decoder" else "") + c.text)
    seconds = time.perf_counter() - start
    n_tokens = sum(len(c.token_ids) for c in completions)
    print(
        f"{len(completions)} completion(s), {n_tokens} tokens in {seconds:.2f}s: "
        f"{n_tokens / max(seconds, 1e-9):.1f} tokens/s",
        file=sys.stderr if len(completions) == 1 else sys.stdout,
    )
    return completions


@hydra_app("generate", validate)
def main(cfg: DictConfig) -> list[Completion]:
    return run(validate(OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)))
