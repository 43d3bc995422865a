"""Table snapshots in order with the stream, on the real stack (PostgreSQL, moto, pg2k), nothing mocked.

The done-when test: tables filled before the slot existed are snapshotted while a concurrent workload
inserts, updates, deletes and changes keys, and replication runs at the same time in small windows; a
consumer reading every shard in order and applying each record by key ends with exactly each table's final
contents -- for each plugin, with and without aggregation, and after a SIGKILL of ``pg2k snapshot`` in the
middle followed by a resume. ``PG2K_SNAPSHOT_ROWS`` sets the table size (default 2,000 rows each;
``make snapshot-long`` runs 100,000).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg2.extensions
import pytest

from pg2kinesis_dagster.core.changes import format_lsn, parse_lsn
from pg2kinesis_dagster.core.snapshot import SNAPSHOT_PREFIX, Session, encode_copy_rows, encode_high, encode_low
from pg2kinesis_dagster.devstack.moto import MotoServer
from pg2kinesis_dagster.devstack.postgres import PostgresServer
from pg2kinesis_dagster.pipeline import ReplicationSettings, Replicator
from pg2kinesis_dagster.postgres.snapshot import SnapshotError, TableSnapshot
from tests.helpers import confirmed_flush, make_replicator, make_sink, pg_settings
from tests.snapshot_support import (
    TABLES,
    Workload,
    apply_by_key,
    create_tables,
    expected_state,
    read_changes,
)

ROWS = int(os.environ.get("PG2K_SNAPSHOT_ROWS", "2000"))
CHUNK_ROWS = max(50, ROWS // 10)
PLUGINS = ["test_decoding", "wal2json", "pgoutput"]


@pytest.fixture(scope="module")
def fast_moto() -> Iterator[MotoServer | None]:
    """At the long size (make snapshot-long) a moto whose records cost O(1): stock moto numbers each record in
    O(shard size), which makes hundreds of thousands of plain records quadratic (see devstack/moto_server)."""
    if ROWS <= 10_000:
        yield None
        return
    with MotoServer(fast=True) as server:
        yield server


@pytest.fixture
def stack(fast_moto: MotoServer | None, moto_server: MotoServer, aws_fake_env: str) -> Iterator[tuple[MotoServer, str]]:
    """The moto server and a fresh 2-shard stream for the done-when tests."""
    moto = fast_moto or moto_server
    name = f"snap-{uuid.uuid4().hex[:16]}"
    moto.create_stream(name, shards=2)
    yield moto, name
    with contextlib.suppress(Exception):
        moto.client().delete_stream(StreamName=name, EnforceConsumerDeletion=True)


def _replicate_while(replicator: Replicator, done: threading.Event, errors: list[BaseException]) -> threading.Thread:
    """Replication running alongside: windows one after another until ``done``."""

    def loop() -> None:
        try:
            while not done.is_set():
                replicator.run_window()
        except BaseException as exc:  # reported by the test
            errors.append(exc)

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    return thread


def _check(conn: psycopg2.extensions.connection, moto: MotoServer, stream: str, *, rows: int) -> None:
    applied = apply_by_key(read_changes(moto, stream))
    assert applied.stale == []
    expected = expected_state(conn)
    missing = expected.keys() - applied.state.keys()
    extra = applied.state.keys() - expected.keys()
    wrong = [k for k in expected.keys() & applied.state.keys() if expected[k] != applied.state[k]]
    assert (sorted(missing)[:5], sorted(extra)[:5], sorted(wrong)[:5]) == ([], [], [])
    assert applied.state == expected
    # The snapshot carried the rows the stream never saw: most of the tables' original rows.
    assert applied.snapshot_rows >= rows


@pytest.mark.parametrize("aggregate", [False, True], ids=["plain", "aggregated"])
@pytest.mark.parametrize("plugin", PLUGINS)
def test_snapshot_with_concurrent_workload_matches_the_tables(
    plugin: str, aggregate: bool, pg_server: PostgresServer, pg_database: str,
    pg_conn: psycopg2.extensions.connection, stack: tuple[MotoServer, str],
) -> None:
    moto_server, kinesis_stream = stack
    create_tables(pg_conn, ROWS)
    with pg_conn.cursor() as cur:
        cur.execute("ALTER TABLE public.pairs REPLICA IDENTITY DEFAULT")
    settings = ReplicationSettings(output_plugin=plugin, create_slot=True, message_formatter="JSON",
                                   max_changes=max(200, ROWS // 10), chunk_changes=max(100, ROWS // 20))
    replicator = Replicator(pg_settings(pg_server, pg_database),
                            make_sink(moto_server, kinesis_stream, aggregate=aggregate), settings)
    with replicator:
        replicator.prepare()  # the slot (and pgoutput's publication) now: the rows before it are not in it
        workload = Workload(pg_server, pg_database, ROWS, seed=len(plugin) + aggregate).start()
        done, errors = threading.Event(), []
        replication = _replicate_while(replicator, done, errors)
        try:
            workload.wait_for(5)  # writing before the snapshot starts, and through it
            for table in TABLES:
                progress = TableSnapshot(pg_settings(pg_server, pg_database), table, slot_name="pg2kinesis",
                                         chunk_rows=CHUNK_ROWS).run()
                assert progress.done and progress.chunks >= 5
            # A fast snapshot must not make a thin test: some more changes after it, replication still running.
            workload.wait_for(21)
        finally:
            workload.finish()
            done.set()
            replication.join(120)
        assert not errors, errors
        assert workload.transactions > 20
        replicator.drain()
    _check(pg_conn, moto_server, kinesis_stream, rows=ROWS)


def _pg2k(server: PostgresServer, database: str, moto: MotoServer, stream: str, plugin: str,
          *args: str) -> list[str]:
    return [sys.executable, "-m", "pg2kinesis_dagster.cli", *args, "--pg-host", server.host, "--pg-port",
            str(server.port), "--pg-user", "postgres", "--pg-dbname", database, "--pg-slot-output-plugin", plugin,
            "--stream-name", stream, "--endpoint-url", moto.endpoint_url, "--message-formatter", "JSON"]


@pytest.mark.parametrize("plugin", PLUGINS)
def test_snapshot_killed_midway_resumes_and_still_matches(
    plugin: str, pg_server: PostgresServer, pg_database: str, pg_conn: psycopg2.extensions.connection,
    stack: tuple[MotoServer, str], tmp_path: Path,
) -> None:
    moto_server, kinesis_stream = stack
    create_tables(pg_conn, ROWS)
    state_dir = tmp_path / "state"
    with make_replicator(pg_server, pg_database, moto_server, kinesis_stream, output_plugin=plugin,
                         max_changes=max(200, ROWS // 10)) as replicator:
        replicator.prepare()
        workload = Workload(pg_server, pg_database, ROWS, seed=7).start()
        snapshot = _pg2k(pg_server, pg_database, moto_server, kinesis_stream, plugin, "snapshot",
                         "--table", "public.items", "--table", "public.pairs",
                         "--snapshot-chunk-rows", str(max(20, ROWS // 40)), "--snapshot-state-dir", str(state_dir))
        try:
            proc = subprocess.Popen(snapshot, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            # Kill it once it is some chunks into the first table (not at a chunk boundary on purpose).
            deadline = time.monotonic() + 120
            states = list(state_dir.glob("*/public.items.json"))
            while time.monotonic() < deadline and proc.poll() is None:
                states = list(state_dir.glob("*/public.items.json"))
                if states and json.loads(states[0].read_text() or "{}").get("chunks", 0) >= 5:
                    break
                time.sleep(0.01)
            assert proc.poll() is None, f"the snapshot finished before it could be killed: {proc.communicate()}"
            proc.send_signal(signal.SIGKILL)
            proc.wait(30)
            killed_at = json.loads(states[0].read_text())["chunks"]
            replicator.drain()  # replication goes on, past the killed chunk's orphan low watermark
            resumed = subprocess.run(snapshot, capture_output=True, text=True, timeout=600)
            assert resumed.returncode == 0, resumed.stderr
            summary = json.loads(resumed.stdout)
            items = next(t for t in summary["tables"] if t["table"] == "public.items")
            assert items["resumed"] and items["chunks"] > killed_at
            assert not list(state_dir.glob("*/*.json")), "finished snapshots leave no state"
        finally:
            workload.finish()
        replicator.drain()
    _check(pg_conn, moto_server, kinesis_stream, rows=ROWS)


# -- watermarks and the window: small, deterministic cases -----------------------------------------------


def _emit(conn: psycopg2.extensions.connection, content: str) -> int:
    with conn.cursor() as cur:
        cur.execute("SELECT pg_logical_emit_message(false, %s, %s)::text", (SNAPSHOT_PREFIX, content))
        (lsn,) = cur.fetchone()
        # Flushed, as the snapshotter does: decoding reads only flushed WAL.
        cur.execute("BEGIN; SELECT pg_logical_emit_message(true, 'flush', ''); COMMIT")
    return parse_lsn(lsn)


def _session(conn: psycopg2.extensions.connection) -> Session:
    with conn.cursor() as cur:
        cur.execute("SELECT pg_backend_pid(), (extract(epoch FROM backend_start) * 1000000)::bigint "
                    "FROM pg_stat_activity WHERE pid = pg_backend_pid()")
        pid, started = cur.fetchone()
    return Session(pid, started)


@pytest.mark.parametrize("plugin", PLUGINS)
def test_window_stops_before_a_live_chunk_and_skips_an_orphan(
    plugin: str, pg_server: PostgresServer, pg_database: str, pg_conn: psycopg2.extensions.connection,
    moto_server: MotoServer, kinesis_stream: str,
) -> None:
    """A chunk in the making holds the slot before its low watermark (nothing after it is published); its high
    watermark then publishes its rows minus the keys changed in between. A low watermark whose session died
    without a high one is skipped for good, whatever follows it."""
    with pg_conn.cursor() as cur:
        cur.execute("CREATE TABLE public.t (id int PRIMARY KEY, v text)")
    columns = [("id", "integer"), ("v", "text")]
    with make_replicator(pg_server, pg_database, moto_server, kinesis_stream, output_plugin=plugin) as replicator:
        replicator.prepare()
        snapshotter = pg_server.connect(pg_database)
        with pg_conn.cursor() as cur:
            cur.execute("INSERT INTO public.t VALUES (1, 'streamed before')")
        before_low = replicator.slot.current_wal_lsn()
        _emit(snapshotter, encode_low("c1", "public", "t", ["id"], _session(snapshotter)))
        with pg_conn.cursor() as cur:
            cur.execute("UPDATE public.t SET v = 'changed between' WHERE id = 1")
            cur.execute("INSERT INTO public.t VALUES (3, 'inserted between')")
        first = replicator.drain()
        assert first.stats.published == 1  # only what precedes the live chunk's low watermark
        assert parse_lsn(confirmed_flush(pg_server, pg_database)) <= before_low
        rows = encode_copy_rows([["1", "stale"], ["2", "snapshot row"], ["3", "stale"]])
        high = _emit(snapshotter, encode_high("c1", "public", "t", ["id"], columns, rows, "2026-01-01 00:00:00+00"))
        # An orphan: a session that wrote a low watermark and ended.
        orphan = pg_server.connect(pg_database)
        _emit(orphan, encode_low("c2", "public", "t", ["id"], _session(orphan)))
        orphan.close()
        with pg_conn.cursor() as cur:
            cur.execute("INSERT INTO public.t VALUES (4, 'after the orphan')")
        # Then another chunk in the making: the orphan before it does not hold the window, the live chunk does.
        before_live = replicator.slot.current_wal_lsn()
        _emit(snapshotter, encode_low("c3", "public", "t", ["id"], _session(snapshotter)))
        with pg_conn.cursor() as cur:
            cur.execute("INSERT INTO public.t VALUES (5, 'after the live chunk')")
        second = replicator.drain()
        assert second.stats.by_table_op == {"public.t UPDATE": 1, "public.t INSERT": 2, "public.t SNAPSHOT": 1}
        assert high < parse_lsn(confirmed_flush(pg_server, pg_database)) <= before_live
        _emit(snapshotter, encode_high("c3", "public", "t", ["id"], columns, "", "2026-01-01 00:00:00+00"))
        snapshotter.close()
        assert replicator.drain().stats.by_table_op == {"public.t INSERT": 1}
    records = read_changes(moto_server, kinesis_stream)
    got = sorted((r["op"], r["after"]["id"], r["after"]["v"]) for r in records)
    assert got == sorted([
        ("INSERT", "1", "streamed before"), ("UPDATE", "1", "changed between"), ("INSERT", "3", "inserted between"),
        ("SNAPSHOT", "2", "snapshot row"), ("INSERT", "4", "after the orphan"), ("INSERT", "5", "after the live chunk"),
    ])
    snapshot_record = next(r for r in records if r["op"] == "SNAPSHOT")
    assert snapshot_record["id"] == f"{format_lsn(high)}:1"
    assert snapshot_record["lsn"] == snapshot_record["commit_lsn"] == format_lsn(high)
    assert snapshot_record["pk"] == {"id": "2"}


def test_snapshot_needs_select_on_the_table(
    pg_server: PostgresServer, pg_database: str, pg_conn: psycopg2.extensions.connection,
) -> None:
    with pg_conn.cursor() as cur:
        cur.execute("CREATE TABLE public.secret (id int PRIMARY KEY)")
        cur.execute("CREATE TABLE public.keyless (v int)")
        cur.execute("CREATE ROLE snap_reader LOGIN PASSWORD 'pw'")
        cur.execute("GRANT SELECT ON public.keyless TO snap_reader")
    settings = pg_settings(pg_server, pg_database, user="snap_reader", password="pw")
    with pytest.raises(SnapshotError, match="replication slot 'pg2kinesis' does not exist in this database"):
        TableSnapshot(settings, "keyless").run()
    with pg_conn.cursor() as cur:
        cur.execute("SELECT pg_create_logical_replication_slot('pg2kinesis', 'test_decoding')")
    with pytest.raises(SnapshotError, match=r"GRANT SELECT ON public\.secret TO snap_reader"):
        TableSnapshot(settings, "public.secret").run()
    with pytest.raises(SnapshotError, match="no primary key"):
        TableSnapshot(settings, "keyless").run()
    with pytest.raises(SnapshotError, match="does not exist"):
        TableSnapshot(settings, "public.nope").run()
    with pg_conn.cursor() as cur:
        cur.execute("GRANT SELECT ON public.secret TO snap_reader")
        cur.execute("INSERT INTO public.secret SELECT generate_series(1, 10)")
    assert TableSnapshot(settings, "public.secret", chunk_rows=3).run().rows == 10


def test_pg2k_snapshot_publish_and_clear_errors(
    pg_server: PostgresServer, pg_database: str, pg_conn: psycopg2.extensions.connection,
    moto_server: MotoServer, kinesis_stream: str, tmp_path: Path,
) -> None:
    """``pg2k snapshot --publish`` exits once the rows are in Kinesis; bad tables fail with exit 1 and the fix."""
    create_tables(pg_conn, 120)
    base = _pg2k(pg_server, pg_database, moto_server, kinesis_stream, "test_decoding", "snapshot",
                 "--snapshot-state-dir", str(tmp_path), "--create-slot")
    env = {**os.environ, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}
    missing = subprocess.run([*base, "--table", "public.nope"], capture_output=True, text=True, env=env, timeout=120)
    assert missing.returncode == 1 and "table public.nope does not exist" in missing.stderr
    with make_replicator(pg_server, pg_database, moto_server, kinesis_stream) as replicator:
        replicator.prepare()
    done = subprocess.run([*base, "--table", "items", "--table", "public.pairs", "--publish",
                           "--snapshot-chunk-rows", "50"], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    assert [(t["table"], t["rows"], t["chunks"]) for t in summary["tables"]] == [
        ("public.items", 120, 3), ("public.pairs", 120, 3)]
    assert summary["published"]["records"] == 240
    applied = apply_by_key(read_changes(moto_server, kinesis_stream))
    assert applied.snapshot_rows == 240 and applied.state == expected_state(pg_conn)


def test_a_chunk_steps_aside_for_an_open_writer_and_replication_goes_on(
    pg_server: PostgresServer, pg_database: str, pg_conn: psycopg2.extensions.connection,
    moto_server: MotoServer, kinesis_stream: str, caplog: pytest.LogCaptureFixture,
) -> None:
    """A transaction that wrote the table and stays open: the chunk closes empty instead of holding replication,
    waits for it, then runs; its change is not overwritten. Past writer_wait_seconds the snapshot fails naming it."""
    create_tables(pg_conn, 100)
    writer = pg_server.connect(pg_database)
    writer.autocommit = False
    settings = pg_settings(pg_server, pg_database)
    with make_replicator(pg_server, pg_database, moto_server, kinesis_stream) as replicator:
        replicator.prepare()
        with writer.cursor() as cur:
            cur.execute("UPDATE public.items SET note = 'held' WHERE id = 5")
            cur.execute("SELECT pg_backend_pid()")
            (writer_pid,) = cur.fetchone()
        with pytest.raises(SnapshotError, match=rf"did not end within 1s \(pid/xid: {writer_pid}/"):
            TableSnapshot(settings, "public.items", writer_wait_seconds=1).run()
        caplog.set_level("INFO", logger="pg2kinesis_dagster.postgres.snapshot")
        result: list[object] = []
        thread = threading.Thread(target=lambda: result.append(TableSnapshot(settings, "public.items").run()))
        thread.start()
        deadline = time.monotonic() + 60
        while not any("waits for transactions writing" in r.getMessage() for r in caplog.records):
            assert time.monotonic() < deadline and thread.is_alive(), "the chunk did not step aside"
            time.sleep(0.01)
        with pg_conn.cursor() as cur:
            cur.execute("INSERT INTO public.items (id, v) VALUES (1000, 1)")
        assert replicator.drain().stats.by_table_op["public.items INSERT"] == 1  # not held by the snapshot
        writer.commit()
        thread.join(120)
        assert result and result[0].done  # type: ignore[attr-defined]
        replicator.drain()
    writer.close()
    applied = apply_by_key(read_changes(moto_server, kinesis_stream))
    assert applied.stale == []
    items = {k: v for k, v in applied.state.items() if k[0] == "public.items"}
    assert items == {k: v for k, v in expected_state(pg_conn).items() if k[0] == "public.items"}
    assert items[("public.items", ("5",))]["note"] == "held"


def test_pgoutput_snapshot_needs_the_table_in_the_publication(
    pg_server: PostgresServer, pg_database: str, pg_conn: psycopg2.extensions.connection,
) -> None:
    with pg_conn.cursor() as cur:
        cur.execute("CREATE TABLE public.outside (id int PRIMARY KEY)")
        cur.execute("CREATE TABLE public.inside (id int PRIMARY KEY)")
        cur.execute("CREATE PUBLICATION only_inside FOR TABLE public.inside")
        cur.execute("SELECT pg_create_logical_replication_slot('pg2kinesis', 'pgoutput')")
    settings = pg_settings(pg_server, pg_database)
    with pytest.raises(SnapshotError, match=r"ALTER PUBLICATION only_inside ADD TABLE public\.outside"):
        TableSnapshot(settings, "public.outside", publication="only_inside").run()
    assert TableSnapshot(settings, "public.inside", publication="only_inside").run().done


def test_a_chunk_finished_after_the_window_bound_by_a_session_now_gone_is_published(
    pg_server: PostgresServer, pg_database: str, pg_conn: psycopg2.extensions.connection,
    moto_server: MotoServer, kinesis_stream: str,
) -> None:
    """Found open at the window's end with its session gone, a chunk is abandoned only if its high watermark is not
    in the WAL flushed after that was seen: here an orphan makes the window extend once, and the next chunk's
    snapshotter writes its high watermark and ends right after -- the chunk must still be published."""
    with pg_conn.cursor() as cur:
        cur.execute("CREATE TABLE public.t (id int PRIMARY KEY, v text)")
    columns = [("id", "integer"), ("v", "text")]
    with make_replicator(pg_server, pg_database, moto_server, kinesis_stream) as replicator:
        replicator.prepare()
        orphan = pg_server.connect(pg_database)
        _emit(orphan, encode_low("a", "public", "t", ["id"], _session(orphan)))
        orphan.close()
        bound = replicator.slot.current_wal_lsn()  # the window's bound: after a, before b
        late = pg_server.connect(pg_database)
        _emit(late, encode_low("b", "public", "t", ["id"], _session(late)))
        real_current = replicator.slot.current_wal_lsn
        finished: list[int] = []

        def current_then_finish_b() -> int:
            lsn = real_current()
            if not finished:  # the window found a gone and extends to here: then b completes and ends
                finished.append(_emit(late, encode_high("b", "public", "t", ["id"], columns,
                                                        encode_copy_rows([["7", "late chunk row"]]), "now")))
                late.close()
            return lsn

        replicator.slot.current_wal_lsn = current_then_finish_b  # type: ignore[method-assign]
        result = replicator.drain(upto_lsn=bound)
        assert finished and result.stats.by_table_op == {"public.t SNAPSHOT": 1}
    (record,) = read_changes(moto_server, kinesis_stream)
    assert (record["op"], record["after"]) == ("SNAPSHOT", {"id": "7", "v": "late chunk row"})
