"""Corpora, tokenizers and the language-modelling DataModule."""

from minillm.data.lm import LMDataModule
from minillm.data.sources import DataConfig, load_documents
from minillm.data.tokenizer import SPECIAL_TOKENS, build_tokenizer, load_tokenizer

__all__ = [
    "SPECIAL_TOKENS",
    "DataConfig",
    "LMDataModule",
    "build_tokenizer",
    "load_documents",
    "load_tokenizer",
]
