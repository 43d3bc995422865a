"""Slot health checks: each driven into warn and error on the real local PostgreSQL, and run by Dagster."""

from __future__ import annotations

import contextlib
import secrets
import time
from collections.abc import Iterator
from dataclasses import replace

import psycopg2
import psycopg2.extras
import pytest
from dagster import AssetCheckSeverity, instance_for_test

from pg2kinesis_dagster.core import health as core
from pg2kinesis_dagster.core.health import Level, Thresholds
from pg2kinesis_dagster.defs import build_definitions
from pg2kinesis_dagster.defs.health import HEALTH_JOB, HEALTH_SCHEDULE, slot_findings
from pg2kinesis_dagster.defs.resources import KinesisResource, PostgresResource, ReplicationResource
from pg2kinesis_dagster.devstack.postgres import PostgresServer
from pg2kinesis_dagster.postgres.connection import PostgresSettings
from pg2kinesis_dagster.postgres.health import read_slot_health

SLOT = "health_slot"
MIB = 1024**2
# Every limit out of reach: a test brings in the one it drives.
FAR = 2**62
OFF = Thresholds(lag_warn_bytes=FAR, lag_error_bytes=FAR, pinned_warn_bytes=FAR, pinned_error_bytes=FAR,
                 safe_wal_warn_fraction=0, safe_wal_error_fraction=0, fresh_warn_minutes=FAR,
                 fresh_error_minutes=FAR)


def _replication(server: PostgresServer, db: str, *, user: str = "postgres", password: str | None = None,
                 slot: str = SLOT, plugin: str = "test_decoding") -> ReplicationResource:
    return ReplicationResource(
        postgres=PostgresResource(host=server.host, port=server.port, dbname=db, user=user, password=password),
        kinesis=KinesisResource(stream_name="unused", region_name="us-east-1"),
        slot_name=slot, output_plugin=plugin,
    )


def _findings(replication: ReplicationResource, thresholds: Thresholds) -> dict[str, core.Finding]:
    with instance_for_test() as instance:
        return {f.check: f for f in slot_findings(replication, thresholds, instance)}


def _write_wal(server: PostgresServer, megabytes: int, db: str = "postgres") -> None:
    """WAL written by another database, in 1 MiB non-transactional messages (no slot decodes them)."""
    with contextlib.closing(server.connect(db)) as conn, conn.cursor() as cur:
        for _ in range(megabytes):
            cur.execute("SELECT pg_logical_emit_message(false, 'filler', repeat('x', 1048576))")


# -- the pure evaluation -------------------------------------------------------------------------------------

def _health(**changes: object) -> core.SlotHealth:
    base = core.SlotHealth(slot_name="s", where="database d on h:5432 as user u", current_wal_lsn=10 * MIB,
                           exists=True, plugin="test_decoding", confirmed_flush_lsn=8 * MIB, restart_lsn=7 * MIB,
                           wal_status="reserved", pending=False)
    return replace(base, **changes)


