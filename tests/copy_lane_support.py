"""Shared by the COPY lane's tests: the reference loop, the driver's runs, windows of generated test_decoding rows.

The reference is ``Replicator._record_chunks``'s loop (decoder -> schema keys -> snapshot merger -> builder),
fed the rows of the same COPY buffer from a list, with its ``find_next`` for the commit of a split transaction.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import strategies as st

from pg2kinesis_dagster import native
from pg2kinesis_dagster.core.batching import Record
from pg2kinesis_dagster.core.changes import SlotRow, Transaction, format_lsn
from pg2kinesis_dagster.core.columns import ColumnExclusion
from pg2kinesis_dagster.core.copy_text import format_row, iter_rows
from pg2kinesis_dagster.core.copy_window import LANE_MODULE, record_chunks_from_copy
from pg2kinesis_dagster.core.decoders import TestDecodingDecoder
from pg2kinesis_dagster.core.errors import DecodeError, Pg2KinesisError
from pg2kinesis_dagster.core.filters import ChangeFilter, parse_operations
from pg2kinesis_dagster.core.formats import make_formatter, needs_row_images
from pg2kinesis_dagster.core.keys import PartitionBy
from pg2kinesis_dagster.core.oversize import OversizedPolicy
from pg2kinesis_dagster.core.records import BatchStats, NoKeyPolicy, RecordBuilder
from pg2kinesis_dagster.core.schema_keys import SchemaFollowingKeys
from pg2kinesis_dagster.core.snapshot import SnapshotMerger
from pg2kinesis_dagster.core.window import RecordChunk
from tests.test_decoder_properties import Value, identifiers, messages, quote_identifier, truncates, typed_values


def lane_module() -> Any:
    """The compiled lane; a test without it is skipped, unless PG2K_REQUIRE_NATIVE=1 (CI) makes that a failure."""
    module = native.load(LANE_MODULE)
    if module is None:
        if os.environ.get("PG2K_REQUIRE_NATIVE") == "1":
            pytest.fail(f"{LANE_MODULE} is not built (PG2K_REQUIRE_NATIVE=1): run make install")
        pytest.skip(f"{LANE_MODULE} is not built (reinstall with a C compiler)")
    return module


# -- the keys, the builder ----------------------------------------------------------------------------------


class _Key:
    def __init__(self, columns: tuple[str, ...]) -> None:
        self.key_columns = columns
        self.changed_by_xid: int | None = None


class StaticCatalog:
    """The catalog's keys; reload() only counts."""

    def __init__(self, keys: dict[tuple[str, str], tuple[str, ...]]) -> None:
        self.now = {name: _Key(key) for name, key in keys.items()}
        self.loads = 0

    def tables(self) -> dict[tuple[str, str], _Key]:
        return self.now

    def reload(self) -> None:
        self.loads += 1

    def key_columns(self, schema: str, table: str) -> tuple[str, ...] | None:
        found = self.now.get((schema, table))
        return found.key_columns if found else None


@dataclass(frozen=True)
class Setup:
    """Everything but the rows: the builder's settings and the chunk limits."""

    keys: tuple[tuple[tuple[str, str], tuple[str, ...]], ...] = ()
    fmt: str = "CSVPayload"
    partition_by: str = "row"
    constant: str = "pg2kinesis"
    no_key: str = "publish"
    operations: str | None = None
    table_pat: str | None = None
    exclude_table_pat: str | None = None
    oversized: str = "fail"
    max_record_bytes: int = 1024 * 1024
    exclude_columns: str | None = None
    chunk_changes: int = 10_000
    chunk_bytes: int = 8 * 1024 * 1024

    def objects(self) -> tuple[TestDecodingDecoder, RecordBuilder, SchemaFollowingKeys, SnapshotMerger]:
        """Fresh decoder, builder, keys and merger, as the pipeline makes them for one window."""
        formatter = make_formatter(self.fmt)
        decoder = TestDecodingDecoder(lazy_images=not needs_row_images(formatter))
        schema_keys = SchemaFollowingKeys(StaticCatalog(dict(self.keys)), max_age_seconds=None)
        builder = RecordBuilder(
            formatter=formatter,
            key_lookup=schema_keys.key_columns,
            change_filter=ChangeFilter(table_pat=self.table_pat, exclude_table_pat=self.exclude_table_pat,
                                       operations=parse_operations(self.operations)),
            partition_by=PartitionBy.parse(self.partition_by),
            partition_constant=self.constant,
            no_key_policy=NoKeyPolicy.parse(self.no_key),
            oversized=OversizedPolicy.parse(self.oversized),
            max_record_bytes=self.max_record_bytes,
            exclude_columns=ColumnExclusion.parse(self.exclude_columns),
        )
        return decoder, builder, schema_keys, SnapshotMerger()


