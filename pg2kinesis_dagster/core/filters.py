"""Which changes are published: table patterns and operations, as pg2kinesis's flags."""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

from pg2kinesis_dagster.core.changes import Change, Operation
from pg2kinesis_dagster.core.errors import ConfigError


def parse_operations(value: str | Iterable[str] | None) -> frozenset[Operation]:
    """``"insert,update"`` or ``["INSERT", "DELETE"]`` or ``"*"``/None for all."""
    if value is None:
        return frozenset(Operation)
    items = value.split(",") if isinstance(value, str) else list(value)
    names = [item.strip().upper() for item in items if item.strip()]
    if not names or names == ["*"] or names == ["ALL"]:
        return frozenset(Operation)
    try:
        return frozenset(Operation(name) for name in names)
    except ValueError:
        raise ConfigError(
            f"unknown operation in {value!r}: use a comma-separated subset of "
            f"{','.join(op.value.lower() for op in Operation)}"
        ) from None


def _compile(pattern: str | None, flag: str) -> re.Pattern[str] | None:
    if not pattern:
        return None
    try:
        return re.compile(pattern)
    except re.error as exc:
        raise ConfigError(f"invalid regular expression for {flag} {pattern!r}: {exc}") from None


@dataclass(frozen=True)
class ChangeFilter:
    """``table_pat``/``exclude_table_pat`` are regular expressions searched in ``schema.table``."""

    table_pat: str | None = None
    exclude_table_pat: str | None = None
    operations: frozenset[Operation] = frozenset(Operation)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_include", _compile(self.table_pat, "--table-pat"))
        object.__setattr__(self, "_exclude", _compile(self.exclude_table_pat, "--exclude-table-pat"))

    def accepts(self, change: Change) -> bool:
        if change.op not in self.operations:
            return False
        name = change.qualified_table
        include: re.Pattern[str] | None = self._include  # type: ignore[attr-defined]
        exclude: re.Pattern[str] | None = self._exclude  # type: ignore[attr-defined]
        if include is not None and not include.search(name):
            return False
        return not (exclude is not None and exclude.search(name))
