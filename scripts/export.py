"""Export a checkpoint as plain files that load without Lightning or Hydra.

    python scripts/export.py ckpt=outputs/<run>/checkpoints/best.ckpt out=exported/

The command is ``minillm.cli.export`` (also installed as ``minillm-export``); ``--help`` lists
every option.
"""

from minillm.cli.export import main

if __name__ == "__main__":
    main()
