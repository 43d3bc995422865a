"""The production instance settings (deploy/dagster.yaml): replication under a real dagster-daemon on
PostgreSQL storage, in a database of its own on the throwaway server, and the deployment files' promises."""

from __future__ import annotations

import secrets
from pathlib import Path

import yaml
from dagster import AssetKey

from pg2kinesis_dagster.devstack.daemon import FINISHED, DagsterDaemon, code_location_env, wait_for
from pg2kinesis_dagster.devstack.moto import MotoServer
from pg2kinesis_dagster.devstack.postgres import PostgresServer
from pg2kinesis_dagster.devstack.workload import create_sample_schema, run_sample_workload
from tests.helpers import assert_matches_ledger, dedupe, read_json

ROOT = Path(__file__).resolve().parents[1]
PRODUCTION_YAML = ROOT / "deploy" / "dagster.yaml"
SLOT = "deploy_slot"


def test_production_settings_keep_the_dev_settings_run_rules() -> None:
    """Same per-slot limit, monitoring and retention as the dev instance; storage in PostgreSQL, from env: only."""
    dev = yaml.safe_load((ROOT / "dagster.yaml").read_text())
    prod = yaml.safe_load(PRODUCTION_YAML.read_text())
    assert prod["concurrency"]["runs"]["tag_concurrency_limits"] == dev["concurrency"]["runs"]["tag_concurrency_limits"]
    assert prod["run_monitoring"]["enabled"] is True
    assert prod["retention"] == dev["retention"]
    db = prod["storage"]["postgres"]["postgres_db"]
    settings = {key: value for key, value in db.items() if key != "scheme"}
    assert all(isinstance(value, dict) and set(value) == {"env"} for value in settings.values()), db


def test_the_code_location_replicates_under_a_daemon_on_postgresql_storage(
    pg_server: PostgresServer, pg_database: str, pg_conn, moto_server: MotoServer, kinesis_stream: str
) -> None:
    storage_db = pg_server.create_database(f"t_dagster_storage_{secrets.token_hex(4)}")
    create_sample_schema(pg_conn)
    with pg_conn.cursor() as cur:
        cur.execute("SELECT pg_create_logical_replication_slot(%s, 'test_decoding')", (SLOT,))
    ledger = run_sample_workload(pg_conn, transactions=20, seed=3)
    expected = sum(1 for _ in ledger.changes())
    env = code_location_env(
        pg_server, pg_database, moto_server, slot=SLOT, stream=kinesis_stream,
        PG2K_MESSAGE_FORMATTER="JSON", PG2K_SENSOR_RUNNING="1", PG2K_SENSOR_INTERVAL_SECONDS="1",
        PG2K_HEALTH_RUNNING="0", PG2K_KEY_METADATA_RUNNING="0",
        DAGSTER_PG_HOST=pg_server.host, DAGSTER_PG_PORT=str(pg_server.port), DAGSTER_PG_USER="postgres",
        DAGSTER_PG_PASSWORD="", DAGSTER_PG_DB=storage_db,
    )
    try:
        with DagsterDaemon(env, dagster_yaml=PRODUCTION_YAML) as daemon:
            try:
                instance = daemon.instance()
                storages = {type(s).__name__ for s in
                            (instance.run_storage, instance.event_log_storage, instance.schedule_storage)}
                assert storages == {"PostgresRunStorage", "PostgresEventLogStorage", "PostgresScheduleStorage"}
                assert type(instance.run_coordinator).__name__ == "QueuedRunCoordinator"
                assert instance.run_monitoring_enabled
                daemon.wait_until_ready(timeout=180)

                wait_for(lambda: len(dedupe(read_json(moto_server, kinesis_stream))) >= expected, 180,
                         "every change in Kinesis", interval=0.5)
                wait_for(lambda: daemon.runs("replicate", statuses=FINISHED) and not daemon.in_flight(), 120,
                         "the runs to end", interval=0.5)
                runs = daemon.runs("replicate")
                assert {r.dagster_run.status.value for r in runs} == {"SUCCESS"}
                assert {r.dagster_run.tags["dagster/max_runtime"] for r in runs} == {"3600"}
                assert instance.get_latest_materialization_event(AssetKey("replication_checkpoint")) is not None
                # Nothing went to SQLite: the runs and their events are rows of the storage database.
                assert not (daemon.home / "history").exists() and not (daemon.home / "schedules").exists()
                conn = pg_server.connect(storage_db)
                try:
                    with conn.cursor() as cur:
                        cur.execute("SELECT count(*) FROM runs WHERE pipeline_name = 'replicate' "
                                    "AND status = 'SUCCESS'")
                        assert cur.fetchone()[0] == len(runs)
                        cur.execute("SELECT count(*) FROM event_logs WHERE asset_key LIKE %s",
                                    ('%replication_checkpoint%',))
                        assert cur.fetchone()[0] >= 1
                        # The sensor's ticks: schedule storage.
                        cur.execute("SELECT count(*) FROM job_ticks WHERE tick_body LIKE %s", ('%replication_sensor%',))
                        assert cur.fetchone()[0] >= 1
                finally:
                    conn.close()
            except (AssertionError, TimeoutError) as exc:
                raise AssertionError(f"{exc}\n{daemon.describe()}") from exc
        assert_matches_ledger(read_json(moto_server, kinesis_stream), ledger)
    finally:
        pg_server.drop_database(storage_db)
