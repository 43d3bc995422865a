"""Idle databases: WAL written elsewhere in the cluster does not pile up behind an idle slot; the heartbeat."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import pytest
from dagster import DagsterInstance, build_sensor_context, instance_for_test

from pg2kinesis_dagster.defs import build_definitions
from pg2kinesis_dagster.defs.automation import IDLE_LAG_BYTES
from pg2kinesis_dagster.defs.heartbeat import HEARTBEAT_JOB
from pg2kinesis_dagster.devstack.moto import MotoServer
from pg2kinesis_dagster.devstack.postgres import PostgresServer
from tests.helpers import read_json

SLOT = "idle_slot"
MIB = 1024**2
QUIET = {"loggers": {"console": {"config": {"log_level": "CRITICAL"}}}}


@pytest.fixture(scope="module")
def small_wal_server() -> Iterator[PostgresServer]:
    # Checkpoints every 64 MB of WAL, so WAL no slot needs is really removed while the test writes.
    with PostgresServer(settings={"max_wal_size": "64MB", "min_wal_size": "32MB"}) as server:
        yield server


def _env(server: PostgresServer, db: str, moto: MotoServer, stream: str, **extra: str) -> dict[str, str]:
    # Slot names are cluster-wide: one per database here.
    return {"PG2K_PG_HOST": server.host, "PG2K_PG_PORT": str(server.port), "PG2K_PG_DBNAME": db,
            "PG2K_PG_USER": "postgres", "PG2K_SLOT_NAME": f"{SLOT}_{db}", "PG2K_STREAM_NAME": stream,
            "PG2K_KINESIS_ENDPOINT_URL": moto.endpoint_url, "PG2K_MESSAGE_FORMATTER": "JSON",
            "PG2K_CREATE_SLOT": "1", **extra}


def _wal(server: PostgresServer, db: str) -> dict[str, int]:
    slot = f"{SLOT}_{db}"
    with contextlib.closing(server.connect(db)) as conn, conn.cursor() as cur:
        cur.execute(
            "SELECT (pg_current_wal_lsn() - confirmed_flush_lsn)::bigint, (pg_current_wal_lsn() - restart_lsn)::bigint,"
            " (SELECT sum(size) FROM pg_ls_waldir())::bigint FROM pg_replication_slots WHERE slot_name = %s", (slot,))
        lag, retained, on_disk = cur.fetchone()
    return {"lag": lag, "retained": retained, "on_disk": on_disk}


def _sensor_tick(defs: Any, instance: DagsterInstance) -> int:
    """One tick of the replication sensor, running what it asks for (as the daemon would); returns the runs."""
    sensor = defs.get_sensor_def("replication_sensor")
    with build_sensor_context(instance=instance, definitions=defs, resources=defs.resources) as context:
        result = sensor(context)
    for _ in result.run_requests or []:
        assert defs.get_job_def("replicate").execute_in_process(instance=instance, run_config=QUIET).success
    return len(result.run_requests or [])


def test_wal_of_another_database_does_not_accumulate_behind_an_idle_slot(
    small_wal_server: PostgresServer, moto_server: MotoServer, kinesis_stream: str, aws_fake_env: str,
) -> None:
    server = small_wal_server
    replicated, busy = server.create_database("replicated"), server.create_database("busy")
    defs = build_definitions(_env(server, replicated, moto_server, kinesis_stream))
    step, total = 8, 160  # MiB written by the busy database, between two sensor ticks
    samples: list[dict[str, int]] = []
    runs = 0
    with instance_for_test() as instance:
        assert defs.get_job_def("replicate").execute_in_process(instance=instance, run_config=QUIET).success
        with contextlib.closing(server.connect(busy)) as conn, conn.cursor() as cur:
            for _ in range(total // step):
                for _ in range(step):
                    cur.execute("SELECT pg_logical_emit_message(false, 'busy', repeat('x', 1048576))")
                runs += _sensor_tick(defs, instance)
                samples.append(_wal(server, replicated))
    peak = {name: max(s[name] for s in samples) // MIB for name in ("lag", "retained", "on_disk")}
    print(f"idle slot: {runs} runs; peak lag {peak['lag']} MiB, retained {peak['retained']} MiB, "
          f"pg_wal {peak['on_disk']} MiB, after {total} MiB written by another database")
    assert runs >= total * MIB // IDLE_LAG_BYTES - 1, "the sensor advanced the idle slot"
    assert read_json(moto_server, kinesis_stream) == [], "nothing of the other database is published"
    # The slot never keeps much more than the idle threshold, and neither does pg_wal: recycled as it goes.
    assert max(s["lag"] for s in samples) < IDLE_LAG_BYTES + (step + 1) * MIB, samples
    assert max(s["retained"] for s in samples) < IDLE_LAG_BYTES + (step + 17) * MIB, samples
    assert max(s["on_disk"] for s in samples[len(samples) // 2:]) < 256 * MIB, samples


def test_heartbeat_gives_an_idle_slot_something_to_move_to(
    small_wal_server: PostgresServer, moto_server: MotoServer, kinesis_stream: str, aws_fake_env: str,
) -> None:
    server = small_wal_server
    db = server.create_database("heartbeat")
    env = _env(server, db, moto_server, kinesis_stream, PG2K_HEARTBEAT_CRON="*/2 * * * *")
    defs = build_definitions(env)
    schedule = defs.get_schedule_def("slot_heartbeat_schedule")
    assert schedule.cron_schedule == "*/2 * * * *" and schedule.default_status.value == "RUNNING"
    assert build_definitions({}).get_schedule_def("slot_heartbeat_schedule").default_status.value == "STOPPED"
    with instance_for_test() as instance:
        assert defs.get_job_def("replicate").execute_in_process(instance=instance, run_config=QUIET).success
        assert _sensor_tick(defs, instance) == 0, "idle, and little WAL: no run"
        before = _wal(server, db)
        assert defs.get_job_def(HEARTBEAT_JOB).execute_in_process(instance=instance, run_config=QUIET).success
        # The heartbeat is a decodable record of this database: the sensor sees it and a run moves past it.
        assert _sensor_tick(defs, instance) == 1
        after = _wal(server, db)
        assert after["lag"] <= before["lag"]
        assert _sensor_tick(defs, instance) == 0
    assert read_json(moto_server, kinesis_stream) == [], "a heartbeat is never published"