def test_levels_follow_the_thresholds() -> None:
    health = _health()
    t = replace(OFF, lag_warn_bytes=MIB, lag_error_bytes=3 * MIB)
    assert core.evaluate(health, OFF, minutes_since_checkpoint=1.0)[0].level is Level.OK
    assert [f.level for f in core.evaluate(health, t, minutes_since_checkpoint=1.0)] == [Level.WARN] + [Level.OK] * 3
    assert core.evaluate(health, replace(t, lag_error_bytes=MIB + 1), minutes_since_checkpoint=1.0)[0].level \
        is Level.ERROR
    assert core.evaluate(health, replace(t, lag_warn_bytes=2 * MIB), minutes_since_checkpoint=1.0)[0].level is Level.OK
    # wal_status alone: extended warns, unreserved errors.
    assert core.evaluate(_health(wal_status="extended"), OFF, minutes_since_checkpoint=1.0)[1].level is Level.WARN
    assert core.evaluate(_health(wal_status="unreserved"), OFF, minutes_since_checkpoint=1.0)[1].level is Level.ERROR
    # Freshness: nothing pending is fresh however old the checkpoint; pending with no checkpoint ever is stale.
    fresh = replace(OFF, fresh_warn_minutes=5, fresh_error_minutes=15)
    assert core.evaluate(_health(), fresh, minutes_since_checkpoint=99)[3].level is Level.OK
    assert core.evaluate(_health(pending=True), fresh, minutes_since_checkpoint=6)[3].level is Level.WARN
    assert core.evaluate(_health(pending=None, active_pid=7), fresh, minutes_since_checkpoint=None)[3].level \
        is Level.ERROR
    # A lost slot fails everything, with the way back.
    lost = core.evaluate(_health(wal_status="lost", restart_lsn=None), Thresholds(), minutes_since_checkpoint=1)
    assert {f.level for f in lost} == {Level.ERROR}
    assert all("Recreate the slot" in f.advice and "re-snapshot" in f.advice for f in lost)
    # Every finding carries the numbers for the trend.
    metadata = core.evaluate(_health(), Thresholds(), minutes_since_checkpoint=2.5)[0].metadata
    assert metadata["lag_bytes"] == 2 * MIB and metadata["retained_wal_bytes"] == 3 * MIB
    assert metadata["restart_lag_bytes"] == MIB and metadata["minutes_since_checkpoint"] == 2.5


# -- live: lag, a missing slot ------------------------------------------------------------------------------

def test_lag_check_warns_errors_and_reports_spills(pg_server: PostgresServer, pg_database: str, pg_conn) -> None:
    with pg_conn.cursor() as cur:
        cur.execute("SELECT pg_create_logical_replication_slot(%s, 'test_decoding')", (SLOT,))
        cur.execute("CREATE TABLE items (id int PRIMARY KEY, body text)")
        # A transaction larger than logical_decoding_work_mem (64kB here) spills when decoded.
        cur.execute("SET logical_decoding_work_mem = '64kB'")
        cur.execute("INSERT INTO items SELECT g, repeat('x', 200) FROM generate_series(1, 5000) g")
        cur.execute("SELECT count(*) FROM pg_logical_slot_peek_changes(%s, NULL, NULL)", (SLOT,))
    replication = _replication(pg_server, pg_database)
    lag = _findings(replication, OFF)[core.LAG_CHECK]
    assert lag.level is Level.OK
    behind = lag.metadata["lag_bytes"]
    assert isinstance(behind, int) and behind > MIB
    # The 1 MB transaction did not fit in logical_decoding_work_mem: decoding spilled it to disk.
    assert lag.metadata["spill_txns"] >= 1 and lag.metadata["spill_bytes"] > 0, lag.metadata
    assert lag.metadata["total_txns"] >= 1 and lag.metadata["total_bytes"] > 0
    warn = _findings(replication, replace(OFF, lag_warn_bytes=MIB, lag_error_bytes=1024 * MIB))[core.LAG_CHECK]
    assert warn.level is Level.WARN
    assert "behind the WAL position" in warn.summary and "sensor" in warn.advice
    error = _findings(replication, replace(OFF, lag_warn_bytes=MIB, lag_error_bytes=MIB + 1))[core.LAG_CHECK]
    assert error.level is Level.ERROR


def test_missing_slot_fails_every_check_with_the_way_back(pg_server: PostgresServer, pg_database: str) -> None:
    findings = _findings(_replication(pg_server, pg_database, slot="never_created"), Thresholds())
    assert [f.check for f in findings.values()] == list(core.CHECK_NAMES)
    for finding in findings.values():
        assert finding.level is Level.ERROR
        assert "does not exist" in finding.summary and "pg_create_logical_replication_slot" in finding.advice
        assert "re-snapshot" in finding.advice


def test_unreachable_postgres_is_an_error_not_a_crash(pg_database: str) -> None:
    from pg2kinesis_dagster.devstack.postgres import free_port

    replication = ReplicationResource(
        postgres=PostgresResource(host="127.0.0.1", port=free_port(), dbname=pg_database, user="postgres",
                                  options={"connect_timeout": "3"}),
        kinesis=KinesisResource(stream_name="unused", region_name="us-east-1"), slot_name=SLOT,
    )
    findings = _findings(replication, Thresholds())
    assert {f.level for f in findings.values()} == {Level.ERROR}
    assert all("cannot connect to PostgreSQL" in f.summary for f in findings.values())


