"""PostgreSQL misbehaving: restarted under a running pg2k, a second pg2k on the same slot, commits that are
written but not yet flushed when pg2k looks."""

from __future__ import annotations

import contextlib
import os
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pg2kinesis_dagster.core.changes import parse_lsn
from pg2kinesis_dagster.devstack.moto import MotoServer
from pg2kinesis_dagster.devstack.postgres import PostgresServer
from pg2kinesis_dagster.devstack.workload import create_sample_schema
from tests.faults.harness import (
    PROFILE,
    Pg2k,
    SlotMonitor,
    WorkloadThread,
    drain_once,
    report_line,
    stack_args,
    wait_caught_up,
    wait_until,
)
from tests.helpers import assert_no_loss_no_reordering, check_against_ledger, make_replicator, read_json

MAX_CHANGES = 10
DOWN_SECONDS = 2.0


@pytest.fixture
def own_pg() -> Iterator[PostgresServer]:
    """A server of this test's own, which it may restart without disturbing the shared one."""
    with tempfile.TemporaryDirectory(prefix="pg2k-faults-") as base:
        os.chmod(base, 0o755)  # the server runs as postgres when we are root
        with PostgresServer(base_dir=base) as server:
            yield server


def test_postgres_restart_mid_drain_loses_nothing(
    own_pg: PostgresServer, moto_server: MotoServer, kinesis_stream: str, tmp_path: Path
) -> None:
    """pg2k (continuous) either survives a PostgreSQL restart or exits non-zero, and is then restarted.

    Rounds alternate a clean restart (the slot must never move backwards) and a crash (``-m immediate``,
    down for a while). After a crash PostgreSQL may return the slot to its last checkpointed position
    (its documented behaviour for ``pg_replication_slot_advance``): pg2k then republishes, so that may
    add duplicates, never a loss. Duplicates are bounded by what a restart can interrupt plus the rewind."""
    db = own_pg.create_database("restart")
    with contextlib.closing(own_pg.connect(db)) as conn:
        create_sample_schema(conn)
    args = stack_args(own_pg, db, moto_server.endpoint_url, kinesis_stream)
    drain_once([*args, "--create-slot"], tmp_path, "create", own_pg, db)
    run = [*args, "--max-changes", str(MAX_CHANGES), "--poll-interval", "0.05"]
    exits: list[str] = []
    survived = rewound = 0
    modes: list[str] = []
    down = threading.Event()  # never set: waiting on it is the outage's duration
    per_round = 80
    with SlotMonitor(own_pg, db) as monitor:
        workload = WorkloadThread(own_pg, db, seed=51, chunk=5, pause=0.03,
                                  max_transactions=per_round * (PROFILE.restart_rounds + 1)).start()
        proc = Pg2k(run, tmp_path, "run-0")
        try:
            for round_ in range(PROFILE.restart_rounds):
                workload.wait_for(per_round * round_ + 40, timeout=60)
                # Mid-drain: pg2k has moved the slot since this round began, and changes are still coming.
                assert monitor.wait_advanced(monitor.current(), 30), "pg2k is not advancing"
                workload.hold()
                mode = "fast" if round_ % 2 == 0 else "crash"
                modes.append(mode)
                backwards_before = len(monitor.backwards)
                if mode == "fast":
                    own_pg.restart()
                else:
                    own_pg.kill()  # -m immediate: a crash; PostgreSQL recovers on start
                    down.wait(DOWN_SECONDS)  # the outage itself
                    own_pg.start()
                workload.resume()
                position = monitor.current()
                # Replication resumes: by the process that survived, or by a restarted one (bounded).
                for attempt in range(5):
                    wait_until(lambda p=proc, at=position: (monitor.current() or 0) > at or p.poll() is not None,
                               90, "pg2k to advance again or exit")
                    code = proc.poll()
                    if code is None:
                        break
                    assert code != 0, proc.stderr
                    exits.append(proc.stderr.strip().splitlines()[-1])
                    proc = Pg2k(run, tmp_path, f"run-{round_}-{attempt}")
                else:
                    raise AssertionError("replication did not resume after the restart")
                survived += not exits
                if mode == "crash":
                    rewound += len(monitor.backwards) - backwards_before
                else:
                    assert len(monitor.backwards) == backwards_before, monitor.backwards
            transactions = workload.stop()
            wait_caught_up(own_pg, db, 120)
            if proc.poll() is None:
                assert proc.terminate() == 0, proc.stderr
        finally:
            if workload._thread.is_alive():
                workload.stop()
            proc.kill()
        drain_once(args, tmp_path, "drain", own_pg, db)
    report = check_against_ledger(read_json(moto_server, kinesis_stream), transactions)
    largest = max(len(t.changes) for t in transactions)
    report_line("postgres_restart", {"restarts": modes, "survived": survived, "exits": exits,
                                     "slot_rewound_by_crash_recovery": rewound, "slot_reconnects": monitor.reconnects,
                                     "transactions": len(transactions), **report.as_dict()})
    for line in exits:
        assert line.startswith("pg2k: error: "), f"not a clear one-line error: {line}"
    bound = PROFILE.restart_rounds * (MAX_CHANGES + largest)
    # A rewound slot republishes everything since PostgreSQL's last checkpoint: no useful bound then.
    assert_no_loss_no_reordering(report, max_duplicates=None if rewound else bound)


