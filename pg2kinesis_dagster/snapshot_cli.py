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
import os
import sys
from collections.abc import Sequence

from pg2kinesis_dagster.core import config
from pg2kinesis_dagster.core.errors import Pg2KinesisError
from pg2kinesis_dagster.postgres.connection import PostgresSettings, mask_passwords
from pg2kinesis_dagster.postgres.snapshot import SnapshotProgress, TableSnapshot

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
    # The model's snapshot settings (chunk rows and bytes, state folder), then this command's own.
    group = config.add_arguments(parser, ("snapshot",), env=os.environ)["snapshot"]
    group.add_argument("--table", action="append", required=True, metavar="SCHEMA.TABLE",
                       help="a table to snapshot (repeatable; schema public when omitted)")
    group.add_argument("--restart", action="store_true",
                       help="start over from each table's first key instead of resuming an interrupted snapshot")
    group.add_argument("--publish", action="store_true",
                       help="then publish what is pending on the slot (as pg2k --once) and exit once published")
    return parser


def snapshot_main(argv: Sequence[str]) -> int:
    from pg2kinesis_dagster.cli import config_from_args, replicator_for

    args = build_snapshot_parser().parse_args(list(argv))
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    pg: PostgresSettings | None = None
    try:
        model = config_from_args(args)
        pg = PostgresSettings(**model.postgres_fields())
        if model.create_slot or model.recreate_slot:
            with replicator_for(model) as replicator:
                replicator.prepare()  # the slot (and pgoutput's publication) before any chunk
        results: list[dict[str, object]] = []
        for table in args.table:
            snapshot = TableSnapshot(pg, table, slot_name=model.slot_name, chunk_rows=model.snapshot_chunk_rows,
                                     chunk_bytes=model.snapshot_chunk_bytes, state_dir=model.snapshot_state_folder(),
                                     publication=model.publication)
            if args.restart:
                snapshot.reset()
            progress = snapshot.run(on_chunk=_log_chunk if args.verbose else None)
            results.append(progress.summary())
        summary: dict[str, object] = {"tables": results}
        if args.publish:
            with replicator_for(model, create_slot=False, recreate_slot=False) as replicator:
                drained = replicator.drain()
            summary["published"] = {"windows": drained.windows, "changes": drained.stats.changes,
                                    "records": drained.stats.published}
        print(json.dumps(summary))
        return 0
    except Pg2KinesisError as exc:
        text = pg.mask(str(exc)) if pg is not None else mask_passwords(str(exc))
        print(f"pg2k snapshot: error: {text}", file=sys.stderr)
        return 1


def _log_chunk(progress: SnapshotProgress) -> None:
    log.info("snapshot %s: chunk %d, %d rows, %.0f rows/s", progress.table, progress.chunks, progress.rows,
             progress.rows_per_second)
