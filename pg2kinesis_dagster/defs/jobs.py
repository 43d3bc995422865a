"""The replication jobs.

* ``replicate``: one window per run, in four ops — ``peek_batch`` -> ``decode_and_format`` -> ``publish``
  -> ``advance_slot``. The ops pass window handles (see :mod:`.handles`), never rows or records; those
  are in the spool. "Re-execute from failure" reruns the failed op on the same window: it skips what
  the slot already passed and reads the window again from the slot when the spool is gone.
* ``replicate_continuous``: one long run that loops windows until its maximum runtime, for latency;
  the sensor starts the next one. It records a checkpoint at most once a minute, and on termination
  finishes the chunk in hand, advances the slot and stops.
"""
# Dagster inspects these annotations at runtime: no "from __future__ import annotations" here.

import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import FrameType
from typing import Any

from dagster import (
    AssetKey,
    AssetMaterialization,
    Config,
    DagsterExecutionInterruptedError,
    DagsterRunStatus,
    JobDefinition,
    MetadataValue,
    OpExecutionContext,
    Out,
    Output,
    graph,
    in_process_executor,
    op,
)

from pg2kinesis_dagster.core.changes import format_lsn
from pg2kinesis_dagster.core.records import BatchStats
from pg2kinesis_dagster.core.window import FormattedWindow, PeekedWindow, PublishedWindow
from pg2kinesis_dagster.defs.resources import SLOT_TAG, ReplicationResource
from pg2kinesis_dagster.pipeline import WindowResult

CHECKPOINT_ASSET = "replication_checkpoint"
# The IO manager that keeps window handles (defs.handles); bound with the other resources.
HANDLES = "pg2kinesis_handles"
REPLICATE_JOB = "replicate"
CONTINUOUS_JOB = "replicate_continuous"
REPLICATION_JOBS = (REPLICATE_JOB, CONTINUOUS_JOB)
# Per-table counts shown in metadata: the largest ones (the event log stays small with many tables).
MAX_TABLES_SHOWN = 20
# Dagster's run monitoring fails a run that exceeds this (when monitoring is on in dagster.yaml).
MAX_RUNTIME_TAG = "dagster/max_runtime"
DEFAULT_REPLICATE_MAX_RUNTIME_SECONDS = 3600


def checkpoint_key(replication_name: str = "") -> AssetKey:
    """``replication_checkpoint``, prefixed by the replication's name when the code location has several."""
    return AssetKey([replication_name, CHECKPOINT_ASSET]) if replication_name else AssetKey(CHECKPOINT_ASSET)


def prefixed(replication_name: str, name: str) -> str:
    """A job, sensor or schedule name of a replication: ``orders_db__replicate`` (unprefixed for the only one)."""
    return f"{replication_name}__{name}" if replication_name else name


def unprefixed(name: str) -> str:
    return name.rpartition("__")[2]


def table_counts(counts: dict[str, int], limit: int = MAX_TABLES_SHOWN) -> MetadataValue:
    lines = ["| table | operation | changes |", "| --- | --- | ---: |"]
    ranked = sorted(counts.items(), key=lambda item: (-item[1], item[0]))
    for name, count in ranked[:limit]:
        table, _, operation = name.rpartition(" ")
        lines.append(f"| {table} | {operation} | {count} |")
    if len(ranked) > limit:
        lines.append(f"| ({len(ranked) - limit} more) | | {sum(c for _, c in ranked[limit:])} |")
    return MetadataValue.md("\n".join(lines))


def top_tables(counts: dict[str, int], limit: int = MAX_TABLES_SHOWN) -> dict[str, int]:
    ranked = sorted(counts.items(), key=lambda item: (-item[1], item[0]))
    top = dict(ranked[:limit])
    if len(ranked) > limit:
        top["(other tables)"] = sum(c for _, c in ranked[limit:])
    return top


def checkpoint_metadata(
    slot: str, start_lsn: int, end_lsn: int | None, stats: BatchStats, plugin_bytes: int, lag: int | None,
    *, windows: int = 1, more_pending: bool = False,
) -> dict[str, Any]:
    """What a checkpoint materialization says: numbers that plot over time, per-table counts, the LSN range."""
    return {
        "slot": slot,
        "start_lsn": format_lsn(start_lsn),
        "end_lsn": format_lsn(end_lsn) if end_lsn is not None else "unchanged",
        "windows": windows,
        "transactions": stats.transactions,
        "changes": stats.changes,
        "records": stats.published,
        "filtered": stats.filtered,
        "skipped_no_primary_key": stats.skipped_no_key,
        "truncated_records": stats.truncated_records,
        "record_bytes": stats.record_bytes,
        "plugin_bytes": plugin_bytes,
        "lag_bytes_after_advance": lag if lag is not None else -1,
        "more_pending": more_pending,
        "changes_by_table": MetadataValue.json(top_tables(dict(stats.by_table_op))),
    }