def test_second_pg2k_on_the_same_slot_is_refused_and_moves_nothing(
    pg_server: PostgresServer, pg_database: str, pg_conn, moto_server: MotoServer, kinesis_stream: str,
    tmp_path: Path,
) -> None:
    create_sample_schema(pg_conn)
    args = stack_args(pg_server, pg_database, moto_server.endpoint_url, kinesis_stream)
    drain_once([*args, "--create-slot"], tmp_path, "create", pg_server, pg_database)
    refusals = []
    with SlotMonitor(pg_server, pg_database) as monitor:
        workload = WorkloadThread(pg_server, pg_database, seed=61, chunk=4, pause=0.02).start()
        first = Pg2k([*args, "--max-changes", "20", "--poll-interval", "0.05"], tmp_path, "first")
        try:
            assert monitor.wait_advanced(monitor.current(), 30)
            for i in range(6):
                # Both modes, at different moments of the first one's cycle.
                extra = ["--once"] if i % 2 else ["--poll-interval", "0.05"]
                second = Pg2k([*args, *extra], tmp_path, f"second-{i}")
                code = second.wait(60)
                refusals.append(second.stderr.strip().splitlines()[-1])
                assert code == 1, second.stderr
                assert monitor.wait_advanced(monitor.current(), 30), "the first pg2k stopped advancing"
            assert first.poll() is None, first.stderr
            transactions = workload.stop()
            wait_caught_up(pg_server, pg_database, 60)
            assert first.terminate() == 0, first.stderr
        finally:
            if workload._thread.is_alive():
                workload.stop()
            first.kill()
    for message in refusals:
        assert message.startswith("pg2k: error: replication slot 'pg2kinesis' is being replicated by another "
                                  "pg2kinesis process"), message
        assert "Nothing was read or advanced" in message and "Traceback" not in message
    report = check_against_ledger(read_json(moto_server, kinesis_stream), transactions)
    report_line("second_pg2k", {"refusals": len(refusals), **report.as_dict()})
    assert not monitor.backwards
    # No failure happened to the first, and the refused ones published nothing: not a single duplicate.
    assert_no_loss_no_reordering(report, max_duplicates=0)


