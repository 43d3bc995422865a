"""The benchmark harness for the Dagster path: a real dagster-daemon on the local stack, and its measurements."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pg2kinesis_dagster.devstack.daemon import (
    FINISHED,
    DagsterDaemon,
    PeakRssPoller,
    code_location_env,
    group_pids,
    measure_home,
    process_alive,
    wait_for,
)
from pg2kinesis_dagster.devstack.moto import MotoServer
from pg2kinesis_dagster.devstack.postgres import PostgresServer
from pg2kinesis_dagster.devstack.workload import create_sample_schema, run_sample_workload
from tests.helpers import assert_matches_ledger, read_json

SLOT = "daemon_slot"
RUN_ID = "0c6e9a4c-6f0c-4a53-9d0e-1b2c3d4e5f60"


def test_wait_for_returns_the_value_or_times_out() -> None:
    calls = iter([None, 0, "ready"])
    assert wait_for(lambda: next(calls), 5, "a value", interval=0.01) == "ready"
    started = time.monotonic()
    with pytest.raises(TimeoutError, match="waiting for never"):
        wait_for(lambda: False, 0.2, "never", interval=0.01)
    assert time.monotonic() - started < 5


def _event_log(path: Path, rows: list[tuple[str, str]]) -> int:
    """A SQLite file with an event_logs table like Dagster's; returns its size."""
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE event_logs (id INTEGER PRIMARY KEY, run_id TEXT, event TEXT)")
    conn.executemany("INSERT INTO event_logs (run_id, event) VALUES (?, ?)", rows)
    conn.commit()
    conn.close()
    return path.stat().st_size


def test_measure_home_splits_a_dagster_home_by_part_and_run(tmp_path: Path) -> None:
    runs = tmp_path / "history" / "runs"
    runs.mkdir(parents=True)
    (tmp_path / "history" / "runs.db").write_bytes(b"r" * 1000)
    shard_size = _event_log(runs / f"{RUN_ID}.db", [(RUN_ID, "a" * 1000), (RUN_ID, "b" * 500), (RUN_ID, "c")])
    (runs / ".db").write_bytes(b"n" * 50)
    index_size = _event_log(runs / "index.db", [(RUN_ID, "x" * 100), (RUN_ID, "y" * 23), ("", "z" * 7)])
    (tmp_path / "storage" / RUN_ID / "publish").mkdir(parents=True)
    (tmp_path / "storage" / RUN_ID / "publish" / "result").write_bytes(b"p" * 700)
    (tmp_path / "storage" / RUN_ID / "compute_logs").mkdir()
    (tmp_path / "storage" / RUN_ID / "compute_logs" / "abc.err").write_bytes(b"l" * 40)
    (tmp_path / "schedules").mkdir()
    (tmp_path / "schedules" / "schedules.db").write_bytes(b"s" * 300)

    usage = measure_home(tmp_path)

    assert set(usage.per_run) == {RUN_ID}
    run = usage.per_run[RUN_ID]
    assert (run.event_log_bytes, run.event_rows, run.event_content_bytes) == (shard_size, 3, 1501)
    assert (run.index_events, run.index_event_bytes) == (2, 123)
    assert (run.storage_bytes, run.compute_log_bytes, run.io_manager_bytes) == (740, 40, 700)
    assert run.event_bytes == shard_size + 123
    assert usage.runs_db_bytes == 1000
    assert usage.runless_event_log_bytes == 50
    assert usage.schedules_bytes == 300
    assert usage.storage_bytes == 740
    assert usage.index_db_bytes == index_size
    assert usage.history_bytes == 1000 + shard_size + 50 + index_size
    assert usage.total_bytes == usage.history_bytes + usage.storage_bytes + usage.schedules_bytes


def test_peak_rss_poller_sees_a_child_allocation_until_it_exits() -> None:
    code = "import time; b = bytearray(200 * 2**20); b[::4096] = b'x' * len(b[::4096]); time.sleep(0.5)"
    proc = subprocess.Popen([sys.executable, "-c", code])
    poller = PeakRssPoller(proc.pid, interval=0.02).start()
    proc.wait(timeout=60)
    peak = poller.join(10)
    assert peak is not None and peak >= 200 * 1024, peak
    assert poller.samples >= 2
    assert not process_alive(proc.pid)


def test_a_sensor_launched_run_under_a_real_daemon_delivers_everything(
    pg_server: PostgresServer, pg_database: str, pg_conn, moto_server: MotoServer, kinesis_stream: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    create_sample_schema(pg_conn)
    with pg_conn.cursor() as cur:
        cur.execute("SELECT pg_create_logical_replication_slot(%s, 'test_decoding')", (SLOT,))
    ledger = run_sample_workload(pg_conn, transactions=20, seed=5)
    expected = sum(1 for _ in ledger.changes())
    env = code_location_env(pg_server, pg_database, moto_server, slot=SLOT, stream=kinesis_stream,
                            PG2K_MESSAGE_FORMATTER="JSON", PG2K_SENSOR_RUNNING="1",
                            PG2K_SENSOR_INTERVAL_SECONDS="1")
    monkeypatch.setenv("PG2K_SLOT_NAME", "leaked_from_the_caller")  # must not reach the daemon
    daemon = DagsterDaemon(env)
    with daemon:
        try:
            home = daemon.home
            assert (home / "dagster.yaml").read_text() == (Path(__file__).parents[1] / "dagster.yaml").read_text()
            assert daemon.process_env()["PG2K_SLOT_NAME"] == SLOT
            daemon.wait_until_ready(timeout=120)

            # Only replicate runs: the code location's schedules may start other jobs meanwhile.
            run = wait_for(lambda: daemon.runs("replicate"), 120, "the sensor's first run", interval=0.1)[0]
            run_id = run.dagster_run.run_id
            worker = daemon.wait_run_worker(run_id, timeout=120)
            assert worker not in (daemon.pid, os.getpid())
            assert os.getpgid(worker) == daemon.pid  # started by the daemon's code server, in its group
            peak = PeakRssPoller(worker).start().join(120)
            assert peak is not None and peak > 20 * 1024  # a Python process with Dagster loaded

            wait_for(lambda: len(read_json(moto_server, kinesis_stream)) >= expected, 120, "every change in Kinesis")
            wait_for(lambda: daemon.runs("replicate", statuses=FINISHED) and not daemon.in_flight("replicate"), 60,
                     "the runs to end")
            assert {r.dagster_run.status.value for r in daemon.runs("replicate")} == {"SUCCESS"}
            assert any(run_id in (t.run_ids or []) for t in daemon.sensor_ticks("replication_sensor"))
            usage = measure_home(home)
            assert usage.per_run[run_id].event_log_bytes > usage.per_run[run_id].event_content_bytes > 0
            assert usage.per_run[run_id].event_rows > 5  # at least the run's start, steps and end
            assert usage.total_bytes >= usage.storage_bytes + usage.history_bytes
            pgid = daemon.pid
        except (AssertionError, TimeoutError) as exc:
            raise AssertionError(f"{exc}\n{daemon.describe()}") from exc
    # The daemon, its code server and run workers are all gone (SIGKILLed ones may take a moment).
    wait_for(lambda: group_pids(pgid) == [], 10, "the daemon's process group to be empty")
    assert not home.exists()  # a temporary DAGSTER_HOME is removed
    assert_matches_ledger(read_json(moto_server, kinesis_stream), ledger)