# -- the micro-batch job ----------------------------------------------------------------------


@op(description="Read the window (everything committed up to the flushed WAL position, within the budget) "
                "into the spool, without consuming the slot.",
    out=Out(io_manager_key=HANDLES))
def peek_batch(context: OpExecutionContext, replication: ReplicationResource) -> Output[PeekedWindow]:
    replicator = replication.replicator()
    replicator.prepare()  # the slot and the stream: a missing stream fails this op, before the window is read
    window = replicator.peek()
    return Output(
        window,
        metadata={
            "slot": window.slot,
            "start_lsn": format_lsn(window.start_lsn),
            "upto_lsn": format_lsn(window.upto_lsn),
            "transactions": window.transactions,
            "rows": window.rows,
            "plugin_bytes": window.plugin_bytes,
            "row_chunks": window.row_chunks,
            "more_pending": window.limited,
            "seconds": round(window.seconds, 3),
        },
    )


@op(description="Decode the window's rows chunk by chunk, apply filters and keys, format records into the spool.",
    out=Out(io_manager_key=HANDLES))
def decode_and_format(
    context: OpExecutionContext, replication: ReplicationResource, peeked: PeekedWindow
) -> Output[FormattedWindow]:
    formatted = replication.replicator().format(peeked)
    stats = formatted.stats
    return Output(
        formatted,
        metadata={
            "changes": stats.changes,
            "records": stats.published,
            "record_chunks": formatted.chunk_count,
            "filtered": stats.filtered,
            "skipped_no_primary_key": stats.skipped_no_key,
            "truncated_records": stats.truncated_records,
            "tables_without_primary_key": ", ".join(sorted(stats.no_key_tables)[:MAX_TABLES_SHOWN]) or "none",
            "record_bytes": stats.record_bytes,
            "seconds": round(formatted.seconds, 3),
        },
    )


@op(description="PutRecords chunk by chunk until Kinesis acknowledged every record, keeping each row's order; "
                "advances the slot after each chunk that ends a transaction.",
    out=Out(io_manager_key=HANDLES))
def publish(
    context: OpExecutionContext, replication: ReplicationResource, formatted: FormattedWindow
) -> Output[PublishedWindow]:
    published = replication.replicator().publish(formatted)
    put = published.put
    return Output(
        published,
        metadata={
            "stream": replication.kinesis.stream_name,
            "changes_published": put.changes,
            "kinesis_records": put.kinesis_records,
            "skipped_already_acknowledged": put.skipped_records,
            "requests": put.requests,
            "retried_entries": put.retried_entries,
            "throttled_entries": put.throttled_entries,
            "checkpoints": put.checkpoints,
            "seconds": round(put.seconds, 3),
            # Plain records: rows with many changes in a chunk cost one round trip per change (use --aggregate).
            "hot_rows": MetadataValue.json([{"row": row, "changes": n} for row, n in put.hot_rows]),
        },
    )


@op(description="Advance the slot to the window's end (never backwards), remove the spool, record the checkpoint.")
def advance_slot(
    context: OpExecutionContext, replication: ReplicationResource, published: PublishedWindow
) -> None:
    replicator = replication.replicator()
    result = replicator.finish(published)
    lag = replicator.slot.lag_bytes()
    window = published.window
    if result is not None and not result.moved and published.put.checkpoints == 0:
        context.log.info(
            f"slot {window.slot!r} already at {format_lsn(result.before or 0)}, at or past "
            f"{format_lsn(result.target)}: nothing to advance (a rerun, or a concurrent run)"
        )
    end = (result.after or result.target) if result is not None else published.checkpoint_lsn
    metadata = checkpoint_metadata(
        window.slot, window.start_lsn, end, published.formatted.stats, window.plugin_bytes, lag,
        more_pending=window.limited,
    )
    context.log_event(AssetMaterialization(asset_key=checkpoint_key(replication.name), metadata=metadata))


@graph(description="Replicate one window of committed changes from the slot to Kinesis.")
def replicate_batch() -> None:
    advance_slot(publish(decode_and_format(peek_batch())))


def build_replicate_job(
    slot_tag: str, max_runtime_seconds: int = DEFAULT_REPLICATE_MAX_RUNTIME_SECONDS, *,
    name: str = REPLICATE_JOB, resource_defs: dict[str, Any] | None = None,
) -> JobDefinition:
    """The job, tagged with its slot so that the instance runs at most one run per slot at a time.

    ``resource_defs``: a replication of a code location with several binds its own ``replication``.
    """
    return replicate_batch.to_job(
        name=name,
        # In-process: a window's steps share the slot's session (and its lock); no process start per op.
        executor_def=in_process_executor,
        tags={SLOT_TAG: slot_tag, MAX_RUNTIME_TAG: str(max_runtime_seconds)},
        resource_defs=resource_defs,
    )


