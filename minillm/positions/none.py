"""No positional information (``none``, NoPE; Kazemnejad et al. 2023, "The Impact of
Positional Encoding on Length Generalization in Transformers").

A causal stack still tells positions apart (a query sees a number of keys that grows with its
position); a bidirectional one without positions is permutation-invariant.
"""

from __future__ import annotations

from minillm.positions.base import Positions


class NoPositions(Positions):
    mechanism = "none"
