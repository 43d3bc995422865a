"""Message formats: a change in, the bytes of one Kinesis record out.

``CSV`` and ``CSVPayload`` reproduce pg2kinesis's formats so that its consumers keep
working; ``JSON`` carries the whole change. A custom formatter is any class with a
``format(change) -> bytes | str`` method, named by import path ``package.module:Class``.
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Callable
from typing import Protocol

from pg2kinesis_dagster.core.changes import Change, Column, format_lsn
from pg2kinesis_dagster.core.errors import ConfigError

# pg2kinesis's record prefix: format version and record type.
_PREFIX = "0,CDC,"


class Formatter(Protocol):
    def format(self, change: Change) -> bytes: ...


def pkey_text(change: Change) -> str:
    """pg2kinesis's ``pkey``: the key value; a composite key as a JSON array; '' without a key."""
    if not change.pk:
        return ""
    values = list(change.pk.values())
    if len(values) == 1:
        return values[0] if values[0] is not None else ""
    return json.dumps(values, ensure_ascii=False)


def row_object(columns: tuple[Column, ...] | None) -> dict[str, str | None] | None:
    if columns is None:
        return None
    return {c.name: c.value for c in columns if not c.unchanged_toast}


def unchanged_columns(change: Change) -> list[str]:
    return [c.name for c in change.after or () if c.unchanged_toast]


class CSVFormatter:
    """``0,CDC,<xid>,<schema.table>,<operation>,<pkey>``, as pg2kinesis's CSVFormatter."""

    def __init__(self, full_change: bool = False) -> None:
        # pg2kinesis had no full-change form of CSV; the flag is accepted and ignored here.
        self.full_change = full_change

    def format(self, change: Change) -> bytes:
        return (
            f"{_PREFIX}{change.xid},{change.qualified_table},{change.op.value},{pkey_text(change)}"
        ).encode()


class CSVPayloadFormatter:
    """``0,CDC,{"xid": ..., "table": ..., "operation": ..., "pkey": ...}``, as pg2kinesis's.

    Like pg2kinesis, ``xid`` and ``pkey`` are strings. With ``full_change`` the object also has
    ``before`` and ``after`` row objects (a pg2kinesis-compatible extension).
    """

    def __init__(self, full_change: bool = False) -> None:
        self.full_change = full_change

    def format(self, change: Change) -> bytes:
        payload: dict[str, object] = {
            "xid": str(change.xid),
            "table": change.qualified_table,
            "operation": change.op.value,
            "pkey": pkey_text(change),
        }
        if self.full_change:
            payload["before"] = row_object(change.before)
            payload["after"] = row_object(change.after)
        # json.dumps's default separators are the ones pg2kinesis produced.
        return (_PREFIX + json.dumps(payload, ensure_ascii=False)).encode()


class JSONFormatter:
    """One JSON object per change; see the README's "JSON format" for every field."""

    def __init__(self, full_change: bool = True) -> None:
        self.full_change = full_change

    def format(self, change: Change) -> bytes:
        payload: dict[str, object] = {
            "id": change.id,
            "lsn": format_lsn(change.lsn),
            "commit_lsn": format_lsn(change.commit_lsn),
            "xid": change.xid,
            "commit_ts": change.commit_time,
            "table": change.qualified_table,
            "op": change.op.value,
            "pk": change.pk,
            "after": row_object(change.after),
            "before": row_object(change.before),
        }
        unchanged = unchanged_columns(change)
        if unchanged:
            payload["unchanged_toast"] = unchanged
        if change.truncate_flags:
            payload["truncate_flags"] = list(change.truncate_flags)
        return json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode()


FORMATTERS: dict[str, Callable[[bool], Formatter]] = {
    "CSV": CSVFormatter,
    "CSVPayload": CSVPayloadFormatter,
    "JSON": JSONFormatter,
}


def make_formatter(name: str, *, full_change: bool = False) -> Formatter:
    """A built-in format by name (case-insensitive), or a custom class by ``package.module:Class``."""
    for known, factory in FORMATTERS.items():
        if name.lower() in (known.lower(), f"{known.lower()}formatter"):
            return factory(full_change)
    if ":" in name:
        module_name, _, class_name = name.partition(":")
        try:
            cls = getattr(importlib.import_module(module_name), class_name)
        except (ImportError, AttributeError) as exc:
            raise ConfigError(f"cannot load formatter {name!r}: {exc}") from None
        try:
            instance = cls(full_change=full_change)
        except TypeError:
            instance = cls()
        if not callable(getattr(instance, "format", None)):
            raise ConfigError(f"formatter {name!r} has no format(change) method")
        return _Encoding(instance)
    raise ConfigError(
        f"unknown message format {name!r}: use one of {', '.join(FORMATTERS)} "
        "or a class given as package.module:Class"
    )


class _Encoding:
    """Lets a custom formatter return str; records are always bytes."""

    def __init__(self, inner: Formatter) -> None:
        self.inner = inner

    def format(self, change: Change) -> bytes:
        out = self.inner.format(change)
        return out.encode() if isinstance(out, str) else bytes(out)
