"""The snapshot rate side by side with a plain ``COPY ... TO STDOUT`` of the same table.

    python benchmarks/bench_snapshot.py --rows 100000 --repeat 3

Starts a throwaway PostgreSQL (and moto's Kinesis server for the publish step), fills one keyed table of
``--rows`` rows (five columns: bigint key, integer, text, timestamptz, numeric), creates a slot, then measures,
interleaved ``--repeat`` times (best shown, the machine is noisy):

* ``COPY (SELECT * FROM bench ORDER BY id) TO STDOUT`` read to the end by psycopg2 (``copy_expert`` into a
  sink that drops the bytes): the floor of reading the table out of PostgreSQL in its text form;
* the snapshot (:class:`~pg2kinesis_dagster.postgres.snapshot.TableSnapshot`, in process): keyset chunks of
  ``--chunk-rows``, each between its two watermarks, rows queued in the slot's WAL;
* then, once: publishing the queued snapshot with the pipeline (``Replicator.drain``, JSON, aggregated) into
  moto, and the snapshot plus publish together.

Figures are rows per second of wall time.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import tempfile
import time

from pg2kinesis_dagster.devstack.moto import MotoServer
from pg2kinesis_dagster.devstack.postgres import PostgresServer
from pg2kinesis_dagster.kinesis.sink import KinesisSink, make_kinesis_client
from pg2kinesis_dagster.pipeline import ReplicationSettings, Replicator
from pg2kinesis_dagster.postgres.connection import PostgresSettings
from pg2kinesis_dagster.postgres.snapshot import DEFAULT_CHUNK_ROWS, TableSnapshot


class _Discard(io.RawIOBase):
    def __init__(self) -> None:
        self.bytes = 0

    def writable(self) -> bool:
        return True

    def write(self, data: bytes) -> int:  # type: ignore[override]
        self.bytes += len(data)
        return len(data)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--chunk-rows", type=int, default=DEFAULT_CHUNK_ROWS)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--no-publish", action="store_true", help="skip the publish step")
    args = parser.parse_args()
    # moto's fake credentials; never real AWS.
    os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_EC2_METADATA_DISABLED="true")
    with PostgresServer() as server, MotoServer() as moto, tempfile.TemporaryDirectory() as spool:
        db = server.create_database("bench")
        conn = server.connect(db)
        with conn.cursor() as cur:
            cur.execute("CREATE TABLE bench (id bigint PRIMARY KEY, qty int, label text, at timestamptz, "
                        "amount numeric(12,2))")
            cur.execute("INSERT INTO bench SELECT i, i %% 100, 'label ' || i, now(), i / 7.0 "
                        "FROM generate_series(1, %s) i", (args.rows,))
            cur.execute("VACUUM ANALYZE bench")
        settings = PostgresSettings(host=server.host, port=server.port, dbname=db, user="postgres")
        moto.create_stream("bench", shards=4)
        sink = KinesisSink(make_kinesis_client(region_name=moto.region, endpoint_url=moto.endpoint_url), "bench",
                           aggregate=True)
        replication = ReplicationSettings(slot_name="bench", create_slot=True, message_formatter="JSON",
                                          spool_dir=spool)
        copy_best = snap_best = float("inf")
        copy_bytes = 0
        with Replicator(settings, sink, replication) as replicator:
            replicator.prepare()
            for _ in range(args.repeat):
                started = time.perf_counter()
                out = _Discard()
                with conn.cursor() as cur:
                    cur.copy_expert("COPY (SELECT * FROM bench ORDER BY id) TO STDOUT", out)
                copy_best = min(copy_best, time.perf_counter() - started)
                copy_bytes = out.bytes
                started = time.perf_counter()
                progress = TableSnapshot(settings, "public.bench", slot_name="bench", chunk_rows=args.chunk_rows,
                                         state_dir=f"{spool}/.snapshots").run()
                snap_best = min(snap_best, time.perf_counter() - started)
                assert progress.rows == args.rows, progress
            # Every repetition queued the table once more: publish one repetition's worth per timing.
            publish_seconds = None
            if not args.no_publish:
                started = time.perf_counter()
                drained = replicator.drain()
                publish_seconds = (time.perf_counter() - started) / args.repeat
                assert drained.stats.published == args.rows * args.repeat, drained.stats
        result = {
            "rows": args.rows,
            "chunk_rows": args.chunk_rows,
            "copy_to_stdout_rows_per_s": round(args.rows / copy_best),
            "copy_bytes": copy_bytes,
            "snapshot_queued_rows_per_s": round(args.rows / snap_best),
            "snapshot_vs_copy": round(copy_best / snap_best, 3),
        }
        if publish_seconds is not None:
            result["publish_rows_per_s"] = round(args.rows / publish_seconds)
            result["snapshot_and_publish_rows_per_s"] = round(args.rows / (snap_best + publish_seconds))
        print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
