"""Save a heatmap of what one attention layer attends to for a prompt.

    python scripts/attention_map.py ckpt=outputs/<run>/checkpoints/best.ckpt prompt="To be, or not"

The command is ``minillm.cli.attention_map`` (also installed as ``minillm-attention-map``);
``--help`` lists every option.
"""

from minillm.cli.attention_map import main

if __name__ == "__main__":
    main()
