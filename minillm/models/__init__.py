"""Models built from one block class. ``build_model`` picks the architecture by config."""

from __future__ import annotations

from typing import Any

from torch import nn

from minillm.models.block import Block
from minillm.models.config import ModelConfig
from minillm.models.decoder import DecoderLM
from minillm.models.encoder_decoder import EncoderDecoderLM
from minillm.models.vit import ViT

MODELS: dict[str, type[nn.Module]] = {
    "decoder": DecoderLM,
    "encoder_decoder": EncoderDecoderLM,
    "vit": ViT,
}

__all__ = ["MODELS", "Block", "DecoderLM", "EncoderDecoderLM", "ModelConfig", "ViT", "build_model"]


def build_model(cfg: ModelConfig | dict[str, Any]) -> nn.Module:
    if not isinstance(cfg, ModelConfig):
        cfg = ModelConfig.from_dict(cfg)
    if cfg.arch not in MODELS:
        raise ValueError(f"model arch {cfg.arch!r} is not available; choose from {sorted(MODELS)}")
    return MODELS[cfg.arch](cfg)
