"""Decoder for the built-in ``pgoutput`` plugin (logical replication protocol, version 1).

The slot is read with ``pg_logical_slot_peek_binary_changes(..., 'proto_version', '1',
'publication_names', '<publication>')``: one binary message per row, as described in
PostgreSQL's "Logical Replication Message Formats" (PostgreSQL 15):

* ``B`` Begin (final LSN, commit timestamp, xid) and ``C`` Commit (flags, commit LSN,
  end LSN, commit timestamp);
* ``R`` Relation (relid, namespace, name, replica identity, columns with key flag,
  type OID and typmod) before the first change of a table in each decoding session,
  ``Y`` Type for non-built-in types, ``O`` Origin, ``M`` Message (read with the
  ``messages`` option: table snapshots' watermarks are yielded, see core.snapshot; others ignored);
* ``I`` Insert (``N`` tuple), ``U`` Update (optional ``K`` old key or ``O`` old row, then
  ``N``), ``D`` Delete (``K`` or ``O``), ``T`` Truncate (relids and CASCADE/RESTART
  IDENTITY flags);
* tuple data: per column ``n`` (NULL), ``u`` (unchanged TOASTed value), ``t`` (text
  form, length-prefixed).

The decoder yields the same :class:`Change` objects as
:class:`~pg2kinesis_dagster.core.decoders.test_decoding.TestDecodingDecoder` for the same
WAL, with these documented differences and choices:

* Types: Relation messages carry type OIDs, not names. Names come from an injected
  ``type_name(oid, typmod)`` callable (the pipeline passes
  :class:`pg2kinesis_dagster.postgres.types.TypeNames`, i.e. ``format_type``); by default
  it is called with typmod ``-1`` so that names are ``format_type_be`` output without
  typmods, exactly as test_decoding prints them (``numeric``, not ``numeric(10,2)``).
  Without the callable, built-in types use a table of PostgreSQL 15's names, and other
  types the ``Y`` message's name (quoted, schema-qualified unless in ``public``): right
  for enums, composites and ranges, not for a type hidden from the search_path by another
  of the same name, arrays of user types (``_mood`` instead of ``mood[]``) nor domains
  (pgoutput names the base type: ``int4`` instead of ``posint``).
* Old images (``K``/``O`` tuples) carry every column, NULL for those not in the key;
  test_decoding prints old tuples without their NULL columns, so NULLs are dropped from
  ``before`` here too.
* Commit time: pgoutput sends microseconds since 2000-01-01 UTC; test_decoding prints
  ``timestamptz_to_str`` in the session's TimeZone. It is rendered the same way in
  ``tz`` (default UTC, which is what the throwaway servers use), e.g.
  ``2026-11-26 05:01:10.89979+00``. A server whose TimeZone is not UTC prints another
  offset: pass that zone.
* pgoutput publishes only the publication's tables and, on PostgreSQL 15, never sends
  generated columns nor empty transactions; a table without a replica identity cannot
  even be updated while a publication publishes its updates.
* PostgreSQL 15's pgoutput sends Begin together with the first change, so
  ``Transaction.begin_lsn`` may be that change's LSN (later than test_decoding's BEGIN);
  xids, change LSNs, commit LSNs and indexes are the same.
* Text values are decoded as UTF-8 (the server and client encoding must be UTF8).
"""

from __future__ import annotations

import dataclasses
import re
import struct
from collections.abc import Callable, Iterable, Iterator
from datetime import datetime, timedelta, timezone, tzinfo

from pg2kinesis_dagster.core.changes import Change, Column, Operation, SlotRow, Transaction, new_column
from pg2kinesis_dagster.core.errors import ConfigError, DecodeError
from pg2kinesis_dagster.core.snapshot import message_transaction, snapshot_content

# (type OID, typmod) -> the type's name; typmod -1 means "without typmod" (format_type_be).
TypeNamer = Callable[[int, int], str]

