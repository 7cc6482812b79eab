"""The ids a tokenizer gives the roles the data, evaluation and generation code need (pad,
bos, eos, unk), found by name wherever they sit: minillm's own tokenizers (0-3), Llama, GPT-2,
Qwen2 ... Depends on ``tokenizers`` only, so generation and export import it without the data
stack (``datasets``, Lightning)."""

from __future__ import annotations

from dataclasses import dataclass

from tokenizers import Tokenizer

# Role -> the names stock tokenizers give it, first found wins: minillm's own, Llama/Mistral
# (sentencepiece), GPT-2/Qwen2/Pythia/OLMo (<|endoftext|>), Llama 3, BERT-style, GPT-NeoX
ROLE_NAMES = {
    "eos": ("<eos>", "</s>", "<|endoftext|>", "<|end_of_text|>", "<|im_end|>", "<|eot_id|>"),
    "bos": ("<bos>", "<s>", "<|begin_of_text|>", "<|startoftext|>"),
    "pad": ("<pad>", "<|pad|>", "[PAD]", "<|padding|>", "<|finetune_right_pad_id|>"),
    "unk": ("<unk>", "[UNK]", "<|unk|>"),
}


@dataclass(frozen=True)
class SpecialTokens:
    """The ids the data, evaluation and generation code give a role, asked of a tokenizer.

    ``eos`` ends every document, response and source (and starts an empty prompt); ``pad``
    fills batches where no label is scored and attention masks (or causality) hide it, so a
    tokenizer without one (Llama, GPT-2) pads with ``eos``; ``bos`` starts a translation's
    decoder, ``eos`` when there is none (GPT-2's ``<|endoftext|>`` is both); ``unk`` is
    informative only. Roles are found by name (``ROLE_NAMES``) in tokenizer.json alone, not
    in a tokenizer_config.json beside it: a checkpoint carries tokenizer.json only, so a
    fine-tuning run and a later generation from its checkpoint must find the same ids.
    """

    pad: int
    bos: int
    eos: int
    unk: int | None = None

    @classmethod
    def from_tokenizer(cls, tokenizer: Tokenizer, where: str = "the tokenizer") -> SpecialTokens:
        """The ids of ``tokenizer``; ``where`` (its file) names it in the error when it has no
        end-of-sequence token."""
        found = {
            role: next((i for n in names if (i := tokenizer.token_to_id(n)) is not None), None)
            for role, names in ROLE_NAMES.items()
        }
        if found["eos"] is None:
            raise ValueError(
                f"{where} has no end-of-sequence token (none of {' '.join(ROLE_NAMES['eos'])} "
                "is in its vocabulary); add one as a special token, e.g. "
                "tokenizer.add_special_tokens(['</s>']), and size the model to the new vocabulary"
            )
        eos = found["eos"]
        return cls(
            pad=eos if found["pad"] is None else found["pad"],
            bos=eos if found["bos"] is None else found["bos"],
            eos=eos,
            unk=found["unk"],
        )
