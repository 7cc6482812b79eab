"""The commands (``minillm-train``, ``-generate``, ``-evaluate``, ``-export``): Hydra apps
composed from ``conf/``, checked before any work, one-line errors (``minillm.cli.app``)."""
