"""minillm: a trainable mini-LLM framework.

``minillm.load_checkpoint(path)`` -> (model, tokenizer), without Hydra or Lightning;
``minillm.load_pretrained(folder)`` the same from an export (``scripts/export.py``).
"""

from minillm.checkpoint import load_checkpoint, load_pretrained, save_pretrained

__all__ = ["load_checkpoint", "load_pretrained", "save_pretrained"]
