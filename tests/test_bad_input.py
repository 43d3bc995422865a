"""Bad input: a clear error naming the problem and the fix, and the slot left where it was."""

from __future__ import annotations

import os
import tempfile
from typing import Any

import psycopg2
import psycopg2.extras
import pytest

from pg2kinesis_dagster.core.errors import DecodeError, RecordTooLargeError, SinkError, SourceError
from pg2kinesis_dagster.devstack.moto import MotoServer
from pg2kinesis_dagster.devstack.postgres import PostgresServer
from pg2kinesis_dagster.postgres.slot import ReplicationSlot
from tests.helpers import confirmed_flush, make_replicator, read_json


@pytest.fixture
def table_db(pg_database: str, pg_conn) -> str:
    with pg_conn.cursor() as cur:
        cur.execute("CREATE TABLE items (id int PRIMARY KEY, body text)")
    return pg_database


def test_wal_level_not_logical(moto_server: MotoServer, kinesis_stream: str) -> None:
    with tempfile.TemporaryDirectory(prefix="pg2k-replica-") as base:
        os.chmod(base, 0o755)  # the server runs as postgres when we are root
        with (
            PostgresServer(wal_level="replica", base_dir=base) as server,
            make_replicator(server, "postgres", moto_server, kinesis_stream) as r,
            pytest.raises(
                SourceError, match=r"wal_level is 'replica'.*wal_level = logical.*rds.logical_replication"
            ),
        ):
            r.prepare()


def test_missing_slot_names_the_fix(pg_server: PostgresServer, table_db: str, moto_server: MotoServer,
                                    kinesis_stream: str) -> None:
    with (
        make_replicator(pg_server, table_db, moto_server, kinesis_stream, create_slot=False, slot_name="nope") as r,
        pytest.raises(SourceError, match=r"'nope' does not exist.*--create-slot"),
    ):
        r.prepare()


def test_slot_of_another_plugin(pg_server: PostgresServer, table_db: str, pg_conn, moto_server: MotoServer,
                                kinesis_stream: str) -> None:
    with pg_conn.cursor() as cur:
        cur.execute("SELECT pg_create_logical_replication_slot('w2j', 'wal2json')")
    with make_replicator(pg_server, table_db, moto_server, kinesis_stream, slot_name="w2j") as r, pytest.raises(
        SourceError, match=r"uses output plugin 'wal2json'.*--pg-slot-output-plugin wal2json"
    ):
        r.prepare()


def test_slot_in_use_by_another_client(pg_server: PostgresServer, table_db: str, pg_conn, moto_server: MotoServer,
                                       kinesis_stream: str) -> None:
    with pg_conn.cursor() as cur:
        cur.execute("SELECT pg_create_logical_replication_slot('busy', 'test_decoding')")
    repl = psycopg2.connect(pg_server.dsn(table_db), connection_factory=psycopg2.extras.LogicalReplicationConnection)
    try:
        repl.cursor().start_replication(slot_name="busy", decode=True)
        with make_replicator(pg_server, table_db, moto_server, kinesis_stream, slot_name="busy") as r, pytest.raises(
            SourceError, match=r"'busy' is in use by PostgreSQL backend PID \d+"
        ):
            r.prepare()
    finally:
        repl.close()


def test_second_process_on_the_same_slot_is_refused(pg_server: PostgresServer, table_db: str,
                                                    moto_server: MotoServer, kinesis_stream: str) -> None:
    with make_replicator(pg_server, table_db, moto_server, kinesis_stream) as first:
        first.prepare()
        with make_replicator(pg_server, table_db, moto_server, kinesis_stream) as second, pytest.raises(
            SourceError, match="being replicated by another pg2kinesis process"
        ):
            second.drain()


def test_role_without_replication(pg_server: PostgresServer, table_db: str, pg_conn, moto_server: MotoServer,
                                  kinesis_stream: str) -> None:
    with pg_conn.cursor() as cur:
        cur.execute("CREATE ROLE plain LOGIN PASSWORD 's3cret-pw'")
    with make_replicator(pg_server, table_db, moto_server, kinesis_stream, user="plain",
                         password="s3cret-pw") as r, pytest.raises(SourceError) as err:
        r.prepare()
    assert "ALTER ROLE plain REPLICATION" in str(err.value) and "rds_replication" in str(err.value)


