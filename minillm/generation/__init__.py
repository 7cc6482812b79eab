"""Generation: sampling filters, prefill/decode over any cache, text and token-level APIs."""

from minillm.generation.generate import (
    GenerationConfig,
    context_limit,
    decode_step,
    decode_steps,
    fit_prompts,
    generate_ids,
    left_pad,
    prefill,
)
from minillm.generation.sampling import (
    SamplingConfig,
    apply_repetition_penalty,
    mark_seen,
    process_logits,
    sample,
    top_k_filter,
    top_p_filter,
)
from minillm.generation.text import Completion, TextStream, complete, generate

__all__ = [
    "Completion",
    "GenerationConfig",
    "SamplingConfig",
    "TextStream",
    "apply_repetition_penalty",
    "complete",
    "context_limit",
    "decode_step",
    "decode_steps",
    "fit_prompts",
    "generate",
    "generate_ids",
    "left_pad",
    "mark_seen",
    "prefill",
    "process_logits",
    "sample",
    "top_k_filter",
    "top_p_filter",
]
