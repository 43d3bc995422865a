"""Table snapshots in order with the stream: watermarks and the key-drop merge (pure, no I/O).

The DBLog method, fitted to the peek/advance pipeline. For each chunk of a table (keyset pagination by
primary key, :mod:`pg2kinesis_dagster.postgres.snapshot`) the snapshotter writes into the WAL, with
``pg_logical_emit_message(false, 'pg2kinesis.snapshot', ...)`` (non-transactional: written at once):

1. a *low* watermark ``L`` naming the chunk, its table and key, and the snapshotter's session;
2. then (after every transaction that was writing the table when ``L`` was written has ended) it SELECTs
   the chunk in a short transaction whose snapshot is ``S``;
3. then a *high* watermark ``H`` whose content carries the chunk's rows.

The replication pipeline reads the slot in WAL order. Between ``L`` and ``H`` it notes every key of the
table that a change touched (old and new key of an UPDATE, the key of a DELETE; a TRUNCATE touches all);
at ``H`` it publishes the chunk's other rows as ``SNAPSHOT`` changes at ``H``'s position
(:class:`SnapshotMerger`). Why that is in order with the stream, for a change ``C`` of a row of the chunk
whose transaction ``T`` commits at ``P``:

* ``T`` visible to ``S``: ``T`` ended before ``S`` was taken, so its commit record precedes ``H``; the
  chunk's row already holds ``C`` and is published after it.
* ``T`` not visible to ``S`` and ``P`` after ``H``: published after the chunk's row, which it supersedes.
* ``T`` not visible to ``S`` and ``P`` between ``L`` and ``H``: the key is dropped from the chunk; the
  stream carries the row.
* ``T`` not visible to ``S`` and ``P`` before ``L``: impossible. A transaction whose commit record
  precedes ``L`` but that has not left the process array yet (it is flushing, or waiting for a
  synchronous standby) still holds its lock on the table; the snapshotter waits for every transaction
  holding a write lock on the table after writing ``L`` before taking ``S``.

Commits between ``L`` and ``H`` may or may not be visible to ``S``; either way their keys are dropped, so
nothing stale is ever published after a newer change. A row not in the chunk's key range when its chunk
runs (moved by a key change) is carried by the stream.

Records: ``op`` ``SNAPSHOT``, ``after`` the row, ``lsn`` and ``commit_lsn`` the high watermark's LSN,
``id`` ``<high watermark LSN>:<row index in the chunk>`` (stable: the chunk is read from the same WAL
record on every retry), ``xid`` 0, ``commit_ts`` when the chunk was read.

The slot is never advanced to a position between a live chunk's ``L`` and ``H`` (the window is cut
before ``L`` instead), so a restarted pipeline always sees a chunk's ``L`` before its ``H``. An ``L``
whose snapshotter session ended without writing ``H`` is an orphan: it is ignored, and the snapshotter
redoes that chunk when it resumes. An ``H`` without its ``L`` (only possible for such an abandoned
chunk) publishes nothing.
"""

from __future__ import annotations

import json
import logging
import re
import struct
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from pg2kinesis_dagster.core.changes import Change, Column, Operation, Transaction, new_column
from pg2kinesis_dagster.core.errors import DecodeError

log = logging.getLogger(__name__)

# Rows per chunk: one short transaction on the source and two WAL messages each.
DEFAULT_CHUNK_ROWS = 5_000
# A chunk's rows travel in one WAL message and one decoded row of the spool: bounded in bytes too.
DEFAULT_CHUNK_BYTES = 16 * 1024 * 1024
SNAPSHOT_PREFIX = "pg2kinesis.snapshot"
# A transactional message with this prefix only forces a WAL flush after a high watermark; ignored.
FLUSH_PREFIX = "pg2kinesis.snapshot.flush"
FORMAT_VERSION = 1