# -- live: a pinned restart_lsn --------------------------------------------------------------------------------

@pytest.fixture
def monitor_role(pg_conn) -> Iterator[tuple[str, str]]:
    """A login role without pg_monitor: it sees other roles' sessions only in part."""
    role, password = f"mon_{secrets.token_hex(4)}", secrets.token_hex(12)
    with pg_conn.cursor() as cur:
        cur.execute(f"CREATE ROLE {role} LOGIN REPLICATION PASSWORD %s", (password,))
    yield role, password
    with contextlib.suppress(psycopg2.Error), pg_conn.cursor() as cur:
        cur.execute(f"DROP ROLE {role}")


def test_pinned_restart_lsn_names_the_held_transaction(
    pg_server: PostgresServer, pg_database: str, pg_conn, monitor_role: tuple[str, str],
) -> None:
    with pg_conn.cursor() as cur:
        cur.execute("CREATE TABLE items (id int PRIMARY KEY)")
        cur.execute("SELECT pg_create_logical_replication_slot(%s, 'test_decoding')", (SLOT,))
    held = pg_server.connect(pg_database, autocommit=False, application_name="nightly-batch")
    try:
        with held.cursor() as cur:
            cur.execute("INSERT INTO items VALUES (1)")  # takes an xid, then sits idle in transaction
            cur.execute("SELECT pg_backend_pid()")
            (held_pid,) = cur.fetchone()
        _write_wal(pg_server, 4)
        with pg_conn.cursor() as cur:
            cur.execute("CHECKPOINT")  # logs the running transactions, as a busy server does every 15 s
            cur.execute("SELECT pg_replication_slot_advance(%s, pg_current_wal_flush_lsn())", (SLOT,))
        replication = _replication(pg_server, pg_database)
        warn = _findings(replication, replace(OFF, pinned_warn_bytes=MIB, pinned_error_bytes=1024 * MIB))
        pinned = warn[core.PINNED_CHECK]
        assert pinned.level is Level.WARN, pinned
        assert f"PID {held_pid}" in pinned.summary and "application 'nightly-batch'" in pinned.summary
        assert "state idle in transaction" in pinned.summary and "user postgres" in pinned.summary
        assert "transaction started" in pinned.summary
        assert "pg_terminate_backend" in pinned.advice and "pg_monitor" not in pinned.advice
        assert pinned.metadata["restart_lag_bytes"] > 4 * MIB and pinned.metadata["sessions_holding_xid"] >= 1
        error = _findings(replication, replace(OFF, pinned_warn_bytes=MIB, pinned_error_bytes=2 * MIB))
        assert error[core.PINNED_CHECK].level is Level.ERROR

        # A role without pg_monitor is told what it cannot see, and still gets the pid and user.
        role, password = monitor_role
        limited = _findings(_replication(pg_server, pg_database, user=role, password=password),
                            replace(OFF, pinned_warn_bytes=MIB))[core.PINNED_CHECK]
        assert limited.level is Level.WARN and f"PID {held_pid}" in limited.summary
        assert "idle in transaction" not in limited.summary and "transaction started" not in limited.summary
        assert f"GRANT pg_monitor TO {role}" in limited.advice
    finally:
        held.rollback()
        held.close()
    # Once the transaction is over, the next running-transactions record lets restart_lsn move on.
    with pg_conn.cursor() as cur:
        cur.execute("CHECKPOINT")
        cur.execute("SELECT pg_replication_slot_advance(%s, pg_current_wal_flush_lsn())", (SLOT,))
    after = _findings(_replication(pg_server, pg_database), replace(OFF, pinned_warn_bytes=MIB))[core.PINNED_CHECK]
    assert after.level is Level.OK, after


