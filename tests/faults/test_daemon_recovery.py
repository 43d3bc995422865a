"""A run worker SIGKILLed in the middle of a sensor-launched run, under a real dagster-daemon: the run
would stay STARTED forever and hold the slot's queue; the sensor marks it failed and replication resumes
by itself, nothing lost."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest
from dagster import DagsterEventType, DagsterRunStatus

from pg2kinesis_dagster.core.changes import parse_lsn
from pg2kinesis_dagster.devstack.daemon import DagsterDaemon, code_location_env, wait_for
from pg2kinesis_dagster.devstack.moto import MotoServer
from pg2kinesis_dagster.devstack.postgres import PostgresServer
from tests.faults.harness import LONG, report_line
from tests.helpers import confirmed_flush, read_json

SLOT = "recovery_slot"
ROWS = 15_000
# The bound: replication resumes by itself within two minutes of the kill.
RESUME_WITHIN_SECONDS = 120


def parent_pid(pid: int) -> int:
    # /proc/<pid>/stat: "pid (comm) state ppid ..."; comm may hold spaces, so split after its ")".
    return int(Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[1])


@pytest.mark.parametrize(
    ("kill_code_server", "marked_by"),
    [
        # The worker alone: Dagster's code server sees its child die and fails the run itself (about 1.5
        # minutes, so in the long profile only: the case below is the one our sensor must handle).
        pytest.param(False, ("marked as failed from outside", "PostgreSQL session has been gone"),
                     marks=pytest.mark.skipif(not LONG, reason="PG2K_FAULTS_PROFILE=long (make faults)")),
        # The worker and the code server that started it, as when their machine is lost: nobody is left to
        # report, the run stays STARTED, and the replication sensor must notice.
        (True, ("PostgreSQL session has been gone",)),
    ],
    ids=["worker", "worker-and-code-server"],
)
def test_a_killed_run_worker_is_failed_and_replication_resumes(
    pg_server: PostgresServer, pg_database: str, pg_conn, moto_server: MotoServer, kinesis_stream: str,
    kill_code_server: bool, marked_by: tuple[str, ...],
) -> None:
    with pg_conn.cursor() as cur:
        cur.execute("CREATE TABLE items (id int PRIMARY KEY, body text)")
        cur.execute("SELECT pg_create_logical_replication_slot(%s, 'test_decoding')", (SLOT,))
        start = parse_lsn(confirmed_flush(pg_server, pg_database, SLOT) or "0/0")
        for first in range(1, ROWS + 1, 1000):
            cur.execute("INSERT INTO items SELECT i, 'row ' || i FROM generate_series(%s, %s) i",
                        (first, first + 999))
        cur.execute("SELECT pg_current_wal_flush_lsn()::text")
        end = parse_lsn(cur.fetchone()[0])
    # Plain records in small chunks: the run publishes for a while, checkpointing as it goes.
    env = code_location_env(pg_server, pg_database, moto_server, slot=SLOT, stream=kinesis_stream,
                            PG2K_MESSAGE_FORMATTER="JSON", PG2K_SENSOR_RUNNING="1", PG2K_CHUNK_CHANGES="500",
                            # Shorter than the defaults (45 s, 15 s): the same detection, sooner.
                            PG2K_DEAD_RUN_GRACE_SECONDS="15", PG2K_DEAD_RUN_AFTER_SECONDS="6")
    with DagsterDaemon(env) as daemon:
        try:
            daemon.wait_until_ready(timeout=120)
            first_run = wait_for(lambda: daemon.runs("replicate"), 120, "the sensor's first run")[-1]
            run_id = first_run.dagster_run.run_id
            worker = daemon.wait_run_worker(run_id, timeout=120)
            # Mid-publish: the slot has moved (a checkpoint) but the window is not done.
            wait_for(lambda: parse_lsn(confirmed_flush(pg_server, pg_database, SLOT) or "0/0") > start, 120,
                     "a first checkpoint")
            code_server = parent_pid(worker)
            os.kill(worker, signal.SIGKILL)
            if kill_code_server:
                os.kill(code_server, signal.SIGKILL)
            killed_at = time.monotonic()
            in_kinesis_at_kill = len(read_json(moto_server, kinesis_stream))
            assert in_kinesis_at_kill < ROWS, "the run had finished before the kill"

            def failed() -> bool:
                record = daemon.instance().get_run_record_by_id(run_id)
                return record is not None and record.dagster_run.status == DagsterRunStatus.FAILURE

            wait_for(failed, RESUME_WITHIN_SECONDS, "the killed run to be marked failed")
            failure = daemon.instance().all_logs(run_id, of_type=DagsterEventType.PIPELINE_FAILURE)
            message = failure[-1].dagster_event.message or ""
            assert any(text in message for text in marked_by), message
            others = lambda: [r for r in daemon.runs("replicate") if r.dagster_run.run_id != run_id]  # noqa: E731
            wait_for(others, RESUME_WITHIN_SECONDS - (time.monotonic() - killed_at), "the next run")
            resumed_after = time.monotonic() - killed_at
            wait_for(lambda: parse_lsn(confirmed_flush(pg_server, pg_database, SLOT) or "0/0") >= end
                     and len({r["id"] for r in read_json(moto_server, kinesis_stream)}) >= ROWS,
                     180, "the backlog to drain after the kill")
        except (AssertionError, TimeoutError) as exc:
            raise AssertionError(f"{exc}\n{daemon.describe()}") from exc
    records = read_json(moto_server, kinesis_stream)
    report_line("daemon_recovery", {
        "killed": "worker and code server" if kill_code_server else "worker", "rows": ROWS,
        "published_at_kill": in_kinesis_at_kill, "next_run_after_seconds": round(resumed_after, 1),
        "records": len(records), "duplicates": len(records) - len({r["id"] for r in records}),
    })
    assert resumed_after <= RESUME_WITHIN_SECONDS, resumed_after
    assert sorted({int(r["pk"]["id"]) for r in records}) == list(range(1, ROWS + 1)), "a change was lost"
    # Duplicates only from the chunk in flight at the kill (and the checkpoint that did not happen).
    assert len(records) - len({r["id"] for r in records}) <= 3 * 500