_TD_HEAD = f"message: transactional: 0 prefix: {SNAPSHOT_PREFIX}, sz: "
_W2J_HEAD = '{"action":"M",'
_W2J_NON_TRANSACTIONAL = '"transactional":false,"prefix":"' + SNAPSHOT_PREFIX + '"'
_PGO_PREFIX = SNAPSHOT_PREFIX.encode() + b"\x00"
_U32 = struct.Struct("!I")

KeyValues = tuple["str | None", ...]


def snapshot_content(plugin: str, data: str | bytes) -> str | None:
    """The content of a slot row that is a non-transactional snapshot message, else None.

    * test_decoding: ``message: transactional: 0 prefix: pg2kinesis.snapshot, sz: <n> content:<content>``;
    * wal2json (format-version 2): ``{"action":"M","transactional":false,"prefix":...,"content":"..."}``;
    * pgoutput (with ``messages 'true'``): ``M``, flags (0: non-transactional), Int64 LSN, prefix, Int32
      length, content.
    """
    if plugin == "test_decoding":
        if isinstance(data, str) and data.startswith(_TD_HEAD):
            start = data.find(" content:", len(_TD_HEAD))
            if start < 0:
                raise DecodeError("snapshot message without content", text=data)
            return data[start + 9:]
        return None
    if plugin == "wal2json":
        # With include-xids/include-timestamp: {"action":"M","xid":null,"timestamp":null,"transactional":false,...}
        if isinstance(data, str) and data.startswith(_W2J_HEAD) and _W2J_NON_TRANSACTIONAL in data[:200]:
            try:
                return str(json.loads(data)["content"])
            except (ValueError, KeyError, TypeError) as exc:
                raise DecodeError(f"invalid wal2json message document ({exc})", text=data) from None
        return None
    if isinstance(data, bytes | bytearray | memoryview):
        raw = bytes(data[:2 + 8 + len(_PGO_PREFIX)])
        if raw[:2] == b"M\x00" and raw[10:] == _PGO_PREFIX:
            data = bytes(data)
            start = 10 + len(_PGO_PREFIX)
            (size,) = _U32.unpack_from(data, start)
            try:
                return data[start + 4:start + 4 + size].decode()
            except UnicodeDecodeError as exc:
                raise DecodeError(f"snapshot message is not UTF-8 ({exc})", text=data) from None
    return None


def message_transaction(lsn: int, content: str, size: int) -> Transaction:
    """A snapshot message as the decoders yield it: a transaction without changes at the message's LSN."""
    return Transaction(0, lsn, lsn, None, [], size, message=content)


# -- watermark contents -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Session:
    """The snapshotter's database session: a low watermark whose session is gone without a high one is an orphan."""

    pid: int
    started_us: int  # backend_start, microseconds since the epoch: pids are reused


@dataclass(frozen=True)
class Watermark:
    """A watermark's header (the first line of the message's content)."""

    kind: str  # "low" or "high"
    chunk: str  # unique per chunk attempt: "<snapshot id>:<chunk number>:<attempt>"
    schema: str
    table: str
    key: tuple[str, ...]
    session: Session | None = None  # low watermarks
    read_at: str | None = None  # high watermarks: when the chunk was read (server time)
    columns: tuple[tuple[str, str], ...] = ()  # high watermarks: (name, type) of each column


def encode_low(chunk: str, schema: str, table: str, key: Sequence[str], session: Session) -> str:
    return json.dumps({"v": FORMAT_VERSION, "kind": "low", "chunk": chunk, "schema": schema, "table": table,
                       "key": list(key), "pid": session.pid, "started_us": session.started_us},
                      ensure_ascii=False, separators=(",", ":"))


def encode_high(chunk: str, schema: str, table: str, key: Sequence[str], columns: Sequence[tuple[str, str]],
                rows_text: str, read_at: str) -> str:
    """``rows_text``: the rows in ``COPY ... TO STDOUT`` text format (what PostgreSQL's COPY wrote, as is)."""
    header = json.dumps({"v": FORMAT_VERSION, "kind": "high", "chunk": chunk, "schema": schema, "table": table,
                         "key": list(key), "columns": [list(c) for c in columns], "read_at": read_at,
                         "rows": "copy-text"}, ensure_ascii=False, separators=(",", ":"))
    return header + "\n" + rows_text


