"""``pg2k snapshot``: queue the rows of tables into the slot, in order with the stream (core.snapshot).

Takes the same connection, slot and stream flags as ``pg2k``. Each ``--table`` is snapshotted in chunks
by primary key; the command exits 0 once every chunk is *queued in the slot*: the next ``pg2k --once``
(or ``pg2k``, or a Dagster run) publishes the rows in order with the tables' changes. With ``--publish``
it runs that drain itself and exits once the rows are published.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from dataclasses import replace

from pg2kinesis_dagster.core.errors import Pg2KinesisError
from pg2kinesis_dagster.pipeline import ReplicationSettings, Replicator
from pg2kinesis_dagster.postgres.connection import PostgresSettings, mask_passwords
from pg2kinesis_dagster.postgres.snapshot import (
    DEFAULT_CHUNK_BYTES,
    DEFAULT_CHUNK_ROWS,
    SnapshotProgress,
    TableSnapshot,
)

log = logging.getLogger("pg2kinesis.snapshot")


def build_snapshot_parser() -> argparse.ArgumentParser:
    from pg2kinesis_dagster.cli import build_parser

    parser = build_parser()
    parser.prog = "pg2k snapshot"
    parser.epilog = None
    parser.description = (
        "Snapshot tables into the replication slot: the rows that existed before the slot, in order with "
        "the stream. Each table is read in chunks by primary key, each chunk between two watermarks written "
        "into the WAL; the next replication run publishes them (op SNAPSHOT) after every older change of "
        "the same row and before every newer one. Exits 0 once every chunk is queued in the slot (with "
        "--publish: once published). The role needs SELECT on the tables. An interrupted snapshot resumes "
        "after its last finished chunk."
    )
    group = parser.add_argument_group("Snapshot")
    group.add_argument("--table", action="append", required=True, metavar="SCHEMA.TABLE",
                       help="a table to snapshot (repeatable; schema public when omitted)")
    group.add_argument("--snapshot-chunk-rows", type=int, default=DEFAULT_CHUNK_ROWS,
                       help="rows per chunk (one short transaction and two WAL messages each)")
    group.add_argument("--snapshot-chunk-bytes", type=int, default=DEFAULT_CHUNK_BYTES,
                       help="at most this many bytes of rows per chunk")
    group.add_argument("--snapshot-state-dir", default=None,
                       help="where each table's progress is kept for a resume (default: <spool dir>/.snapshots)")
    group.add_argument("--restart", action="store_true",
                       help="start over from each table's first key instead of resuming an interrupted snapshot")
    group.add_argument("--publish", action="store_true",
                       help="then publish what is pending on the slot (as pg2k --once) and exit once published")
    return parser


def snapshot_main(argv: Sequence[str]) -> int:
    from pg2kinesis_dagster.cli import settings_from_args

    args = build_snapshot_parser().parse_args(list(argv))
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    pg: PostgresSettings | None = None
    try:
        pg, replication = settings_from_args(args)
        state_dir = args.snapshot_state_dir
        if state_dir is None and replication.spool_dir:
            state_dir = f"{replication.spool_dir}/.snapshots"
        if replication.create_slot or replication.recreate_slot:
            with _replicator(args, pg, replication) as replicator:
                replicator.prepare()  # the slot (and pgoutput's publication) before any chunk
        results: list[dict[str, object]] = []
        for table in args.table:
            snapshot = TableSnapshot(pg, table, slot_name=replication.slot_name,
                                     chunk_rows=args.snapshot_chunk_rows, chunk_bytes=args.snapshot_chunk_bytes,
                                     state_dir=state_dir, publication=replication.publication)
            if args.restart:
                snapshot.reset()
            progress = snapshot.run(on_chunk=_log_chunk if args.verbose else None)
            results.append(progress.summary())
        summary: dict[str, object] = {"tables": results}
        if args.publish:
            with _replicator(args, pg, replace(replication, create_slot=False, recreate_slot=False)) as replicator:
                drained = replicator.drain()
            summary["published"] = {"windows": drained.windows, "changes": drained.stats.changes,
                                    "records": drained.stats.published}
        print(json.dumps(summary))
        return 0
    except Pg2KinesisError as exc:
        text = pg.mask(str(exc)) if pg is not None else mask_passwords(str(exc))
        print(f"pg2k snapshot: error: {text}", file=sys.stderr)
        return 1


def _replicator(args: argparse.Namespace, pg: PostgresSettings, replication: ReplicationSettings) -> Replicator:
    from pg2kinesis_dagster.kinesis.sink import KinesisSink, make_kinesis_client

    client = make_kinesis_client(region_name=args.aws_region, endpoint_url=args.endpoint_url,
                                 profile_name=args.aws_profile)
    sink = KinesisSink(client, args.stream_name, max_retry_seconds=args.max_retry_seconds, aggregate=args.aggregate)
    return Replicator(pg, sink, replication)


def _log_chunk(progress: SnapshotProgress) -> None:
    log.info("snapshot %s: chunk %d, %d rows, %.0f rows/s", progress.table, progress.chunks, progress.rows,
             progress.rows_per_second)
