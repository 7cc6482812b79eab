"""Range checks for config dataclasses: each raises one ``ValueError`` line that names the key
as a user types it (``model.dim``), the value given and what would work.

Used from the ``__post_init__`` of every config dataclass, so a value is checked where its
field is defined, whichever command (or test) builds the config.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from typing import Any


def _bad(key: str, value: Any, need: str) -> ValueError:
    return ValueError(f"{key}={value!r}: {need}")


def integer(key: str, value: Any, low: int = 1, optional: bool = False) -> None:
    """An int >= ``low`` (bools are not ints here); None allowed when ``optional``."""
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        what = "a positive integer" if low == 1 else f"an integer >= {low}"
        raise _bad(key, value, f"must be {what}{' or null' if optional else ''}")


def number(
    key: str,
    value: Any,
    low: float | None = None,
    high: float | None = None,
    *,
    low_open: bool = False,
    high_open: bool = False,
    optional: bool = False,
) -> None:
    """A real number in [low, high] (an open end with ``low_open``/``high_open``)."""
    if value is None and optional:
        return
    ok = isinstance(value, int | float) and not isinstance(value, bool) and value == value
    if ok and low is not None:
        ok = value > low if low_open else value >= low
    if ok and high is not None:
        ok = value < high if high_open else value <= high
    if not ok:
        lo = "" if low is None else ("(" if low_open else "[") + f"{low}, "
        hi = "" if high is None else f"{high}" + (")" if high_open else "]")
        span = f"in {lo}{hi}" if low is not None and high is not None else ""
        if not span:
            span = f"{'>' if low_open else '>='} {low}" if low is not None else f"<= {high}"
        raise _bad(key, value, f"must be a number {span}")


def choice(key: str, value: Any, choices: Iterable[Any]) -> None:
    choices = list(choices)
    if value not in choices:
        raise _bad(key, value, f"choose one of {', '.join(map(str, choices))}")


def options(owner: str, config_cls: type, given: Mapping[str, Any]) -> Any:
    """``config_cls(**given)`` for a registry kind's nested ``Config``, or one line naming the
    options ``owner`` (e.g. ``attention kind 'mha'``) does not have and the ones it has."""
    names = {f.name for f in dataclasses.fields(config_cls)}
    unknown = sorted(set(given) - names)
    if unknown:
        raise ValueError(f"{owner} has no option(s) {unknown}; its options are {sorted(names)}")
    return config_cls(**given)
