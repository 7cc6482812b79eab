"""Every command is a Hydra app run through ``hydra_app``: composed from ``conf/<name>.yaml``,
checked before any work, and a user error ends in one line on stderr with exit status 2.

Checking happens twice, both before Hydra creates a run directory: the config is composed with
Hydra's compose API from the same overrides (unknown keys, wrong types, unknown group options:
Hydra's and OmegaConf's own checks), then ``validate`` builds the dataclasses, whose
``__post_init__`` checks ranges. Only then does ``hydra.main`` run the command. A multirun
(``-m``) checks every job of the sweep first.

``MINILLM_TRACEBACK=1`` shows the full Python traceback instead of the one line.
"""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import hydra
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

CONF = Path(__file__).resolve().parents[2] / "conf"  # the repository's conf/ (editable install)
TRACEBACK_ENV = "MINILLM_TRACEBACK"
USAGE_EXIT = 2  # what argparse and most Unix tools return for bad usage

# Exceptions that mean "the input was wrong" (a value, a path, a file): one line, status 2.
USER_ERRORS: tuple[type[BaseException], ...] = (
    ValueError,
    OSError,
    HydraException,
    OmegaConfBaseException,
)


def one_line(err: BaseException) -> str:
    """The error as one line: Hydra's and OmegaConf's multi-line messages folded."""
    cause = err.__cause__
    if isinstance(err, HydraException) and isinstance(cause, OmegaConfBaseException):
        err = cause  # "Could not override x" -> OmegaConf's reason, which names the key
    if isinstance(err, OmegaConfBaseException) and getattr(err, "full_key", None):
        return _omegaconf_line(err)
    text = str(err) or err.__class__.__name__
    if "Could not find" in text and "Available options" in text:
        return _missing_option_line(text)
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    lines = [line for line in lines if not line.startswith(("full_key:", "object_type", "Set the"))]
    return "; ".join(lines)


def _omegaconf_line(err: OmegaConfBaseException) -> str:
    key = err.full_key
    msg = getattr(err, "msg", str(err)).splitlines()[0]
    if msg.startswith("Key '") and "not in" in msg:
        node_type = getattr(err, "object_type", None)
        valid = sorted(getattr(node_type, "__dataclass_fields__", {}))
        hint = f"; valid keys there: {', '.join(valid)}" if valid else ""
        return f"unknown option {key}{hint}"
    if "Missing mandatory value" in msg:
        return f"{key} is required: pass {key}=..."
    return f"bad value for {key}: {msg}"


def _missing_option_line(text: str) -> str:
    """Hydra's 'Could not find attn/nope ... Available options in attn: a b c' in one line."""
    lines = [line.strip() for line in text.splitlines()]
    wanted = next((ln for ln in lines if "Could not find" in ln), lines[0])
    start = next(i for i, ln in enumerate(lines) if ln.startswith("Available options"))
    options = []
    for line in lines[start + 1 :]:
        if not line or line.startswith(("Config search path", "provider=")):
            break
        options.append(line)
    group = lines[start].removeprefix("Available options in").strip(" ':")
    hidden = [o for o in options if o.startswith("base_")]  # schemas, not choices
    choices = ", ".join(o for o in options if o not in hidden)
    return f"{wanted.removeprefix('In ').strip()}; valid choices for {group}: {choices}"


def fail(err: BaseException) -> None:
    """Print ``err`` as one line to stderr and exit 2 (or re-raise under MINILLM_TRACEBACK)."""
    if os.environ.get(TRACEBACK_ENV, "") not in ("", "0"):
        raise err
    print(f"error: {one_line(err)}", file=sys.stderr)
    sys.exit(USAGE_EXIT)


def _override_sets(overrides: list[str], multirun: bool) -> list[list[str]]:
    """The overrides of every job: one job, or every combination of a ``-m`` sweep."""
    if not multirun:
        return [overrides]
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(overrides)
    return [job for batch in BasicSweeper.split_arguments(parsed, None) for job in batch]


def compose(config_name: str, overrides: list[str]) -> dict[str, Any]:
    """The config a command would get, as a resolved plain dict (hydra key dropped)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from minillm.cli import schema

    schema.register()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = hydra_compose(config_name=config_name, overrides=overrides)
    return OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)


def check_command_line(
    config_name: str, validate: Callable[[dict[str, Any]], Any], argv: list[str]
) -> None:
    """Compose and validate every job the command line describes; exit 2 on the first error."""
    from hydra._internal.utils import get_args_parser

    args, _ = get_args_parser().parse_known_args(argv)
    if args.help or args.hydra_help or args.cfg or args.info or args.shell_completion:
        return  # Hydra answers these itself
    try:
        for overrides in _override_sets(list(args.overrides), args.multirun):
            validate(compose(config_name, overrides))
    except USER_ERRORS as err:
        fail(err)


def hydra_app(
    config_name: str, validate: Callable[[dict[str, Any]], Any]
) -> Callable[[Callable[[DictConfig], Any]], Callable[[], Any]]:
    """Decorate ``task(cfg)`` into a command: checked, composed, one-line user errors."""

    def decorate(task: Callable[[DictConfig], Any]) -> Callable[[], Any]:
        @functools.wraps(task)
        def guarded(cfg: DictConfig) -> Any:
            try:
                return task(cfg)
            except USER_ERRORS as err:
                fail(err)

        main = hydra.main(version_base="1.3", config_path=str(CONF), config_name=config_name)(
            guarded
        )

        @functools.wraps(task)
        def command() -> Any:
            from minillm.cli import schema

            schema.register()
            check_command_line(config_name, validate, sys.argv[1:])
            return main()

        return command

    return decorate
