"""Evaluation: perplexity and bits per byte (here), BLEU (``minillm.evaluation.bleu``).

``scripts/evaluate.py metric=ppl|bleu`` is the command line; BLEU is imported only when asked
for, so perplexity needs no sacrebleu or seq2seq code.
"""

from minillm.evaluation.perplexity import PerplexityResult, perplexity, spans

__all__ = ["PerplexityResult", "perplexity", "spans"]