def test_wrong_password_is_not_echoed(pg_server: PostgresServer, table_db: str, pg_conn, moto_server: MotoServer,
                                      kinesis_stream: str) -> None:
    with pg_conn.cursor() as cur:
        cur.execute("CREATE ROLE pw_role LOGIN REPLICATION PASSWORD 'right-one'")
    with make_replicator(pg_server, table_db, moto_server, kinesis_stream, user="pw_role",
                         password="Wr0ng-S3cret") as r, pytest.raises(SourceError) as err:
        r.prepare()
    assert "cannot connect to PostgreSQL" in str(err.value)
    assert "Wr0ng-S3cret" not in str(err.value) and "Wr0ng-S3cret" not in repr(err.value)


def test_missing_stream(pg_server: PostgresServer, table_db: str, moto_server: MotoServer, aws_fake_env: str) -> None:
    with make_replicator(pg_server, table_db, moto_server, "no-such-stream") as r, pytest.raises(
        SinkError, match=r"'no-such-stream' does not exist"
    ):
        r.prepare()


def test_oversized_record_fails_before_publishing(pg_server: PostgresServer, table_db: str, pg_conn,
                                                  moto_server: MotoServer, kinesis_stream: str) -> None:
    with make_replicator(pg_server, table_db, moto_server, kinesis_stream) as r:
        r.prepare()
        before = confirmed_flush(pg_server, table_db)
        with pg_conn.cursor() as cur:
            cur.execute("INSERT INTO items VALUES (1, 'small')")
            # Incompressible-ish text so the row is really over 1 MiB once formatted.
            cur.execute("INSERT INTO items SELECT 2, string_agg(md5(i::text), '') FROM generate_series(1, 40000) i")
        with pytest.raises(RecordTooLargeError) as err:
            r.drain()
    message = str(err.value)
    assert "1048576" in message or "1 MiB" in message
    assert confirmed_flush(pg_server, table_db) == before
    assert read_json(moto_server, kinesis_stream) == [], "nothing of the failing batch was published"


def test_unparsable_plugin_output(pg_server: PostgresServer, table_db: str, pg_conn, moto_server: MotoServer,
                                  kinesis_stream: str, monkeypatch: pytest.MonkeyPatch) -> None:
    real_copy = ReplicationSlot.copy_rows

    def corrupt_copy(self: ReplicationSlot, out: Any, **kwargs: Any) -> bool:
        """The slot's COPY rows with the second one replaced (psycopg2 writes one row per call)."""
        rows = iter(range(1 << 30))

        class Corrupting:
            def write(self, data: bytes) -> object:
                if next(rows) == 1:
                    lsn, xid, _ = data.split(b"\t", 2)
                    data = lsn + b"\t" + xid + b"\ttable public.items: UPSERT: id[integer]:1\n"
                return out.write(data)

        return real_copy(self, Corrupting(), **kwargs)

    with make_replicator(pg_server, table_db, moto_server, kinesis_stream, slot_name="garbled") as r:
        r.prepare()
        before = confirmed_flush(pg_server, table_db, "garbled")
        with pg_conn.cursor() as cur:
            cur.execute("INSERT INTO items VALUES (1, 'a')")
        monkeypatch.setattr(ReplicationSlot, "copy_rows", corrupt_copy)
        with pytest.raises(DecodeError) as err:
            r.drain()
    assert "slot 'garbled'" in str(err.value) and "UPSERT" in str(err.value) and "LSN" in str(err.value)
    assert confirmed_flush(pg_server, table_db, "garbled") == before
    assert read_json(moto_server, kinesis_stream) == []


def test_peek_waits_for_a_slot_held_for_a_moment(pg_server: PostgresServer, table_db: str, pg_conn,
                                                 moto_server: MotoServer, kinesis_stream: str) -> None:
    import threading

    with make_replicator(pg_server, table_db, moto_server, kinesis_stream, slot_name="shared") as r:
        r.prepare()
        with pg_conn.cursor() as cur:
            cur.execute("INSERT INTO items VALUES (1, 'a')")
        # Another client (the sensor, a DBA) holds the slot; it lets go after a moment.
        repl = psycopg2.connect(
            pg_server.dsn(table_db), connection_factory=psycopg2.extras.LogicalReplicationConnection
        )
        repl.cursor().start_replication(slot_name="shared", decode=True)
        threading.Timer(1.0, repl.close).start()
        result = r.drain()
    assert result.stats.published == 1
    assert [rec["after"] for rec in read_json(moto_server, kinesis_stream)] == [{"id": "1", "body": "a"}]
