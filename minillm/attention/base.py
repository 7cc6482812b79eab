"""The interface every attention kind implements (see DESIGN.md, "The attention interface").

A kind is an ``nn.Module`` with a nested ``Config`` dataclass holding its own knobs, the
``roles`` it can fill, ``forward`` (whole sequence -> parallel form; new tokens with a cache ->
step form) and ``init_cache`` returning its own cache type.

Shapes used throughout: ``B`` batch, ``T`` query tokens, ``S`` key tokens (memory or cache),
``H`` query heads, ``H_kv`` key/value heads, ``D`` head dim.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from minillm.attention.cache import Cache
from minillm.positions import POSITIONS, Positions, build_positions, positions_with

ROLES = ("causal", "bidirectional", "cross")


class Attention(nn.Module):
    """Base class: projections are built by subclasses; this holds the shared bookkeeping.

    ``forward(x, *, positions, cache=None, memory=None, mask=None)``:

    - ``x`` (B, T, dim) queries (and keys/values for self-attention roles).
    - ``positions`` (B, T) long, absolute position of each query token (left-padded rows start
      counting at their first real token). Kinds without positional encoding ignore it.
    - ``cache`` the object returned by ``init_cache``; when given, the new keys/values are
      appended to it and the output attends over everything it holds. A kind touches its
      cache only through the cache's own ``update`` (see ``cache.py``), so the same forward
      runs eagerly and under torch.compile with fixed shapes.
    - ``memory`` (B, S, dim) encoder output, only for the ``cross`` role. With a cache, the
      call given ``memory`` writes what the kind keeps of it; calls with ``memory=None`` read
      that back (the memory is projected once per source).
    - ``mask`` (B, S) bool, True where a *key* is a real token: for self roles the keys are
      ``x`` itself (S = T), for ``cross`` they are ``memory``. ``None`` means no padding.
    """

    roles: ClassVar[tuple[str, ...]] = ()
    # positions mechanisms (minillm/positions) this kind has a meaning for. Every kind can take
    # what leaves attention untouched; a kind that rotates queries and keys or adds a bias to
    # a score matrix says so.
    positions_accepted: ClassVar[tuple[str, ...]] = ("absolute", "none")

    @dataclass
    class Config:
        pass

    def __init__(self, cfg: Any, dim: int, n_heads: int, role: str) -> None:
        super().__init__()
        if dim % n_heads:
            raise ValueError(f"dim={dim} is not divisible by n_heads={n_heads}")
        self.cfg = cfg
        self.dim = dim
        self.n_heads = n_heads
        self.head_dim = dim // n_heads
        self.role = role
        self.kind = type(self).__name__  # build_attention sets the registry key
        default = "rope" if "rotary" in self.positions_accepted else "none"
        self.use_positions(build_positions(default, dim, n_heads, 1, self.causal))

    def use_positions(self, module: Positions) -> None:
        """Take ``module`` (its model's, shared by a stack) as this kind's positions.

        Stored, not registered: the model owns it, so a shared table is saved once. Until
        this is called a kind uses its natural default: RoPE if it takes rotations, else none.
        """
        if module.mechanism not in self.positions_accepted:
            key = next(k for k, cls in POSITIONS.items() if isinstance(module, cls))
            raise ValueError(
                f"positions {key!r} ({module.mechanism}) has no meaning for attention kind "
                f"{self.kind!r}; positions that work with it: "
                f"{', '.join(positions_with(self.positions_accepted))}"
            )
        object.__setattr__(self, "pos_encoding", module)

    def grouped_kv_projections(self, n_kv_heads: int | None, bias: bool) -> None:
        """``q_proj``/``k_proj``/``v_proj``/``o_proj`` with ``n_kv_heads`` key/value heads
        (None: one per query head) and ``self.n_kv_heads``: the softmax kinds' projections
        (mha/gqa/mqa, local, sparse)."""
        n_heads, dim = self.n_heads, self.dim
        self.n_kv_heads = n_kv_heads or n_heads
        if self.n_kv_heads < 1 or n_heads % self.n_kv_heads:
            raise ValueError(
                f"n_heads={n_heads} is not divisible by n_kv_heads={self.n_kv_heads}; "
                f"choose an n_kv_heads that divides {n_heads} (1 gives MQA, {n_heads} gives MHA)"
            )
        kv_dim = self.n_kv_heads * self.head_dim
        self.q_proj = nn.Linear(dim, dim, bias=bias)
        self.k_proj = nn.Linear(dim, kv_dim, bias=bias)
        self.v_proj = nn.Linear(dim, kv_dim, bias=bias)
        self.o_proj = nn.Linear(dim, dim, bias=bias)

    @property
    def causal(self) -> bool:
        return self.role == "causal"

    def init_weights(self, std: float, out_std: float) -> None:
        """Normal(0, std) for every linear map, ``out_std`` for ``o_proj``, zero biases.

        Kinds with extra parameters (gates, norms) override and call ``super()``.
        """
        for name, module in self.named_modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, 0.0, out_std if name == "o_proj" else std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    def init_cache(
        self,
        batch_size: int,
        max_len: int,
        device: torch.device | str,
        dtype: torch.dtype,
        lookahead: int = 0,
    ) -> Cache:
        """This kind's own cache (a ``Cache``) for ``batch_size`` rows of up to ``max_len``
        tokens (cross role: ``max_len`` = memory length). ``lookahead``: tokens a step may
        write beyond what it keeps and then ``rollback`` (speculative decoding)."""
        raise NotImplementedError

    def flops_per_token(self, context: int) -> float:
        """Forward FLOPs per query token over a sequence (or, for ``cross``, a memory) of
        ``context`` tokens: 2 per multiply-add of every matmul, this module's projections
        included (``projection_flops``). Elementwise work (softmax, RoPE, gates, norms) is
        not counted, as in PaLM / nanoGPT / torchtitan; training costs 3x this.

        Every kind overrides this. The default raises, so a kind without a count logs
        tokens/s only instead of a wrong MFU.
        """
        raise NotImplementedError(f"{type(self).__name__} does not define flops_per_token")

    def projection_flops(self) -> int:
        """2 x the weight entries of every ``nn.Linear`` here: their FLOPs per token."""
        return sum(
            2 * m.in_features * m.out_features for m in self.modules() if isinstance(m, nn.Linear)
        )

    def forward(
        self,
        x: Tensor,
        *,
        positions: Tensor,
        cache: Any = None,
        memory: Tensor | None = None,
        mask: Tensor | None = None,
    ) -> Tensor:
        raise NotImplementedError

    def attention_weights(self, x: Tensor, *, positions: Tensor) -> Tensor:
        """Token-mixing weights (B, H, T, T) of self-attention over ``x`` (no padding, no
        cache): entry [b, h, t, s] is how much value s adds to query t's head-h output before
        the output projection (``scripts/attention_map.py``). Kinds that can say override this.
        """
        raise NotImplementedError(
            f"{type(self).__name__} does not provide attention_weights (attention maps)"
        )
