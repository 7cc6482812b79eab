"""Hugging Face interop for the Llama family and GPT-2: a minillm decoder <-> an HF model folder.

minillm's decoder block is the Llama block (pre-norm RMSNorm, SwiGLU, RoPE, grouped KV heads),
and GPT-2's is the same block with options (model.norm=layernorm, mlp=gelu, learned positions,
biases), so converting is renaming tensors and translating config keys (``common.py``, one
table per model_type):

- ``save_hf`` writes a folder that ``transformers.AutoModelForCausalLM`` and ``AutoTokenizer``
  load with no custom code (``LlamaForCausalLM``, or ``GPT2LMHeadModel`` for a decoder with
  learned positions; ``PreTrainedTokenizerFast``). What the layout cannot express (another
  attention kind, the encoder-decoder, an option added to minillm after this mapping) is
  refused in one line; the minillm-native export stays available.
- ``load_hf`` reads a ``LlamaForCausalLM`` or ``GPT2LMHeadModel`` folder, or a Mistral / Qwen2
  one that needs nothing more (no active sliding window), into a ``DecoderLM`` plus the
  folder's ``tokenizer.json``. Qwen2's q/k/v biases become ``bias=True`` with a zero
  ``o_proj`` bias (a missing bias is a zero one), which exports back as Llama's
  ``attention_bias=true``.

RoPE needs no permutation of q/k rows: ``minillm.positions.rope`` rotates pairs (i, i + D/2)
with inv_freq = base^(-2i/D), HF Llama's ``rotate_half`` convention (HF permutes Meta's
interleaved checkpoints when converting them).

Exporting needs safetensors and tokenizers only. Importing reads the config through
``transformers.AutoConfig`` (it knows each model type's defaults for the keys a config.json
leaves out); transformers is the optional ``hf`` extra and is imported only then.
"""

from minillm.hf.common import (
    HF_FILES,
    HF_PREFIX,
    NATIVE,
    SPECIAL_ROLES,
    hf_folder,
    hf_name,
    is_hf,
    minillm_name,
)
from minillm.hf.export import check_exportable, hf_state_dict, llama_config, save_hf, special_tokens
from minillm.hf.load import (
    auto_config,
    check_importable,
    load_hf,
    minillm_state_dict,
    model_config,
    read_hf_weights,
)

__all__ = [
    "HF_FILES",
    "HF_PREFIX",
    "NATIVE",
    "SPECIAL_ROLES",
    "auto_config",
    "check_exportable",
    "check_importable",
    "hf_folder",
    "hf_name",
    "hf_state_dict",
    "is_hf",
    "llama_config",
    "load_hf",
    "minillm_name",
    "minillm_state_dict",
    "model_config",
    "read_hf_weights",
    "save_hf",
    "special_tokens",
]