# format_type(oid, NULL) of PostgreSQL 15's built-in types, so that the decoder works
# stand-alone; OIDs below 16384 are fixed by the server's catalog (pg_type.dat).
BUILTIN_TYPE_NAMES: dict[int, str] = {
    16: "boolean", 17: "bytea", 18: '"char"', 19: "name", 20: "bigint", 21: "smallint", 23: "integer",
    24: "regproc", 25: "text", 26: "oid", 27: "tid", 28: "xid", 29: "cid", 114: "json", 142: "xml",
    194: "pg_node_tree", 600: "point", 601: "lseg", 602: "path", 603: "box", 604: "polygon", 628: "line",
    650: "cidr", 700: "real", 701: "double precision", 718: "circle", 774: "macaddr8", 790: "money",
    829: "macaddr", 869: "inet", 1033: "aclitem", 1042: "character", 1043: "character varying", 1082: "date",
    1083: "time without time zone", 1114: "timestamp without time zone", 1184: "timestamp with time zone",
    1186: "interval", 1266: "time with time zone", 1560: "bit", 1562: "bit varying", 1700: "numeric",
    1790: "refcursor", 2202: "regprocedure", 2203: "regoper", 2204: "regoperator", 2205: "regclass",
    2206: "regtype", 2950: "uuid", 2970: "txid_snapshot", 3220: "pg_lsn", 3361: "pg_ndistinct",
    3402: "pg_dependencies", 3614: "tsvector", 3615: "tsquery", 3642: "gtsvector", 3734: "regconfig",
    3769: "regdictionary", 3802: "jsonb", 3904: "int4range", 3906: "numrange", 3908: "tsrange", 3910: "tstzrange",
    3912: "daterange", 3926: "int8range", 4072: "jsonpath", 4089: "regnamespace", 4096: "regrole",
    4191: "regcollation", 4451: "int4multirange", 4532: "nummultirange", 4533: "tsmultirange",
    4534: "tstzmultirange", 4535: "datemultirange", 4536: "int8multirange", 4600: "pg_brin_bloom_summary",
    4601: "pg_brin_minmax_multi_summary", 5017: "pg_mcv_list", 5038: "pg_snapshot", 5069: "xid8",
}
# Built-in array type OID -> element type OID; the name is the element's plus "[]".
_BUILTIN_ARRAYS: dict[int, int] = {
    143: 142, 199: 114, 271: 5069, 629: 628, 651: 650, 719: 718, 775: 774, 791: 790, 1000: 16, 1001: 17, 1002: 18,
    1003: 19, 1005: 21, 1007: 23, 1008: 24, 1009: 25, 1010: 27, 1011: 28, 1012: 29, 1014: 1042, 1015: 1043,
    1016: 20, 1017: 600, 1018: 601, 1019: 602, 1020: 603, 1021: 700, 1022: 701, 1027: 604, 1028: 26, 1034: 1033,
    1040: 829, 1041: 869, 1115: 1114, 1182: 1082, 1183: 1083, 1185: 1184, 1187: 1186, 1231: 1700, 1270: 1266,
    1561: 1560, 1563: 1562, 2201: 1790, 2207: 2202, 2208: 2203, 2209: 2204, 2210: 2205, 2211: 2206, 2949: 2970,
    2951: 2950, 3221: 3220, 3643: 3614, 3644: 3642, 3645: 3615, 3735: 3734, 3770: 3769, 3807: 3802, 3905: 3904,
    3907: 3906, 3909: 3908, 3911: 3910, 3913: 3912, 3927: 3926, 4073: 4072, 4090: 4089, 4097: 4096, 4192: 4191,
    5039: 5038, 6150: 4451, 6151: 4532, 6152: 4533, 6153: 4534, 6155: 4535, 6157: 4536,
}
BUILTIN_TYPE_NAMES.update({array: BUILTIN_TYPE_NAMES[elem] + "[]" for array, elem in _BUILTIN_ARRAYS.items()})


# -- helpers shared with the wal2json decoder -------------------------------------------



_BARE_IDENT = re.compile(r"[a-z_][a-z0-9_$]*")


def quote_ident(name: str) -> str:
    """PostgreSQL's quote_identifier() for names (keywords aside): bare or double-quoted."""
    if _BARE_IDENT.fullmatch(name):
        return name
    return '"' + name.replace('"', '""') + '"'


