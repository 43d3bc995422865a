"""Message formats: a change in, the bytes of one Kinesis record out.

``CSV`` and ``CSVPayload`` reproduce pg2kinesis's formats so that its consumers keep
working; ``JSON`` carries the whole change, values as PostgreSQL's text or, with
``typed=True``, as typed JSON values (:mod:`pg2kinesis_dagster.core.typed`). A custom formatter is any class with a
``format(change) -> bytes | str`` method, named by import path ``package.module:Class``.
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Callable
from typing import Protocol

import orjson

from pg2kinesis_dagster.core.changes import Change, Column, format_lsn
from pg2kinesis_dagster.core.errors import ConfigError
from pg2kinesis_dagster.core.typed import BYTEA_MODES, Converter, convert_or_text, converter_for

# pg2kinesis's record prefix: format version and record type.
_PREFIX = "0,CDC,"


class Formatter(Protocol):
    def format(self, change: Change) -> bytes: ...


def needs_row_images(formatter: object) -> bool:
    """Whether ``formatter`` reads a change's row images (``after``/``before``) beyond its key.

    A built-in format says so with ``row_images``; a custom class is assumed to read them. Decoders can skip
    parsing the images of a format that does not (``lazy_images``).
    """
    return bool(getattr(formatter, "row_images", True))


def dumps(value: object) -> bytes:
    """``json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode()`` for a value without floats.

    For strings, integers, booleans, None, lists and dicts of them orjson writes the same bytes (checked by
    tests/test_formats_fast.py), several times faster; what it refuses (integers beyond 64 bits, lone
    surrogates) goes through the standard library. Not for floats: orjson writes ``1e-07`` as ``1e-7``.
    """
    try:
        return orjson.dumps(value)
    except TypeError:
        return json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode()


def _json_string(text: str) -> bytes:
    """A JSON string literal, as json.dumps(text, ensure_ascii=False) encoded as UTF-8."""
    try:
        return orjson.dumps(text)
    except TypeError:  # lone surrogates: as json.dumps would (then fail to encode, as before)
        return json.dumps(text, ensure_ascii=False).encode()


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

    row_images = False  # the key only

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
        self.row_images = full_change
        # (schema, table, operation) -> the bytes between the xid and the pkey value (bounded, see _middle).
        self._middles: dict[tuple[str, str, str], bytes] = {}

    def format(self, change: Change) -> bytes:
        if not self.full_change:
            # The bytes of json.dumps({"xid": ..., "table": ..., "operation": ..., "pkey": ...}) built from
            # parts: the table and operation part is the same for every change of a table.
            op = change.op.value
            middle = self._middles.get((change.schema, change.table, op))
            if middle is None:
                middle = self._middle(change.schema, change.table, op)
            return b'0,CDC,{"xid": "%d' % change.xid + middle + _json_string(pkey_text(change)) + b"}"
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

    def _middle(self, schema: str, table: str, op: str) -> bytes:
        if len(self._middles) >= 10_000:  # bounded: a stream of ever-new tables
            self._middles.clear()
        middle = self._middles[(schema, table, op)] = (
            b'", "table": ' + _json_string(f"{schema}.{table}") + b', "operation": ' + _json_string(op)
            + b', "pkey": '
        )
        return middle


class JSONFormatter:
    """One JSON object per change; see the README's "JSON format" for every field.

    ``typed``: ``after``/``before``/``pk`` values become typed JSON values (numbers, booleans,
    parsed json, arrays; bytea as ``bytea``: base64 or hex digits) wherever that is lossless;
    otherwise, and by default, they keep PostgreSQL's text form.
    """

    row_images = True

    def __init__(self, full_change: bool = True, *, typed: bool = False, bytea: str = "base64") -> None:
        if bytea not in BYTEA_MODES:
            raise ConfigError(f"unknown bytea encoding {bytea!r}: use one of {', '.join(BYTEA_MODES)}")
        self._commit_lsn = -1  # the last commit LSN seen and its text: consecutive changes share it
        self._commit_text = ""
        self.full_change = full_change
        self.typed = typed
        self.bytea = bytea
        # Column type -> converter (None: the text stays): one lookup per value on the hot path.
        self._converters: dict[str, Converter | None] = {}

    def format(self, change: Change) -> bytes:
        if self.typed:
            after = self._typed_row(change.after)
            before = self._typed_row(change.before)
            pk = self._typed_pk(change)
        else:
            after, before, pk = row_object(change.after), row_object(change.before), change.pk
        if change.commit_lsn != self._commit_lsn:
            self._commit_lsn = change.commit_lsn
            self._commit_text = format_lsn(change.commit_lsn)
        commit = self._commit_text
        payload: dict[str, object] = {
            "id": f"{commit}:{change.index}",  # Change.id
            "lsn": format_lsn(change.lsn),
            "commit_lsn": commit,
            "xid": change.xid,
            "commit_ts": change.commit_time,
            "table": change.qualified_table,
            "op": change.op.value,
            "pk": pk,
            "after": after,
            "before": before,
        }
        unchanged = unchanged_columns(change)
        if unchanged:
            payload["unchanged_toast"] = unchanged
        if change.truncate_flags:
            payload["truncate_flags"] = list(change.truncate_flags)
        if self.typed:  # floats: the standard library's shortest form, as documented
            return json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode()
        return dumps(payload)

    def _converter(self, type_name: str) -> Converter | None:
        try:
            return self._converters[type_name]
        except KeyError:
            if len(self._converters) >= 10_000:  # bounded: a stream of ever-new type names
                self._converters.clear()
            convert = self._converters[type_name] = converter_for(type_name, self.bytea)
            return convert

    def _typed_row(self, columns: tuple[Column, ...] | None) -> dict[str, object] | None:
        """:func:`row_object` with each value converted by its column's type (core.typed)."""
        if columns is None:
            return None
        row: dict[str, object] = {}
        for c in columns:
            if c.unchanged_toast:
                continue
            text = c.value
            if text is None:
                row[c.name] = None
                continue
            convert = self._converter(c.type)
            row[c.name] = text if convert is None else convert_or_text(convert, text)
        return row

    def _typed_pk(self, change: Change) -> dict[str, object] | None:
        if not change.pk:
            return change.pk
        # The key's types are those of the same columns in the row images.
        types = {c.name: c.type for c in change.before or ()}
        types.update((c.name, c.type) for c in change.after or ())
        pk: dict[str, object] = {}
        for name, text in change.pk.items():
            convert = self._converter(types[name]) if text is not None and name in types else None
            pk[name] = text if convert is None or text is None else convert_or_text(convert, text)
        return pk


FORMATTERS: dict[str, Callable[[bool], Formatter]] = {
    "CSV": CSVFormatter,
    "CSVPayload": CSVPayloadFormatter,
    "JSON": JSONFormatter,
}


def make_formatter(name: str, *, full_change: bool = False, typed: bool = False) -> Formatter:
    """A built-in format by name (case-insensitive), or a custom class by ``package.module:Class``.

    ``typed`` (typed JSON values) applies to the ``JSON`` format only; asking for it with
    another format is a ConfigError rather than silently ignored.
    """
    for known, factory in FORMATTERS.items():
        if name.lower() in (known.lower(), f"{known.lower()}formatter"):
            if known == "JSON":
                return JSONFormatter(full_change, typed=typed)
            if typed:
                raise ConfigError(f"typed JSON values apply to the JSON message format only, not {known}: "
                                  "use --message-formatter JSON or drop --typed-json")
            return factory(full_change)
    if ":" in name:
        if typed:
            raise ConfigError(f"typed JSON values apply to the built-in JSON format only, not {name!r}")
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
        self.row_images = needs_row_images(inner)

    def format(self, change: Change) -> bytes:
        out = self.inner.format(change)
        return out.encode() if isinstance(out, str) else bytes(out)