# -- the continuous job -----------------------------------------------------------------------


class ContinuousConfig(Config):
    max_runtime_seconds: float = 1800.0
    """The run ends after this long (the sensor starts the next one), so code and config changes land."""
    poll_interval_seconds: float = 0.2
    """Wait between windows when nothing is pending: the latency floor."""
    checkpoint_interval_seconds: float = 60.0
    """At most one checkpoint materialization this often (the event log stays small)."""


class StopRequest:
    """Set by SIGINT/SIGTERM (how Dagster terminates a run) or by the run's status turning CANCELING."""

    def __init__(self, is_canceling: Callable[[], bool], check_every: float = 2.0) -> None:
        self.signalled = False
        self._is_canceling = is_canceling
        self._check_every = check_every
        self._checked = time.monotonic()

    def handle(self, signum: int, frame: FrameType | None) -> None:
        self.signalled = True

    def __call__(self) -> bool:
        now = time.monotonic()
        if not self.signalled and now - self._checked >= self._check_every:
            self._checked = now
            self.signalled = self._is_canceling()
        return self.signalled

    def sleep(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while not self() and time.monotonic() < deadline:
            time.sleep(min(0.05, max(0.0, deadline - time.monotonic())))

    @contextmanager
    def installed(self) -> Iterator[None]:
        """Catch the termination signals for the duration (main thread only: elsewhere, status checks do)."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
        for sig in previous:
            signal.signal(sig, self.handle)
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


@op(description="Loop windows (peek, format, publish, advance) until the maximum runtime or termination; "
                "records a checkpoint at most once per interval.")
def replicate_continuously(
    context: OpExecutionContext, config: ContinuousConfig, replication: ReplicationResource
) -> None:
    replicator = replication.replicator()
    replicator.prepare()

    def canceling() -> bool:
        run = context.instance.get_run_by_id(context.run_id)
        return run is not None and run.status in (DagsterRunStatus.CANCELING, DagsterRunStatus.CANCELED)

    stop = StopRequest(canceling)
    deadline = time.monotonic() + config.max_runtime_seconds
    pending = _CheckpointAccumulator()
    last_recorded = time.monotonic()

    def record(lag: int | None) -> None:
        nonlocal last_recorded
        if pending.windows:
            context.log_event(AssetMaterialization(asset_key=checkpoint_key(replication.name),
                                                   metadata=pending.metadata(lag)))
            pending.reset()
        last_recorded = time.monotonic()


    with stop.installed():
        while not stop() and time.monotonic() < deadline:
            result = replicator.run_window(should_stop=stop)
            pending.add(result)
            if time.monotonic() - last_recorded >= config.checkpoint_interval_seconds:
                record(result.lag_bytes)
            if not result.limited:
                stop.sleep(config.poll_interval_seconds)
        record(replicator.slot.lag_bytes())
    if stop.signalled:
        context.log.info("stopped on request after a checkpoint; the next run resumes from the slot")
        raise DagsterExecutionInterruptedError()


class _CheckpointAccumulator:
    """Windows since the last checkpoint materialization, summed."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.windows = 0
        self.stats = BatchStats()
        self.start_lsn: int | None = None
        self.end_lsn: int | None = None
        self.plugin_bytes = 0
        self.slot = ""

    def add(self, result: WindowResult) -> None:
        self.windows += 1
        self.slot = result.window.slot
        self.stats.merge(result.stats)
        self.plugin_bytes += result.window.plugin_bytes
        if self.start_lsn is None:
            self.start_lsn = result.window.start_lsn
        self.end_lsn = result.end_lsn or self.end_lsn

    def metadata(self, lag: int | None) -> dict[str, Any]:
        return checkpoint_metadata(
            self.slot, self.start_lsn or 0, self.end_lsn, self.stats, self.plugin_bytes, lag, windows=self.windows
        )


@graph(description="Replicate continuously in one long run, for low latency; the sensor starts the next run.")
def replicate_continuous_graph() -> None:
    replicate_continuously()


def build_continuous_job(
    slot_tag: str, max_runtime_seconds: float = 1800.0, *,
    name: str = CONTINUOUS_JOB, resource_defs: dict[str, Any] | None = None,
) -> JobDefinition:
    return replicate_continuous_graph.to_job(
        name=name,
        resource_defs=resource_defs,
        executor_def=in_process_executor,
        config={"ops": {"replicate_continuously": {"config": {"max_runtime_seconds": max_runtime_seconds}}}},
        # Run monitoring's limit: the run's own limit plus time to finish a window.
        tags={SLOT_TAG: slot_tag, MAX_RUNTIME_TAG: str(int(max_runtime_seconds) + 600)},
    )
