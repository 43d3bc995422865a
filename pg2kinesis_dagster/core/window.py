"""Windows: what one run takes from the slot, how it is cut into chunks, and the handles that describe it.

Pure data, no I/O. A *window* is everything committed between the slot's confirmed position and a
WAL position fixed when the run starts, bounded by a :class:`WindowBudget`. Inside a window the rows
and records flow in *chunks* of bounded size, whole transactions or not, so that memory does not grow
with the window or with one huge transaction.

The handles (:class:`PeekedWindow`, :class:`FormattedWindow`, :class:`PublishedWindow`) are what the
Dagster ops pass on and what Dagster stores: slot, LSN range, counts, the spool's window id — never the
rows or records, which live in the spool (a cache on local disk that the slot can always regenerate).
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

from pg2kinesis_dagster.core.batching import Record
from pg2kinesis_dagster.core.changes import Transaction
from pg2kinesis_dagster.core.errors import ConfigError
from pg2kinesis_dagster.core.records import BatchStats, RecordBuilder

# Window budget defaults: large enough that a backlog drains in few runs (a run's start costs seconds
# under a daemon), small enough that a run stays minutes, not hours, and its spool a few hundred MB.
DEFAULT_MAX_CHANGES = 500_000
DEFAULT_MAX_BYTES = 256 * 1024 * 1024
DEFAULT_MAX_SECONDS = 60.0
# Chunk defaults: a chunk of rows, its decoded changes and its records stay well under 100 MB.
DEFAULT_CHUNK_CHANGES = 10_000
DEFAULT_CHUNK_BYTES = 8 * 1024 * 1024
# Per-table counts kept in a handle (they end up in Dagster's event log): the largest ones, the rest summed.
MAX_TABLES_IN_HANDLE = 50
OTHER_TABLES = "(other tables)"


@dataclass(frozen=True)
class WindowBudget:
    """How much one window may take: it ends at the first commit after any limit is reached.

    ``max_changes`` counts rows of plugin output and ``max_bytes`` their bytes; ``max_seconds`` bounds
    the time spent reading the slot. A window is whole transactions, so the transaction that crosses a
    limit is finished; chunks keep even a huge one bounded in memory.
    """

    max_changes: int = DEFAULT_MAX_CHANGES
    max_bytes: int = DEFAULT_MAX_BYTES
    max_seconds: float = DEFAULT_MAX_SECONDS
    chunk_changes: int = DEFAULT_CHUNK_CHANGES
    chunk_bytes: int = DEFAULT_CHUNK_BYTES

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if not value > 0:
                raise ConfigError(f"window budget {f.name} must be positive, got {value!r}")
        if self.chunk_changes > self.max_changes:
            object.__setattr__(self, "chunk_changes", self.max_changes)


def stats_to_dict(stats: BatchStats, max_tables: int = MAX_TABLES_IN_HANDLE) -> dict[str, Any]:
    """BatchStats as JSON-ready data, per-table counts capped so a handle stays small."""
    data = asdict(stats)
    by_table = Counter(stats.by_table_op)
    if len(by_table) > max_tables:
        kept = dict(by_table.most_common(max_tables))
        kept[OTHER_TABLES] = sum(by_table.values()) - sum(kept.values())
        by_table = Counter(kept)
    data["by_table_op"] = dict(by_table)
    no_key = sorted(stats.no_key_tables)
    data["no_key_tables"] = no_key[:max_tables]
    return data


def stats_from_dict(data: dict[str, Any]) -> BatchStats:
    values = dict(data)
    values["by_table_op"] = Counter(values.get("by_table_op", {}))
    values["no_key_tables"] = set(values.get("no_key_tables", ()))
    return BatchStats(**values)


@dataclass(frozen=True)
class PeekedWindow:
    """What ``peek`` read into the spool: the peek_batch op's output."""

    slot: str
    window_id: str
    # The slot's confirmed position when the window was read: where it starts.
    start_lsn: int
    # The WAL position the window is bounded by (the flushed position when the run started).
    upto_lsn: int
    # The last commit in the window, or None when it holds no transaction.
    last_commit_lsn: int | None
    # Where the slot may go once everything is published: the last commit; when nothing at all was
    # pending before upto_lsn, upto_lsn itself (an idle slot must not hold WAL).
    advance_to: int | None
    # True when a budget limit ended the window: more is pending before upto_lsn.
    limited: bool
    transactions: int
    rows: int
    plugin_bytes: int
    row_chunks: int
    seconds: float = 0.0
    # Snapshot chunks whose low watermark is orphaned (core.snapshot): their snapshotter is gone.
    abandoned_chunks: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PeekedWindow:
        data = dict(data)
        data["abandoned_chunks"] = tuple(data.get("abandoned_chunks", ()))
        return cls(**data)