# -- runs -------------------------------------------------------------------------------------------------------


class _ListReader:
    """The spool reader's interface over a list: iteration and find_next from the reading position."""

    def __init__(self, rows: list[SlotRow]) -> None:
        self.rows = rows
        self.index = 0

    def __iter__(self) -> Iterator[SlotRow]:
        while self.index < len(self.rows):
            row = self.rows[self.index]
            self.index += 1
            yield row

    def find_next(self, predicate: Callable[[str | bytes], bool]) -> SlotRow | None:
        return next((row for row in self.rows[self.index:] if predicate(row[2])), None)


def reference_chunks(buf: bytes, setup: Setup, stats: BatchStats) -> Iterator[RecordChunk]:
    """``Replicator._record_chunks``'s loop over the buffer's rows."""
    decoder, builder, schema_keys, merger = setup.objects()
    reader = _ListReader([row for row, _ in iter_rows(buf)])
    chunk = RecordChunk()
    commits: dict[tuple[int, int], tuple[int, str | None]] = {}

    def stamp(part: Transaction) -> None:
        key = (part.xid, part.begin_lsn)
        if key not in commits:
            commits.clear()
            row = reader.find_next(decoder.is_commit)
            if row is None:
                raise DecodeError("transaction without its commit in the window", lsn=part.begin_lsn)
            commits[key] = (row[0], decoder.commit_time(row[2]))
        part.commit(*commits[key])

    decoded = decoder.decode(reader, part_size=setup.chunk_changes)
    for txn in merger.follow(schema_keys.follow(decoded, decoder)):
        if txn.partial:
            stamp(txn)
        first = len(chunk.records)
        builder.add(txn, chunk.records, stats)
        added = chunk.records[first:]
        chunk.commit_lsns.extend([txn.commit_lsn] * len(added))
        chunk.record_bytes += sum(r.size for r in added)
        if not txn.partial and not merger.open:
            chunk.advance_to = txn.commit_lsn
        if len(chunk.records) >= setup.chunk_changes or chunk.record_bytes >= setup.chunk_bytes:
            yield chunk
            chunk = RecordChunk()
    if chunk.records or chunk.advance_to is not None:
        yield chunk


def driver_chunks(buf: bytes, setup: Setup, stats: BatchStats, *, native: bool) -> Iterator[RecordChunk]:
    decoder, builder, schema_keys, merger = setup.objects()
    return record_chunks_from_copy(buf, 0, len(buf), decoder=decoder, builder=builder, schema_keys=schema_keys,
                                   merger=merger, chunk_changes=setup.chunk_changes, chunk_bytes=setup.chunk_bytes,
                                   stats=stats, native=native)


@dataclass
class Outcome:
    """What a run gave: records and commit LSNs in order, advance points, stats, or the error."""

    records: list[tuple[Any, ...]] = field(default_factory=list)
    commit_lsns: list[int] = field(default_factory=list)
    advances: list[tuple[int, int]] = field(default_factory=list)  # (records so far, advance_to)
    chunks: list[RecordChunk] = field(default_factory=list)
    stats: BatchStats = field(default_factory=BatchStats)
    error: tuple[str, str] | None = None

    @property
    def last_advance(self) -> int | None:
        return self.advances[-1][1] if self.advances else None


def _fields(record: Record) -> tuple[Any, ...]:
    return (record.data, record.partition_key, record.ordering_key, record.record_id, record.barrier,
            record.explicit_hash_key, record.size)


def collect(chunks: Callable[[BatchStats], Iterator[RecordChunk]]) -> Outcome:
    out = Outcome()
    try:
        for chunk in chunks(out.stats):
            assert len(chunk.records) == len(chunk.commit_lsns)
            assert chunk.record_bytes == sum(r.size for r in chunk.records)
            out.records += [_fields(r) for r in chunk.records]
            out.commit_lsns += chunk.commit_lsns
            out.chunks.append(chunk)
            if chunk.advance_to is not None:
                out.advances.append((len(out.records), chunk.advance_to))
    except (Pg2KinesisError, UnicodeDecodeError) as exc:
        out.error = (type(exc).__name__, str(exc))
    return out


