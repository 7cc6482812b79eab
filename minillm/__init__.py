"""minillm: a trainable mini-LLM framework.

``minillm.load_checkpoint(path)`` -> (model, tokenizer), without Hydra or Lightning;
``minillm.load_pretrained(folder)`` the same from an export (``scripts/export.py``);
``minillm.generate(model, tokenizer, prompts, **options)`` -> completions.
"""

from minillm.checkpoint import load_checkpoint, load_pretrained, save_pretrained
from minillm.generation import generate

__all__ = ["generate", "load_checkpoint", "load_pretrained", "save_pretrained"]
