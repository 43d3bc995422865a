"""One window end to end, in four steps shared by the Dagster ops and the ``pg2k`` CLI.

    peek (slot -> spool rows) -> format (rows -> record chunks) -> publish (chunks -> Kinesis,
    checkpointing the slot) -> finish (last advance, spool removed)

A *window* is what was committed between the slot's position and the flushed WAL position when the
run started, bounded by a budget (:class:`~pg2kinesis_dagster.core.window.WindowBudget`). Rows and
records flow through the window in chunks on local disk (:mod:`pg2kinesis_dagster.spool`), so memory
is flat in the window's size and in the size of one transaction; the steps hand each other small
handles (slot, LSN range, counts, the spool's window id), never the data. A process that runs whole
windows (``pg2k``, the continuous job: :meth:`Replicator.run_window`) formats in a second thread while it
publishes, handing record chunks over in memory, a bounded number ahead.

Guarantees, and what makes them hold:

* Nothing committed is lost: :meth:`Replicator.peek` never consumes the slot. The slot only moves to
  a commit once every record of every transaction up to it was acknowledged (after each published
  chunk, and in :meth:`Replicator.finish`). On any error it stays at the last such commit.
* Commit order and per-row order: chunks are published in commit order, one after another; the sink
  never sends a row's later change while an earlier one is unacknowledged.
* At-least-once, bounded duplicates: a crash republishes at most what was in flight since the last
  checkpoint (about one chunk); every record carries its change's stable id (commit LSN + index).
* The spool is a cache: when a step's input is gone (another machine, a cleaned disk) it is read
  again from the slot, which has not moved past what was acknowledged, up to the same last commit.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import mmap
import queue
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from functools import partial
from types import TracebackType
from typing import TYPE_CHECKING, Generic, TypeVar

from pg2kinesis_dagster.core.changes import Transaction, format_lsn
from pg2kinesis_dagster.core.columns import ColumnExclusion
from pg2kinesis_dagster.core.config import ReplicationSettings
from pg2kinesis_dagster.core.copy_window import record_chunks_from_copy
from pg2kinesis_dagster.core.decoders import decoder_for
from pg2kinesis_dagster.core.errors import DecodeError, SinkError
from pg2kinesis_dagster.core.filters import ChangeFilter, parse_operations
from pg2kinesis_dagster.core.formats import make_formatter, needs_row_images
from pg2kinesis_dagster.core.keys import PartitionBy
from pg2kinesis_dagster.core.oversize import OversizedPolicy
from pg2kinesis_dagster.core.records import BatchStats, NoKeyPolicy, RecordBuilder
from pg2kinesis_dagster.core.schema_keys import SchemaFollowingKeys
from pg2kinesis_dagster.core.snapshot import SnapshotMerger, decode_header, snapshot_content
from pg2kinesis_dagster.core.window import (
    DEFAULT_MAX_BYTES,
    DEFAULT_MAX_CHANGES,
    DEFAULT_MAX_SECONDS,
    FormattedWindow,
    PeekedWindow,
    PublishedWindow,
    PutTotals,
    RecordChunk,
    RecordChunkInfo,
    TransactionProgress,
    WindowBudget,
    change_index,
)
from pg2kinesis_dagster.core.window_scan import copy_window_writer
from pg2kinesis_dagster.postgres.catalog import TableKey, load_table_keys
from pg2kinesis_dagster.postgres.connection import PostgresSettings
from pg2kinesis_dagster.postgres.plugin_options import WAL2JSON_NUMBERS_AS_STRINGS, plugin_accepts_option
from pg2kinesis_dagster.postgres.slot import AdvanceResult, ReplicationSlot
from pg2kinesis_dagster.postgres.types import decoder_options
from pg2kinesis_dagster.spool import RowReader, Spool, WindowSpool, slot_key

if TYPE_CHECKING:  # boto3 is imported only where a sink is made (pg2k makes it while the first window is read)
    from pg2kinesis_dagster.kinesis.sink import KinesisSink, PreparedPut, PutReport

log = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_MAX_BYTES",
    "DEFAULT_MAX_CHANGES",
    "DEFAULT_MAX_SECONDS",
    "DrainResult",
    "ReplicationSettings",
    "Replicator",
    "WindowResult",
]


@contextmanager
def _gc_paused() -> Iterator[None]:
    """Decoding allocates millions of small acyclic objects, freed by reference counting anyway; the cyclic
    collector's passes over them cost more than half of the decoding time, so it waits for the step."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


# Record chunks prepared (formatted, validated, aggregated) ahead of the one being sent.
PREPARED_CHUNKS_AHEAD = 2
# The thread that prepares them (tests check that none outlives its window).
PREPARE_THREAD_NAME = "pg2k-prepare"

_T = TypeVar("_T")


def _same(chunk: RecordChunk) -> RecordChunk:
    return chunk


