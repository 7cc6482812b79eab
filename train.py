"""Train a minillm model: ``python train.py [group=option ...] [key=value ...]``.

The command itself lives in ``minillm.cli.train`` (installed as ``minillm-train``).
"""

from minillm.cli.train import main

if __name__ == "__main__":
    main()
