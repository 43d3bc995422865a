"""Decoder for the ``wal2json`` output plugin, format version 2 (wal2json 2.x).

Format version 2 prints one JSON document per row of ``pg_logical_slot_peek_changes``, so
a huge transaction is many small documents, never one giant one::

    {"action":"B","xid":726,"timestamp":"2026-11-26 05:04:46.708167+00"}
    {"action":"I","xid":726,"timestamp":"...","schema":"public","table":"t",
     "columns":[{"name":"id","type":"integer","typeoid":23,"value":1,"position":1}, ...]}
    {"action":"U", ..., "columns":[...], "identity":[{"name":"id", ..., "value":1}]}
    {"action":"D", ..., "identity":[...]}
    {"action":"T", ..., "schema":"public","table":"t"}         (one per truncated table)
    {"action":"M", ..., "transactional":true,"prefix":"p","content":"..."}   (ignored)
    {"action":"C","xid":726,"timestamp":"2026-11-26 05:04:46.708167+00"}

Each change carries its table's primary key (``include-pk``), as the catalog was when the change was
written: :meth:`Wal2JsonDecoder.relation_key` hands it to the pipeline, so keys stay exact across DDL.

Numbers are parsed as their exact text (``parse_int=str``/``parse_float=str``). Values
are turned back into PostgreSQL's text form as the test_decoding decoder yields it:
``true``/``false`` -> ``t``/``f``; bytea, which wal2json prints without its ``\\x``,
gets it back; everything else is the type output function's text already.

What wal2json (2.5, the Debian package for PostgreSQL 15) cannot give, and how it is
handled, compared with :class:`~pg2kinesis_dagster.core.decoders.test_decoding.TestDecodingDecoder`:

* NaN and +-Infinity of numeric/real/double precision columns are printed as JSON
  ``null``, indistinguishable from NULL, unless wal2json >= 2.6 is asked for
  ``numeric-data-types-as-string`` (``numbers_as_strings=True``).
* Unchanged TOASTed columns of an UPDATE are left out of ``columns``. They are put back
  as ``Column(unchanged_toast=True)`` from the REPLICA IDENTITY FULL old row when there
  is one, else from the injected ``columns(schema, table)`` catalog lookup (attnum ->
  (name, type); the positions wal2json prints show which are missing), else they stay
  out.
* ``identity`` is printed for every UPDATE, taken from the new row when the key did not
  change, whereas test_decoding prints an old key only when it changed (or the table is
  REPLICA IDENTITY FULL). An identity whose values all equal the new row's is therefore
  taken as "no old key" -- except when it covers every column (REPLICA IDENTITY FULL).
  Residual ambiguity: a no-op UPDATE of a table whose primary key is every column keeps
  ``before``; an UPDATE that leaves an out-of-line TOASTed key unchanged loses it.
* Old images are printed by test_decoding without NULL columns: NULLs are dropped from
  ``before`` here too.
* UPDATE and DELETE on a table without replica identity (no primary key, not FULL) are
  not printed at all by wal2json (only a server WARNING); test_decoding prints them.
* TRUNCATE carries no options: ``truncate_flags`` is always ``()``.
* Type names: wal2json prints them with typmods (``numeric(10,2)``) and ignores
  ``include-typmod`` in format 2. Names come from the injected ``type_name(oid, -1)``
  when given (exact), else from PostgreSQL 15's built-in names by OID, else from the
  printed name without its parenthesised typmod. wal2json emits a type name that
  starts with a double quote verbatim, i.e. unescaped: such names lose their quotes, and
  one with an embedded ``""`` makes the document invalid JSON (DecodeError).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

from pg2kinesis_dagster.core.changes import Change, Column, Operation, SlotRow, Transaction, new_column
from pg2kinesis_dagster.core.decoders.pgoutput import BUILTIN_TYPE_NAMES, TypeNamer
from pg2kinesis_dagster.core.errors import DecodeError
from pg2kinesis_dagster.core.snapshot import SNAPSHOT_PREFIX, message_transaction

# (schema, table) -> {attnum: (column name, format_type_be type name)} of the live columns.
ColumnLookup = Callable[[str, str], Mapping[int, tuple[str, str]]]

_BYTEA_OID = "17"  # typeoid as parsed (parse_int=str)
_OPS = {"I": Operation.INSERT, "U": Operation.UPDATE, "D": Operation.DELETE}


def strip_typmod(type_text: str) -> str:
    """``numeric(10,2)`` -> ``numeric``, ``geometry(Point,4326)[]`` -> ``geometry[]``.

    Removes parenthesised parts outside double-quoted identifiers.
    """
    if "(" not in type_text:
        return type_text
    out: list[str] = []
    depth = 0
    quoted = False
    for ch in type_text:
        if ch == '"' and depth == 0:
            quoted = not quoted
        elif not quoted and ch == "(":
            depth += 1
            continue
        elif not quoted and ch == ")" and depth:
            depth -= 1
            continue
        if depth == 0:
            out.append(ch)
    return "".join(out).replace(" [", "[").strip()


class Wal2JsonDecoder:
    """Decoder for slots created with the ``wal2json`` plugin (format version 2).

    Args:
        type_name: ``(oid, typmod) -> name`` (``postgres.types.TypeNames``) for exact
            type names; called with typmod -1.
        columns: ``(schema, table) -> {attnum: (name, type)}`` to restore unchanged TOAST
            columns of tables without REPLICA IDENTITY FULL (``postgres.types.TableColumns``).
        numbers_as_strings: ask wal2json >= 2.6 to quote numbers so that NaN/Infinity
            survive (2.5 rejects the option).
    """

    plugin: str = "wal2json"

    def __init__(
        self,
        *,
        type_name: TypeNamer | None = None,
        columns: ColumnLookup | None = None,
        numbers_as_strings: bool = False,
    ) -> None:
        options = [
            "format-version", "2",
            "include-transaction", "1",
            "include-xids", "1",
            "include-timestamp", "1",
            "include-schemas", "1",
            # wal2json 2.5 prints a quoted type name ("My Schema".t) unescaped, which is not JSON; with the
            # catalog at hand we name types by OID and ask for no names at all.
            "include-types", "0" if type_name is not None else "1",
            "include-type-oids", "1",
            # Positions reveal the columns wal2json leaves out (unchanged TOAST).
            "include-column-positions", "1",
            # Each change's primary key, from the catalog as it was then: keys stay exact across DDL.
            "include-pk", "1",
        ]
        if numbers_as_strings:
            options += ["numeric-data-types-as-string", "1"]
        self.slot_options: tuple[str, ...] = tuple(options)
        self._type_name = type_name
        self._lookup = columns
        # typeoid text -> type name; wal2json repeats both on every column.
        self._types: dict[str, str] = {}
        self._json = json.JSONDecoder(parse_float=str, parse_int=str)
        # (schema, table) -> its primary key from the latest change (include-pk), and the raw list it came as.
        self._pks: dict[tuple[str, str], tuple[str, ...]] = {}
        self._raw_pks: dict[tuple[str, str], Any] = {}

    # -- transactions --------------------------------------------------------------------

    @staticmethod
    def is_commit(data: str | bytes) -> bool:
        """Whether a row is a transaction's commit (where a slot may be advanced to)."""
        return isinstance(data, str) and '"action":"C"' in data[:40]

    def commit_time(self, data: str | bytes) -> str | None:
        """The commit time a commit document carries, as :meth:`decode` stamps it."""
        try:
            return self._json.decode(data).get("timestamp")  # type: ignore[arg-type]
        except (ValueError, TypeError, AttributeError) as exc:
            raise DecodeError(f"invalid wal2json commit document ({exc})", text=data) from None

    def decode(self, rows: Iterable[SlotRow], part_size: int | None = None) -> Iterator[Transaction]:
        """Yield each committed transaction of ``rows`` (lsn, xid, data), in order.

        Streams: only the transaction being read is held, and with ``part_size`` at most that
        many of its changes (:meth:`Transaction.split` parts); a trailing transaction without
        its commit document is not yielded.
        """
        part_limit = part_size or 1 << 62
        txn: Transaction | None = None
        parse = self._json.decode
        for lsn, xid, data in rows:
            if not isinstance(data, str):
                raise DecodeError("wal2json rows must be text, got bytes", lsn=lsn, text=data)
            try:
                doc = parse(data)
                action = doc["action"]
                if action in _OPS:  # the common case first
                    if txn is None:
                        raise DecodeError("row change outside a transaction (no B before it)",
                                          lsn=lsn, text=data)
                    txn.size += len(data)
                    self._change(doc, _OPS[action], lsn, txn)
                    if len(txn.changes) >= part_limit:
                        yield txn.split()
                elif action == "B":
                    if txn is not None:
                        raise DecodeError("B while the previous transaction has no C", lsn=lsn, text=data)
                    # The row's xid is authoritative, as for test_decoding.
                    txn_xid = int(xid) if xid else int(doc.get("xid") or 0)
                    txn = Transaction(txn_xid, lsn, 0, None, [], len(data))
                elif action == "C":
                    if txn is None:
                        raise DecodeError("C without a B", lsn=lsn, text=data)
                    commit_time = doc.get("timestamp")
                    txn.size += len(data)
                    txn.commit(lsn, commit_time)
                    yield txn
                    txn = None
                elif action == "T":
                    if txn is None:
                        raise DecodeError("TRUNCATE outside a transaction", lsn=lsn, text=data)
                    txn.size += len(data)
                    changes = txn.changes
                    changes.append(Change(txn.xid, lsn, txn.first_index + len(changes), doc["schema"],
                                          doc["table"], Operation.TRUNCATE))
                    if len(changes) >= part_limit:
                        yield txn.split()
                elif action == "M":
                    # pg_logical_emit_message(): no row change; counts towards the size. A snapshot
                    # watermark (non-transactional) is yielded as a message transaction (core.snapshot).
                    if txn is not None:
                        txn.size += len(data)
                    elif not doc.get("transactional") and doc.get("prefix") == SNAPSHOT_PREFIX:
                        yield message_transaction(lsn, str(doc.get("content", "")), len(data))
                else:
                    raise DecodeError(f"unknown wal2json action {action!r}", lsn=lsn, text=data)
            except DecodeError:
                raise
            except ValueError as exc:  # json.JSONDecodeError included
                raise DecodeError(f"invalid wal2json document ({exc})", lsn=lsn, text=data) from None
            except (KeyError, TypeError, AttributeError) as exc:
                raise DecodeError(f"wal2json document without the expected fields ({exc!r}); was the "
                                  "slot read with format-version 2?", lsn=lsn, text=data) from None

    # -- row changes -----------------------------------------------------------------------

    def _change(self, doc: dict[str, Any], op: Operation, lsn: int, txn: Transaction) -> None:
        schema: str = doc["schema"]
        table: str = doc["table"]
        pk = doc.get("pk")
        if pk is not None:
            self._note_pk(schema, table, pk)
        after: tuple[Column, ...] | None = None
        before: tuple[Column, ...] | None = None
        identity = doc.get("identity")
        if op is Operation.INSERT:
            after = self._columns(doc["columns"])
        elif op is Operation.UPDATE:
            raw = doc["columns"]
            after = self._columns(raw)
            old = self._columns(identity) if identity is not None else None
            if old is not None and self._is_old_row(old, after):
                before = tuple(c for c in old if c.value is not None or c.unchanged_toast)
            after = self._restore_toast(schema, table, raw, after, old)
        else:  # DELETE
            if identity is not None:
                before = tuple(c for c in self._columns(identity) if c.value is not None or c.unchanged_toast)
        changes = txn.changes
        changes.append(Change(txn.xid, lsn, txn.first_index + len(changes), schema, table, op, after, before))

    def _note_pk(self, schema: str, table: str, pk: Sequence[dict[str, Any]]) -> None:
        # The same key over and over: compare the raw list before building a tuple.
        name = (schema, table)
        if self._raw_pks.get(name) != pk:
            self._raw_pks[name] = pk
            self._pks[name] = tuple(c["name"] for c in pk)

    def relation_key(self, schema: str, table: str) -> tuple[str, ...] | None:
        """The table's primary key as wal2json printed it with the change decoded last (None: none seen yet)."""
        return self._pks.get((schema, table))

    def _columns(self, raw: Sequence[dict[str, Any]]) -> tuple[Column, ...]:
        types = self._types
        out: list[Column] = []
        append = out.append
        for col in raw:
            oid = col["typeoid"]
            type_ = types.get(oid)
            if type_ is None:
                type_ = self._resolve_type(oid, col.get("type", ""))
            value = col["value"]
            if value.__class__ is str:
                if oid == _BYTEA_OID:
                    value = "\\x" + value  # wal2json strips bytea_output's \x
            elif value is None:
                pass
            elif value is True:
                value = "t"  # boolout()'s text form, as test_decoding yields it
            elif value is False:
                value = "f"
            else:
                raise ValueError(f"unexpected JSON value {value!r} for column {col['name']!r}")
            append(_column(col["name"], type_, value))
        return tuple(out)

    def _resolve_type(self, oid: str, text: str) -> str:
        if self._type_name is not None:
            name = self._type_name(int(oid), -1)
        else:
            name = BUILTIN_TYPE_NAMES.get(int(oid)) or strip_typmod(text)
        self._types[oid] = name
        return name

    @staticmethod
    def _is_old_row(old: tuple[Column, ...], new: tuple[Column, ...]) -> bool:
        """Whether an UPDATE's identity is a logged old key/row rather than copied from the new row."""
        new_values = {c.name: c.value for c in new}
        for c in old:
            if c.name not in new_values:
                return True  # a column the new row lacks (unchanged TOAST): a FULL old row
            if new_values[c.name] != c.value:
                return True  # the key changed: PostgreSQL logged the old key
        # Same values: copied from the new row unless it is the whole row (REPLICA IDENTITY FULL).
        return len(old) == len(new)

    def _restore_toast(
        self, schema: str, table: str, raw: Sequence[dict[str, Any]], after: tuple[Column, ...],
        old: tuple[Column, ...] | None,
    ) -> tuple[Column, ...]:
        """Put the unchanged TOAST columns wal2json left out back, in column order."""
        names = {c.name for c in after}
        if old is not None and any(c.name not in names for c in old):
            # A REPLICA IDENTITY FULL old row has every column, in the same order.
            by_name = {c.name: c for c in after}
            if len(by_name.keys() - {c.name for c in old}) == 0:
                return tuple(by_name.get(c.name) or Column(c.name, c.type, None, True) for c in old)
        if self._lookup is None:
            return after
        positions = [int(col["position"]) for col in raw]
        live = self._lookup(schema, table)
        if not any(n not in positions for n in live):
            return after  # nothing missing (the common case)
        if any(live.get(p, ("",))[0] != c.name for p, c in zip(positions, after, strict=True)):
            # The catalog changed since (or is cached stale): reload once, else leave as is.
            invalidate = getattr(self._lookup, "invalidate", None)
            if invalidate is None:
                return after
            invalidate(schema, table)
            live = self._lookup(schema, table)
            if any(live.get(p, ("",))[0] != c.name for p, c in zip(positions, after, strict=True)):
                return after
        merged = dict(zip(positions, after, strict=True))
        for attnum, (name, type_) in live.items():
            if attnum not in merged:
                merged[attnum] = Column(name, type_, None, True)
        return tuple(merged[n] for n in sorted(merged))


_column = new_column