@dataclass(frozen=True)
class RecordChunkInfo:
    """One chunk of records in the spool, and what publishing it makes final."""

    index: int
    records: int
    record_bytes: int
    # Commit LSN of the chunk's first and last record's transaction (None: a chunk without records).
    first_commit_lsn: int | None
    last_commit_lsn: int | None
    # Once this chunk and every one before it are acknowledged, the slot may move here: the last
    # transaction that ends in this chunk (None when the chunk lies inside one transaction).
    advance_to: int | None


@dataclass(frozen=True)
class FormattedWindow:
    """What ``format`` wrote: record chunks in the spool, and the counts (decode_and_format's output)."""

    window: PeekedWindow
    # The chunks' descriptions: in the spool's manifest; empty in a handle read back from Dagster.
    chunks: tuple[RecordChunkInfo, ...]
    stats: BatchStats = field(compare=False)
    seconds: float = 0.0
    chunk_count: int = 0

    @property
    def records(self) -> int:
        return self.stats.published

    def to_dict(self, *, with_chunks: bool = False) -> dict[str, Any]:
        """JSON-ready; the chunk list (one entry per chunk) only when asked: handles leave it to the spool."""
        data: dict[str, Any] = {
            "window": self.window.to_dict(),
            "stats": stats_to_dict(self.stats),
            "seconds": self.seconds,
            "chunk_count": self.chunk_count,
        }
        if with_chunks:
            data["chunks"] = [asdict(c) for c in self.chunks]
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FormattedWindow:
        return cls(
            window=PeekedWindow.from_dict(data["window"]),
            chunks=tuple(RecordChunkInfo(**c) for c in data.get("chunks", ())),
            stats=stats_from_dict(data["stats"]),
            seconds=data.get("seconds", 0.0),
            chunk_count=data.get("chunk_count", 0),
        )


@dataclass(frozen=True)
class PutTotals:
    """What publishing a window cost in Kinesis requests, summed over its chunks."""

    kinesis_records: int = 0
    changes: int = 0
    requests: int = 0
    retried_entries: int = 0
    throttled_entries: int = 0
    seconds: float = 0.0
    # Records not sent again because the slot had already passed their commit (a rerun).
    skipped_records: int = 0
    # Slot advances made while publishing (checkpoints).
    checkpoints: int = 0
    # Plain records: the rows with the most changes in a chunk (KinesisSink's PutReport.hot_rows, the largest
    # count of each row over the chunks), as ("schema.table:key", changes): each change costs a round trip.
    hot_rows: tuple[tuple[str, int], ...] = ()

    def __post_init__(self) -> None:  # from JSON (to_dict/from_dict): lists back to tuples
        object.__setattr__(self, "hot_rows", tuple((str(row), int(n)) for row, n in self.hot_rows))

    def with_hot_rows(self, rows: Sequence[tuple[str, int]], limit: int = 5) -> PutTotals:
        if not rows:
            return self
        merged = dict(self.hot_rows)
        for row, n in rows:
            merged[row] = max(n, merged.get(row, 0))
        top = sorted(merged.items(), key=lambda item: -item[1])[:limit]
        return replace(self, hot_rows=tuple(top))