_PG_EPOCH = datetime(2000, 1, 1, tzinfo=timezone.utc)


def format_commit_time(micros: int, tz: tzinfo = timezone.utc) -> str:
    """A TimestampTz (microseconds since 2000-01-01 UTC) as test_decoding prints it.

    That is ``timestamptz_to_str``: ISO date and time in ``tz``, fractional seconds
    without trailing zeros, offset as ``+HH``, ``+HH:MM`` or ``+HH:MM:SS``.
    """
    at = (_PG_EPOCH + timedelta(microseconds=micros)).astimezone(tz)
    text = (f"{at.year:04d}-{at.month:02d}-{at.day:02d} "
            f"{at.hour:02d}:{at.minute:02d}:{at.second:02d}")
    if at.microsecond:
        text += f".{at.microsecond:06d}".rstrip("0")
    offset = at.utcoffset()
    seconds = int(offset.total_seconds()) if offset is not None else 0
    sign = "+" if seconds >= 0 else "-"
    minutes, secs = divmod(abs(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    text += f"{sign}{hours:02d}"
    if secs:
        text += f":{minutes:02d}:{secs:02d}"
    elif minutes:
        text += f":{minutes:02d}"
    return text


# -- the decoder ------------------------------------------------------------------------

_U16 = struct.Struct("!H")
_U32 = struct.Struct("!I")
_BEGIN = struct.Struct("!QqI")  # final LSN, commit timestamp, xid
_COMMIT = struct.Struct("!BQQq")  # flags, commit LSN, end LSN, commit timestamp
_ATTR = struct.Struct("!Ii")  # type OID, typmod
_TRUNCATE = struct.Struct("!IB")  # number of relations, options

_TRUNCATE_CASCADE = 1
_TRUNCATE_RESTART_SEQS = 2

_T, _N, _U, _B = ord("t"), ord("n"), ord("u"), ord("b")
_NEW, _KEY, _OLD = ord("N"), ord("K"), ord("O")
_IDENTITY_DEFAULT = ord("d")


@dataclasses.dataclass(frozen=True, slots=True)
class _Relation:
    """What a Relation message said about a table, with prebuilt NULL/TOAST columns."""

    schema: str
    table: str
    names: tuple[str, ...]
    types: tuple[str, ...]
    nulls: tuple[Column, ...]
    toasts: tuple[Column, ...]


def _cstring(data: bytes, pos: int) -> tuple[str, int]:
    """A NUL-terminated UTF-8 string at ``pos`` and the position after it."""
    end = data.index(b"\0", pos)
    return data[pos:end].decode(), end + 1


def _publication_option(name: str) -> str:
    # publication_names is parsed by SplitIdentifierString: unquoted names are
    # lower-cased and split at commas, so anything else must be double-quoted.
    if not name:
        raise ConfigError("the publication name must not be empty: set it (default pg2kinesis)")
    return quote_ident(name)


class PgOutputDecoder:
    """Decoder for slots created with the ``pgoutput`` plugin (protocol version 1, text values).

    Args:
        publication: the publication whose tables are decoded; it must exist before the
            slot reaches the changes (pgoutput looks it up in the historic catalog).
        type_name: ``(oid, typmod) -> name``, e.g. ``postgres.types.TypeNames(settings)``.
        typmods: pass the columns' typmods to ``type_name`` (``numeric(10,2)``); off by
            default to print types as test_decoding does.
        tz: zone of the commit time text (the server's TimeZone; default UTC).
    """

    plugin: str = "pgoutput"

    def __init__(
        self,
        publication: str = "pg2kinesis",
        *,
        type_name: TypeNamer | None = None,
        typmods: bool = False,
        tz: tzinfo = timezone.utc,
    ) -> None:
        self.publication = publication
        self.slot_options: tuple[str, ...] = (
            "proto_version", "1",
            # Logical messages: table snapshots' watermarks (core.snapshot).
            "messages", "true",
            "publication_names", _publication_option(publication),
        )
        self._type_name = type_name
        self._typmods = typmods
        self._tz = tz
        # Relation and Type messages are sent once per decoding session, possibly in an
        # earlier batch's rows than the change that uses them: kept across decode() calls.
        self._relations: dict[int, _Relation] = {}
        self._custom_types: dict[int, tuple[str, str]] = {}
        self._type_names: dict[tuple[int, int], str] = {}
        # (schema, table) -> (relid, replica identity, column names, key columns) of its latest Relation message.
        self._table_shapes: dict[tuple[str, str], tuple[int, int, tuple[str, ...], tuple[str, ...]]] = {}
        # How many Relation messages changed a table's shape (a DDL): see relation_key().
        self.schema_changes = 0

    # -- transactions --------------------------------------------------------------------

    @staticmethod
    def is_commit(data: str | bytes) -> bool:
        """Whether a row is a transaction's commit (where a slot may be advanced to)."""
        return isinstance(data, bytes | bytearray | memoryview) and bytes(data[:1]) == b"C"

    def commit_time(self, data: str | bytes) -> str | None:
        """The commit time a Commit message carries, as :meth:`decode` stamps it."""
        try:
            return format_commit_time(_COMMIT.unpack_from(data, 1)[3], self._tz)  # type: ignore[arg-type]
        except (struct.error, TypeError) as exc:
            raise DecodeError(f"malformed pgoutput Commit message ({exc})", text=data) from None

    def decode(self, rows: Iterable[SlotRow], part_size: int | None = None) -> Iterator[Transaction]:
        """Yield each committed transaction of ``rows`` (lsn, xid, data), in order.

        Streams: only the transaction being read is held, and with ``part_size`` at most that
        many of its changes (:meth:`Transaction.split` parts); a trailing transaction without
        its Commit is not yielded.
        """
        part_limit = part_size or 1 << 62
        txn: Transaction | None = None
        for lsn, xid, data in rows:
            if not isinstance(data, bytes | bytearray | memoryview):
                raise DecodeError("pgoutput rows must be bytes (peek_binary_changes), got text",
                                  lsn=lsn, text=data)
            data = bytes(data)
            if not data:
                raise DecodeError("empty pgoutput message", lsn=lsn, text=data)
            kind = data[0]
            try:
                if kind in _CHANGE_KINDS:  # the common case first
                    if txn is None:
                        raise DecodeError("row change outside a transaction (no Begin before it)",
                                          lsn=lsn, text=data)
                    txn.size += len(data)
                    self._change(kind, data, lsn, txn)
                    if len(txn.changes) >= part_limit:
                        yield txn.split()
                elif kind == _MSG_BEGIN:
                    if txn is not None:
                        raise DecodeError("Begin while the previous transaction has no Commit",
                                          lsn=lsn, text=data)
                    _final_lsn, _ts, begin_xid = _BEGIN.unpack_from(data, 1)
                    # The row's xid is authoritative, as for test_decoding.
                    txn = Transaction(int(xid) if xid else begin_xid, lsn, 0, None, [], len(data))
                elif kind == _MSG_COMMIT:
                    if txn is None:
                        raise DecodeError("Commit without a Begin", lsn=lsn, text=data)
                    _flags, _commit_lsn, _end_lsn, ts = _COMMIT.unpack_from(data, 1)
                    commit_time = format_commit_time(ts, self._tz)
                    txn.size += len(data)
                    txn.commit(lsn, commit_time)
                    yield txn
                    txn = None
                elif kind == _MSG_RELATION:
                    self._relation(data)
                    if txn is not None:
                        txn.size += len(data)
                elif kind == _MSG_TYPE:
                    oid = _U32.unpack_from(data, 1)[0]
                    namespace, pos = _cstring(data, 5)
                    name, _ = _cstring(data, pos)
                    self._custom_types[oid] = (namespace, name)
                    if txn is not None:
                        txn.size += len(data)
                elif kind in (_MSG_ORIGIN, _MSG_MESSAGE):
                    # No row change; it still counts towards the transaction's size. A snapshot
                    # watermark (non-transactional) is yielded as a message transaction (core.snapshot).
                    if txn is not None:
                        txn.size += len(data)
                    elif kind == _MSG_MESSAGE and (content := snapshot_content(self.plugin, data)) is not None:
                        yield message_transaction(lsn, content, len(data))
                else:
                    raise DecodeError(f"unknown pgoutput message type {chr(kind)!r} (only protocol "
                                      "version 1 without streaming is supported)", lsn=lsn, text=data)
            except DecodeError:
                raise
            except (struct.error, IndexError, ValueError, UnicodeDecodeError) as exc:
                # Truncated or garbled message: index()/unpack_from()/decode() ran off the data.
                raise DecodeError(f"malformed pgoutput {chr(kind)!r} message ({exc})",
                                  lsn=lsn, text=data) from None

    # -- schema ----------------------------------------------------------------------------

    def _relation(self, data: bytes) -> None:
        relid = _U32.unpack_from(data, 1)[0]
        namespace, pos = _cstring(data, 5)
        table, pos = _cstring(data, pos)
        replica_identity = data[pos]  # the key flags below say what K tuples hold
        pos += 1
        ncols = _U16.unpack_from(data, pos)[0]
        pos += 2
        names: list[str] = []
        types: list[str] = []
        keys: list[str] = []
        for _ in range(ncols):
            flags = data[pos]  # 1 = part of the key
            pos += 1
            name, pos = _cstring(data, pos)
            if flags & 1:
                keys.append(name)
            oid, typmod = _ATTR.unpack_from(data, pos)
            pos += 8
            names.append(name)
            types.append(self._type(oid, typmod))
        if pos != len(data):
            raise ValueError(f"{len(data) - pos} bytes after the last column")
        self._note_keys(relid, namespace or "pg_catalog", table, replica_identity, tuple(names), tuple(keys))
        self._relations[relid] = _Relation(
            # pgoutput sends "" for pg_catalog.
            namespace or "pg_catalog",
            table,
            tuple(names),
            tuple(types),
            tuple(Column(n, t, None) for n, t in zip(names, types, strict=True)),
            # A TOASTed value the UPDATE did not touch: unknown here, never invent one.
            tuple(Column(n, t, None, True) for n, t in zip(names, types, strict=True)),
        )

    def _note_keys(self, relid: int, schema: str, table: str, identity: int, names: tuple[str, ...],
                   keys: tuple[str, ...]) -> None:
        """Remember what a Relation message said about the table's key; count the changes of its shape."""
        seen = (relid, identity, names, keys)
        previous = self._table_shapes.get((schema, table))
        if previous is not None and (previous != seen or identity != _IDENTITY_DEFAULT):
            # A DDL since (or, for a table whose key the message cannot show, possibly one: pgoutput sends the
            # message again after any change of the table, and at the start of each peek): the pipeline reads
            # the catalog again.
            self.schema_changes += 1
        self._table_shapes[(schema, table)] = seen

    def relation_key(self, schema: str, table: str) -> tuple[str, ...] | None:
        """The table's primary key as of its latest Relation message, or None when that does not tell it.

        With ``REPLICA IDENTITY DEFAULT`` the key flags are the primary key's columns (none without one),
        taken from the catalog as it was at the change: exact across DDL. Other identities flag an index's or
        every column, so the catalog is asked instead.
        """
        seen = self._table_shapes.get((schema, table))
        if seen is None or seen[1] != _IDENTITY_DEFAULT:
            return None
        return seen[3]

    def _type(self, oid: int, typmod: int) -> str:
        key = (oid, typmod if self._typmods else -1)
        name = self._type_names.get(key)
        if name is None:
            if self._type_name is not None:
                name = self._type_name(*key)
            elif oid in BUILTIN_TYPE_NAMES:
                name = BUILTIN_TYPE_NAMES[oid]
            elif oid in self._custom_types:
                namespace, typname = self._custom_types[oid]
                name = quote_ident(typname)
                if namespace not in ("public", "pg_catalog", ""):
                    name = f"{quote_ident(namespace)}.{name}"
            else:
                raise ValueError(f"type OID {oid} is unknown: pass type_name (postgres.types.TypeNames)")
            self._type_names[key] = name
        return name

    # -- row changes -----------------------------------------------------------------------

    def _rel(self, data: bytes) -> _Relation:
        relid = _U32.unpack_from(data, 1)[0]
        rel = self._relations.get(relid)
        if rel is None:
            raise ValueError(f"change for relation {relid} without a Relation message before it")
        return rel

    def _change(self, kind: int, data: bytes, lsn: int, txn: Transaction) -> None:
        out = txn.changes
        if kind == _MSG_TRUNCATE:
            nrels, options = _TRUNCATE.unpack_from(data, 1)
            flags: tuple[str, ...] = ()
            if options & _TRUNCATE_RESTART_SEQS:
                flags += ("restart_seqs",)
            if options & _TRUNCATE_CASCADE:
                flags += ("cascade",)
            if len(data) != 6 + 4 * nrels:
                raise ValueError(f"{nrels} relations announced in {len(data)} bytes")
            for i in range(nrels):
                rel = self._relations.get(_U32.unpack_from(data, 6 + 4 * i)[0])
                if rel is None:
                    raise ValueError("TRUNCATE of a relation without a Relation message before it")
                out.append(Change(txn.xid, lsn, txn.first_index + len(out), rel.schema, rel.table,
                                  Operation.TRUNCATE, truncate_flags=flags))
            return
        rel = self._rel(data)
        marker = data[5]
        pos = 6
        after: tuple[Column, ...] | None = None
        before: tuple[Column, ...] | None = None
        if kind == _MSG_INSERT:
            if marker != _NEW:
                raise ValueError("Insert without its N tuple")
            after, pos = self._tuple(data, pos, rel, False)
            op = Operation.INSERT
        elif kind == _MSG_UPDATE:
            if marker in (_KEY, _OLD):
                before, pos = self._tuple(data, pos, rel, True)
                if data[pos] != _NEW:
                    raise ValueError("Update old tuple not followed by its N tuple")
                pos += 1
            elif marker != _NEW:
                raise ValueError(f"Update with tuple marker {chr(marker)!r}")
            after, pos = self._tuple(data, pos, rel, False)
            op = Operation.UPDATE
        else:  # Delete
            if marker not in (_KEY, _OLD):
                raise ValueError(f"Delete with tuple marker {chr(marker)!r}")
            before, pos = self._tuple(data, pos, rel, True)
            op = Operation.DELETE
        if pos != len(data):
            raise ValueError(f"{len(data) - pos} bytes after the tuple data")
        out.append(Change(txn.xid, lsn, txn.first_index + len(out), rel.schema, rel.table, op, after, before))

    def _tuple(self, data: bytes, pos: int, rel: _Relation, old: bool) -> tuple[tuple[Column, ...], int]:
        """TupleData at ``pos``: the columns and the position after them.

        ``old``: an old key or old row, printed by test_decoding without its NULL columns.
        """
        ncols = _U16.unpack_from(data, pos)[0]
        pos += 2
        names = rel.names
        if ncols != len(names):
            raise ValueError(f"{ncols} columns where the Relation message announced {len(names)}")
        types = rel.types
        columns: list[Column] = []
        append = columns.append
        unpack_len = _U32.unpack_from
        for i in range(ncols):
            kind = data[pos]
            if kind == _T:
                start = pos + 5
                end = start + unpack_len(data, pos + 1)[0]
                if end > len(data):
                    raise ValueError("column value runs past the end of the message")
                append(_column(names[i], types[i], data[start:end].decode()))
                pos = end
            elif kind == _N:
                pos += 1
                if not old:
                    append(rel.nulls[i])
            elif kind == _U:
                pos += 1
                append(rel.toasts[i])
            elif kind == _B:
                raise ValueError("binary column value (the 'binary' option is not supported)")
            else:
                raise ValueError(f"unknown column kind {chr(kind)!r}")
        return tuple(columns), pos


_column = new_column
_MSG_BEGIN, _MSG_COMMIT, _MSG_RELATION, _MSG_TYPE, _MSG_ORIGIN, _MSG_MESSAGE = (ord(c) for c in "BCRYOM")
_MSG_INSERT, _MSG_UPDATE, _MSG_DELETE, _MSG_TRUNCATE = (ord(c) for c in "IUDT")
_CHANGE_KINDS = frozenset((_MSG_INSERT, _MSG_UPDATE, _MSG_DELETE, _MSG_TRUNCATE))
