"""RoPE's functions, now in ``minillm.positions.rope``; re-exported for kinds that still rotate
by a ``rope_base`` of their own (``sparse``). Other kinds take positions from the model
(``Attention.pos_encoding``), so ``model.positions`` reaches them."""

from minillm.positions.rope import apply_rope, rope_angles

__all__ = ["apply_rope", "rope_angles"]