@dataclass(frozen=True)
class PublishedWindow:
    """Proof that every record of a window was acknowledged: only this finishes a window (publish's output)."""

    formatted: FormattedWindow
    put: PutTotals
    # Where publishing left the slot (its confirmed position after the last checkpoint).
    checkpoint_lsn: int | None
    # Publishing stopped early on request (after a checkpoint): the rest of the window is still pending.
    stopped: bool = False

    @property
    def window(self) -> PeekedWindow:
        return self.formatted.window

    def to_dict(self) -> dict[str, Any]:
        return {"formatted": self.formatted.to_dict(), "put": asdict(self.put), "checkpoint_lsn": self.checkpoint_lsn,
                "stopped": self.stopped}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PublishedWindow:
        return cls(
            formatted=FormattedWindow.from_dict(data["formatted"]),
            put=PutTotals(**data["put"]),
            checkpoint_lsn=data["checkpoint_lsn"],
            stopped=data.get("stopped", False),
        )


def change_index(record: Record) -> int:
    """A record's change index in its transaction, from its id ``<commit LSN>:<index>``."""
    return int(record.record_id.rpartition(":")[2])


@dataclass(frozen=True)
class TransactionProgress:
    """How far the records of a transaction the slot has not passed yet were acknowledged.

    A transaction larger than a chunk is published over several chunks before its commit can be
    checkpointed; this remembers the acknowledged part, so that a crash does not send it all again.
    """

    commit_lsn: int
    acked_index: int  # every record of the transaction up to this change index is acknowledged

    def to_dict(self) -> dict[str, int]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TransactionProgress:
        return cls(int(data["commit_lsn"]), int(data["acked_index"]))


@dataclass
class RecordChunk:
    """Records of one chunk with each record's commit LSN (what a rerun compares with the slot)."""

    records: list[Record] = field(default_factory=list)
    commit_lsns: list[int] = field(default_factory=list)
    record_bytes: int = 0
    advance_to: int | None = None

    def add(self, record: Record, commit_lsn: int) -> None:
        self.records.append(record)
        self.commit_lsns.append(commit_lsn)
        self.record_bytes += record.size

    def add_transaction(self, txn: Transaction, builder: RecordBuilder, stats: BatchStats, *, ends: bool) -> None:
        """The records ``builder`` makes of ``txn`` (a transaction or a part of one, its commit known), each with
        its commit LSN. ``ends``: the transaction is whole here (not a part, no table snapshot chunk open), so
        once this chunk is acknowledged the slot may move to its commit."""
        first = len(self.records)
        builder.add(txn, self.records, stats)
        added = self.records[first:]
        self.commit_lsns.extend([txn.commit_lsn] * len(added))
        self.record_bytes += sum(r.size for r in added)
        if ends:
            self.advance_to = txn.commit_lsn

    def full(self, max_records: int, max_bytes: int) -> bool:
        """Whether the chunk reached a chunk's budget (records or bytes)."""
        return len(self.records) >= max_records or self.record_bytes >= max_bytes

    def after(self, confirmed_lsn: int | None, progress: TransactionProgress | None = None) -> list[Record]:
        """The records still to send when the slot already stands at ``confirmed_lsn``.

        The slot only ever moves to a commit whose every record was acknowledged, so the records of
        transactions committed at or before it are in Kinesis already; so are the records of the open
        transaction that ``progress`` says were acknowledged.
        """
        # Records are in commit order: the commit LSNs never decrease.
        start = 0 if confirmed_lsn is None else bisect_right(self.commit_lsns, confirmed_lsn)
        records = self.records[start:]
        if progress is None or (confirmed_lsn is not None and progress.commit_lsn <= confirmed_lsn):
            return records
        lsns = self.commit_lsns[start:]
        first, end = bisect_left(lsns, progress.commit_lsn), bisect_right(lsns, progress.commit_lsn)
        # A transaction's records are in change order, so the acknowledged ones come first.
        done = first
        while done < end and change_index(records[done]) <= progress.acked_index:
            done += 1
        return records[:first] + records[done:] if done > first else records

    def info(self, index: int) -> RecordChunkInfo:
        return RecordChunkInfo(
            index=index,
            records=len(self.records),
            record_bytes=self.record_bytes,
            first_commit_lsn=self.commit_lsns[0] if self.commit_lsns else None,
            last_commit_lsn=self.commit_lsns[-1] if self.commit_lsns else None,
            advance_to=self.advance_to,
        )
