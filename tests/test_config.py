"""Invariant 5: every YAML in conf/ composes, and every key is a field of its dataclass."""

from __future__ import annotations

import dataclasses

import pytest
import yaml
from conftest import CONF, compose
from hydra.errors import ConfigCompositionException

from minillm.attention import ATTENTION, attention_config
from minillm.models import ModelConfig
from minillm.training import LoggerConfig, OptimConfig, TrainerConfig
from minillm.training.run import DATA_MODULES, GROUPS, RunConfig

SCHEMAS = {
    "model": ModelConfig,
    "trainer": TrainerConfig,
    "optim": OptimConfig,
    "logger": LoggerConfig,
}
OPTIONS = [
    (group.name, option.stem)
    for group in sorted(CONF.iterdir())
    if group.is_dir()
    for option in sorted(group.glob("*.yaml"))
]
REQUIRED = {("data", "text"): ["data.files=[x.txt]"], ("data", "hf"): ["data.name=x"]}


def field_names(cls: type) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}


@pytest.mark.parametrize(("group", "option"), OPTIONS, ids=[f"{g}/{o}" for g, o in OPTIONS])
def test_every_option_composes_and_matches_its_schema(group: str, option: str) -> None:
    cfg = compose([f"{group}={option}", *REQUIRED.get((group, option), [])])
    top = {k: v for k, v in cfg.items() if k not in GROUPS}
    assert set(top) <= field_names(RunConfig)
    data_schema = DATA_MODULES[cfg["data"]["task"]].Config  # each task has its own schema
    for name, schema in {**SCHEMAS, "data": data_schema}.items():
        assert set(cfg[name]) <= field_names(schema), (
            f"{name}: {set(cfg[name]) - field_names(schema)}"
        )
    cls, attn_cfg = attention_config(cfg["attn"])  # raises on unknown keys
    ModelConfig.from_dict({**cfg["model"], "attn": cfg["attn"]})


@pytest.mark.parametrize("kind", sorted(ATTENTION))
def test_attn_yaml_equals_registry_preset(kind: str) -> None:
    path = CONF / "attn" / f"{kind}.yaml"
    assert path.exists(), f"registry kind {kind!r} has no conf/attn/{kind}.yaml"
    values = yaml.safe_load(path.read_text())
    _, resolved = attention_config(kind)
    assert values == {"kind": kind, **dataclasses.asdict(resolved)}


def test_unknown_attention_lists_the_choices() -> None:
    with pytest.raises(ConfigCompositionException) as err:
        compose(["attn=nope"])
    message = str(err.value) + str(err.value.__cause__)
    for kind in ("mha", "mqa", "gqa"):
        assert kind in message


def test_unknown_key_in_a_group_is_rejected() -> None:
    with pytest.raises(ConfigCompositionException):
        compose(["trainer.max_stepz=3"])
