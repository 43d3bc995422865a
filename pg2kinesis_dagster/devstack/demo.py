"""``make demo`` and ``make dev``: the local stack with the sample workload.

``python -m pg2kinesis_dagster.devstack.demo`` starts a throwaway PostgreSQL (wal_level=logical)
and moto's Kinesis server, creates the sample schema, a slot and a stream, commits a sample
workload, runs the ``replicate`` Dagster job until the slot is drained, prints what arrived in
Kinesis, and stops everything it started.

``... demo --dev`` leaves the stack running under ``dagster dev`` (sensor on), with a trickle of
new transactions so the sensor has something to do, until Ctrl-C.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import warnings
from collections import Counter
from collections.abc import Mapping
from pathlib import Path

from dagster import BetaWarning, DagsterInstance, instance_for_test

from pg2kinesis_dagster.defs import build_definitions
from pg2kinesis_dagster.devstack.moto import MotoServer
from pg2kinesis_dagster.devstack.postgres import PostgresServer
from pg2kinesis_dagster.devstack.workload import create_sample_schema, run_sample_workload

REPO_ROOT = Path(__file__).resolve().parents[2]
DEMO_DB = "demo"
DEMO_STREAM = "pg2kinesis-demo"
DEMO_SLOT = "pg2kinesis_demo"
# Dagster's console logger prints every event at DEBUG; the demo prints its own summary.
QUIET_LOGS = {"loggers": {"console": {"config": {"log_level": "WARNING"}}}}


def stack_env(pg: PostgresServer, moto: MotoServer, formatter: str) -> dict[str, str]:
    """The environment variables that point the code location at the local stack."""
    return {
        "PG2K_PG_HOST": pg.host,
        "PG2K_PG_PORT": str(pg.port),
        "PG2K_PG_DBNAME": DEMO_DB,
        "PG2K_PG_USER": "postgres",
        "PG2K_SLOT_NAME": DEMO_SLOT,
        "PG2K_STREAM_NAME": DEMO_STREAM,
        "PG2K_KINESIS_ENDPOINT_URL": moto.endpoint_url,
        "PG2K_AWS_REGION": moto.region,
        "PG2K_MESSAGE_FORMATTER": formatter,
        "PG2K_MAX_CHANGES": "2000",
        # moto accepts any credentials; these fake ones keep boto3 away from real AWS.
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_EC2_METADATA_DISABLED": "true",
    }


def prepare(pg: PostgresServer, moto: MotoServer, transactions: int) -> int:
    pg.create_database(DEMO_DB)
    conn = pg.connect(DEMO_DB)
    try:
        create_sample_schema(conn)
        with conn.cursor() as cur:
            cur.execute("SELECT pg_create_logical_replication_slot(%s, 'test_decoding')", (DEMO_SLOT,))
        moto.create_stream(DEMO_STREAM, shards=2)
        ledger = run_sample_workload(conn, transactions=transactions, seed=42)
    finally:
        conn.close()
    return sum(len(t.changes) for t in ledger.transactions)


def run_until_drained(env: Mapping[str, str], instance: DagsterInstance, max_runs: int = 1000) -> int:
    defs = build_definitions(env)
    job = defs.get_job_def("replicate")
    runs = 0
    while runs < max_runs:
        result = job.execute_in_process(instance=instance, run_config=QUIET_LOGS)
        runs += 1
        peeked = result.output_for_node("peek_batch")
        if not peeked.limited:
            return runs
    raise RuntimeError(f"the slot was not drained after {max_runs} runs")


def print_stream(moto: MotoServer, committed: int) -> None:
    records = moto.read_stream(DEMO_STREAM)
    counts: Counter[tuple[str, str]] = Counter()
    for rec in records:
        change = json.loads(rec["data"])
        counts[(change["table"], change["op"])] += 1
    print(f"\n{len(records)} records arrived in Kinesis stream {DEMO_STREAM!r} "
          f"({committed} changes committed)\n")
    print(f"  {'table':<22} {'operation':<9} {'records':>7}")
    for (table, op), count in sorted(counts.items()):
        print(f"  {table:<22} {op:<9} {count:>7}")
    print("\nA few records (JSON format, one per change):")
    for rec in records[:3]:
        print(f"  shard {rec['shard_id']} key {rec['partition_key']!r}: {rec['data'].decode()}")


def demo(transactions: int) -> int:
    with PostgresServer() as pg, MotoServer() as moto:
        print(f"PostgreSQL {pg.host}:{pg.port} (wal_level=logical), moto Kinesis at {moto.endpoint_url}")
        committed = prepare(pg, moto, transactions)
        print(f"committed {transactions} transactions ({committed} row changes); running the replicate job")
        # boto3 reads the fake credentials from the process environment.
        os.environ.update(stack_env(pg, moto, "JSON"))
        with instance_for_test() as instance:
            runs = run_until_drained(os.environ, instance)
        print(f"{runs} replicate run(s) drained the slot")
        print_stream(moto, committed)
        records = len(moto.read_stream(DEMO_STREAM))
        if records != committed:
            print(f"ERROR: {committed} changes committed but {records} records arrived", file=sys.stderr)
            return 1
    print("\nstopped PostgreSQL and moto; done")
    return 0


def dev(port: int) -> int:
    with PostgresServer() as pg, MotoServer() as moto:
        prepare(pg, moto, transactions=50)
        home = Path(tempfile.mkdtemp(prefix="pg2k-dagster-home-"))
        shutil.copy(REPO_ROOT / "dagster.yaml", home / "dagster.yaml")
        env = {
            **os.environ,
            **stack_env(pg, moto, "JSON"),
            "PG2K_SENSOR_RUNNING": "1",
            "DAGSTER_HOME": str(home),
        }
        stop = threading.Event()

        def trickle() -> None:
            # A transaction every few seconds, so the sensor keeps finding work.
            conn = pg.connect(DEMO_DB)
            seed = 1000
            while not stop.wait(3.0):
                seed += 1
                run_sample_workload(conn, transactions=1, seed=seed)
            conn.close()

        threading.Thread(target=trickle, daemon=True).start()
        print(f"PostgreSQL {pg.host}:{pg.port} db {DEMO_DB!r}, slot {DEMO_SLOT!r}; "
              f"moto Kinesis {moto.endpoint_url}, stream {DEMO_STREAM!r}")
        print(f"Dagster UI: http://127.0.0.1:{port}  (Ctrl-C stops everything)", flush=True)
        proc = subprocess.Popen(
            [str(Path(sys.executable).with_name("dagster")), "dev", "-w", "workspace.yaml",
             "-h", "127.0.0.1", "-p", str(port)],
            cwd=REPO_ROOT, env=env, start_new_session=True,
        )
        try:
            return proc.wait()
        except KeyboardInterrupt:
            return 0
        finally:
            stop.set()
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGINT)
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
            shutil.rmtree(home, ignore_errors=True)


def _exit_on_sigterm(signum: int, frame: object) -> None:
    # Unwind like Ctrl-C so every `with` stops what it started (PostgreSQL, moto, dagster dev).
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    warnings.filterwarnings("ignore", category=BetaWarning)
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dev", action="store_true", help="leave the stack running under dagster dev")
    parser.add_argument("--port", type=int, default=3000, help="dagster dev's port (with --dev)")
    parser.add_argument("--transactions", type=int, default=500, help="sample transactions to commit")
    args = parser.parse_args(argv)
    return dev(args.port) if args.dev else demo(args.transactions)


if __name__ == "__main__":
    sys.exit(main())
