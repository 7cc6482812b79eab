"""The one schema of a model: sizes, the attention kinds per role, encoder-decoder options."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

import torch

from minillm import checks
from minillm.attention import build_attention

N_SPECIAL_TOKENS = 4  # <pad> <bos> <eos> <unk> (minillm.data.tokenizer.SPECIAL_TOKENS)

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
        checks.choice("model.arch", self.arch, ARCHS)
        for key in ("vocab_size", "dim", "n_layers", "n_heads", "max_len"):
            checks.integer(f"model.{key}", getattr(self, key))
        if self.vocab_size <= N_SPECIAL_TOKENS:
            raise ValueError(
                f"model.vocab_size={self.vocab_size}: must be larger than the "
                f"{N_SPECIAL_TOKENS} special tokens"
            )
        checks.integer("model.mlp_hidden", self.mlp_hidden, optional=True)
        checks.integer("model.n_encoder_layers", self.n_encoder_layers, 0, optional=True)
        checks.number("model.dropout", self.dropout, 0, 1, high_open=True)
        checks.number("model.norm_eps", self.norm_eps, 0, low_open=True)
        checks.number("model.init_std", self.init_std, 0, low_open=True)
        if self.dim % self.n_heads:
            raise ValueError(
                f"model.dim={self.dim} is not divisible by model.n_heads={self.n_heads}; "
                "choose a dim that is a multiple of n_heads"
            )
        self._check_attention()

    def _check_attention(self) -> None:
        """Build each attention config on the meta device: its own checks run, no memory."""
        roles = [(self.attn, "causal")]
        if self.arch == "encoder_decoder":
            roles += [(self.encoder_attn, "bidirectional"), (self.cross_attn, "cross")]
        with torch.device("meta"):
            for attn, role in roles:
                build_attention(attn, self.dim, self.n_heads, role)

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
