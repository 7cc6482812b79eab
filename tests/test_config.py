"""Invariant 5: every config composes, every key is a field of its dataclass (Hydra's
structured-config schemas), no default is written twice, and a bad value stops a command
with one line and exit status 2 before anything is read or written."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import CONF, ROOT, compose

from minillm.attention import ATTENTION, attention_config
from minillm.cli.app import check_command_line
from minillm.cli.schema import TrainSchema
from minillm.cli.train import validate
from minillm.models import ModelConfig
from minillm.models.mlp import MLPS, mlp_config
from minillm.positions import positions_config
from minillm.training import LoggerConfig, OptimConfig, TrainerConfig
from minillm.training.run import DATA_MODULES, RunConfig

OPTIONS = [
    (group.name, option.stem)
    for group in sorted(CONF.iterdir())
    if group.is_dir()
    for option in sorted(group.glob("*.yaml"))
]
REQUIRED = {
    ("data", "text"): ["data.files=[x.txt]"],
    ("data", "instructions"): ["data.files=[x.jsonl]"],
    ("data", "hf"): ["data.name=x"],
    ("experiment", "finetune"): ["init_from=x"],
    ("data", "imagefolder"): ["data.path=x", "model.arch=vit"],
}
SCHEMAS = {"model": ModelConfig, "trainer": TrainerConfig, "optim": OptimConfig}
SCHEMAS["logger"] = LoggerConfig


@pytest.mark.parametrize(("group", "option"), OPTIONS, ids=[f"{g}/{o}" for g, o in OPTIONS])
def test_every_option_composes_and_validates(group: str, option: str) -> None:
    cfg = compose([f"{group}={option}", *REQUIRED.get((group, option), [])])
    validate(cfg)  # every dataclass built: keys known, values in range


GROUP_KINDS = [("attn", k, attention_config) for k in sorted(ATTENTION)]
GROUP_KINDS += [("mlp", k, mlp_config) for k in sorted(MLPS)]


@pytest.mark.parametrize("group, kind, resolve", GROUP_KINDS)
def test_every_registry_kind_is_a_group_option_without_yaml(group, kind, resolve) -> None:
    """attn=<kind> and mlp=<kind> come from the registries, not YAML files."""
    cfg = compose([f"{group}={kind}"])
    _, resolved = resolve(kind)
    assert cfg[group] == {"kind": kind, **dataclasses.asdict(resolved)}
    assert cfg["model"][group] == cfg[group]  # the model reads the group


def _schema_defaults(cls: type) -> dict:
    out = {}
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            out[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            out[f.name] = f.default_factory()
    return out


def _redundant(values: dict, schema: type, where: str) -> list[str]:
    """Keys of ``values`` equal to the dataclass default (nested groups followed)."""
    defaults, out = _schema_defaults(schema), []
    for key, value in values.items():
        if key in ("defaults", "hydra"):
            continue
        nested = {**SCHEMAS, "data": None}.get(key) if schema is TrainSchema else None
        if isinstance(value, dict) and nested:
            out += _redundant(value, nested, f"{where}{key}.")
        elif key in defaults and defaults[key] == value:
            out.append(f"{where}{key}={value!r}")
    return out


def _yaml_schema(path: Path) -> type | None:
    values = yaml.safe_load(path.read_text()) or {}
    group = path.parent.name
    if group == "data":
        base = next(d for d in values.get("defaults", []) if str(d).startswith("base_"))
        return DATA_MODULES[base.removeprefix("base_")].Config
    if group == "experiment":
        return TrainSchema
    return SCHEMAS.get(group)


GROUP_FILES = sorted(p for p in CONF.glob("*/*.yaml") if p.parent.name != "experiment")


@pytest.mark.parametrize("path", GROUP_FILES, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_no_default_is_written_twice(path: Path) -> None:
    schema = _yaml_schema(path)
    values = yaml.safe_load(path.read_text()) or {}
    assert schema is not None, f"{path} has no schema"
    assert not _redundant(values, schema, f"{path.parent.name}/"), "restates a default"


def _leaves(values: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in values.items():
        if isinstance(value, dict):
            out |= _leaves(value, f"{prefix}{key}.")
        else:
            out[f"{prefix}{key}"] = value
    return out


@pytest.mark.parametrize("path", sorted(CONF.glob("experiment/*.yaml")), ids=lambda p: p.stem)
def test_experiments_set_only_what_changes(path: Path) -> None:
    """A preset's key must change the config it is applied to (its group choices included)."""
    values = yaml.safe_load(path.read_text()) or {}
    groups = [
        f"{k.removeprefix('override /')}={v}"
        for d in values.pop("defaults", [])
        for k, v in d.items()
    ]
    values.pop("hydra", None)
    base = _leaves(compose([*groups, *REQUIRED.get(("experiment", path.stem), [])]))
    same = [k for k, v in _leaves(values).items() if k in base and base[k] == v]
    assert not same, f"{path.name} restates {same}"


