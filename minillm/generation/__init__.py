"""Generation: one decoding loop (greedy, sampling, beam search) over any model's ``start`` /
``step``, logits filters, and the token-level and text APIs."""

from minillm.generation.beam import BeamSearch, Hypotheses
from minillm.generation.generate import (
    GenerationConfig,
    generate_ids,
    generate_scored,
    left_pad,
    pad_right,
)
from minillm.generation.loop import Search, decode, decode_step, prefill, step_function
from minillm.generation.sampling import (
    Sampler,
    SamplingConfig,
    apply_repetition_penalty,
    mark_seen,
    process_logits,
    sample,
    top_k_filter,
    top_p_filter,
)
from minillm.generation.seq2seq import translate
from minillm.generation.text import Completion, TextStream, complete, generate

__all__ = [
    "BeamSearch",
    "Completion",
    "GenerationConfig",
    "Hypotheses",
    "Sampler",
    "SamplingConfig",
    "Search",
    "TextStream",
    "apply_repetition_penalty",
    "complete",
    "decode",
    "decode_step",
    "generate",
    "generate_ids",
    "generate_scored",
    "left_pad",
    "mark_seen",
    "pad_right",
    "prefill",
    "process_logits",
    "sample",
    "step_function",
    "top_k_filter",
    "top_p_filter",
    "translate",
]
