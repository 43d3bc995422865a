"""The ``replicate`` job: peek -> decode_and_format -> publish -> advance_slot, one micro-batch per run.
# Dagster inspects these annotations at runtime: no "from __future__ import annotations" here.

Outputs pass through the run's IO manager, so "re-execute from failure" in the UI republishes
the very records of the failed run and advances to the same LSN (a no-op when the slot is
already there or further).
"""


from dagster import (
    AssetMaterialization,
    JobDefinition,
    MetadataValue,
    OpExecutionContext,
    Output,
    graph,
    in_process_executor,
    op,
)

from pg2kinesis_dagster.core.changes import format_lsn
from pg2kinesis_dagster.defs.resources import SLOT_TAG, ReplicationResource
from pg2kinesis_dagster.pipeline import FormattedBatch, PeekedBatch, PublishedBatch

CHECKPOINT_ASSET = "replication_checkpoint"


def _table_counts(counts: dict[str, int]) -> MetadataValue:
    lines = ["| table | operation | changes |", "| --- | --- | ---: |"]
    for name, count in sorted(counts.items()):
        table, _, operation = name.rpartition(" ")
        lines.append(f"| {table} | {operation} | {count} |")
    return MetadataValue.md("\n".join(lines))


@op(description="Peek whole transactions from the slot without consuming them.")
def peek_batch(context: OpExecutionContext, replication: ReplicationResource) -> Output[PeekedBatch]:
    peeked = replication.replicator().peek()
    return Output(
        peeked,
        metadata={
            "slot": peeked.slot,
            "start_lsn": format_lsn(peeked.start_lsn),
            "upto_lsn": format_lsn(peeked.upto_lsn),
            "transactions": peeked.transactions,
            "rows": len(peeked.rows),
            "plugin_bytes": peeked.data_bytes,
            "more_pending": peeked.limited,
        },
    )


@op(description="Decode the plugin output, apply filters and keys, format each change as a record.")
def decode_and_format(
    context: OpExecutionContext, replication: ReplicationResource, peeked: PeekedBatch
) -> Output[FormattedBatch]:
    formatted = replication.replicator().build(peeked)
    stats = formatted.stats
    return Output(
        formatted,
        metadata={
            "changes": stats.changes,
            "records": stats.published,
            "filtered": stats.filtered,
            "skipped_no_primary_key": stats.skipped_no_key,
            "truncated_records": stats.truncated_records,
            "tables_without_primary_key": ", ".join(sorted(stats.no_key_tables)) or "none",
            "record_bytes": stats.record_bytes,
            "changes_by_table": _table_counts(dict(stats.by_table_op)),
        },
    )


@op(description="PutRecords until Kinesis acknowledged every record, keeping each row's order.")
def publish(
    context: OpExecutionContext, replication: ReplicationResource, formatted: FormattedBatch
) -> Output[PublishedBatch]:
    published = replication.replicator().publish(formatted)
    put = published.put
    return Output(
        published,
        metadata={
            "stream": replication.kinesis.stream_name,
            "changes_published": put.user_records if put else 0,
            "kinesis_records": put.records if put else 0,
            "requests": put.requests if put else 0,
            "retried_entries": put.retried_entries if put else 0,
            "throttled_entries": put.throttled_entries if put else 0,
            "seconds": round(put.seconds, 3) if put else 0.0,
        },
    )


@op(description="Advance the slot to the last published commit; never backwards, a no-op if already there.")
def advance_slot(
    context: OpExecutionContext, replication: ReplicationResource, published: PublishedBatch
) -> None:
    replicator = replication.replicator()
    result = replicator.advance(published)
    lag = replicator.slot.lag_bytes()
    stats = published.stats
    end = result.after if result and result.after is not None else (result.target if result else None)
    metadata = {
        "slot": published.slot,
        "start_lsn": format_lsn(published.start_lsn),
        "end_lsn": format_lsn(end) if end is not None else "unchanged",
        "moved": bool(result and result.moved),
        "transactions": stats.transactions,
        "changes": stats.changes,
        "records": stats.published,
        "filtered": stats.filtered,
        "skipped_no_primary_key": stats.skipped_no_key,
        "truncated_records": stats.truncated_records,
        "record_bytes": stats.record_bytes,
        "plugin_bytes": published.data_bytes,
        "lag_bytes_after_advance": lag if lag is not None else -1,
        "changes_by_table": _table_counts(dict(stats.by_table_op)),
    }
    if result is not None and not result.moved:
        context.log.info(
            f"slot {published.slot!r} already at {format_lsn(result.before or 0)}, at or past "
            f"{format_lsn(result.target)}: nothing to advance (a rerun or a concurrent run)"
        )
    context.log_event(AssetMaterialization(asset_key=CHECKPOINT_ASSET, metadata=metadata))


@graph(description="Replicate one micro-batch of committed changes from the slot to Kinesis.")
def replicate_batch() -> None:
    advance_slot(publish(decode_and_format(peek_batch())))


def build_replicate_job(slot_name: str) -> JobDefinition:
    """The job, tagged with its slot so that the instance runs at most one run per slot at a time."""
    return replicate_batch.to_job(
        name="replicate",
        # In-process: a micro-batch costs seconds, not a process start per op.
        executor_def=in_process_executor,
        tags={SLOT_TAG: slot_name},
    )
