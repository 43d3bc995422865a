"""``pg2k`` (alias ``pg2kinesis``): the same pipeline as the Dagster job, from a shell.

Accepts pg2kinesis's flags with the same meaning, so its users can switch by changing the
command name. Without ``--once`` it runs until interrupted, like pg2kinesis.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import time
from collections.abc import Sequence

import psycopg2

from pg2kinesis_dagster import pipeline
from pg2kinesis_dagster.core.decoders import supported_plugins
from pg2kinesis_dagster.core.errors import Pg2KinesisError, SourceUnavailableError
from pg2kinesis_dagster.core.window import DEFAULT_CHUNK_CHANGES
from pg2kinesis_dagster.kinesis.sink import KinesisSink, make_kinesis_client
from pg2kinesis_dagster.pipeline import ReplicationSettings, Replicator, WindowResult
from pg2kinesis_dagster.postgres.connection import PostgresSettings, mask_passwords
from pg2kinesis_dagster.spool import default_spool_root

log = logging.getLogger("pg2kinesis")

# Continuous mode, PostgreSQL unavailable: first wait between attempts, doubling up to the maximum.
_RECONNECT_FIRST_DELAY = 0.5
_RECONNECT_MAX_DELAY = 10.0


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Show a default only where there is one worth showing."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default in (None, False, "", argparse.SUPPRESS) or "default:" in (action.help or ""):
            return action.help or ""
        return super()._get_help_string(action) or ""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pg2k",
        description=(
            "Replicate committed changes from a PostgreSQL logical replication slot to an AWS Kinesis "
            "stream: peek, publish, and advance the slot only after Kinesis acknowledged every record. "
            "Delivery is at-least-once; every record carries a stable change id. Connection settings "
            "left empty fall back to libpq's PG* variables (the password: PGPASSWORD or ~/.pgpass), "
            "AWS settings to the standard credential chain."
        ),
        epilog="pg2k snapshot --table schema.table ...: queue the rows of existing tables into the slot, in order "
        "with the stream (pg2k snapshot --help).",
        formatter_class=_HelpFormatter,
    )
    pg = parser.add_argument_group("PostgreSQL (pg2kinesis flags)")
    pg.add_argument(
        "--pg-dbname", default=None,
        help="database (default: PGDATABASE); as in libpq, a URI or key=value string here is a connection string "
        "(the flags below override it)",
    )
    pg.add_argument("--pg-host", default=None, help="host (default: PGHOST or the local socket)")
    pg.add_argument("--pg-port", type=int, default=None, help="port (default: PGPORT or 5432)")
    pg.add_argument("--pg-user", default=None, help="role (default: PGUSER)")
    pg.add_argument("--pg-sslmode", default=None, help="libpq sslmode (default: PGSSLMODE or prefer)")
    pg.add_argument("--pg-dsn", default="", help="a libpq connection string or URI; the flags above override it")
    pg.add_argument("--pg-slot-name", default="pg2kinesis", help="logical replication slot")
    pg.add_argument(
        "--pg-slot-output-plugin",
        default="test_decoding",
        choices=supported_plugins(),
        help="the slot's output plugin",
    )
    pg.add_argument(
        "--publication",
        default="pg2kinesis",
        help="pgoutput only: the publication to replicate (created FOR ALL TABLES with the slot when missing)",
    )
    pg.add_argument("--create-slot", action="store_true", help="create the slot if it does not exist")
    pg.add_argument(
        "--recreate-slot",
        action="store_true",
        help="drop and create the slot first (loses the changes pending on it)",
    )

    out = parser.add_argument_group("Kinesis")
    out.add_argument("--stream-name", default="pg2kinesis", help="Kinesis data stream")
    out.add_argument("--aws-region", default=None, help="AWS region (default: AWS_REGION/AWS_DEFAULT_REGION)")
    out.add_argument("--aws-profile", default=None, help="AWS profile (default: AWS_PROFILE)")
    out.add_argument(
        "--endpoint-url",
        default=None,
        help="Kinesis endpoint, e.g. a local emulator (default: AWS_ENDPOINT_URL_KINESIS, then AWS)",
    )
    out.add_argument(
        "--aggregate",
        action="store_true",
        help="pack changes into KPL-aggregated records, as pg2kinesis did: far fewer Kinesis records "
        "(consumers deaggregate with the KCL or aws-kinesis-agg)",
    )
    out.add_argument(
        "--max-retry-seconds",
        type=float,
        default=300.0,
        help="keep retrying Kinesis (and, without --once, a lost PostgreSQL connection) this long, then fail "
        "with the slot untouched",
    )

    fmt = parser.add_argument_group("What is published (pg2kinesis flags)")
    fmt.add_argument(
        "--message-formatter",
        default="CSVPayload",
        help="CSV, CSVPayload (pg2kinesis formats), JSON, or a class as package.module:Class",
    )
    fmt.add_argument("--full-change", action="store_true", help="include the row images in CSVPayload")
    fmt.add_argument(
        "--typed-json",
        action="store_true",
        help="JSON format: numbers, booleans, json and arrays as typed JSON values where lossless (see README)",
    )
    fmt.add_argument("--table-pat", default=None, help="only tables whose schema.table matches this regex")
    fmt.add_argument("--exclude-table-pat", default=None, help="skip tables whose schema.table matches")
    fmt.add_argument(
        "--exclude-columns",
        action="append",
        default=None,
        help="columns never published, from every format: schema.table:col,col, entries separated by ';' or "
        "repeated, e.g. public.users:ssn,password_hash (default: PG2K_EXCLUDE_COLUMNS); key columns cannot be",
    )
    fmt.add_argument(
        "--operations",
        action="append",
        default=None,
        help="operations to publish, comma-separated or repeated: insert,update,delete,truncate (default: all)",
    )
    fmt.add_argument(
        "--no-primary-key",
        choices=["publish", "skip"],
        default="publish",
        help="changes of tables without a primary key: publish keyed by table, or skip as pg2kinesis did",
    )
    fmt.add_argument(
        "--partition-key",
        choices=["row", "table", "xid", "constant"],
        default="row",
        help="Kinesis partition key: the row (table + key), the table, the transaction id, or a constant",
    )
    fmt.add_argument("--partition-key-constant", default="pg2kinesis", help="with --partition-key constant")
    fmt.add_argument(
        "--oversized",
        choices=["fail", "truncate"],
        default="fail",
        help="a record over Kinesis's 1 MiB limit: fail the run (slot untouched), or replace its largest "
        "non-key values by the marker __pg2kinesis_truncated__:<bytes> until it fits",
    )

    run = parser.add_argument_group("Running")
    run.add_argument(
        "--once",
        action="store_true",
        help="drain what is pending up to the current WAL position, then exit 0",
    )
    run.add_argument(
        "--max-changes",
        type=int,
        default=pipeline.DEFAULT_MAX_CHANGES,
        help="window budget: rows of plugin output per window (it ends at the next commit; a window is "
        "processed in chunks, so a large one costs disk in the spool, not memory)",
    )
    run.add_argument(
        "--max-bytes", type=int, default=pipeline.DEFAULT_MAX_BYTES, help="window budget: plugin output bytes"
    )
    run.add_argument(
        "--max-seconds",
        type=float,
        default=pipeline.DEFAULT_MAX_SECONDS,
        help="window budget: seconds spent reading the slot",
    )
    run.add_argument(
        "--chunk-changes",
        type=int,
        default=DEFAULT_CHUNK_CHANGES,
        help="changes per chunk inside a window: about what memory holds, and what a crash sends again",
    )
    run.add_argument(
        "--spool-dir",
        default=os.environ.get("PG2K_SPOOL_DIR") or None,
        help="local folder for the window being replicated (default: PG2K_SPOOL_DIR, else "
        f"{default_spool_root()})",
    )
    run.add_argument("--poll-interval", type=float, default=1.0, help="seconds to wait when nothing is pending")
    run.add_argument(
        "--key-refresh-seconds", type=float, default=3600.0,
        help="re-read primary keys from the catalog at least this often (schema changes seen in the stream "
        "re-read them at once)",
    )
    run.add_argument("-v", "--verbose", action="store_true", help="log every window")
    return parser


def settings_from_args(args: argparse.Namespace) -> tuple[PostgresSettings, ReplicationSettings]:
    pg = PostgresSettings(
        dsn=args.pg_dsn,
        host=args.pg_host,
        port=args.pg_port,
        dbname=args.pg_dbname,
        user=args.pg_user,
        sslmode=args.pg_sslmode,
    )
    operations = ",".join(args.operations) if args.operations else None
    replication = ReplicationSettings(
        slot_name=args.pg_slot_name,
        output_plugin=args.pg_slot_output_plugin,
        publication=args.publication,
        message_formatter=args.message_formatter,
        full_change=args.full_change,
        table_pat=args.table_pat,
        exclude_table_pat=args.exclude_table_pat,
        operations=operations,
        no_primary_key=args.no_primary_key,
        partition_key=args.partition_key,
        partition_key_constant=args.partition_key_constant,
        max_changes=args.max_changes,
        max_bytes=args.max_bytes,
        max_seconds=args.max_seconds,
        chunk_changes=args.chunk_changes,
        spool_dir=args.spool_dir,
        create_slot=args.create_slot,
        recreate_slot=args.recreate_slot,
        oversized=args.oversized,
        typed_json=args.typed_json,
        key_refresh_seconds=args.key_refresh_seconds,
        exclude_columns=";".join(args.exclude_columns) if args.exclude_columns
        else os.environ.get("PG2K_EXCLUDE_COLUMNS") or None,
    )
    return pg, replication


class _Stop:
    """Finish the window in hand, then stop, on SIGINT/SIGTERM."""

    def __init__(self) -> None:
        self.requested = False
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._handle)

    def sleep(self, seconds: float) -> None:
        """Sleep, but wake within 0.1 s of a stop request (a signal does not cut time.sleep short)."""
        deadline = time.monotonic() + seconds
        while not self.requested:
            left = deadline - time.monotonic()
            if left <= 0:
                return
            time.sleep(min(left, 0.1))

    def _handle(self, signum: int, frame: object) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        log.info("stopping after the current window (signal %s)", signum)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["snapshot"]:  # pg2k snapshot --table ...: its own flags on top of these
        from pg2kinesis_dagster.snapshot_cli import snapshot_main

        return snapshot_main(argv[1:])
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose or not args.once else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    pg: PostgresSettings | None = None
    try:
        pg, replication = settings_from_args(args)
        client = make_kinesis_client(
            region_name=args.aws_region, endpoint_url=args.endpoint_url, profile_name=args.aws_profile
        )
        sink = KinesisSink(
            client, args.stream_name, max_retry_seconds=args.max_retry_seconds, aggregate=args.aggregate
        )
        with Replicator(pg, sink, replication) as replicator:
            return _run(replicator, args)
    except Pg2KinesisError as exc:
        # Messages never carry a password; masking here covers one given in any connection setting anyway.
        text = pg.mask(str(exc)) if pg is not None else mask_passwords(str(exc))
        print(f"pg2k: error: {text}", file=sys.stderr)
        return 1


def _log_window(window: WindowResult) -> None:
    log.info("window %s", json.dumps(window.summary()))


def _run(replicator: Replicator, args: argparse.Namespace) -> int:
    replicator.prepare()
    if args.once:
        result = replicator.drain(on_window=_log_window if args.verbose else None)
        summary = {
            "windows": result.windows,
            "transactions": result.stats.transactions,
            "changes": result.stats.changes,
            "published": result.stats.published,
            "filtered": result.stats.filtered,
            "skipped_no_primary_key": result.stats.skipped_no_key,
            "truncated_records": result.stats.truncated_records,
            "seconds": round(result.seconds, 3),
            "changes_per_second": round(result.stats.changes / result.seconds) if result.seconds else 0,
        }
        print(json.dumps(summary))
        return 0
    stop = _Stop()
    log.info(
        "replicating slot %r to stream %r (Ctrl-C to stop)", replicator.slot.name, replicator.sink.stream_name
    )
    failing_since: float | None = None
    delay = _RECONNECT_FIRST_DELAY
    while not stop.requested:
        try:
            window = replicator.run_window(should_stop=lambda: stop.requested)
        except (SourceUnavailableError, psycopg2.OperationalError, psycopg2.InterfaceError) as exc:
            # PostgreSQL restarted or the network broke: the window in hand is dropped (the slot did not
            # move past what was acknowledged), and the next attempt reconnects, takes the lock and re-reads.
            now = time.monotonic()
            failing_since = now if failing_since is None else failing_since
            reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            if now - failing_since > args.max_retry_seconds:
                raise SourceUnavailableError(
                    f"{reason} (still failing after {now - failing_since:.0f}s, giving up; the slot stays at "
                    "its confirmed position)"
                ) from None
            log.warning("PostgreSQL unavailable, retrying in %.1fs: %s", delay, reason)
            replicator.slot.close()
            stop.sleep(delay)
            delay = min(delay * 2, _RECONNECT_MAX_DELAY)
            continue
        failing_since, delay = None, _RECONNECT_FIRST_DELAY
        if window.stats.changes:
            _log_window(window)
        if not window.limited and not stop.requested:
            stop.sleep(args.poll_interval)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