def test_commit_written_but_not_flushed_is_never_skipped(
    own_pg: PostgresServer, moto_server: MotoServer, kinesis_stream: str
) -> None:
    """With asynchronous commit, PostgreSQL writes WAL some time before it flushes it, and logical
    decoding only reads flushed WAL. A peek that finds nothing then advances the idle slot to the position
    it was bounded by: if that bound were the *write* position and the flush caught up before the advance,
    a commit between the two would be skipped for good."""
    # Keep the WAL writer from flushing on its own; small wal_buffers make backends write (not flush) WAL.
    own_pg.settings.update({"wal_writer_delay": "10s", "wal_writer_flush_after": "1GB", "wal_buffers": "64kB"})
    own_pg.restart()
    db = own_pg.create_database("asynccommit")
    with contextlib.closing(own_pg.connect(db)) as conn, conn.cursor() as cur:
        cur.execute("CREATE TABLE items (id int PRIMARY KEY, body text)")
    app = own_pg.connect(db)
    other = own_pg.connect(db)
    gap = None
    try:
        with make_replicator(own_pg, db, moto_server, kinesis_stream) as replicator:
            replicator.prepare()
            with app.cursor() as cur:
                cur.execute("SET synchronous_commit = off")
                # Wake the WAL writer now (it flushes when it last did long ago), so that it does not flush
                # during the attempt below.
                cur.execute("INSERT INTO items SELECT -1000000 - i, repeat('x', 200) FROM generate_series(1, 800) i")
            for attempt in range(20):
                # Everything flushed and published: the slot is at the flush position, nothing pending.
                with other.cursor() as cur:
                    cur.execute("INSERT INTO items VALUES (%s, 'synchronous')", (-2 - attempt,))
                replicator.drain()
                with app.cursor() as cur:
                    cur.execute("INSERT INTO items VALUES (%s, 'small')", (attempt,))
                    cur.execute("SELECT pg_current_wal_insert_lsn()::text")
                    small_end = parse_lsn(cur.fetchone()[0])
                    # Lots of WAL after it: the pages holding the small commit get written, not flushed.
                    cur.execute("INSERT INTO items SELECT 100000 + %s * 1000 + i, repeat('x', 200) "
                                "FROM generate_series(1, 800) i", (attempt,))
                    cur.execute("SELECT pg_current_wal_lsn()::text, pg_current_wal_flush_lsn()::text")
                    write, flush = (parse_lsn(v) for v in cur.fetchone())
                if flush < small_end <= write:
                    gap = (flush, small_end, write)
                    break
            if gap is None:
                pytest.skip("could not get PostgreSQL to hold written-but-unflushed WAL on this machine")
            # pg2k looks now: the small transaction's commit is written but not flushed, so not decodable yet.
            peeked = replicator.peek()
            rows = list(replicator.spool.window(replicator.spool_key, peeked.window_id).read_rows())
            assert all(f"id[integer]:{attempt} " not in str(row[2]) for row in rows)
            # The flush catches up between the peek and the advance (any synchronous commit flushes all).
            with other.cursor() as cur:
                cur.execute("INSERT INTO items VALUES (-1, 'synchronous')")
            replicator.finish(replicator.publish(replicator.format(peeked)))
            replicator.drain()
    finally:
        app.close()
        other.close()
    ids = {r["pk"]["id"] for r in read_json(moto_server, kinesis_stream) if r["table"] == "public.items"}
    with contextlib.closing(own_pg.connect(db)) as conn, conn.cursor() as cur:
        cur.execute("SELECT id::text FROM items")
        committed = {row[0] for row in cur.fetchall()}
    report_line("unflushed_commit", {"flush": gap[0], "commit_end": gap[1], "write": gap[2],
                                     "peek_bound": peeked.upto_lsn, "committed": len(committed),
                                     "published": len(ids)})
    missing = sorted(committed - ids)
    assert not missing, f"{len(missing)} committed rows never published (skipped by the slot), e.g. {missing[:5]}"


def test_postgres_down_longer_than_the_retry_budget_ends_with_a_clear_error(
    own_pg: PostgresServer, moto_server: MotoServer, kinesis_stream: str, tmp_path: Path
) -> None:
    db = own_pg.create_database("down")
    with contextlib.closing(own_pg.connect(db)) as conn:
        create_sample_schema(conn)
    args = stack_args(own_pg, db, moto_server.endpoint_url, kinesis_stream)
    drain_once([*args, "--create-slot"], tmp_path, "create", own_pg, db)
    with SlotMonitor(own_pg, db) as monitor:
        before = monitor.current()
        proc = Pg2k([*args, "--poll-interval", "0.05", "--max-retry-seconds", "3"], tmp_path, "run")
        try:
            wait_until(lambda: monitor.current() != before or proc.poll() is not None, 30, "pg2k to start")
            own_pg.kill()
            started = time.monotonic()
            code = proc.wait(60)
            waited = time.monotonic() - started
        finally:
            proc.kill()
            own_pg.start()
    last = proc.stderr.strip().splitlines()[-1]
    report_line("postgres_down", {"exit": code, "seconds": round(waited, 1), "error": last})
    assert code == 1 and waited >= 3, (code, waited, proc.stderr)
    assert last.startswith("pg2k: error: cannot connect to PostgreSQL") and "giving up" in last, last
    assert "PostgreSQL unavailable, retrying" in proc.stderr and "Traceback" not in proc.stderr