def check_chunks(out: Outcome, setup: Setup, commits: Sequence[int]) -> None:
    """Chunks bounded; advance points only at whole transactions, never ahead of their records."""
    for chunk in out.chunks:
        # A chunk may pass its limits by one transaction part (the Python path: a part passes its size by the
        # changes of its last row, a TRUNCATE of up to 4 tables here) or by one record (the lane).
        assert len(chunk.records) <= 2 * setup.chunk_changes + 4
    previous = -1
    for count, lsn in out.advances:
        assert lsn > previous and lsn in commits
        previous = lsn
        assert all(c > lsn for c in out.commit_lsns[count:])  # nothing of that transaction or before it comes later


def compare(buf: bytes, setup: Setup, commits: Sequence[int] = (), *, lane: bool = True) -> Outcome:
    """The reference, the driver's Python path and (with ``lane``) the driver with the lane agree."""
    reference = collect(lambda stats: reference_chunks(buf, setup, stats))
    python = collect(lambda stats: driver_chunks(buf, setup, stats, native=False))
    runs = [python]
    if lane:
        lane_module()
        runs.append(collect(lambda stats: driver_chunks(buf, setup, stats, native=True)))
    for run in runs:
        assert run.error == reference.error
        if reference.error is None:
            assert run.records == reference.records
            assert run.commit_lsns == reference.commit_lsns
            assert run.stats == reference.stats
            assert run.last_advance == reference.last_advance
            check_chunks(run, setup, commits)
    return reference


# -- generated windows ----------------------------------------------------------------------------------------


@dataclass
class TableSpec:
    schema: str
    table: str
    columns: list[str]  # key columns first
    key: tuple[str, ...]
    in_catalog: bool

    @property
    def printed(self) -> str:
        return f"{quote_identifier(self.schema)}.{quote_identifier(self.table)}"


@dataclass
class Window:
    buf: bytes
    keys: tuple[tuple[tuple[str, str], tuple[str, ...]], ...]
    commits: list[int]
    tables: list[TableSpec]


key_values = st.one_of(
    st.integers(-(2**40), 2**40).map(lambda n: Value(str(n), str(n))),
    typed_values().map(lambda tv: tv[1]).filter(lambda v: v.value is not None and not v.unchanged_toast),
)


@st.composite
def table_specs(draw: st.DrawFn) -> TableSpec:
    schema = draw(st.one_of(st.just("public"), identifiers))
    table = draw(identifiers)
    names = draw(st.lists(identifiers, min_size=1, max_size=5, unique=True))
    if draw(st.integers(0, 19)) == 0:  # a duplicate column name: the lane leaves such rows
        names.append(names[0])
    nkeys = draw(st.sampled_from([0, 1, 1, 1, 2]))
    key = tuple(dict.fromkeys(names[:nkeys]))
    return TableSpec(schema, table, names, key, in_catalog=draw(st.integers(0, 9)) > 0)


# Types without quoted parts and values the lane takes (no unchanged TOAST): windows(friendly=True).
PLAIN_TYPES = ["text", "integer", "bigint", "text[]", "numeric(10,2)", "timestamp with time zone", "bit varying",
               "character varying(20)[]", "boolean"]
friendly_values = st.tuples(st.sampled_from(PLAIN_TYPES), typed_values().map(lambda tv: tv[1]).filter(
    lambda v: not v.unchanged_toast))


@st.composite
def _tuple(draw: st.DrawFn, spec: TableSpec, key_only: bool = False, friendly: bool = False) -> str:
    names = list(spec.key) if key_only and spec.key else spec.columns
    parts = []
    for name in names:
        if name in spec.key and draw(st.integers(0, 29)) > 0:
            type_name, value = draw(st.sampled_from(["text", "integer", "bigint"])), draw(key_values)
        else:
            type_name, value = draw(friendly_values if friendly else typed_values())
        if key_only and value.printed == "null":
            continue  # old keys and DELETE images skip NULLs
        parts.append(f" {quote_identifier(name)}[{type_name}]:{value.printed}")
    if draw(st.integers(0, 29)) == 0 and len(parts) > 1:
        draw(st.randoms()).shuffle(parts)
    return "".join(parts)


