"""Config fields with their help, and the checks every config dataclass uses (the CLI's help comes from here)."""

from __future__ import annotations

from dataclasses import field
from typing import Any

from feddat.errors import FedDATError


def setting(default: Any, help: str, **metadata: Any) -> Any:
    """A config field with its default and its one-line help (the command line's `--help` shows it)."""
    return field(default=default, metadata={"help": help, **metadata})


def check(ok: bool, key: str, expected: str, value: Any) -> None:
    """Refuse a setting's value: `key must be <expected>, got <value>` (key as the command line spells it)."""
    if not ok:
        raise FedDATError(f"{key.replace('_', '-')} must be {expected}, got {value!r}")


def is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and v == v and abs(v) != float("inf")


def is_count(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)
