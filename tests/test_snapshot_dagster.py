"""The table snapshot as a Dagster backfill: partitions from the catalog, one materialization per table.

The code location is built from PG2K_* variables exactly as shipped; the sensor and the asset run through
Dagster's public testing APIs on the throwaway PostgreSQL and moto.
"""

from __future__ import annotations

import psycopg2.extensions
import pytest
from dagster import build_sensor_context, instance_for_test, materialize

from pg2kinesis_dagster.defs import build_definitions, build_resources
from pg2kinesis_dagster.defs.snapshot import SNAPSHOT_ASSET, SNAPSHOT_TABLES_PARTITIONS
from pg2kinesis_dagster.devstack.moto import MotoServer
from pg2kinesis_dagster.devstack.postgres import PostgresServer
from tests.helpers import code_location_env, make_replicator
from tests.snapshot_support import apply_by_key, create_tables, expected_state, read_changes


def test_backfill_partitions_follow_the_catalog_and_a_partition_snapshots_its_table(
    pg_server: PostgresServer, pg_database: str, pg_conn: psycopg2.extensions.connection,
    moto_server: MotoServer, kinesis_stream: str, monkeypatch: pytest.MonkeyPatch,
) -> None:
    create_tables(pg_conn, 300)
    with pg_conn.cursor() as cur:
        cur.execute("CREATE TABLE public.keyless (v int)")
        cur.execute('CREATE TABLE public."Odd.Name" (id int PRIMARY KEY)')
    env = code_location_env(pg_server, pg_database, moto_server, kinesis_stream, "pg2kinesis",
                            PG2K_SNAPSHOT_CHUNK_ROWS="70")
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    defs = build_definitions(env)
    with make_replicator(pg_server, pg_database, moto_server, kinesis_stream) as replicator:
        replicator.prepare()  # the slot exists before the snapshot
        with instance_for_test() as instance:
            sensor = defs.get_sensor_def("snapshot_tables_sensor")
            resources = build_resources(env)
            with build_sensor_context(instance=instance, resources={"postgres": resources["postgres"]}) as ctx:
                result = sensor(ctx)
            (request,) = result.dynamic_partitions_requests
            assert sorted(request.partition_keys) == ['public."Odd.Name"', "public.items", "public.pairs"]
            instance.add_dynamic_partitions(SNAPSHOT_TABLES_PARTITIONS, list(request.partition_keys))
            with build_sensor_context(instance=instance, resources={"postgres": resources["postgres"]}) as ctx:
                assert sensor(ctx).skip_message.startswith("3 tables")  # type: ignore[union-attr]

            asset = defs.get_assets_def(SNAPSHOT_ASSET)
            for table in ("public.items", "public.pairs"):
                run = materialize([asset], partition_key=table, instance=instance,
                                  resources={"replication": resources["replication"]})
                assert run.success
                (materialization,) = run.asset_materializations_for_node(asset.op.name)
                metadata = {k: v.value for k, v in materialization.metadata.items()}
                assert metadata["rows"] == 300 and metadata["chunks"] == 5 and metadata["table"] == table
                assert metadata["rows_per_second"] > 0
        replicator.drain()
    applied = apply_by_key(read_changes(moto_server, kinesis_stream))
    assert applied.snapshot_rows == 600 and applied.stale == []
    assert applied.state == expected_state(pg_conn)


def test_static_partitions_from_configuration() -> None:
    defs = build_definitions({"PG2K_SNAPSHOT_TABLES": "public.a, billing.cards"})
    partitions = defs.get_assets_def(SNAPSHOT_ASSET).partitions_def
    assert partitions is not None and partitions.get_partition_keys() == ["public.a", "billing.cards"]
    with pytest.raises(Exception, match="snapshot_tables_sensor"):
        defs.get_sensor_def("snapshot_tables_sensor")