@st.composite
def row_change(draw: st.DrawFn, spec: TableSpec, friendly: bool = False) -> str:
    head = f"table {spec.printed}:"
    kind = draw(st.sampled_from(["INSERT"] * 6 + ["UPDATE"] * 3 + ["DELETE"] * 2 + ["TRUNCATE", "odd"]))
    if kind == "INSERT":
        return f"{head} INSERT:{draw(_tuple(spec, friendly=friendly))}"
    if kind == "UPDATE":
        old = f" old-key:{draw(_tuple(spec, key_only=True))} new-tuple:" if draw(st.integers(0, 5)) == 0 else ""
        return f"{head} UPDATE:{old}{draw(_tuple(spec, friendly=friendly))}"
    if kind == "DELETE":
        if draw(st.integers(0, 9)) == 0:
            return f"{head} DELETE: (no-tuple-data)"
        return f"{head} DELETE:{draw(_tuple(spec, key_only=draw(st.booleans()), friendly=friendly))}"
    if kind == "TRUNCATE":
        return f"{head} TRUNCATE: (no-flags)"
    return draw(st.one_of(truncates(), messages())).line


COMMIT_TIMES = ["2026-11-26 05:00:00.123456+00", "x", "é\n\\ \t"]


@st.composite
def windows(draw: st.DrawFn, max_transactions: int = 5, big: bool = False, friendly: bool = False) -> Window:
    """Transactions of test_decoding rows in COPY form; ``friendly``: mostly rows the lane takes (no unchanged
    TOAST values, no quoted type names, every table in the catalog)."""
    tables = draw(st.lists(table_specs(), min_size=1, max_size=3))
    if friendly:
        for spec in tables:
            spec.in_catalog = True
    keys = tuple(((t.schema, t.table), t.key) for t in tables if t.in_catalog)
    lines: list[bytes] = []
    commits: list[int] = []
    lsn = draw(st.integers(1, 2**40))
    for _ in range(draw(st.integers(0, max_transactions))):
        xid = draw(st.integers(1, 2**32 - 1))
        row_xid = xid if draw(st.integers(0, 9)) else 0
        printed = draw(st.sampled_from(["both", "both", "both", "none", "begin", "commit"]))
        lines.append(format_row(format_lsn(lsn), row_xid, f"BEGIN {xid}" if printed in ("both", "begin") else "BEGIN"))
        size = draw(st.integers(0, 40 if big else 6))
        for _ in range(size):
            lsn += draw(st.integers(0, 300))
            spec = draw(st.sampled_from(tables))
            line = draw(row_change(spec, friendly)) if draw(st.integers(0, 9)) else draw(messages()).line
            lines.append(format_row(format_lsn(lsn), row_xid, line))
        lsn += draw(st.integers(1, 300))
        commit = f"COMMIT {xid}" if printed in ("both", "commit") else "COMMIT"
        if draw(st.booleans()):
            commit += " (at " + draw(st.sampled_from(COMMIT_TIMES)) + ")"
        lines.append(format_row(format_lsn(lsn), row_xid, commit))
        commits.append(lsn)
        if draw(st.integers(0, 5)) == 0:  # a non-transactional message between transactions
            lsn += 1
            lines.append(format_row(format_lsn(lsn), 0, draw(messages()).line.replace(
                "transactional: 1", "transactional: 0", 1)))
        lsn += draw(st.integers(1, 100))
    return Window(b"".join(lines), keys, commits, tables)


@st.composite
def setups(draw: st.DrawFn, window: Window) -> Setup:
    names = [f"{t.schema}.{t.table}" for t in window.tables]
    table_pat = None
    if draw(st.integers(0, 5)) == 0 and names:
        import re

        table_pat = re.escape(draw(st.sampled_from(names)))
    exclude = None
    if draw(st.integers(0, 9)) == 0:
        spec = draw(st.sampled_from(window.tables))
        others = [c for c in spec.columns if c not in spec.key]
        if others and all(c and '"' not in c for c in (spec.schema, spec.table, others[0])):
            exclude = f'"{spec.schema}"."{spec.table}":"{others[0]}"'
    small = draw(st.booleans())
    return Setup(
        keys=window.keys,
        fmt=draw(st.sampled_from(["CSV", "CSVPayload", "JSON"])),
        partition_by=draw(st.sampled_from(["row", "row", "table", "xid", "constant"])),
        constant=draw(st.sampled_from(["pg2kinesis", "k"])),
        no_key=draw(st.sampled_from(["publish", "publish", "skip"])),
        operations=draw(st.sampled_from([None, None, None, "insert", "update,delete", "insert,delete"])),
        table_pat=table_pat,
        exclude_table_pat=None,
        oversized=draw(st.sampled_from(["fail", "fail", "truncate"])),
        max_record_bytes=draw(st.sampled_from([1024 * 1024, 1024 * 1024, 300])),
        exclude_columns=exclude,
        chunk_changes=draw(st.integers(1, 8)) if small else 10_000,
        chunk_bytes=draw(st.integers(50, 2000)) if small and draw(st.booleans()) else 8 * 1024 * 1024,
    )
