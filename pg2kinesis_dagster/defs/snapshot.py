"""Table snapshots as a Dagster backfill: one partition per table, materializing it queues the table's rows.

``table_snapshot`` is partitioned by table. By default its partitions are the catalog's tables with a primary
key (dynamic partitions, kept in step by the ``snapshot_tables_sensor``, every 5 minutes); with
``snapshot_tables`` set (``PG2K_SNAPSHOT_TABLES=schema.table,...``) they are exactly those (static). A named
replication of a configuration file gets its own, prefixed: asset ``["orders_db", "table_snapshot"]``,
sensor ``orders_db__snapshot_tables_sensor``. Launching a backfill of
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


from typing import Any

from dagster import (
    AssetExecutionContext,
    AssetKey,
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

from pg2kinesis_dagster.core.config import ReplicationConfig
from pg2kinesis_dagster.defs.jobs import prefixed
from pg2kinesis_dagster.defs.resources import PostgresResource, ReplicationResource
from pg2kinesis_dagster.postgres.catalog import load_table_keys
from pg2kinesis_dagster.postgres.snapshot import SnapshotProgress, TableSnapshot, sql_name

SNAPSHOT_ASSET = "table_snapshot"
SNAPSHOT_TABLES_PARTITIONS = "pg2kinesis_snapshot_tables"


def build_snapshot_definitions(
    config: ReplicationConfig, *, replication_name: str = "", replication_key: str = "replication",
    postgres_key: str = "postgres",
) -> tuple[list[AssetsDefinition], list[SensorDefinition]]:
    """The ``table_snapshot`` asset of one replication; with ``snapshot_tables`` its static partitions, otherwise
    dynamic partitions and the sensor that keeps them equal to the catalog's tables with a primary key.
    ``*_key``: the replication's resource keys (a named replication's are prefixed)."""
    tables = config.snapshot_table_list()
    partitions: PartitionsDefinition
    sensors: list[SensorDefinition] = []
    if tables:
        partitions = StaticPartitionsDefinition(tables)
    else:
        dynamic = DynamicPartitionsDefinition(name=prefixed(replication_name, SNAPSHOT_TABLES_PARTITIONS))
        partitions = dynamic
        sensors.append(_build_sync_sensor(dynamic, config.snapshot_sync_running, replication_name, postgres_key))
    chunk_rows, chunk_bytes = config.snapshot_chunk_rows, config.snapshot_chunk_bytes
    state_dir = config.snapshot_state_folder()

    @asset(name=SNAPSHOT_ASSET, key_prefix=[replication_name] if replication_name else None,
           partitions_def=partitions, group_name=replication_name or "pg2kinesis",
           required_resource_keys={replication_key})
    def table_snapshot(context: AssetExecutionContext) -> MaterializeResult:
        """The rows of one table (the partition) queued into the slot, in order with the stream: chunks by
        primary key between two WAL watermarks; the replication runs publish them as SNAPSHOT records. The
        role needs SELECT on the table. Rerun a failed partition to resume it."""
        replication: ReplicationResource = getattr(context.resources, replication_key)
        table = context.partition_key

        def on_chunk(progress: SnapshotProgress) -> None:
            context.log.info(f"snapshot {progress.table}: chunk {progress.chunks}, {progress.rows} rows, "
                             f"{progress.rows_per_second:.0f} rows/s")

        snapshot = TableSnapshot(
            replication.postgres_settings(), table, slot_name=replication.slot_name, chunk_rows=chunk_rows,
            chunk_bytes=chunk_bytes, state_dir=state_dir,
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


def _build_sync_sensor(partitions: DynamicPartitionsDefinition, running: bool, replication_name: str,
                       postgres_key: str) -> SensorDefinition:
    asset_key = AssetKey([replication_name, SNAPSHOT_ASSET] if replication_name else [SNAPSHOT_ASSET])

    @sensor(name=prefixed(replication_name, "snapshot_tables_sensor"), minimum_interval_seconds=300,
            asset_selection=[asset_key], required_resource_keys={postgres_key},
            default_status=DefaultSensorStatus.RUNNING if running else DefaultSensorStatus.STOPPED)
    def snapshot_tables_sensor(context: SensorEvaluationContext, **resources: Any) -> SensorResult | SkipReason:
        """Keeps table_snapshot's partitions equal to the catalog's tables that have a primary key."""
        # Called directly (tests), Dagster passes the required resources as arguments; the daemon does not.
        postgres: PostgresResource = resources.get(postgres_key) or getattr(context.resources, postgres_key)
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
