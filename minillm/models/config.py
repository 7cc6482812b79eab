"""The one schema of a model: sizes, the attention kinds per role, encoder-decoder options."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

ARCHS = ("decoder", "encoder_decoder")


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
    norm_eps: float = 1e-5
    tie_embeddings: bool = True
    init_std: float = 0.02
    # decoder self-attention: {"kind": <registry key>, **knobs}; filled from conf/attn/
    attn: dict[str, Any] = field(default_factory=lambda: {"kind": "mha"})
    # encoder-decoder only: a registry key or {"kind": ..., **knobs}
    n_encoder_layers: int | None = None  # None: same as n_layers
    encoder_attn: Any = "mha"
    cross_attn: Any = "mha"
    share_embeddings: bool = True  # one embedding table for source and target

    def __post_init__(self) -> None:
        if self.arch not in ARCHS:
            raise ValueError(f"unknown model arch {self.arch!r}; choose one of {ARCHS}")
        if self.dim % self.n_heads:
            raise ValueError(f"model dim={self.dim} is not divisible by n_heads={self.n_heads}")

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
