"""minillm: a trainable mini-LLM framework.

``minillm.load_checkpoint(path)`` -> (model, tokenizer), without Hydra or Lightning.
"""

from minillm.checkpoint import load_checkpoint

__all__ = ["load_checkpoint"]
