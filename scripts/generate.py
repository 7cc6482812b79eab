r"""Generate text from a checkpoint: ``python scripts/generate.py ckpt=... prompt="..."``.

    python scripts/generate.py ckpt=run/checkpoints/last.ckpt prompt="The Congress"
    python scripts/generate.py ckpt=... prompt="..." num_beams=4 n_best=2      # beam search
    python scripts/generate.py ckpt=<translation ckpt> prompt="..." temperature=0.8 top_p=0.9 seed=1
    python scripts/generate.py ckpt=<target> draft=<small ckpt> draft_k=4 prompt="..."

The command lives in ``minillm.cli.generate`` (installed as ``minillm-generate``); ``--help``
lists every option.
"""

from minillm.cli.generate import main

if __name__ == "__main__":
    main()
