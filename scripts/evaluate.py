"""Evaluate a checkpoint: perplexity and bits per byte (``metric=ppl``) or BLEU (``metric=bleu``).

    python scripts/evaluate.py ckpt=outputs/<run>/checkpoints/best.ckpt          # its held-out docs
    python scripts/evaluate.py ckpt=... data=text 'data.files=[notes.txt]' stride=64
    python scripts/evaluate.py metric=bleu ckpt=... data.test_file=test.jsonl num_beams=5

The command is ``minillm.cli.evaluate`` (also installed as ``minillm-evaluate``); ``--help``
lists every option.
"""

from minillm.cli.evaluate import main

if __name__ == "__main__":
    main()
