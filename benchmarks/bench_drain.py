"""Drain a generated backlog with `pg2k --once` and compare with a bare slot fetch.

    python benchmarks/bench_drain.py --changes 200000

Starts a throwaway PostgreSQL and moto's Kinesis server, commits ``--changes`` row changes
(inserts and updates over a keyed table, in transactions of ``--txn-size`` rows), then measures:

* bare fetch: ``pg_logical_slot_peek_changes`` of the whole backlog into Python (psycopg2), the
  floor any test_decoding-based tool pays;
* pipeline without the network: peek + decode + format (through the spool) + request planning;
* ``pg2k --once --aggregate`` (``--plain``: without aggregation) end to end into the moto server
  (a separate process: its peak RSS is reported).

Numbers depend on the machine; moto's server is far slower than Kinesis itself, so the end-to-end
figure is a floor for what the tool does against AWS.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

from pg2kinesis_dagster.core.batching import plan_batch
from pg2kinesis_dagster.core.window import FormattedWindow, PublishedWindow, PutTotals
from pg2kinesis_dagster.devstack.moto import MotoServer
from pg2kinesis_dagster.devstack.postgres import PostgresServer
from pg2kinesis_dagster.kinesis.sink import KinesisSink, make_kinesis_client
from pg2kinesis_dagster.pipeline import ReplicationSettings, Replicator
from pg2kinesis_dagster.postgres.connection import PostgresSettings

SLOT = "bench"
# A second slot on the same backlog, drained (and advanced) by the run without network.
LOCAL_SLOT = "bench_local"
STREAM = "bench"


def generate_backlog(conn, changes: int, txn_size: int) -> None:
    with conn.cursor() as cur:
        cur.execute(
            "CREATE TABLE bench (id bigint PRIMARY KEY, qty int, label text, updated_at timestamptz)"
        )
        for slot in (SLOT, LOCAL_SLOT):
            cur.execute("SELECT pg_create_logical_replication_slot(%s, 'test_decoding')", (slot,))
        inserts = changes * 3 // 4
        done = 0
        while done < inserts:
            n = min(txn_size, inserts - done)
            cur.execute(
                "INSERT INTO bench SELECT i, i %% 100, 'label ' || i, now() FROM generate_series(%s, %s) i",
                (done + 1, done + n),
            )
            done += n
        updates = changes - inserts
        done = 0
        while done < updates:
            n = min(txn_size, updates - done)
            cur.execute("UPDATE bench SET qty = qty + 1 WHERE id BETWEEN %s AND %s", (done + 1, done + n))
            done += n


def bare_fetch(pg: PostgresServer, db: str) -> tuple[int, float]:
    conn = pg.connect(db)
    try:
        started = time.perf_counter()
        with conn.cursor() as cur:
            cur.execute(
                "SELECT lsn::text, xid::text, data FROM pg_logical_slot_peek_changes(%s, NULL, NULL, "
                "'include-xids', '1', 'include-timestamp', '1')",
                (SLOT,),
            )
            rows = cur.fetchall()
        return len(rows), time.perf_counter() - started
    finally:
        conn.close()


def pipeline_without_network(pg: PostgresServer, db: str, moto: MotoServer) -> tuple[int, float]:
    settings = PostgresSettings(host=pg.host, port=pg.port, dbname=db, user="postgres")
    sink = KinesisSink(make_kinesis_client(region_name=moto.region, endpoint_url=moto.endpoint_url), STREAM)
    replicator = Replicator(settings, sink, ReplicationSettings(slot_name=LOCAL_SLOT))
    changes = 0
    started = time.perf_counter()
    with replicator:
        replicator.prepare()
        upto = replicator.slot.current_wal_lsn()
        while True:
            window = replicator.peek(upto)
            formatted = replicator.format(window)
            spool = replicator.spool.window(replicator.spool_key, window.window_id)
            for info in FormattedWindow.from_dict(spool.records_manifest() or {}).chunks:
                for _ in plan_batch(spool.read_record_chunk(info.index).records):
                    pass
            # Stands in for publish: the window counts as acknowledged, so the slot moves on.
            replicator.finish(PublishedWindow(formatted, PutTotals(), None))
            changes += formatted.stats.changes
            if not window.limited:
                break
    return changes, time.perf_counter() - started


def main() -> int:
    # A killed benchmark must still stop its PostgreSQL and moto servers.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(1))
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--changes", type=int, default=200_000)
    parser.add_argument("--txn-size", type=int, default=1000)
    parser.add_argument("--shards", type=int, default=8)
    parser.add_argument("--formatter", default="CSVPayload")
    parser.add_argument("--plain", action="store_true", help="plain records instead of KPL aggregation")
    args = parser.parse_args()
    os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_EC2_METADATA_DISABLED="true")

    with PostgresServer() as pg, MotoServer() as moto:
        db = pg.create_database("bench")
        conn = pg.connect(db)
        t0 = time.perf_counter()
        generate_backlog(conn, args.changes, args.txn_size)
        conn.close()
        print(f"backlog: {args.changes} changes in transactions of {args.txn_size} "
              f"({time.perf_counter() - t0:.1f}s to generate)")
        moto.create_stream(STREAM, shards=args.shards)

        rows, seconds = bare_fetch(pg, db)
        print(f"bare pg_logical_slot_peek_changes fetch: {rows} rows in {seconds:.2f}s = {rows / seconds:,.0f} rows/s")

        changes, seconds = pipeline_without_network(pg, db, moto)
        print(f"pipeline without network (peek+decode+format+plan): {changes} changes in {seconds:.2f}s "
              f"= {changes / seconds:,.0f} changes/s")

        pg2k = str(Path(sys.executable).with_name("pg2k"))
        command = [pg2k, "--once", "--pg-host", pg.host, "--pg-port", str(pg.port), "--pg-dbname", db,
                   "--pg-user", "postgres", "--pg-slot-name", SLOT, "--stream-name", STREAM,
                   "--endpoint-url", moto.endpoint_url, "--aws-region", moto.region,
                   "--message-formatter", args.formatter, *([] if args.plain else ["--aggregate"])]
        # GNU time reports pg2k's own peak RSS; RUSAGE_CHILDREN would also count every other waited-for child.
        timer = ["/usr/bin/time", "-f", "PEAK_RSS_KB=%M"] if Path("/usr/bin/time").exists() else []
        started = time.perf_counter()
        out = subprocess.run(timer + command, capture_output=True, text=True, check=False)
        wall = time.perf_counter() - started
        if out.returncode != 0:
            print(out.stderr, file=sys.stderr)
            return 1
        summary = json.loads(out.stdout.strip().splitlines()[-1])
        peaks = [int(line.split("=", 1)[1]) for line in out.stderr.splitlines() if line.startswith("PEAK_RSS_KB=")]
        peak_mib = (peaks[-1] if peaks else resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss) / 1024
        mode = "plain" if args.plain else "aggregated"
        print(f"pg2k --once into moto ({args.shards} shards, {args.formatter}, {mode}): "
              f"{summary['changes']} changes in {wall:.2f}s wall = {summary['changes'] / wall:,.0f} changes/s; "
              f"peak RSS {peak_mib:.0f} MiB")
        print(f"Kinesis records in the stream: {len(moto.read_stream(STREAM))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
