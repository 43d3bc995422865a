"""Table snapshots as a Dagster backfill: one partition per table, materializing it queues the table's rows.

``table_snapshot`` is partitioned by table. By default its partitions are the catalog's tables with a primary
key (dynamic partitions, kept in step by the ``snapshot_tables_sensor``, every 5 minutes); with
``PG2K_SNAPSHOT_TABLES`` set (``schema.table,...``) they are exactly those (static). Launching a backfill of
the chosen partitions in the UI is the whole gesture: each run snapshots one table into the slot
(:mod:`pg2kinesis_dagster.postgres.snapshot`), logs every chunk (rows so far, rows/s) and records the table's
rows, chunks, seconds and rate as the partition's materialization. A failed table is rerun alone (its
partition) and resumes after its last finished chunk when it runs on the same machine (the state file lives
next to the spool); elsewhere it starts over, which only repeats rows.

The rows are queued in the slot: the replication runs (the sensor's ``replicate`` runs, or the continuous job)
publish them in order with the tables' changes. Snapshot runs do not carry the slot's run tag, so they run
alongside replication instead of queueing behind it.
"""
# Dagster inspects these annotations at runtime: no "from __future__ import annotations" here.

from collections.abc import Sequence

from dagster import (
    AssetExecutionContext,
    AssetsDefinition,
    DefaultSensorStatus,
    DynamicPartitionsDefinition,
    MaterializeResult,
    PartitionsDefinition,
    SensorDefinition,
    SensorEvaluationContext,
    SensorResult,
    SkipReason,
    StaticPartitionsDefinition,
    asset,
    sensor,
)

from pg2kinesis_dagster.defs.resources import PostgresResource, ReplicationResource
from pg2kinesis_dagster.postgres.catalog import load_table_keys
from pg2kinesis_dagster.postgres.snapshot import DEFAULT_CHUNK_ROWS, SnapshotProgress, TableSnapshot, sql_name

SNAPSHOT_ASSET = "table_snapshot"
SNAPSHOT_TABLES_PARTITIONS = "pg2kinesis_snapshot_tables"


def build_snapshot_definitions(
    tables: Sequence[str] | None = None, *, chunk_rows: int = DEFAULT_CHUNK_ROWS, sync_running: bool = True,
) -> tuple[list[AssetsDefinition], list[SensorDefinition]]:
    """The ``table_snapshot`` asset; with ``tables`` its static partitions, otherwise dynamic partitions and the
    sensor that keeps them equal to the catalog's tables with a primary key."""
    partitions: PartitionsDefinition
    sensors: list[SensorDefinition] = []
    if tables:
        partitions = StaticPartitionsDefinition(list(dict.fromkeys(tables)))
    else:
        dynamic = DynamicPartitionsDefinition(name=SNAPSHOT_TABLES_PARTITIONS)
        partitions = dynamic
        sensors.append(_build_sync_sensor(dynamic, sync_running))

    @asset(name=SNAPSHOT_ASSET, partitions_def=partitions, group_name="pg2kinesis")
    def table_snapshot(context: AssetExecutionContext, replication: ReplicationResource) -> MaterializeResult:
        """The rows of one table (the partition) queued into the slot, in order with the stream: chunks by
        primary key between two WAL watermarks; the replication runs publish them as SNAPSHOT records. The
        role needs SELECT on the table. Rerun a failed partition to resume it."""
        table = context.partition_key

        def on_chunk(progress: SnapshotProgress) -> None:
            context.log.info(f"snapshot {progress.table}: chunk {progress.chunks}, {progress.rows} rows, "
                             f"{progress.rows_per_second:.0f} rows/s")

        snapshot = TableSnapshot(
            replication.postgres_settings(), table, slot_name=replication.slot_name, chunk_rows=chunk_rows,
            state_dir=f"{replication.spool_dir}/.snapshots" if replication.spool_dir else None,
            publication=replication.publication,
        )
        progress = snapshot.run(on_chunk=on_chunk)
        return MaterializeResult(metadata={
            "table": progress.table,
            "rows": progress.rows,
            "chunks": progress.chunks,
            "seconds": round(progress.seconds, 3),
            "rows_per_second": round(progress.rows_per_second),
            "resumed": progress.resumed,
            "slot": replication.slot_name,
            "published": "queued in the slot; the replication runs publish it in order with the stream",
        })

    return [table_snapshot], sensors


def _build_sync_sensor(partitions: DynamicPartitionsDefinition, running: bool) -> SensorDefinition:
    @sensor(name="snapshot_tables_sensor", minimum_interval_seconds=300, asset_selection=[SNAPSHOT_ASSET],
            default_status=DefaultSensorStatus.RUNNING if running else DefaultSensorStatus.STOPPED)
    def snapshot_tables_sensor(context: SensorEvaluationContext, postgres: PostgresResource
                               ) -> SensorResult | SkipReason:
        """Keeps table_snapshot's partitions equal to the catalog's tables that have a primary key."""
        wanted = sorted(sql_name(key.schema, key.table) for key in load_table_keys(postgres.settings()).values()
                        if key.has_primary_key)
        assert partitions.name is not None
        have = set(context.instance.get_dynamic_partitions(partitions.name))
        added = [t for t in wanted if t not in have]
        removed = sorted(have - set(wanted))
        if not added and not removed:
            return SkipReason(f"{len(have)} tables, unchanged")
        requests = []
        if added:
            requests.append(partitions.build_add_request(added))
        if removed:
            requests.append(partitions.build_delete_request(removed))
        return SensorResult(dynamic_partitions_requests=requests)

    return snapshot_tables_sensor