class _Prefetch(Generic[_T]):
    """Runs an iterator in a thread of its own, at most ``ahead`` items ahead of the consumer; iterating yields
    its items in order and raises what it raised. Leaving the ``with`` block stops the thread (a consumer that
    failed or stopped early) and waits for it."""

    _DONE = object()

    def __init__(self, items: Iterator[_T], *, ahead: int, name: str) -> None:
        self._items = items
        self._queue: queue.Queue[object] = queue.Queue(maxsize=ahead)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._produce, name=name, daemon=True)

    def _offer(self, item: object) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _produce(self) -> None:
        try:
            for item in self._items:
                if not self._offer(item):
                    return
        except BaseException as exc:  # handed to the consumer, which raises it in its own thread
            self._offer(exc)
        else:
            self._offer(self._DONE)
        finally:
            close = getattr(self._items, "close", None)
            if close is not None:
                close()

    def __enter__(self) -> _Prefetch[_T]:
        self._thread.start()
        return self

    def __iter__(self) -> Iterator[_T]:
        while True:
            item = self._queue.get()
            if item is self._DONE:
                return
            if isinstance(item, BaseException):
                raise item
            yield item  # type: ignore[misc]

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self._stop.set()
        self._thread.join()


@dataclass(frozen=True)
class _ReadyChunk:
    """A chunk as the preparing thread hands it to the sender: None for one skipped whole (``skipped``)."""

    chunk: RecordChunk | None
    prepared: PreparedPut | None  # what sink.send sends; None when nothing in it is left to send
    skipped: int  # records already acknowledged before this run


class _Checkpoints:
    """The slot's advances after published chunks, made by a thread of their own.

    ``pg_replication_slot_advance`` decodes the WAL again from the slot's restart point, which a backlog keeps
    far behind (tens of milliseconds a call late in a 200k window): here it overlaps the put of the next chunk
    instead of delaying it. Only acknowledged commits are ever requested and targets only grow, so the slot is
    never ahead of Kinesis; it is behind by at most the advance in progress, which :meth:`wait` finishes (a
    window's end, a stop, a failure). Requests made while one runs are merged into one advance to the newest.
    An advance's error is raised by the next call.
    """

    def __init__(self, slot: ReplicationSlot) -> None:
        self._slot = slot
        self._cond = threading.Condition()
        self._target: int | None = None  # requested, not started
        self._busy = False
        self._done: list[AdvanceResult] = []
        self._error: BaseException | None = None
        self._closed = False
        self._thread: threading.Thread | None = None

    def request(self, target: int) -> list[AdvanceResult]:
        """Advance to ``target`` soon; returns the advances finished since the last call."""
        with self._cond:
            self._raise()
            self._target = target if self._target is None else max(self._target, target)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="pg2k-advance", daemon=True)
                self._thread.start()
            self._cond.notify_all()
            return self._take()

    def wait(self) -> list[AdvanceResult]:
        """Wait until every requested advance is made; returns those finished since the last call."""
        with self._cond:
            while (self._target is not None or self._busy) and self._error is None:
                self._cond.wait()
            self._raise()
            return self._take()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join()

    def _take(self) -> list[AdvanceResult]:
        done, self._done = self._done, []
        return done

    def _raise(self) -> None:
        if self._error is not None:
            error, self._error = self._error, None
            self._target = None
            raise error

    def _run(self) -> None:
        while True:
            with self._cond:
                while self._target is None and not self._closed:
                    self._cond.wait()
                if self._target is None:
                    return
                target, self._target, self._busy = self._target, None, True
            try:
                result = self._slot.advance(target)
            except BaseException as exc:  # handed to the publishing thread, which raises it
                with self._cond:
                    self._error, self._busy = exc, False
                    self._cond.notify_all()
                continue
            with self._cond:
                self._done.append(result)
                self._busy = False
                self._cond.notify_all()


@dataclass
class WindowResult:
    """A finished window: what was published and where the slot stands."""

    published: PublishedWindow
    advance: AdvanceResult | None
    lag_bytes: int | None
    seconds: float

    @property
    def window(self) -> PeekedWindow:
        return self.published.window

    @property
    def stats(self) -> BatchStats:
        return self.published.formatted.stats

    @property
    def limited(self) -> bool:
        return self.window.limited

    @property
    def end_lsn(self) -> int | None:
        """Where the slot stands after the window (None: unknown, nothing advanced)."""
        if self.advance is not None:
            return self.advance.after or self.advance.target
        return self.published.checkpoint_lsn

    def summary(self) -> dict[str, object]:
        stats = self.stats
        end = self.end_lsn
        return {
            "slot": self.window.slot,
            "start_lsn": format_lsn(self.window.start_lsn),
            "end_lsn": format_lsn(end) if end else None,
            "transactions": stats.transactions,
            "changes": stats.changes,
            "published": stats.published,
            "filtered": stats.filtered,
            "skipped_no_primary_key": stats.skipped_no_key,
            "record_bytes": stats.record_bytes,
            "truncated_records": stats.truncated_records,
            "plugin_bytes": self.window.plugin_bytes,
            "chunks": self.published.formatted.chunk_count,
            "checkpoints": self.published.put.checkpoints,
            "lag_bytes": self.lag_bytes,
            "seconds": round(self.seconds, 3),
            # Plain records: rows with many changes in a chunk, one round trip each (--aggregate avoids it).
            "hot_rows": [{"row": row, "changes": n} for row, n in self.published.put.hot_rows],
        }


