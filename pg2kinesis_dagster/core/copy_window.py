"""A window's records straight from its COPY text rows: the driver of the compiled test_decoding lane.

``COPY (SELECT lsn, xid, data FROM pg_logical_slot_peek_changes(...)) TO STDOUT`` spools a window as COPY
text (core.copy_text); :func:`record_chunks_from_copy` turns that buffer into the :class:`RecordChunk` objects
the pipeline's per-transaction loop (decoder -> snapshot merger -> schema-following keys -> RecordBuilder)
makes from the same rows: same records, commit LSNs, advance points, statistics and DecodeErrors.

Two paths share the work:

* the Python path: exactly that loop, over ``copy_text.iter_rows``; it is the reference, it serves every
  plugin, and whatever the lane leaves;
* the lane (``core/_td_lane.pyx``, test_decoding only): reads rows from the buffer and appends records
  itself, as long as they are in its subset (plain INSERT/UPDATE/DELETE rows of tables it knows, a format
  it implements); any other row it hands back, and the Python path decodes that row alone (inside a
  transaction the lane began: resumed with ``decode(open_transaction=...)``) or the whole transaction.

The lane keeps per-table settings (names, accepted operations, key columns) that the driver registers on
its request and drops whenever the keys in force may have moved (``SchemaFollowingKeys.generation``, a
catalog read due). It is used only while no table snapshot chunk is open (the merger must see every change
then) and when the builder keys changes with ``schema_keys.key_columns``.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from pg2kinesis_dagster import native as native_modules
from pg2kinesis_dagster.core.changes import Change, Operation, SlotRow, Transaction
from pg2kinesis_dagster.core.copy_text import Buffer, find_field, iter_rows, parse_row, unescape
from pg2kinesis_dagster.core.decoders.test_decoding import _QUALIFIED, TestDecodingDecoder, _unquote
from pg2kinesis_dagster.core.errors import DecodeError
from pg2kinesis_dagster.core.formats import CSVFormatter, CSVPayloadFormatter, JSONFormatter
from pg2kinesis_dagster.core.records import BatchStats, NoKeyPolicy, RecordBuilder
from pg2kinesis_dagster.core.schema_keys import SchemaFollowingKeys
from pg2kinesis_dagster.core.snapshot import SnapshotMerger
from pg2kinesis_dagster.core.window import RecordChunk

LANE_MODULE = "pg2kinesis_dagster.core._td_lane"

# The lane's run() statuses (mirrored in _td_lane.pyx).
END, CHUNK_FULL, NEED_TABLE, SLOW, NEED_COMMIT = 0, 1, 2, 3, 4

# After this many consecutive rows handed back inside a transaction, its rest goes the Python path whole.
SLOW_STREAK = 4
_COMMIT_FIELD = b"\tCOMMIT"  # a raw tab only separates fields, and an xid is digits: a data field starting so
_OPS = (Operation.INSERT, Operation.UPDATE, Operation.DELETE)


def lane_format(builder: RecordBuilder) -> str | None:
    """The lane's name for the builder's format, or None when the lane does not implement it."""
    fmt = builder.formatter
    if type(fmt) is CSVFormatter:
        return "CSV"
    if type(fmt) is CSVPayloadFormatter and not fmt.full_change:
        return "CSVPayload"
    if type(fmt) is JSONFormatter and not fmt.typed:
        return "JSON"
    return None


def load_lane() -> Any | None:
    """The compiled lane module, or None (not built, or ``PG2K_NATIVE=0``)."""
    return native_modules.load(LANE_MODULE)


@dataclass
class LaneCounts:
    """How the work was shared (for tests and benchmarks): records the lane appended, rows and whole units
    (transactions or rows outside one) the Python path read."""

    lane_records: int = 0
    python_rows: int = 0
    python_units: int = 0


@dataclass
class _Commit:
    lsn: int
    time: str | None


@dataclass
class _Rows:
    """Rows of ``buf`` from ``pos``; with ``unit``, only up to the end of the first transaction (or the first row
    when it is none): what the Python path takes between two stretches of the lane."""

    buf: Buffer
    pos: int
    end: int
    unit: bool
    in_txn: bool = False
    done: bool = field(default=False, init=False)

    def __iter__(self) -> Iterator[SlotRow]:
        for row, after in iter_rows(self.buf, self.pos, self.end):
            self.pos = after
            data = row[2]
            yield row
            if not self.unit:
                continue
            if self.in_txn:
                if data.startswith("COMMIT"):
                    return
            elif data.startswith("BEGIN"):
                self.in_txn = True
            else:
                return


class _Driver:
    def __init__(self, buf: Buffer, start: int, end: int, decoder: Any, builder: RecordBuilder,
                 schema_keys: SchemaFollowingKeys, merger: SnapshotMerger, chunk_changes: int, chunk_bytes: int,
                 stats: BatchStats, lane_module: Any | None, counts: LaneCounts) -> None:
        self.buf = buf
        self.pos = start
        self.end = end
        self.decoder = decoder
        self.builder = builder
        self.schema_keys = schema_keys
        self.merger = merger
        self.chunk_changes = chunk_changes
        self.chunk_bytes = chunk_bytes
        self.stats = stats
        self.chunk = RecordChunk()
        self.commits: dict[tuple[int, int], _Commit] = {}
        self.lane = self._make_lane(lane_module) if lane_module is not None else None
        self.generation = -1
        self.counts = counts
        self.begin_xid: str | None = None
        self.slow_streak = 0  # rows in a row handed back by the lane inside one transaction
        self.resumed_at = -1  # where the lane went on after the last row it handed back

    # -- the lane ---------------------------------------------------------------------------------------

    def _make_lane(self, module: Any) -> Any | None:
        builder = self.builder
        fmt = lane_format(builder)
        if fmt is None or type(self.decoder) is not TestDecodingDecoder:
            return None
        if builder.key_lookup != self.schema_keys.key_columns:  # keys the lane caches must follow the schema
            return None
        return module.TestDecodingLane(
            fmt=fmt, partition_by=builder.partition_by.value, constant=builder.partition_constant,
            skip_no_key=builder.no_key_policy is NoKeyPolicy.SKIP,
            max_record_bytes=builder.max_record_bytes if builder.oversized.value == "truncate" else -1,
        )

    def _sync_lane(self) -> None:
        """Drop the lane's tables when the keys in force may have moved since they were registered."""
        keys = self.schema_keys
        keys.check_age()
        if keys.reload_due or keys.generation != self.generation:
            self.lane.clear_tables(self.stats)
            self.lane.set_deferred(keys.deferred_xids())
            self.generation = keys.generation

    def _register(self, raw: bytes) -> None:
        lane = self.lane
        if lane.has_table(raw):
            # Known, its key not looked up yet: the first accepted change asks (when the builder would).
            schema, table = lane.table_names(raw)
            lane.set_keys(raw, self.builder.key_lookup(schema, table))
            if self.schema_keys.generation != self.generation:  # that lookup read the catalog
                self._sync_lane()
            return
        try:
            text = unescape(raw).decode("utf-8")
        except (DecodeError, UnicodeDecodeError):
            lane.add_table(raw, None)  # the Python path raises the error at the row
            return
        m = _QUALIFIED.fullmatch(text)
        if m is None:  # pragma: no cover - the lane only asks for names it matched
            lane.add_table(raw, None)
            return
        schema, table = _unquote(m.group(1)), _unquote(m.group(2))
        change_filter = self.builder.change_filter
        accepts = tuple(change_filter.accepts(Change(0, 0, 0, schema, table, op)) for op in _OPS)
        excluded = bool(self.builder.exclude_columns.by_table.get((schema, table)))
        lane.add_table(raw, None if excluded else (schema, table, accepts))

    def _run_lane(self) -> Iterator[RecordChunk]:
        """The lane from ``self.pos`` until it ends, hands a row back, or fills the chunk."""
        lane, chunk = self.lane, self.chunk
        self._sync_lane()
        while True:
            before = len(chunk.records)
            status = lane.run(self.buf, self.pos, self.end, chunk.records, chunk.commit_lsns, chunk.record_bytes,
                              self.chunk_changes, self.chunk_bytes)
            self.counts.lane_records += len(chunk.records) - before
            self.pos = lane.pos
            chunk.record_bytes = lane.record_bytes
            if lane.advance_to is not None:  # the lane runs only while no snapshot chunk is open
                chunk.advance_to = lane.advance_to
            if status == NEED_TABLE:
                self._register(lane.need)
                continue
            if status == NEED_COMMIT:  # a long transaction: its commit found here, without mapping it whole
                start = lane.need_commit_from
                lane.set_commit_hint(start, find_field(self.buf, _COMMIT_FIELD, start, self.end))
                continue
            if status == CHUNK_FULL:
                yield from self._emit()
                chunk = self.chunk
                continue
            if status == SLOW and lane.in_txn:
                # Rows the lane hands back one after another (a table it leaves, e.g. with excluded columns):
                # the rest of the transaction goes the Python path at once, without a round trip per row.
                self.slow_streak = self.slow_streak + 1 if self.pos == self.resumed_at else 1
                if self.slow_streak >= SLOW_STREAK:
                    yield from self._python_rest()
                else:
                    yield from self._python_row()
                chunk = self.chunk
                if self.merger.open:  # pragma: no cover - a row change never opens a snapshot chunk
                    raise AssertionError("snapshot chunk opened inside a transaction")
                self._sync_lane()
                continue
            return  # END, or SLOW outside a transaction: the Python path takes the next unit

    def _open_transaction(self) -> Transaction:
        """The transaction the lane is reading, for the Python decoder to go on with."""
        xid, begin_lsn, index, self.begin_xid, commit_lsn, commit_time = self.lane.transaction()
        self.commits = {(xid, begin_lsn): _Commit(commit_lsn, commit_time)}
        return Transaction(xid, begin_lsn, 0, None, [], 0, index)

    def _python_rest(self) -> Iterator[RecordChunk]:
        """The rest of the transaction the lane is reading, from ``self.pos`` to its commit, by the Python path."""
        txn = self._open_transaction()
        rows = self._rows = _Rows(self.buf, self.pos, self.end, unit=True, in_txn=True)
        self.counts.python_units += 1
        yield from self._build(self.decoder.decode(rows, part_size=self.chunk_changes, open_transaction=txn,
                                                   begin_xid=self.begin_xid), None)
        self.pos = rows.pos
        self.lane.end_transaction(self.pos)  # counted and advanced to by the Python path

    def _python_row(self) -> Iterator[RecordChunk]:
        """The row at ``self.pos``, inside the transaction the lane is reading, through the Python path."""
        lane = self.lane
        newline = self.buf.find(b"\n", self.pos, self.end)
        if newline < 0:
            raise DecodeError(f"a COPY row without its newline at byte {self.pos}")
        row = parse_row(bytes(self.buf[self.pos:newline]))
        self.counts.python_rows += 1
        txn = self._open_transaction()
        # part_size 1: the row's changes come out as one part, at once; the lane goes on with the next index.
        yield from self._build(self.decoder.decode([row], 1, open_transaction=txn, begin_xid=self.begin_xid),
                               newline + 1)
        lane.resume(txn.first_index, newline + 1)
        self.pos = self.resumed_at = newline + 1

    # -- the Python path ----------------------------------------------------------------------------------

    def _python(self, unit: bool) -> Iterator[RecordChunk]:
        """Today's loop from ``self.pos``: one unit (a transaction, or a row outside one) or everything."""
        rows = _Rows(self.buf, self.pos, self.end, unit)
        self._rows = rows
        self.counts.python_units += 1
        yield from self._build(self.decoder.decode(rows, part_size=self.chunk_changes), None)
        self.pos = rows.pos

    def _build(self, decoded: Iterator[Transaction], resume_at: int | None) -> Iterator[RecordChunk]:
        chunk, builder, merger, stats = self.chunk, self.builder, self.merger, self.stats
        for txn in merger.follow(self.schema_keys.follow(decoded, self.decoder)):
            if txn.partial:
                self._stamp(txn, resume_at)
            chunk.add_transaction(txn, builder, stats, ends=not txn.partial and not merger.open)
            if chunk.full(self.chunk_changes, self.chunk_bytes):
                yield from self._emit()
                chunk = self.chunk

    def _stamp(self, part: Transaction, resume_at: int | None) -> None:
        """A part of a transaction whose commit is further on: find the commit row ahead in the buffer."""
        key = (part.xid, part.begin_lsn)
        commit = self.commits.get(key)
        if commit is None:
            self.commits.clear()
            commit = self.commits[key] = self._find_commit(self._rows.pos if resume_at is None else resume_at,
                                                           part.begin_lsn)
        part.commit(commit.lsn, commit.time)

    def _find_commit(self, pos: int, begin_lsn: int) -> _Commit:
        buf, end = self.buf, self.end
        while True:
            at = find_field(buf, _COMMIT_FIELD, pos, end)
            if at < 0:
                raise DecodeError("transaction without its commit in the window", lsn=begin_lsn)
            start = buf.rfind(b"\n", pos, at) + 1 or pos
            newline = buf.find(b"\n", at, end)
            if newline < 0:
                raise DecodeError(f"a COPY row without its newline at byte {start}")
            lsn, _, data = parse_row(bytes(buf[start:newline]))
            if self.decoder.is_commit(data):
                return _Commit(lsn, self.decoder.commit_time(data))
            pos = newline + 1

    # -- chunks ------------------------------------------------------------------------------------------

    def _emit(self) -> Iterator[RecordChunk]:
        if self.lane is not None:
            self.lane.flush_stats(self.stats)
        chunk, self.chunk = self.chunk, RecordChunk()
        yield chunk

    def chunks(self) -> Iterator[RecordChunk]:
        if self.lane is None:
            yield from self._python(unit=False)
        else:
            self.schema_keys.start(self.decoder)
            while self.pos < self.end:
                if not self.merger.open:
                    yield from self._run_lane()
                    if self.pos >= self.end:
                        break
                yield from self._python(unit=True)
            self.lane.flush_stats(self.stats)
        chunk = self.chunk
        if chunk.records or chunk.advance_to is not None:
            yield chunk


def record_chunks_from_copy(buf: Buffer, start: int, end: int, *, decoder: Any, builder: RecordBuilder,
                            schema_keys: SchemaFollowingKeys, merger: SnapshotMerger, chunk_changes: int,
                            chunk_bytes: int, stats: BatchStats, native: bool = True,
                            counts: LaneCounts | None = None) -> Iterator[RecordChunk]:
    """The record chunks of the COPY rows ``buf[start:end]`` (whole rows of one window), counting into ``stats``.

    The same records, commit LSNs, advance points, statistics and errors as the pipeline's loop over the decoded
    rows (``Replicator._record_chunks``); chunk boundaries may differ, each chunk holding about ``chunk_changes``
    records or ``chunk_bytes`` bytes at most. With ``native`` and a test_decoding decoder, the compiled lane does
    what it can (see the module's docstring). DecodeErrors come without the slot's name (the caller adds it).
    ``counts``, if given, is told how the work was shared.
    """
    module = load_lane() if native else None
    driver = _Driver(buf, start, end, decoder, builder, schema_keys, merger, chunk_changes, chunk_bytes, stats,
                     module, counts if counts is not None else LaneCounts())
    return driver.chunks()