def test_forgotten_prepared_transaction_is_named(pg_database: str) -> None:
    with PostgresServer(settings={"max_prepared_transactions": 5}) as server:
        db = server.create_database("prepared")
        with contextlib.closing(server.connect(db)) as conn, conn.cursor() as cur:
            cur.execute("CREATE TABLE items (id int PRIMARY KEY)")
            cur.execute("SELECT pg_create_logical_replication_slot(%s, 'test_decoding')", (SLOT,))
        xact = server.connect(db, autocommit=False)
        with xact.cursor() as cur:
            cur.execute("INSERT INTO items VALUES (1)")
            cur.execute("PREPARE TRANSACTION 'forgotten-42'")
        xact.close()
        _write_wal(server, 3)
        with contextlib.closing(server.connect(db)) as conn, conn.cursor() as cur:
            cur.execute("CHECKPOINT")
            cur.execute("SELECT pg_replication_slot_advance(%s, pg_current_wal_flush_lsn())", (SLOT,))
        pinned = _findings(_replication(server, db), replace(OFF, pinned_warn_bytes=MIB))[core.PINNED_CHECK]
        assert pinned.level is Level.WARN
        assert "prepared transaction 'forgotten-42'" in pinned.summary
        assert "ROLLBACK PREPARED 'forgotten-42'" in pinned.summary
        with contextlib.closing(server.connect(db)) as conn, conn.cursor() as cur:
            cur.execute("ROLLBACK PREPARED 'forgotten-42'")


# -- live: wal_status and safe_wal_size with max_slot_wal_keep_size --------------------------------------------

def test_wal_status_extended_then_safe_wal_size_small_then_lost() -> None:
    settings = {"max_wal_size": "32MB", "min_wal_size": "32MB", "max_slot_wal_keep_size": "128MB",
                "checkpoint_timeout": "1h"}
    with PostgresServer(settings=settings) as server:
        db = server.create_database("kept")
        with contextlib.closing(server.connect(db)) as conn, conn.cursor() as cur:
            cur.execute("SELECT pg_create_logical_replication_slot(%s, 'test_decoding')", (SLOT,))
        replication = _replication(server, db)
        t = replace(OFF, safe_wal_warn_fraction=0.5, safe_wal_error_fraction=0.3)

        status = _findings(replication, t)[core.WAL_STATUS_CHECK]
        assert status.level is Level.OK and status.metadata["wal_status"] == "reserved"
        assert status.metadata["max_slot_wal_keep_size_bytes"] == 128 * MIB

        _write_wal(server, 64)  # past max_wal_size: the slot alone keeps it
        status = _findings(replication, t)[core.WAL_STATUS_CHECK]
        assert status.metadata["wal_status"] == "extended" and status.level is Level.WARN, status
        assert "wal_status is extended" in status.summary

        _write_wal(server, 40)  # close to max_slot_wal_keep_size: safe_wal_size gets small
        status = _findings(replication, t)[core.WAL_STATUS_CHECK]
        assert status.level is Level.ERROR, status
        assert 0 <= status.metadata["safe_wal_fraction"] < 0.3
        assert "before PostgreSQL invalidates the slot" in status.summary and "max_slot_wal_keep_size" in status.advice

        _write_wal(server, 60)
        with contextlib.closing(server.connect(db)) as conn, conn.cursor() as cur:
            cur.execute("CHECKPOINT")  # removes the WAL: the slot is invalidated
        findings = _findings(replication, t)
        assert {f.level for f in findings.values()} == {Level.ERROR}
        status = findings[core.WAL_STATUS_CHECK]
        assert status.metadata["wal_status"] == "lost" and "invalidated" in status.summary
        assert "Recreate the slot" in status.advice and "re-snapshot" in status.advice


# -- live: freshness, through Dagster ---------------------------------------------------------------------------

def _stack_env(server: PostgresServer, db: str) -> dict[str, str]:
    return {"PG2K_PG_HOST": server.host, "PG2K_PG_PORT": str(server.port), "PG2K_PG_DBNAME": db,
            "PG2K_PG_USER": "postgres", "PG2K_SLOT_NAME": SLOT, "PG2K_MESSAGE_FORMATTER": "JSON"}