@dataclass
class _Scan:
    """One pass of the slot's rows into a window's spool (see Replicator._read_window)."""

    start_lsn: int
    # Writes the spool's rows manifest; returns the number of row files.
    finish_rows: Callable[[dict[str, object]], int]
    # The last place the window may end and the slot may advance to: a commit or a high watermark with no
    # snapshot chunk open; the rows and bytes up to it.
    last_commit: int | None = None
    committed_rows: int = 0
    committed_bytes: int = 0
    transactions: int = 0
    limited: bool = False
    rows_read: int = 0
    # Snapshot chunks whose low watermark was read without their high one: chunk -> (pid, backend start).
    open: dict[str, tuple[int, int]] = field(default_factory=dict)

    def advance_to(self, upto_lsn: int) -> int | None:
        """The last boundary; when nothing was pending before ``upto_lsn``, that (an idle slot must not hold WAL);
        rows after the last boundary belong to a transaction or chunk not read to its end: never used."""
        if self.last_commit is not None:
            return self.last_commit
        return None if self.limited or self.open else upto_lsn


@dataclass
class DrainResult:
    windows: int = 0
    stats: BatchStats = field(default_factory=BatchStats)
    seconds: float = 0.0
    last: WindowResult | None = None


class TableKeyCache:
    """The catalog's primary keys, reloaded when a change names a table we have not seen."""

    def __init__(self, load: Callable[[], dict[tuple[str, str], TableKey]]) -> None:
        self._load = load
        self._tables: dict[tuple[str, str], TableKey] | None = None
        self._missing: set[tuple[str, str]] = set()

    def tables(self) -> dict[tuple[str, str], TableKey]:
        if self._tables is None:
            self.reload()
        assert self._tables is not None
        return self._tables

    def reload(self) -> None:
        self._tables = self._load()
        self._missing.clear()

    def key_columns(self, schema: str, table: str) -> tuple[str, ...] | None:
        name = (schema, table)
        found = self.tables().get(name)
        if found is None and name not in self._missing:
            self.reload()
            found = self.tables().get(name)
            if found is None:
                # Dropped since the change was committed: remember, so we reload once, not per change.
                self._missing.add(name)
        return found.key_columns if found is not None else None