def test_train_yaml_holds_no_top_level_defaults() -> None:
    values = yaml.safe_load((CONF / "train.yaml").read_text())
    assert set(values) <= {"defaults", "model", "hydra"}
    assert not set(values) & {f.name for f in dataclasses.fields(RunConfig)}


BAD_VALUES = [
    ("batch_size=0", "batch_size=0"),
    ("trainer.max_steps=0", "trainer.max_steps=0"),
    ("trainer.val_check_interval=0", "trainer.val_check_interval=0"),
    ("trainer.accumulate_grad_batches=0", "trainer.accumulate_grad_batches=0"),
    ("optim.lr=-1", "optim.lr=-1"),
    ("model.dim=0", "model.dim=0"),
    ("model.n_layers=0", "model.n_layers=0"),
    ("model.max_len=0", "model.max_len=0"),
    ("data.vocab_size=3", "data.vocab_size=3"),
    ("data.valid_fraction=1.5", "data.valid_fraction=1.5"),
    ("trainer.max_steps=abc", "trainer.max_steps"),
    ("attn=nope", "mha"),
    ("attn.windw=3", "attn.windw"),
    ("model=nope", "tiny"),
    ("data=text", "data.files"),
    ("attn=gqa attn.n_kv_heads=3", "n_kv_heads=3"),
    ("attn=local attn.window=0", "window"),
    ("-m attn=mha,nope", "nope"),
    ("mlp=nope", "moe, swiglu"),
    ("mlp.n_experts=4", "mlp.n_experts"),  # a knob of moe, not of the default swiglu
    ("mlp=moe mlp.top_k=9", "top_k=9"),
]


@pytest.mark.parametrize(("args", "named"), BAD_VALUES, ids=[a for a, _ in BAD_VALUES])
def test_bad_value_is_one_line_and_exit_2(args: str, named: str, capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        check_command_line("train", validate, args.split())
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and named in err, err


def test_good_command_line_passes_the_check() -> None:
    check_command_line("train", validate, ["model=tiny", "attn=local", "attn.window=8"])
    check_command_line("train", validate, ["model=tiny", "mlp=moe", "mlp.n_experts=4"])
    check_command_line("train", validate, ["-m", "attn=mha,linear", "model=tiny"])


def test_train_py_bad_value_exits_2_without_traceback_or_files(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "train.py", "model.n_layers=0", f"hydra.run.dir={run_dir}"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("error: model.n_layers=0: must be a positive integer")
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert not run_dir.exists()


def test_train_py_help_lists_groups_and_keys() -> None:
    proc = subprocess.run(
        [sys.executable, "train.py", "--help"], cwd=ROOT, capture_output=True, text=True
    )
    assert proc.returncode == 0
    words = ("attn:", "gated_linear", "mlp: gelu, moe, swiglu", "max_steps", "MINILLM_TRACEBACK")
    for word in words:
        assert word in proc.stdout


@pytest.mark.parametrize(
    "resolve, cfg, line",
    [
        (attention_config, {"kind": "local", "windw": 8}, "attention kind 'local'"),
        (mlp_config, {"kind": "swiglu", "hiden": 8}, "model.mlp: kind 'swiglu'"),
        (positions_config, {"kind": "rope", "bse": 10.0}, "positions kind 'rope'"),
    ],
)
def test_every_registry_names_an_unknown_option_and_the_valid_ones(resolve, cfg, line) -> None:
    bad = next(k for k in cfg if k != "kind")
    with pytest.raises(ValueError, match=rf"^{line} has no option\(s\) \['{bad}'\]; its options"):
        resolve(cfg)
    resolve({"kind": cfg["kind"]})  # the kind alone is fine