def decode_header(content: str) -> Watermark:
    line, _, _ = content.partition("\n")
    try:
        doc: dict[str, Any] = json.loads(line)
        if doc.get("v") != FORMAT_VERSION:
            raise ValueError(f"version {doc.get('v')!r}, expected {FORMAT_VERSION}")
        kind = doc["kind"]
        session = Session(int(doc["pid"]), int(doc["started_us"])) if kind == "low" else None
        return Watermark(kind=kind, chunk=str(doc["chunk"]), schema=str(doc["schema"]), table=str(doc["table"]),
                         key=tuple(doc["key"]), session=session, read_at=doc.get("read_at"),
                         columns=tuple((str(n), str(t)) for n, t in doc.get("columns", ())))
    except (ValueError, KeyError, TypeError) as exc:
        raise DecodeError(f"invalid snapshot watermark ({exc})", text=content[:200]) from None


# COPY's text format: tab-separated fields, one row a line, \N for NULL, backslash escapes for the rest.
_COPY_ESCAPE = re.compile(r"\\(?:([0-7]{1,3})|x([0-9a-fA-F]{1,2})|(.))", re.DOTALL)
_COPY_CHARS = {"b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t", "v": "\v"}
_ESCAPE_FOR_COPY = str.maketrans({"\\": "\\\\", "\n": "\\n", "\r": "\\r", "\t": "\\t"})


def _copy_char(m: re.Match[str]) -> str:
    octal, hexa, char = m.groups()
    if octal is not None:
        return chr(int(octal, 8))
    if hexa is not None:
        return chr(int(hexa, 16))
    return _COPY_CHARS.get(char, char)


def copy_field(text: str) -> str | None:
    """One field of COPY's text format -> the value (None for NULL)."""
    if text == "\\N":
        return None
    return _COPY_ESCAPE.sub(_copy_char, text) if "\\" in text else text


def decode_copy_rows(text: str) -> Iterator[list[str | None]]:
    """The rows of COPY's text format, each a list of values in column order."""
    if not text:
        return
    if not text.endswith("\n"):
        raise DecodeError("snapshot rows do not end with a newline (truncated COPY output)", text=text[-200:])
    for line in text[:-1].split("\n"):
        yield [copy_field(f) for f in line.split("\t")]


def encode_copy_rows(rows: Iterable[Sequence[str | None]]) -> str:
    """Rows in COPY's text format (what ``COPY ... TO STDOUT`` prints)."""
    return "".join("\t".join("\\N" if v is None else v.translate(_ESCAPE_FOR_COPY) for v in row) + "\n"
                   for row in rows)


def decode_rows(content: str) -> list[list[str | None]]:
    """A high watermark's rows."""
    _, _, rows = content.partition("\n")
    return list(decode_copy_rows(rows))


# -- the merge ----------------------------------------------------------------------------------------------


@dataclass
class _OpenChunk:
    mark: Watermark
    touched: set[KeyValues] = field(default_factory=set)
    truncated: bool = False


@dataclass
class SnapshotStats:
    chunks: int = 0
    rows: int = 0
    dropped_rows: int = 0
    orphan_high: int = 0
    abandoned_low: int = 0


def _image_key(image: tuple[Column, ...] | None, key: tuple[str, ...]) -> KeyValues | None:
    if image is None:
        return None
    values = {c.name: c for c in image}
    if any(name not in values or values[name].unchanged_toast for name in key):
        return None
    return tuple(values[name].value for name in key)


