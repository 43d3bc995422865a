"""``pg2k`` (alias ``pg2kinesis``): the same pipeline as the Dagster job, from a shell.

Accepts pg2kinesis's flags with the same meaning, so its users can switch by changing the
command name. Without ``--once`` it runs until interrupted, like pg2kinesis.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import signal
import sys
import time
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, NoReturn, cast

import psycopg2

from pg2kinesis_dagster.core import config
from pg2kinesis_dagster.core.errors import Pg2KinesisError, SourceUnavailableError
from pg2kinesis_dagster.pipeline import ReplicationSettings, Replicator, WindowResult
from pg2kinesis_dagster.postgres.connection import PostgresSettings, mask_passwords

if TYPE_CHECKING:
    from pg2kinesis_dagster.kinesis.sink import KinesisSink

log = logging.getLogger("pg2kinesis")

# Continuous mode, PostgreSQL unavailable: first wait between attempts, doubling up to the maximum.
_RECONNECT_FIRST_DELAY = 0.5
_RECONNECT_MAX_DELAY = 10.0


def add_replication_arguments(
    parser: argparse.ArgumentParser, groups: Sequence[str] = ("source", "kinesis", "format", "budget")
) -> dict[str, argparse._ArgumentGroup]:
    """The configuration model's flags (:mod:`pg2kinesis_dagster.core.config`) on ``parser``, by group.

    A subcommand that needs only the connection, slot and stream passes ``groups=("source", "kinesis")``.
    """
    return config.add_arguments(parser, groups, env=os.environ)


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
        formatter_class=config.HelpFormatter,
    )
    groups = add_replication_arguments(parser)
    run = groups["budget"]
    run.add_argument(
        "--once",
        action="store_true",
        help="drain what is pending up to the current WAL position, then exit 0",
    )
    run.add_argument("--poll-interval", type=float, default=1.0, help="seconds to wait when nothing is pending")
    run.add_argument("-v", "--verbose", action="store_true", help="log every window")
    return parser


def config_from_args(args: argparse.Namespace) -> config.ReplicationConfig:
    """The replication the flags describe; a bad value is a ConfigError naming the flag, value and what is allowed."""
    return config.from_args(args, env=os.environ)


def settings_from_args(args: argparse.Namespace) -> tuple[PostgresSettings, ReplicationSettings]:
    replication = config_from_args(args)
    return PostgresSettings(**replication.postgres_fields()), replication.settings()


def make_sink(model: config.ReplicationConfig) -> KinesisSink:
    """The Kinesis sink of the replication ``model`` describes, its stream checked."""
    from pg2kinesis_dagster.kinesis.sink import KinesisSink, make_kinesis_client  # boto3: see _SinkInTheMaking

    client = make_kinesis_client(
        region_name=model.aws_region, endpoint_url=model.kinesis_endpoint_url, profile_name=model.aws_profile
    )
    sink = KinesisSink(client, model.stream_name, max_retry_seconds=model.max_retry_seconds, aggregate=model.aggregate)
    sink.check_stream()
    return sink


class _SinkInTheMaking:
    """The sink, made by a thread while the replicator checks its slot and reads the first window.

    Importing boto3 and making a client take a few tenths of a second of CPU, and reading a window is mostly
    PostgreSQL decoding it: done side by side, a ``pg2k --once`` is that much shorter. Any attribute waits for
    the sink; an error making it (a missing stream, bad credentials) is raised there, before anything is sent.
    """

    def __init__(self, model: config.ReplicationConfig) -> None:
        pool = ThreadPoolExecutor(1, thread_name_prefix="pg2k-sink")
        self._future: Future[KinesisSink] = pool.submit(make_sink, model)
        pool.shutdown(wait=False)  # its one thread ends with the task

    def __getattr__(self, name: str) -> Any:
        return getattr(self._future.result(), name)


def replicator_for(model: config.ReplicationConfig, **overrides: object) -> Replicator:
    """The pipeline of the replication ``model`` describes (``overrides``: pipeline settings changed)."""
    settings = model.settings().model_copy(update=overrides) if overrides else model.settings()
    sink = cast("KinesisSink", _SinkInTheMaking(model))
    return Replicator(PostgresSettings(**model.postgres_fields()), sink, settings)


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


def run() -> NoReturn:
    """The console scripts' entry point (``pg2k``, ``pg2kinesis``): :func:`main`, then a quick exit.

    By the time main() returns it has closed what it opened (the slot's connections, the spool's window) and
    the slot's advances are made, so the exit skips the interpreter's teardown, which frees every object of
    boto3, pydantic and the run one by one (a tenth of a second of a short ``--once`` run): the output is
    flushed and ``os._exit`` ends the process. The objects the imports made are frozen out of the garbage
    collector's passes, which would otherwise walk them again and again while the run makes its records. An
    exception leaves the normal way (a traceback, exit status 1).
    """
    gc.freeze()
    code = main()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


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
    # botocore says where it found credentials (INFO) in continuous mode's log: noise next to the windows.
    logging.getLogger("botocore").setLevel(logging.WARNING)
    pg: PostgresSettings | None = None
    try:
        model = config_from_args(args)
        pg = PostgresSettings(**model.postgres_fields())
        with replicator_for(model) as replicator:
            return _run(replicator, args, model.stream_name)
    except Pg2KinesisError as exc:
        # Messages never carry a password; masking here covers one given in any connection setting anyway.
        text = pg.mask(str(exc)) if pg is not None else mask_passwords(str(exc))
        print(f"pg2k: error: {text}", file=sys.stderr)
        return 1


def _log_window(window: WindowResult) -> None:
    log.info("window %s", json.dumps(window.summary()))


def _run(replicator: Replicator, args: argparse.Namespace, stream_name: str) -> int:
    replicator.prepare_source()  # the stream: checked while the first window is read (replicator_for)
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
        "replicating slot %r to stream %r (Ctrl-C to stop)", replicator.slot.name, stream_name
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