def _run_health(env: dict[str, str], instance: object) -> dict[str, object]:
    defs = build_definitions(env)
    result = defs.get_job_def(HEALTH_JOB).execute_in_process(
        instance=instance, raise_on_error=False,
        run_config={"loggers": {"console": {"config": {"log_level": "ERROR"}}}})
    assert result.success, [e.message for e in result.all_events if e.is_failure]
    return {e.check_name: e for e in result.get_asset_check_evaluations()}


def test_health_job_reports_a_stopped_replication(
    pg_server: PostgresServer, pg_database: str, pg_conn, moto_server, kinesis_stream: str,
) -> None:
    """Freshness: changes pending and no recent checkpoint. The checks run on their own job, in Dagster."""
    env = {**_stack_env(pg_server, pg_database), "PG2K_STREAM_NAME": kinesis_stream,
           "PG2K_KINESIS_ENDPOINT_URL": moto_server.endpoint_url, "PG2K_CREATE_SLOT": "1"}
    defs = build_definitions(env)
    schedule = defs.get_schedule_def(HEALTH_SCHEDULE)
    assert schedule.cron_schedule == "* * * * *" and schedule.default_status.value == "RUNNING"
    with pg_conn.cursor() as cur:
        cur.execute("CREATE TABLE items (id int PRIMARY KEY)")
    with instance_for_test() as instance:
        assert defs.get_job_def("replicate").execute_in_process(instance=instance).success  # a checkpoint
        quick = {**env, "PG2K_FRESHNESS_WARN_MINUTES": "0.0001", "PG2K_FRESHNESS_ERROR_MINUTES": "1000"}
        evaluations = _run_health(quick, instance)
        assert set(evaluations) == set(core.CHECK_NAMES)
        assert evaluations[core.FRESHNESS_CHECK].passed, "nothing pending: fresh however old the checkpoint"
        assert all(e.passed for e in evaluations.values())

        with pg_conn.cursor() as cur:
            cur.execute("INSERT INTO items VALUES (1)")  # replication "stopped": nobody runs replicate
        fresh = _run_health(quick, instance)[core.FRESHNESS_CHECK]
        assert not fresh.passed and fresh.severity == AssetCheckSeverity.WARN
        assert fresh.metadata["pending"].value is True
        assert fresh.metadata["minutes_since_checkpoint"].value >= 0
        assert "not moving" in fresh.description
        error = _run_health({**quick, "PG2K_FRESHNESS_ERROR_MINUTES": "0.0002"}, instance)[core.FRESHNESS_CHECK]
        assert not error.passed and error.severity == AssetCheckSeverity.ERROR
        assert "replicate runs" in error.metadata["what_to_do"].value

        # Replication catches up: fresh again (a checkpoint seconds old; an autovacuum transaction since may be
        # pending already, which a real threshold of minutes lets the next run take).
        assert defs.get_job_def("replicate").execute_in_process(instance=instance).success
        assert _run_health({**quick, "PG2K_FRESHNESS_WARN_MINUTES": "1"}, instance)[core.FRESHNESS_CHECK].passed


def test_pending_is_unknown_while_another_backend_reads_the_slot(
    pg_server: PostgresServer, pg_database: str, pg_conn,
) -> None:
    with pg_conn.cursor() as cur:
        cur.execute("SELECT pg_create_logical_replication_slot(%s, 'test_decoding')", (SLOT,))
    settings = PostgresSettings(host=pg_server.host, port=pg_server.port, dbname=pg_database, user="postgres")
    assert read_slot_health(settings, SLOT).pending is False
    # A streaming client (pg_recvlogical, a subscriber, another run) holds the slot.
    reader = pg_server.connect(pg_database, connection_factory=psycopg2.extras.LogicalReplicationConnection)
    try:
        with reader.cursor() as cur:
            cur.start_replication(slot_name=SLOT, decode=True)
            deadline = time.monotonic() + 30
            while (health := read_slot_health(settings, SLOT)).active_pid is None:
                assert time.monotonic() < deadline, "the streaming client never became active"
                time.sleep(0.1)
            assert health.pending is None
    finally:
        reader.close()
