"""The one schema of a model: sizes, the attention kinds per role, encoder-decoder options."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import torch
from torch import nn

from minillm import checks
from minillm.attention import ATTENTION, build_attention
from minillm.models.mlp import build_mlp
from minillm.positions import RotaryPositions, build_positions, positions_kind

# an end-of-sequence token and one other: the fewest any tokenizer has (minillm's own have 4
# special tokens, GPT-2's one, wherever they sit; minillm.data.tokenizer.SpecialTokens)
MIN_VOCAB_SIZE = 2

ARCHS = ("decoder", "encoder_decoder", "vit")
# the role of ``attn`` (the self-attention of the main stack) in each architecture
SELF_ROLE = {"decoder": "causal", "encoder_decoder": "causal", "vit": "bidirectional"}
POOLS = ("mean", "cls")
# every norm of a model (each block's, the final one): ``model.norm`` (build_norm in block.py);
# LayerNorm has a bias (GPT-2), RMSNorm none (Llama)
NORMS: dict[str, type[nn.Module]] = {"rmsnorm": nn.RMSNorm, "layernorm": nn.LayerNorm}


def attention_label(layers: list[Any]) -> str:
    """Layer kinds (registry keys or {"kind": ...}) run-length coded: ``3xgated_linear+mha``."""
    kinds = [a if isinstance(a, str) else a["kind"] for a in layers]
    runs: list[list[Any]] = []
    for kind in kinds:
        if runs and runs[-1][0] == kind:
            runs[-1][1] += 1
        else:
            runs.append([kind, 1])
    return "+".join(kind if n == 1 else f"{n}x{kind}" for kind, n in runs)


@dataclass
class ModelConfig:
    arch: str = "decoder"  # "decoder" (DecoderLM) or "encoder_decoder" (EncoderDecoderLM)
    vocab_size: int = 8192  # set from the tokenizer at build time
    dim: int = 256
    n_layers: int = 4  # decoder blocks
    n_heads: int = 4
    max_len: int = 256  # training context; also the default generation cache size
    dropout: float = 0.0
    mlp_hidden: int | None = None  # None: SwiGLU width 8/3 * dim rounded up to a multiple of 64
    # feed-forward: a registry key (minillm/models/mlp.py MLPS) or {"kind": ..., **knobs}
    mlp: Any = "swiglu"
    norm: str = "rmsnorm"  # a NORMS key: rmsnorm (Llama) or layernorm (GPT-2)
    norm_eps: float = 1e-5
    tie_embeddings: bool = True
    init_std: float = 0.02
    # decoder self-attention: {"kind": <registry key>, **knobs}; the `attn` config group
    attn: dict[str, Any] = field(default_factory=lambda: {"kind": "mha"})
    # per-layer self-attention of the main stack (a hybrid), overriding ``attn``: a list of
    # registry keys or {"kind": ..., **knobs}, repeated to n_layers (whose multiple its length
    # must be), e.g. [gated_linear, gated_linear, gated_linear, mha]. None: ``attn`` everywhere
    layers: list[Any] | None = None
    # how attention gets token order: a minillm/positions registry key (rope, alibi, t5,
    # learned, none) or {"kind": ..., **knobs}, for every self-attention of the model (each
    # stack its own module; cross-attention has none). None: each attention kind's default
    # (RoPE where it takes rotations, else none)
    positions: Any = None
    # Transformer-XL segment recurrence (decoder only): each block also attends over the last
    # memory_len hidden states that entered it in the previous segments (no gradient through
    # them); training reads the data as streams of consecutive segments. 0: off
    memory_len: int = 0
    # encoder-decoder only: a registry key or {"kind": ..., **knobs}
    n_encoder_layers: int | None = None  # None: same as n_layers
    encoder_attn: Any = "mha"
    cross_attn: Any = "mha"
    share_embeddings: bool = True  # one embedding table for source and target
    # vit only: square images -> classes; ``attn`` is its bidirectional self-attention, and
    # vocab_size, max_len and tie_embeddings are unused (the head is ``n_classes`` wide)
    image_size: int = 32  # pixels a side; the data must deliver (channels, size, size)
    patch_size: int = 4  # pixels a side of a patch; must divide image_size
    channels: int = 3
    n_classes: int | None = None  # None: vocab_size, which train() sets to the data's classes
    pool: str = "mean"  # "mean" of the patch states, or a learned "cls" token's state

    def __post_init__(self) -> None:
        self._move_rope_base()
        checks.choice("model.arch", self.arch, ARCHS)
        for key in ("dim", "n_layers", "n_heads", "max_len"):
            checks.integer(f"model.{key}", getattr(self, key))
        if self.arch == "vit":
            self._check_vit()
        else:
            checks.integer("model.vocab_size", self.vocab_size)
        if self.arch != "vit" and self.vocab_size < MIN_VOCAB_SIZE:
            raise ValueError(
                f"model.vocab_size={self.vocab_size}: must be at least {MIN_VOCAB_SIZE} (an "
                "end-of-sequence token and one other); it is set from the tokenizer"
            )
        checks.integer("model.mlp_hidden", self.mlp_hidden, optional=True)
        checks.integer("model.n_encoder_layers", self.n_encoder_layers, 0, optional=True)
        checks.number("model.dropout", self.dropout, 0, 1, high_open=True)
        checks.choice("model.norm", self.norm, tuple(NORMS))
        checks.number("model.norm_eps", self.norm_eps, 0, low_open=True)
        checks.number("model.init_std", self.init_std, 0, low_open=True)
        if self.dim % self.n_heads:
            raise ValueError(
                f"model.dim={self.dim} is not divisible by model.n_heads={self.n_heads}; "
                "choose a dim that is a multiple of n_heads"
            )
        self._check_attention()
        self._check_mlp()
        self._check_memory()

    def _check_attention(self) -> None:
        """Build each attention config on the meta device: its own checks run, no memory."""
        if self.layers is not None and (
            not self.layers or len(self.layers) > self.n_layers or self.n_layers % len(self.layers)
        ):
            raise ValueError(
                f"model.layers has {len(self.layers)} entries for model.n_layers={self.n_layers}: "
                "give one kind per layer, or a pattern whose length divides n_layers"
            )
        roles = [(attn, SELF_ROLE[self.arch]) for attn in self.layers or [self.attn]]
        if self.arch == "encoder_decoder":
            roles += [(self.encoder_attn, "bidirectional"), (self.cross_attn, "cross")]
        if self.arch == "vit" and self.positions is not None:
            raise ValueError(
                f"model.positions={self.positions!r}: a vit has its own learned 2-D positions; "
                "model.positions applies to decoder and encoder_decoder (leave it null)"
            )
        with torch.device("meta"):
            for attn, role in roles:
                module = build_attention(attn, self.dim, self.n_heads, role)
                if self.positions is not None and role != "cross":  # cross: no positions
                    causal = role == "causal"
                    pos = build_positions(self.positions, self.dim, self.n_heads, 1, causal)
                    module.use_positions(pos)

    def _move_rope_base(self) -> None:
        """Checkpoints from before ``model.positions`` kept RoPE's base in the attention
        configs (``attn.rope_base``): move it to ``positions`` so they load unchanged. A kind
        whose Config still has its own ``rope_base`` keeps it; cross-attention never used it."""
        bases: list[float] = []

        def strip(attn: Any, role: str) -> Any:
            if not isinstance(attn, Mapping) or "rope_base" not in attn:
                return attn
            cls = ATTENTION.get(attn.get("kind"), (None,))[0]
            if cls is None or "rope_base" in {f.name for f in fields(cls.Config)}:
                return attn  # an unknown kind fails later, naming the valid ones
            if role != "cross":
                bases.append(float(attn["rope_base"]))
            return {k: v for k, v in attn.items() if k != "rope_base"}

        self.attn = strip(self.attn, "self")
        self.layers = None if self.layers is None else [strip(a, "self") for a in self.layers]
        self.encoder_attn = strip(self.encoder_attn, "self")
        self.cross_attn = strip(self.cross_attn, "cross")
        if set(bases) <= {RotaryPositions.Config().base}:  # RoPE's default: nothing to carry
            return
        if self.positions is not None or len(set(bases)) > 1:
            raise ValueError(
                f"attention rope_base={sorted(set(bases))} (an old config) cannot combine with "
                f"model.positions={self.positions!r}: set RoPE's base once, in "
                "model.positions={kind: rope, base: ...}"
            )
        self.positions = {"kind": "rope", "base": bases[0]}

    def _check_vit(self) -> None:
        """Image and head sizes; vocab_size may be None here (no tokenizer)."""
        for key in ("image_size", "patch_size", "channels"):
            checks.integer(f"model.{key}", getattr(self, key))
        checks.integer("model.n_classes", self.n_classes, 2, optional=True)
        checks.integer("model.vocab_size", self.vocab_size, 2, optional=True)
        checks.choice("model.pool", self.pool, POOLS)
        if self.image_size % self.patch_size:
            raise ValueError(
                f"model.patch_size={self.patch_size}: must divide model.image_size="
                f"{self.image_size} (e.g. model.patch_size="
                f"{max(d for d in range(1, self.patch_size) if self.image_size % d == 0)})"
            )

    def _check_memory(self) -> None:
        """XL memory needs a decoder and positions that are relative (or none): memory tokens
        take the positions just before the segment's, which an absolute table would not
        carry from one segment to the next."""
        checks.integer("model.memory_len", self.memory_len, 0)
        if not self.memory_len:
            return
        if self.arch != "decoder":
            raise ValueError(
                f"model.memory_len={self.memory_len} needs model.arch=decoder (got "
                f"{self.arch!r}); set model.memory_len=0"
            )
        if self.positions is not None and positions_kind(self.positions) == "learned":
            raise ValueError(
                f"model.memory_len={self.memory_len} cannot use model.positions=learned (absolute "
                "positions restart each segment); use rope, alibi, t5 or none"
            )

    def _check_mlp(self) -> None:
        """Build the feed-forward on the meta device: its Config's checks run, no memory."""
        with torch.device("meta"):
            build_mlp(self.mlp, self.dim, self.hidden)

    def layer_attns(self) -> list[Any]:
        """The self-attention config of each block of the main stack (n_layers entries)."""
        if self.layers is None:
            return [self.attn] * self.n_layers
        return [self.layers[i % len(self.layers)] for i in range(self.n_layers)]

    @property
    def attn_label(self) -> str:
        """The main stack's attention kind for reports: ``mha``, or a hybrid's layer pattern
        run-length coded, e.g. ``3xgated_linear+mha``."""
        return attention_label(self.layers or [self.attn])

    @property
    def hidden(self) -> int:
        if self.mlp_hidden:
            return self.mlp_hidden
        return -(-int(8 * self.dim / 3) // 64) * 64

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown model option(s) {unknown}; valid: {sorted(names)}")
        return cls(**d)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