class Replicator:
    """Drives one slot into one stream. The Dagster ops call the steps; the CLI calls :meth:`drain`."""

    def __init__(
        self, pg: PostgresSettings, sink: KinesisSink, settings: ReplicationSettings, *, spool: Spool | None = None
    ) -> None:
        self.pg = pg
        self.sink = sink
        self.settings = settings
        self.budget = settings.budget()
        self.spool = spool if spool is not None else Spool(settings.spool_dir)
        formatter = make_formatter(settings.message_formatter, full_change=settings.full_change,
                                   typed=settings.typed_json)
        options = decoder_options(settings.output_plugin, pg, publication=settings.publication)
        if settings.output_plugin == "test_decoding" and not needs_row_images(formatter):
            options["lazy_images"] = True  # a key-only format: row images validated, never parsed
        self.decoder = decoder_for(settings.output_plugin, **options)
        self.slot = ReplicationSlot(
            pg, settings.slot_name, settings.output_plugin,
            publication=settings.publication if settings.output_plugin == "pgoutput" else None,
        )
        self.keys = TableKeyCache(lambda: load_table_keys(pg))
        # Keys as the stream goes: the plugin's own word, or the catalog re-read at each schema change.
        self.schema_keys = SchemaFollowingKeys(self.keys, max_age_seconds=settings.key_refresh_seconds)
        # The slot's spool folder: its name is only unique within one PostgreSQL server.
        self.spool_key = slot_key(settings.slot_name, pg.describe(with_user=False))
        self.builder = RecordBuilder(
            formatter=formatter,
            key_lookup=self.schema_keys.key_columns,
            change_filter=ChangeFilter(
                table_pat=settings.table_pat,
                exclude_table_pat=settings.exclude_table_pat,
                operations=parse_operations(settings.operations),
            ),
            partition_by=PartitionBy.parse(settings.partition_key),
            partition_constant=settings.partition_key_constant,
            no_key_policy=NoKeyPolicy.parse(settings.no_primary_key),
            oversized=OversizedPolicy.parse(settings.oversized),
            exclude_columns=ColumnExclusion.parse(settings.exclude_columns),
        )
        self._source_prepared = False
        self._sink_prepared = False

    def close(self) -> None:
        self.slot.close()

    def __enter__(self) -> Replicator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- the four steps ------------------------------------------------------------------
    def prepare(self) -> None:
        """Check (or create) the slot and the stream before reading anything."""
        self.prepare_source()
        self._prepare_sink()

    def prepare_source(self) -> None:
        """The slot's half of :meth:`prepare`, all that peeking needs: the stream is checked before the first
        format step (``pg2k`` builds its Kinesis client meanwhile, while PostgreSQL decodes the window)."""
        if not self._source_prepared:
            self.slot.ensure(create=self.settings.create_slot, recreate=self.settings.recreate_slot)
            if self.settings.output_plugin == "wal2json" and plugin_accepts_option(
                    self.slot, self.decoder.slot_options, WAL2JSON_NUMBERS_AS_STRINGS):
                # wal2json >= 2.6: numbers as strings keep NaN/Infinity apart from NULL.
                self.decoder = decoder_for("wal2json", numbers_as_strings=True,
                                           **decoder_options("wal2json", self.pg))
            if self.builder.exclude_columns:  # a key column named there is refused before anything is read
                self.builder.exclude_columns.check_catalog(
                    {name: key.key_columns for name, key in self.keys.tables().items()})
            self._source_prepared = True

    def _prepare_sink(self) -> None:
        if not self._sink_prepared:
            if not self.sink.stream_checked:
                self.sink.check_stream()
            # Oversized records are judged (and truncated) against the stream's own limit: 1 MiB unless raised.
            self.builder = replace(self.builder, max_record_bytes=self.sink.max_record_bytes)
            self._sink_prepared = True

    def peek(self, upto_lsn: int | None = None) -> PeekedWindow:
        """Read the window into a new spool: everything committed up to ``upto_lsn`` (default: the flushed
        WAL position now), within the budget."""
        self.prepare_source()
        if upto_lsn is None:
            upto_lsn = self.slot.current_wal_lsn()
        spool = self.spool.new_window(self.spool_key)
        # A new window starts where the slot stands, so older windows of this slot hold nothing it will not
        # give again: keep the disk to one window per slot.
        self.spool.remove_others(self.spool_key, keep=spool.window_id)
        return self._read_window(spool, upto_lsn, self.budget)

    def _read_window(self, spool: WindowSpool, upto_lsn: int, budget: WindowBudget | None,
                     abandoned: tuple[str, ...] = ()) -> PeekedWindow:
        """Stream the slot's rows into ``spool``, stopping at the first commit past the budget (if any).

        Table snapshots (core.snapshot): the window never ends between a chunk's low and high watermarks
        while its snapshotter lives; it is cut before the low watermark instead (the next window reads the
        chunk whole). A low watermark whose session is gone and whose high watermark is not in the flushed
        WAL is abandoned (listed in the window, ignored by format). Without a budget (a window read again)
        the abandoned chunks are the ones the window was first read with.
        """
        started = time.perf_counter()
        nchanges = budget.max_changes if budget else None
        # Open chunks whose session was found gone, and the flushed WAL position right after: a high watermark
        # that session wrote and saw flushed lies before it.
        dead_at: dict[str, int] = {}
        while True:
            scan = self._scan(spool, upto_lsn, budget, nchanges, set(abandoned))
            if not scan.open or budget is None:
                break
            if nchanges is not None and scan.rows_read >= nchanges:
                nchanges *= 4  # PostgreSQL stopped at upto_nchanges inside a chunk: read on to its end
                continue
            live = self.slot.live_sessions(list(set(scan.open.values())))
            dead = sorted(chunk for chunk, session in scan.open.items() if session not in live)
            if not dead:
                log.info("window %s..%s ends before a live snapshot chunk at %s (open %s)", format_lsn(scan.start_lsn),
                         format_lsn(upto_lsn), format_lsn(scan.last_commit or 0), scan.open)
                break  # a snapshot chunk in the making: the window ends before its low watermark
            ripe = [chunk for chunk in dead if chunk in dead_at and dead_at[chunk] <= upto_lsn]
            if not ripe:
                flushed = self.slot.current_wal_lsn()  # read after the sessions were found gone
                for chunk in dead:
                    dead_at.setdefault(chunk, flushed)
                if flushed > upto_lsn:
                    upto_lsn = flushed  # their high watermarks, if they wrote them to the end, are before it
                    continue
                ripe = dead
            log.warning("snapshot chunks %s: low watermark without a high one in the WAL flushed after their session "
                        "ended: abandoned (window %s..%s)", ripe, format_lsn(scan.start_lsn), format_lsn(upto_lsn))
            abandoned = (*abandoned, *ripe)
        window = PeekedWindow(
            slot=self.slot.name,
            window_id=spool.window_id,
            start_lsn=scan.start_lsn,
            upto_lsn=upto_lsn,
            last_commit_lsn=scan.last_commit,
            advance_to=scan.advance_to(upto_lsn),
            limited=scan.limited,
            transactions=scan.transactions,
            rows=scan.committed_rows,
            plugin_bytes=scan.committed_bytes,
            row_chunks=0,
            seconds=time.perf_counter() - started,
            abandoned_chunks=tuple(abandoned),
        )
        return replace(window, row_chunks=scan.finish_rows(window.to_dict()))

    def _scan(self, spool: WindowSpool, upto_lsn: int, budget: WindowBudget | None, nchanges: int | None,
              abandoned: set[str]) -> _Scan:
        if self.settings.output_plugin != "pgoutput":
            return self._scan_copy(spool, upto_lsn, budget, nchanges, abandoned)
        state = self.slot.state()
        chunk_rows = budget.chunk_changes if budget else self.budget.chunk_changes
        writer = spool.start_rows(chunk_rows, self.budget.chunk_bytes)

        def finish_rows(manifest: dict[str, object]) -> int:
            writer.finish(manifest)
            return writer.chunks

        scan = _Scan(start_lsn=(state.confirmed_flush_lsn if state is not None else None) or 0,
                     finish_rows=finish_rows)
        is_commit = self.decoder.is_commit
        plugin = self.settings.output_plugin
        open_chunks = scan.open
        rows = data_bytes = transactions = 0
        deadline = time.monotonic() + (budget.max_seconds if budget else float("inf"))
        reader = self.slot.read_rows(
            options=self.decoder.slot_options,
            upto_lsn=upto_lsn,
            upto_nchanges=nchanges,
            binary=plugin == "pgoutput",
        )
        try:
            for row in reader:
                writer.add(row)
                rows += 1
                data = row[2]
                data_bytes += len(data)
                if is_commit(data):
                    transactions += 1
                elif (content := snapshot_content(plugin, data)) is not None:
                    mark = decode_header(content)
                    if mark.kind == "low":
                        if mark.chunk not in abandoned and mark.session is not None:
                            open_chunks[mark.chunk] = (mark.session.pid, mark.session.started_us)
                        continue
                    open_chunks.pop(mark.chunk, None)
                else:
                    continue
                if open_chunks:
                    continue  # inside a snapshot chunk: no place to end the window or advance to
                scan.last_commit = row[0]
                scan.committed_rows, scan.committed_bytes, scan.transactions = rows, data_bytes, transactions
                if budget is not None and (
                    rows >= budget.max_changes
                    or data_bytes >= budget.max_bytes
                    or time.monotonic() >= deadline
                ):
                    scan.limited = True
                    break
        finally:
            reader.close()
        scan.rows_read = rows
        if budget is not None and scan.committed_rows >= budget.max_changes:
            scan.limited = True  # PostgreSQL stopped at upto_nchanges: more may be pending
        return scan

    def _scan_copy(self, spool: WindowSpool, upto_lsn: int, budget: WindowBudget | None, nchanges: int | None,
                   abandoned: set[str]) -> _Scan:
        """:meth:`_scan` for a text plugin: one COPY of the slot's rows straight into the spool file, the window's
        rules applied to each row as it is written (core.window_scan), no Python work per row."""
        state = self.slot.state()
        plugin = self.settings.output_plugin
        open_chunks: dict[str, tuple[int, int]] = {}

        def on_message(lsn: int, data: str) -> bool:
            """A message row: a snapshot watermark opens or closes a chunk; a high one is a boundary."""
            content = snapshot_content(plugin, data)
            if content is None:
                return False
            mark = decode_header(content)
            if mark.kind == "low":
                if mark.chunk not in abandoned and mark.session is not None:
                    open_chunks[mark.chunk] = (mark.session.pid, mark.session.started_us)
                boundary = False
            else:
                open_chunks.pop(mark.chunk, None)
                boundary = True
            writer.holding = bool(open_chunks)
            return boundary

        with spool.start_copy_rows() as out:
            writer = copy_window_writer(
                out,
                plugin=plugin,
                max_rows=budget.max_changes if budget else None,
                max_bytes=budget.max_bytes if budget else None,
                deadline=time.monotonic() + budget.max_seconds if budget else None,
                on_message=on_message,
            )
            self.slot.copy_rows(writer, options=self.decoder.slot_options, upto_lsn=upto_lsn, upto_nchanges=nchanges)
            writer.finish()

        def finish_rows(manifest: dict[str, object]) -> int:
            spool.finish_copy_rows(manifest)
            return 1

        scan = _Scan(
            start_lsn=(state.confirmed_flush_lsn if state is not None else None) or 0,
            finish_rows=finish_rows,
            last_commit=writer.last_commit,
            committed_rows=writer.committed_rows,
            committed_bytes=writer.committed_bytes,
            transactions=writer.committed_transactions,
            limited=writer.limited,
            rows_read=writer.rows,
            open=open_chunks,
        )
        if budget is not None and scan.committed_rows >= budget.max_changes:
            scan.limited = True  # PostgreSQL stopped at upto_nchanges: more may be pending
        return scan

    def _rows_of(self, window: PeekedWindow) -> WindowSpool:
        """The window's spool with its rows, read again from the slot when they are gone."""
        spool = self.spool.window(self.spool_key, window.window_id)
        if spool.rows_manifest() is None:
            if window.last_commit_lsn is None:  # nothing was committed in the window: nothing to read
                spool.start_rows(1, 1).finish(replace(window, rows=0, transactions=0).to_dict())
            else:
                self.prepare_source()
                # Bounded by the window's last commit, not by the budget: the same transactions (minus those
                # the slot already passed), whatever the budget says now.
                self._read_window(spool, window.last_commit_lsn, None, window.abandoned_chunks)
        return spool

    def format(self, window: PeekedWindow) -> FormattedWindow:
        """Decode, filter, key and format the window's rows into record chunks in the spool."""
        started = time.perf_counter()
        spool = self._rows_of(window)
        spool.drop_records()
        stats = BatchStats()
        infos: list[RecordChunkInfo] = []
        for chunk in self._record_chunks(window, spool, stats):
            spool.write_record_chunk(len(infos), chunk)
            infos.append(chunk.info(len(infos)))
        formatted = FormattedWindow(window=window, chunks=tuple(infos), stats=stats,
                                    seconds=time.perf_counter() - started, chunk_count=len(infos))
        spool.finish_records(formatted.to_dict(with_chunks=True))
        return formatted

    def _record_chunks(self, window: PeekedWindow, spool: WindowSpool, stats: BatchStats) -> Iterator[RecordChunk]:
        """The window's records, chunk by chunk (each at most a chunk's changes or bytes), counting into ``stats``."""
        # Table snapshots' watermarks become SNAPSHOT changes in stream order (core.snapshot).
        merger = SnapshotMerger(window.abandoned_chunks)
        buf = spool.copy_rows()
        if buf is None:
            reader = spool.read_rows()
            assert isinstance(reader, RowReader)  # rows that are not COPY text are pickled rows
            chunks = self._record_chunks_of_rows(reader, merger, stats)
        else:
            # A text plugin's COPY rows: the compiled lane where it can (test_decoding), the Python loop otherwise.
            chunks = record_chunks_from_copy(
                buf, 0, len(buf), decoder=self.decoder, builder=self.builder, schema_keys=self.schema_keys,
                merger=merger, chunk_changes=self.budget.chunk_changes, chunk_bytes=self.budget.chunk_bytes,
                stats=stats,
            )
        with _gc_paused():
            try:
                for chunk in chunks:
                    yield chunk
                    if isinstance(buf, mmap.mmap) and hasattr(mmap, "MADV_DONTNEED"):
                        # The spool file's pages read so far leave this process's memory (they stay in the page
                        # cache; a page still needed comes back at the cost of a minor fault).
                        buf.madvise(mmap.MADV_DONTNEED)
            except DecodeError as exc:
                raise exc.with_slot(window.slot) from None
            finally:
                chunks.close()
                if isinstance(buf, mmap.mmap):
                    buf.close()
        if merger.stats.orphan_high:
            log.warning("window %s..%s (advance to %s, abandoned %s): %d snapshot high watermarks without a low one",
                        format_lsn(window.start_lsn), format_lsn(window.upto_lsn),
                        format_lsn(window.advance_to or 0), window.abandoned_chunks, merger.stats.orphan_high)

    def _record_chunks_of_rows(self, reader: RowReader, merger: SnapshotMerger,
                               stats: BatchStats) -> Iterator[RecordChunk]:
        """The records of a binary plugin's spooled rows (pgoutput): decoder -> snapshot merger -> keys -> builder."""
        chunk_changes, chunk_bytes = self.budget.chunk_changes, self.budget.chunk_bytes
        chunk = RecordChunk()
        commits: dict[tuple[int, int], tuple[int, str | None]] = {}

        def stamp(part: Transaction) -> None:
            """A part of a transaction whose commit is further on: find the commit row ahead in the spool."""
            key = (part.xid, part.begin_lsn)
            if key not in commits:
                commits.clear()
                row = reader.find_next(self.decoder.is_commit)
                if row is None:
                    raise DecodeError("transaction without its commit in the window", lsn=part.begin_lsn)
                commits[key] = (row[0], self.decoder.commit_time(row[2]))
            part.commit(*commits[key])

        # Keys follow the schema as the stream goes (core.schema_keys): it sees each part before it is keyed.
        decoded = self.decoder.decode(reader, part_size=chunk_changes)
        for txn in merger.follow(self.schema_keys.follow(decoded, self.decoder)):
            if txn.partial:
                stamp(txn)
            chunk.add_transaction(txn, self.builder, stats, ends=not txn.partial and not merger.open)
            if chunk.full(chunk_changes, chunk_bytes):
                yield chunk
                chunk = RecordChunk()
        if chunk.records or chunk.advance_to is not None:
            yield chunk

    def _records_of(self, formatted: FormattedWindow) -> tuple[WindowSpool, FormattedWindow]:
        """The window's spool with its record chunks, rebuilt (rows read again if needed) when gone."""
        spool = self.spool.window(self.spool_key, formatted.window.window_id)
        manifest = spool.records_manifest()
        if manifest is None:
            return spool, self.format(formatted.window)
        return spool, FormattedWindow.from_dict(manifest)

    def publish(
        self,
        formatted: FormattedWindow,
        *,
        on_checkpoint: Callable[[AdvanceResult], None] | None = None,
        should_stop: Callable[[], bool] | None = None,
    ) -> PublishedWindow:
        """Send the spool's record chunks in order, advancing the slot after each chunk that ends a transaction.

        Chunks (and records) whose commit the slot already passed are skipped: rerunning this step after a
        failure sends again only what was not acknowledged before. ``should_stop`` is asked after each
        checkpoint: a stop leaves the rest of the window pending on the slot (``stopped``).
        """
        self.prepare()
        spool, formatted = self._records_of(formatted)
        chunks = ((info, partial(spool.read_record_chunk, info.index)) for info in formatted.chunks)
        totals, confirmed, stopped = self._publish_chunks(formatted.window, chunks, on_checkpoint, should_stop)
        return PublishedWindow(formatted=formatted, put=totals, checkpoint_lsn=confirmed, stopped=stopped)

    def _publish_chunks(
        self,
        window: PeekedWindow,
        chunks: Iterable[tuple[RecordChunkInfo, Callable[[], RecordChunk]]],
        on_checkpoint: Callable[[AdvanceResult], None] | None,
        should_stop: Callable[[], bool] | None,
    ) -> tuple[PutTotals, int | None, bool]:
        """Publish ``chunks`` (each described, and loaded only when not skipped): (totals, slot position, stopped)."""
        confirmed = self._confirmed()
        # An open transaction's records acknowledged before a crash (a transaction larger than a chunk).
        progress = self.spool.read_progress(self.spool_key)
        if progress is not None and confirmed is not None and progress.commit_lsn <= confirmed:
            progress = None
        checkpoints = _Checkpoints(self.slot)

        def checkpointed(results: list[AdvanceResult]) -> None:
            if on_checkpoint is not None:
                for advanced in results:
                    on_checkpoint(advanced)

        try:
            totals, confirmed, stopped = self._publish_each(window, chunks, confirmed, progress, checkpoints,
                                                            checkpointed, should_stop)
            checkpointed(checkpoints.wait())
        except BaseException:
            # Acknowledged is acknowledged: the advance in progress is finished before the error goes up (its own
            # failure then says nothing new).
            with contextlib.suppress(Exception):
                checkpointed(checkpoints.wait())
            raise
        finally:
            checkpoints.close()
        return totals, confirmed, stopped

    def _publish_each(
        self,
        window: PeekedWindow,
        chunks: Iterable[tuple[RecordChunkInfo, Callable[[], RecordChunk]]],
        confirmed: int | None,
        progress: TransactionProgress | None,
        checkpoints: _Checkpoints,
        checkpointed: Callable[[list[AdvanceResult]], None],
        should_stop: Callable[[], bool] | None,
    ) -> tuple[PutTotals, int | None, bool]:
        """The loop of :meth:`_publish_chunks`; ``confirmed`` is the last acknowledged commit, which the slot
        reaches once ``checkpoints`` made the advance in progress.

        Chunks are sent one after another, each once the one before is acknowledged, by this thread; a thread
        of their own loads (or formats) the next chunks and prepares them (``sink.prepare``: validated,
        aggregated) meanwhile, at most :data:`PREPARED_CHUNKS_AHEAD` ahead. The sending thread has little to
        do besides waiting for Kinesis, so it gets the GIL as soon as an answer comes. What a chunk skips does
        not depend on the outcome of the chunks before it (records of a transaction they completed are all in
        them; an open transaction's acknowledged part is their own records), so the preparing thread skips by
        the position the window started from. A chunk that fails to prepare fails the window once every
        chunk before it is acknowledged and checkpointed.
        """
        totals = PutTotals()
        start_confirmed, start_progress = confirmed, progress

        def ready_chunks() -> Iterator[_ReadyChunk]:
            for info, load in chunks:
                if (
                    start_confirmed is not None
                    and (info.last_commit_lsn is None or info.last_commit_lsn <= start_confirmed)
                    and (info.advance_to is None or info.advance_to <= start_confirmed)
                ):
                    yield _ReadyChunk(None, None, info.records)
                    continue
                chunk = load()
                records = chunk.after(start_confirmed, start_progress)
                prepared = self.sink.prepare(records) if records else None
                yield _ReadyChunk(chunk, prepared, len(chunk.records) - len(records))

        def land(chunk: RecordChunk, report: PutReport | None) -> bool:
            """Checkpoint after the acknowledged ``chunk``; whether to stop there."""
            nonlocal totals, confirmed, progress
            if report is not None:
                totals = replace(
                    totals,
                    kinesis_records=totals.kinesis_records + report.records,
                    changes=totals.changes + report.user_records,
                    requests=totals.requests + report.requests,
                    retried_entries=totals.retried_entries + report.retried_entries,
                    throttled_entries=totals.throttled_entries + report.throttled_entries,
                    seconds=totals.seconds + report.seconds,
                ).with_hot_rows(report.hot_rows)
            if chunk.advance_to is not None and (confirmed is None or chunk.advance_to > confirmed):
                # Every record up to this commit is acknowledged: a checkpoint (made while the next chunk goes).
                checkpointed(checkpoints.request(chunk.advance_to))
                confirmed = chunk.advance_to
                totals = replace(totals, checkpoints=totals.checkpoints + 1)
            # The chunk ends inside a transaction that is not checkpointed yet: remember how far it got.
            last = chunk.commit_lsns[-1] if chunk.commit_lsns else None
            open_txn = last is not None and (confirmed is None or last > confirmed)
            if open_txn:
                acked = change_index(chunk.records[-1])
                if progress is not None and progress.commit_lsn == last:
                    acked = max(acked, progress.acked_index)  # skipped records were acknowledged before
                reached = TransactionProgress(last, acked)  # type: ignore[arg-type]
                if reached != progress:
                    progress = reached
                    self.spool.write_progress(self.spool_key, progress)
            elif progress is not None:
                progress = None
                self.spool.write_progress(self.spool_key, None)
            if (not open_txn and should_stop is not None and confirmed != window.advance_to
                    and should_stop()):
                checkpointed(checkpoints.wait())
                return True
            return False

        with _Prefetch(ready_chunks(), ahead=PREPARED_CHUNKS_AHEAD, name=PREPARE_THREAD_NAME) as ready:
            try:
                for item in ready:
                    totals = replace(totals, skipped_records=totals.skipped_records + item.skipped)
                    if item.chunk is None:
                        continue
                    report = self.sink.send(item.prepared) if item.prepared is not None else None
                    if land(item.chunk, report):
                        return totals, confirmed, True
            except SinkError as exc:  # preparing or sending: what was acknowledged before is checkpointed
                with contextlib.suppress(Exception):
                    checkpointed(checkpoints.wait())  # so the message says where the slot really stands
                raise self._with_slot_position(exc, window, confirmed) from exc
        return totals, confirmed, False

    def _format_and_publish(
        self, window: PeekedWindow, should_stop: Callable[[], bool] | None = None
    ) -> PublishedWindow:
        """``format`` and ``publish`` at once, for a run that does the whole window in one process (``pg2k``,
        the continuous job): the preparing thread of :meth:`_publish_each` formats the next chunks while this
        one sends, and record chunks are handed over in memory instead of through the spool. Same order,
        checkpoints and skipping as the two steps one after the other."""
        started = time.perf_counter()
        self.prepare()
        spool = self._rows_of(window)
        spool.drop_records()
        stats = BatchStats()
        infos: list[RecordChunkInfo] = []  # filled by the preparing thread, read once it is stopped

        def chunks() -> Iterator[tuple[RecordChunkInfo, Callable[[], RecordChunk]]]:
            formatted = self._record_chunks(window, spool, stats)
            try:
                for chunk in formatted:
                    infos.append(chunk.info(len(infos)))
                    yield infos[-1], partial(_same, chunk)
            finally:
                formatted.close()

        totals, confirmed, stopped = self._publish_chunks(window, chunks(), None, should_stop)
        # A stopped window counts what was formatted up to the stop; the rest stays pending on the slot.
        formatted = FormattedWindow(window=window, chunks=tuple(infos), stats=stats,
                                    seconds=time.perf_counter() - started, chunk_count=len(infos))
        return PublishedWindow(formatted=formatted, put=totals, checkpoint_lsn=confirmed, stopped=stopped)

    def _confirmed(self) -> int | None:
        state = self.slot.state()
        return state.confirmed_flush_lsn if state is not None else None

    def _with_slot_position(self, exc: SinkError, window: PeekedWindow, confirmed: int | None) -> SinkError:
        """The sink's error plus where the slot stands, so the operator knows what the next run resends."""
        try:
            position = self._confirmed()
        except Exception:  # PostgreSQL unreachable as well: say where the slot stood at the last checkpoint
            position = confirmed if confirmed is not None else window.start_lsn
        where = format_lsn(position) if position is not None else "(unknown)"
        target = ""
        if window.advance_to is not None:
            target = f"; this window would have moved it to {format_lsn(window.advance_to)}"
        message = (f"{exc} Replication slot {window.slot!r} stays at {where} (not advanced further{target}); "
                   "the next run starts from there.")
        try:
            wrapped = type(exc)(message)
        except TypeError:  # a subclass with another constructor: keep the message, lose the subtype
            wrapped = SinkError(message)
        wrapped.__dict__.update(exc.__dict__)
        return wrapped

    def finish(self, published: PublishedWindow) -> AdvanceResult | None:
        """Move the slot to the window's end (an idle window: to its WAL bound) and remove its spool.

        A window whose publishing was stopped early stays where its last checkpoint left it."""
        target = published.window.advance_to
        result = self.slot.advance(target) if target is not None and not published.stopped else None
        self.spool.window(self.spool_key, published.window.window_id).remove()
        return result

    # -- whole windows -------------------------------------------------------------------
    def run_window(self, upto_lsn: int | None = None, should_stop: Callable[[], bool] | None = None) -> WindowResult:
        started = time.perf_counter()
        published = self._format_and_publish(self.peek(upto_lsn), should_stop=should_stop)
        advanced = self.finish(published)
        return WindowResult(
            published=published,
            advance=advanced,
            lag_bytes=self.slot.lag_bytes(),
            seconds=time.perf_counter() - started,
        )

    def drain(
        self,
        *,
        upto_lsn: int | None = None,
        max_windows: int | None = None,
        on_window: Callable[[WindowResult], None] | None = None,
        should_stop: Callable[[], bool] | None = None,
    ) -> DrainResult:
        """Publish everything committed before ``upto_lsn`` (default: the flushed WAL position now)."""
        self.prepare_source()  # the stream is checked by the first window's format step
        if upto_lsn is None:
            upto_lsn = self.slot.current_wal_lsn()
        result = DrainResult()
        started = time.perf_counter()
        while max_windows is None or result.windows < max_windows:
            window = self.run_window(upto_lsn, should_stop=should_stop)
            result.windows += 1
            result.stats.merge(window.stats)
            result.last = window
            if on_window is not None:
                on_window(window)
            if not window.limited or window.published.stopped or (should_stop is not None and should_stop()):
                break
        result.seconds = time.perf_counter() - started
        return result

