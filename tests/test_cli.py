"""`pg2k` as a user runs it: a real process against the throwaway PostgreSQL and the moto server."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from pg2kinesis_dagster.devstack.moto import MotoServer
from pg2kinesis_dagster.devstack.postgres import PostgresServer
from pg2kinesis_dagster.devstack.workload import create_sample_schema, run_sample_workload
from tests.helpers import assert_matches_ledger, confirmed_flush, read_json

PG2K = [str(Path(sys.executable).with_name("pg2k"))]
PG2KINESIS_FLAGS = [
    "--pg-dbname", "--pg-host", "--pg-port", "--pg-user", "--pg-sslmode", "--pg-slot-name",
    "--pg-slot-output-plugin", "--stream-name", "--message-formatter", "--table-pat", "--full-change",
    "--create-slot", "--recreate-slot", "--operations", "--once",
]


def run_pg2k(args: list[str], env_extra: dict[str, str] | None = None, timeout: float = 120
             ) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, **(env_extra or {})}
    return subprocess.run(PG2K + args, capture_output=True, text=True, timeout=timeout, env=env, check=False)


def stack_args(server: PostgresServer, db: str, moto: MotoServer, stream: str) -> list[str]:
    return ["--pg-host", server.host, "--pg-port", str(server.port), "--pg-dbname", db, "--pg-user", "postgres",
            "--stream-name", stream, "--endpoint-url", moto.endpoint_url, "--aws-region", moto.region]


def test_help_lists_every_pg2kinesis_flag() -> None:
    out = run_pg2k(["--help"])
    assert out.returncode == 0
    for flag in PG2KINESIS_FLAGS:
        assert flag in out.stdout, flag
    alias = subprocess.run([str(Path(sys.executable).with_name("pg2kinesis")), "--help"], capture_output=True,
                           text=True, check=False)
    assert alias.returncode == 0 and "--pg-slot-name" in alias.stdout


def test_once_drains_and_exits_zero(pg_server: PostgresServer, pg_database: str, pg_conn,
                                    moto_server: MotoServer, kinesis_stream: str) -> None:
    create_sample_schema(pg_conn)
    args = stack_args(pg_server, pg_database, moto_server, kinesis_stream)
    created = run_pg2k([*args, "--create-slot", "--once"])
    assert created.returncode == 0, created.stderr
    ledger = run_sample_workload(pg_conn, transactions=80, seed=4)
    out = run_pg2k([*args, "--once", "--message-formatter", "JSON", "--max-changes", "100"])
    assert out.returncode == 0, out.stderr
    summary = json.loads(out.stdout.strip().splitlines()[-1])
    assert summary["changes"] == sum(1 for _ in ledger.changes()) and summary["windows"] > 1
    assert_matches_ledger(read_json(moto_server, kinesis_stream), ledger)
    assert confirmed_flush(pg_server, pg_database) is not None


def test_bad_input_exits_one_with_a_clear_message(pg_server: PostgresServer, pg_database: str,
                                                  moto_server: MotoServer, kinesis_stream: str) -> None:
    args = stack_args(pg_server, pg_database, moto_server, kinesis_stream)
    out = run_pg2k([*args, "--once", "--pg-slot-name", "missing_slot"])
    assert out.returncode == 1
    assert "pg2k: error: replication slot 'missing_slot' does not exist" in out.stderr
    assert "Traceback" not in out.stderr
    bad_format = run_pg2k([*args, "--once", "--message-formatter", "XML"])
    assert bad_format.returncode == 1 and "unknown message format 'XML'" in bad_format.stderr


def test_continuous_mode_stops_cleanly_on_sigterm(pg_server: PostgresServer, pg_database: str, pg_conn,
                                                  moto_server: MotoServer, kinesis_stream: str) -> None:
    import signal
    import time

    create_sample_schema(pg_conn)
    args = stack_args(pg_server, pg_database, moto_server, kinesis_stream)
    proc = subprocess.Popen([*PG2K, *args, "--create-slot", "--poll-interval", "0.2", "--message-formatter", "JSON"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        ledger = None
        deadline = time.monotonic() + 60
        # Wait (on a condition) until the slot exists, then commit a workload and wait until it arrived.
        while confirmed_flush(pg_server, pg_database) is None:
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read() if proc.stderr else ""
            time.sleep(0.1)
        ledger = run_sample_workload(pg_conn, transactions=30, seed=8)
        expected = sum(1 for _ in ledger.changes())
        while len(moto_server.read_stream(kinesis_stream)) < expected:
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    assert_matches_ledger(read_json(moto_server, kinesis_stream), ledger)
