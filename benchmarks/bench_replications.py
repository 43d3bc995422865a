"""Several replications in one code location under one dagster-daemon: total throughput against one alone.

    python benchmarks/bench_replications.py                       # 1 vs 4 replications, 300 transactions each
    python benchmarks/bench_replications.py --replications 4 --transactions 1000 --max-changes 2000

Each scenario gets a fresh daemon (dev dagster.yaml: SQLite, the per-slot run limit) and its own databases on
one throwaway PostgreSQL server, every backlog committed before the daemon starts; Kinesis is moto behind the
latency proxy (20-30 ms a request, as from inside an AWS region). The clock runs from the daemon's first sensor
heartbeat until every slot's confirmed position reached the WAL position after its backlog. Both scenarios run
in one invocation, side by side: compare the ratio, not the absolute numbers (the machine is shared).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pg2kinesis_dagster.devstack.daemon import FAKE_AWS_ENV, DagsterDaemon, wait_for
from pg2kinesis_dagster.devstack.latency import LatencyProxy
from pg2kinesis_dagster.devstack.moto import MotoServer
from pg2kinesis_dagster.devstack.postgres import PostgresServer
from pg2kinesis_dagster.devstack.replications import (
    current_lsn,
    drained,
    drop_replications,
    prepare_replications,
    write_config,
)


def scenario(pg: PostgresServer, moto: MotoServer, proxy_url: str, count: int, args: argparse.Namespace,
             prefix: str) -> dict[str, float]:
    prepared = prepare_replications(pg, moto, count, transactions=args.transactions, prefix=prefix, seed=1)
    targets = {r.name: current_lsn(pg, r.dbname) for r in prepared}
    changes = sum(r.expected for r in prepared)
    try:
        with tempfile.TemporaryDirectory(prefix="pg2k-bench-replications-") as folder:
            config = write_config(
                Path(folder) / "pg2kinesis.yaml", pg, moto, prepared, endpoint_url=proxy_url,
                message_formatter="JSON", sensor_running=True, sensor_interval_seconds=1,
                max_changes=args.max_changes, health_running=False, key_metadata_running=False,
                alerts_running=False,
            )
            with DagsterDaemon({"PG2K_CONFIG": str(config), **FAKE_AWS_ENV}) as daemon:
                daemon.wait_until_ready(timeout=300)
                started = time.monotonic()
                wait_for(lambda: all(drained(pg, r, targets[r.name]) for r in prepared), args.timeout,
                         f"{count} replication(s) to drain", interval=0.5)
                seconds = time.monotonic() - started
                runs = len(daemon.runs())
    finally:
        drop_replications(pg, prepared)
    return {"replications": count, "changes": changes, "seconds": round(seconds, 2),
            "changes_per_second": round(changes / seconds), "runs": runs}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--replications", type=int, default=4)
    parser.add_argument("--transactions", type=int, default=300, help="backlog of each replication")
    parser.add_argument("--max-changes", type=int, default=500, help="window budget (rows) of each run")
    parser.add_argument("--timeout", type=float, default=1800)
    args = parser.parse_args()
    with PostgresServer() as pg, MotoServer(fast=True) as moto, LatencyProxy(moto.endpoint_url) as proxy:
        one = scenario(pg, moto, proxy.endpoint_url, 1, args, "one")
        print(f"one replication: {json.dumps(one)}", file=sys.stderr)
        many = scenario(pg, moto, proxy.endpoint_url, args.replications, args, "many")
    print(json.dumps({"one": one, "many": many,
                      "throughput_ratio": round(many["changes_per_second"] / one["changes_per_second"], 2)},
                     indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
