"""The dataclasses registered as Hydra's structured-config schemas: the only place a default
lives. ``conf/*.yaml`` hold what differs from these defaults, nothing else.

- ``train_schema``: the top level of ``conf/train.yaml`` (``RunConfig``'s keys) with the typed
  groups ``model`` (ModelConfig), ``trainer``, ``optim``, ``logger``.
- ``attn/<kind>``: one node per attention registry key, generated from the kind's ``Config``
  and its registry preset, so a new kind needs no YAML (a YAML only for a further preset).
- ``mlp/<kind>``: likewise one node per feed-forward registry key (``MLPS``), from its
  ``Config``: ``mlp=moe mlp.n_experts=4``. ``conf/train.yaml`` points ``model.mlp`` at it, so
  the stored model config holds ``{"kind": ..., **knobs}``; ``model.mlp=<kind>`` still
  replaces the whole node with that kind's defaults (the form runs before the group used).
- ``data/base_<task>``: the schema of each data task; ``conf/data/*.yaml`` start from one.

Composition then rejects unknown keys and values of the wrong type; ranges are checked by
the dataclasses' ``__post_init__`` (``minillm.cli.train.validate``).
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf

from minillm.attention import ATTENTION, attention_config
from minillm.models import ModelConfig
from minillm.models.config import attention_label
from minillm.models.mlp import MLPS
from minillm.training import LoggerConfig, OptimConfig, TrainerConfig
from minillm.training.run import DATA_MODULES, RunConfig


@dataclass
class TrainSchema(RunConfig):
    """conf/train.yaml: the run's own keys plus one typed node per config group."""

    model: ModelConfig = field(default_factory=ModelConfig)
    attn: Any = None  # an attn/<kind> node (attention_schema)
    mlp: Any = None  # an mlp/<kind> node (mlp_schema)
    data: Any = None  # a data/<option> node, built on a data/base_<task> schema
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)


def attention_schema(kind: str) -> type:
    """A dataclass ``{kind: <key>, **Config fields}`` whose defaults are the registry preset."""
    cls, resolved = attention_config(kind)
    hints = typing.get_type_hints(cls.Config)
    fields = [("kind", str, field(default=kind))]
    for f in dataclasses.fields(cls.Config):
        fields.append((f.name, hints[f.name], field(default=getattr(resolved, f.name))))
    return dataclasses.make_dataclass(f"{kind}_attention", fields)


def mlp_schema(kind: str) -> type:
    """A dataclass ``{kind: <key>, **Config fields}`` with the kind's ``Config`` defaults."""
    cls = MLPS[kind]
    hints = typing.get_type_hints(cls.Config)
    fields = [("kind", str, field(default=kind))]
    for f in dataclasses.fields(cls.Config):
        fields.append((f.name, hints[f.name], field(default=f.default)))
    return dataclasses.make_dataclass(f"{kind}_mlp", fields)


def _attn_label(kind: str, layers: Any) -> str:
    """``${attn_label:${attn.kind},${model.layers}}``: a run's kind, or its hybrid's pattern
    (``3xgated_linear+mha``), e.g. in a sweep's job directory names."""
    layers = OmegaConf.to_container(layers) if OmegaConf.is_config(layers) else layers
    return attention_label(layers or [kind])


def register() -> None:
    """Put every schema into Hydra's ConfigStore and the resolvers into OmegaConf (idempotent)."""
    OmegaConf.register_new_resolver("attn_label", _attn_label, replace=True)
    cs = ConfigStore.instance()
    cs.store(name="train_schema", node=TrainSchema)
    for kind in ATTENTION:
        cs.store(group="attn", name=kind, node=attention_schema(kind))
    for kind in MLPS:
        cs.store(group="mlp", name=kind, node=mlp_schema(kind))
    for task, module in DATA_MODULES.items():
        cs.store(group="data", name=f"base_{task}", node=module.Config)


register()