class SnapshotMerger:
    """Turns watermark messages into SNAPSHOT changes, in stream order (see the module's docstring).

    ``abandoned``: chunks whose low watermark the window reader found orphaned (their snapshotter session
    ended without a high watermark): ignored. Open chunks do not outlive one pass over a window: the
    pipeline never cuts a window between a live chunk's watermarks.
    """

    def __init__(self, abandoned: Iterable[str] = ()) -> None:
        self.abandoned = set(abandoned)
        self._open: dict[str, _OpenChunk] = {}
        self._by_table: dict[tuple[str, str], list[_OpenChunk]] = {}
        self.stats = SnapshotStats()

    @property
    def open(self) -> bool:
        """Whether a chunk's low watermark was seen without its high one: no advance point here."""
        return bool(self._open)

    def follow(self, transactions: Iterable[Transaction]) -> Iterator[Transaction]:
        for txn in transactions:
            content = txn.message
            if content is None:
                if self._by_table:
                    self._observe(txn)
                yield txn
                continue
            mark = decode_header(content)
            if mark.kind == "low":
                if mark.chunk in self.abandoned:
                    self.stats.abandoned_low += 1
                    continue
                chunk = _OpenChunk(mark)
                self._open[mark.chunk] = chunk
                self._by_table.setdefault((mark.schema, mark.table), []).append(chunk)
                continue  # a low watermark is no place to advance the slot to
            if mark.kind != "high":
                raise DecodeError(f"unknown snapshot watermark kind {mark.kind!r}", lsn=txn.commit_lsn)
            opened = self._open.pop(mark.chunk, None)
            if opened is None:
                self.stats.orphan_high += 1
                log.warning("snapshot chunk %s of %s.%s: high watermark at LSN %X without its low watermark "
                            "(an abandoned chunk): not published; the snapshot redoes it", mark.chunk,
                            mark.schema, mark.table, txn.commit_lsn)
                yield txn  # no changes; a place to advance to
                continue
            others = self._by_table[(mark.schema, mark.table)]
            others.remove(opened)
            if not others:
                del self._by_table[(mark.schema, mark.table)]
            yield self._rows(txn, mark, opened, content)

    def _observe(self, txn: Transaction) -> None:
        for change in txn.changes:
            chunks = self._by_table.get((change.schema, change.table))
            if not chunks:
                continue
            for chunk in chunks:
                if change.op is Operation.TRUNCATE:
                    chunk.truncated = True
                    continue
                key = chunk.mark.key
                new = _image_key(change.after, key)
                old = _image_key(change.before, key)
                if new is None and old is None:
                    # No key in the change (cannot happen for a table with a primary key): the chunk cannot be
                    # merged row by row, so none of it is published rather than a possibly stale row.
                    chunk.truncated = True
                    continue
                if new is not None:
                    chunk.touched.add(new)
                if old is not None:
                    chunk.touched.add(old)

    def _rows(self, txn: Transaction, mark: Watermark, chunk: _OpenChunk, content: str) -> Transaction:
        lsn = txn.commit_lsn
        out = Transaction(0, lsn, lsn, mark.read_at, [], txn.size)
        rows = decode_rows(content)
        names = [name for name, _ in mark.columns]
        try:
            positions = [names.index(k) for k in chunk.mark.key]
        except ValueError:
            raise DecodeError(f"snapshot chunk {mark.chunk}: key {chunk.mark.key} not among its columns",
                              lsn=lsn) from None
        touched, truncated = chunk.touched, chunk.truncated
        changes = out.changes
        columns = mark.columns
        dropped = 0
        for index, row in enumerate(rows):
            if len(row) != len(columns):
                raise DecodeError(f"snapshot chunk {mark.chunk}: a row of {len(row)} values for "
                                  f"{len(columns)} columns", lsn=lsn)
            if truncated or tuple(row[p] for p in positions) in touched:
                dropped += 1
                continue
            after = tuple(new_column(name, type_, value) for (name, type_), value in zip(columns, row, strict=True))
            changes.append(_snapshot_change(mark, lsn, index, after))
        self.stats.chunks += 1
        self.stats.rows += len(changes)
        self.stats.dropped_rows += dropped
        return out


def _snapshot_change(mark: Watermark, lsn: int, index: int, after: tuple[Column, ...]) -> Change:
    return Change(0, lsn, index, mark.schema, mark.table, Operation.SNAPSHOT, after=after, commit_lsn=lsn,
                  commit_time=mark.read_at)
