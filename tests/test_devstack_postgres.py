"""The throwaway PostgreSQL server and the sample workload behave as the other tests assume."""

from __future__ import annotations

import contextlib
import json
import re
import secrets
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import psycopg2
import psycopg2.errors
import psycopg2.extensions
import psycopg2.extras
import pytest

from pg2kinesis_dagster.devstack.postgres import PostgresServer, PostgresServerError, find_bindir
from pg2kinesis_dagster.devstack.workload import (
    SAMPLE_TABLES,
    RowChange,
    create_sample_schema,
    run_sample_workload,
    snapshot_tables,
)

Connection = psycopg2.extensions.connection


@pytest.fixture
def base_dir() -> Iterator[Path]:
    """An empty parent folder for a test's own server.

    Not pytest's tmp_path: its parents are private to root, and the server runs as
    the postgres user when the tests run as root.
    """
    path = Path(tempfile.mkdtemp(prefix="pg2k-test-"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _scalar(conn: Connection, query: str, params: tuple[object, ...] = ()) -> object:
    with conn.cursor() as cur:
        cur.execute(query, params)
        row = cur.fetchone()
    assert row is not None
    return row[0]


def _peek(conn: Connection, slot: str, *options: str) -> list[str]:
    with conn.cursor() as cur:
        cur.execute(
            "SELECT data FROM pg_logical_slot_peek_changes(%s, NULL, NULL, VARIADIC %s::text[])",
            (slot, list(options)),
        )
        return [row[0] for row in cur.fetchall()]


# -- server ------------------------------------------------------------------------


def test_server_runs_with_logical_decoding_settings(pg_server: PostgresServer, pg_conn: Connection) -> None:
    assert pg_server.host == "127.0.0.1"
    assert pg_server.is_running
    assert _scalar(pg_conn, "SHOW wal_level") == "logical"
    assert _scalar(pg_conn, "SHOW max_replication_slots") == "20"
    assert _scalar(pg_conn, "SHOW max_wal_senders") == "20"
    assert _scalar(pg_conn, "SHOW password_encryption") == "scram-sha-256"
    # On, on purpose: logical decoding only sees flushed WAL (see PostgresServer._config).
    assert _scalar(pg_conn, "SHOW synchronous_commit") == "on"
    assert _scalar(pg_conn, "SHOW fsync") == "off"
    assert _scalar(pg_conn, "SHOW port") == str(pg_server.port)
    assert _scalar(pg_conn, "SELECT inet_server_addr()::text") == "127.0.0.1/32"
    assert pg_conn.autocommit
    assert pg_server.log_path.is_file()


@pytest.mark.parametrize(
    ("plugin", "options"),
    [
        ("test_decoding", ("include-xids", "1", "skip-empty-xacts", "1")),
        ("wal2json", ("format-version", "2")),
    ],
)
def test_logical_slot_sees_an_insert(pg_conn: Connection, plugin: str, options: tuple[str, ...]) -> None:
    with pg_conn.cursor() as cur:
        cur.execute("CREATE TABLE t (id int PRIMARY KEY, v text)")
        cur.execute("SELECT pg_create_logical_replication_slot(%s, %s)", (f"s_{plugin}", plugin))
        cur.execute("INSERT INTO t VALUES (1, 'héllo ''world''')")
    lines = _peek(pg_conn, f"s_{plugin}", *options)
    if plugin == "test_decoding":
        expected = "table public.t: INSERT: id[integer]:1 v[text]:'héllo ''world'''"
        assert expected in lines, lines
    else:
        records = [json.loads(line) for line in lines]
        inserts = [r for r in records if r["action"] == "I"]
        assert [(r["schema"], r["table"]) for r in inserts] == [("public", "t")]
        assert {c["name"]: c["value"] for c in inserts[0]["columns"]} == {"id": 1, "v": "héllo 'world'"}
    # Peeking does not consume.
    assert _peek(pg_conn, f"s_{plugin}", *options) == lines


def test_restart_and_kill_keep_data_and_slots(base_dir: Path) -> None:
    with PostgresServer(base_dir=base_dir) as server:
        port = server.port
        db = server.create_database("restart me")
        conn = server.connect(db)
        with conn.cursor() as cur:
            cur.execute("CREATE TABLE t (id int PRIMARY KEY)")
            cur.execute("SELECT pg_create_logical_replication_slot('keep', 'test_decoding')")
            cur.execute("INSERT INTO t VALUES (1)")

        server.restart()
        assert server.port == port, "clients keep their DSN across a restart"
        with pytest.raises(psycopg2.OperationalError):
            _scalar(conn, "SELECT 1")  # the old session is gone
        conn = server.connect(db)
        assert _scalar(conn, "SELECT count(*) FROM t") == 1
        with conn.cursor() as cur:
            cur.execute("INSERT INTO t VALUES (2)")
        conn.close()

        server.kill()
        assert not server.is_running
        server.start()  # crash recovery
        with contextlib.closing(server.connect(db)) as conn:
            assert _scalar(conn, "SELECT array_agg(id ORDER BY id)::text FROM t") == "{1,2}"
            lines = _peek(conn, "keep")
            assert sum("INSERT" in line for line in lines) == 2, lines
        tmpdir = server.tmpdir
    assert not tmpdir.exists(), "stop() deletes the cluster"


def test_password_role_connects_over_loopback(pg_server: PostgresServer, pg_conn: Connection,
                                              pg_database: str) -> None:
    role = f"cdc_{secrets.token_hex(4)}"
    password = "s3cret with 'quotes' and spaces"
    with pg_conn.cursor() as cur:
        cur.execute(f"CREATE ROLE {role} LOGIN REPLICATION PASSWORD %s", (password,))
    try:
        conn = pg_server.connect(pg_database, user=role, password=password)
        with contextlib.closing(conn):
            assert _scalar(conn, "SELECT current_user") == role
        stored = _scalar(pg_conn, "SELECT rolpassword FROM pg_authid WHERE rolname = %s", (role,))
        assert str(stored).startswith("SCRAM-SHA-256$")
        # A logical replication connection (what the CDC source opens) works too.
        repl = pg_server.connect(pg_database, user=role, password=password,
                                 connection_factory=psycopg2.extras.LogicalReplicationConnection)
        with contextlib.closing(repl), repl.cursor() as cur:
            cur.execute("IDENTIFY_SYSTEM")
            assert cur.fetchone() is not None
        for wrong in ("nope", None):
            with pytest.raises(psycopg2.OperationalError, match="password"):
                pg_server.connect(pg_database, user=role, password=wrong).close()
    finally:
        with pg_conn.cursor() as cur:
            cur.execute(f"DROP ROLE {role}")


def test_database_names_are_quoted(pg_server: PostgresServer) -> None:
    name = f"it's a \"db\" ü {secrets.token_hex(2)}"
    assert pg_server.create_database(name) == name
    try:
        assert "dbname=" in pg_server.dsn(name)
        with contextlib.closing(pg_server.connect(name)) as conn:
            assert _scalar(conn, "SELECT current_database()") == name
    finally:
        pg_server.drop_database(name)
    with pytest.raises(ValueError):
        pg_server.create_database("x" * 64)


def test_replica_wal_level_server_refuses_logical_slots(base_dir: Path) -> None:
    with PostgresServer(wal_level="replica", base_dir=base_dir) as server, \
            contextlib.closing(server.connect()) as conn:
        assert _scalar(conn, "SHOW wal_level") == "replica"
        with pytest.raises(psycopg2.errors.ObjectNotInPrerequisiteState, match="wal_level"):
            _scalar(conn, "SELECT pg_create_logical_replication_slot('s', 'test_decoding')")


def test_start_failure_reports_the_server_log_and_cleans_up(base_dir: Path) -> None:
    server = PostgresServer(settings={"shared_buffers": "plenty"}, base_dir=base_dir)
    with pytest.raises(PostgresServerError, match=r"(?s)did not start.*last lines.*shared_buffers"):
        server.start()
    assert not server.is_running
    assert list(base_dir.iterdir()) == []


def test_server_is_stopped_when_the_python_process_exits_without_stop(base_dir: Path) -> None:
    # An interrupted test run must not leave a postgres behind: the finalizer runs at exit.
    script = (
        "import sys\n"
        "from pg2kinesis_dagster.devstack.postgres import PostgresServer\n"
        f"server = PostgresServer(base_dir={str(base_dir)!r}).start()\n"
        "print(server.data_dir, flush=True)\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                            check=True)
    data_dir = result.stdout.strip()
    assert data_dir.startswith(str(base_dir))
    assert not Path(data_dir).exists()
    assert list(base_dir.iterdir()) == []


def test_missing_binaries_error_says_what_to_install(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PG_BINDIR", str(tmp_path))
    with pytest.raises(PostgresServerError, match="apt-get install postgresql-15 postgresql-15-wal2json"):
        find_bindir()


# -- workload ----------------------------------------------------------------------


def test_workload_ledger_matches_the_tables(pg_server: PostgresServer, pg_conn: Connection) -> None:
    assert create_sample_schema(pg_conn) == [
        "public.customers", "public.order_items", "public.audit_log", "public.Mixed Case",
    ]
    ledger = run_sample_workload(pg_conn, 200, seed=7)

    assert len(ledger.transactions) == 200
    assert all(txn.changes for txn in ledger.transactions), "no empty transactions"
    assert ledger.rolled_back > 0
    assert snapshot_tables(pg_conn) == ledger.final_state()
    assert pg_conn.autocommit, "the connection's autocommit setting is restored"

    counts = ledger.counts()
    for table in SAMPLE_TABLES:
        for op in ("INSERT", "UPDATE", "DELETE"):
            assert counts[(table.qualified, op)] > 0, (table.qualified, op)
    assert counts[("public.audit_log", "TRUNCATE")] == 200 // 25
    assert max(len(h) for h in ledger.key_history().values()) >= 10, "hot rows change many times"
    assert {c.key is None for c in ledger.changes() if c.table == "public.audit_log"} == {True}

    # Same seed, same starting point: same changes.
    other = pg_server.create_database(f"t_workload_again_{secrets.token_hex(4)}")
    try:
        with contextlib.closing(pg_server.connect(other)) as conn:
            create_sample_schema(conn)
            again = run_sample_workload(conn, 200, seed=7)
    finally:
        pg_server.drop_database(other)
    assert [t.changes for t in again.transactions] == [t.changes for t in ledger.transactions]


def test_workload_on_a_non_autocommit_connection(pg_server: PostgresServer, pg_database: str) -> None:
    with contextlib.closing(pg_server.connect(pg_database, autocommit=False)) as conn:
        create_sample_schema(conn)
        first = run_sample_workload(conn, 20, seed=1)
        second = run_sample_workload(conn, 20, seed=2)  # builds on the first run's rows
        assert second.initial_state == first.final_state()
        assert snapshot_tables(conn) == second.final_state()
        assert not conn.autocommit


_TD_CHANGE = re.compile(r"table (?P<table>.+?): (?P<op>INSERT|UPDATE|DELETE|TRUNCATE): (?P<rest>.*)", re.S)
_TD_COLUMN = re.compile(r"""(?P<name>"(?:[^"]|"")*"|[^\s\[]+)\[[^\]]+\]:(?P<value>'(?:[^']|'')*'|\S+)""")


def _unquote(ident: str) -> str:
    return ident[1:-1].replace('""', '"') if ident.startswith('"') else ident


def _parse_test_decoding(line: str) -> RowChange:
    """One test_decoding change line -> the ledger's shape (values or key, by op)."""
    match = _TD_CHANGE.fullmatch(line)
    assert match, line
    schema, table = re.findall(r'"(?:[^"]|"")*"|[^.]+', match["table"])
    columns: dict[str, str | None] = {}
    for col in _TD_COLUMN.finditer(match["rest"]):
        value = col["value"]
        columns[_unquote(col["name"])] = (
            None if value == "null" else value[1:-1].replace("''", "'") if value.startswith("'") else value
        )
    op = match["op"]
    values = columns if op in ("INSERT", "UPDATE") else None
    key = columns or None if op == "DELETE" else None
    return RowChange(f"{_unquote(schema)}.{_unquote(table)}", op, key, values)


def test_workload_ledger_matches_test_decoding_output(pg_conn: Connection) -> None:
    create_sample_schema(pg_conn)
    with pg_conn.cursor() as cur:
        cur.execute("SELECT pg_create_logical_replication_slot('ledger', 'test_decoding')")
    ledger = run_sample_workload(pg_conn, 120, seed=11)

    decoded: list[tuple[int, list[RowChange]]] = []
    for line in _peek(pg_conn, "ledger", "include-xids", "1", "skip-empty-xacts", "1"):
        if line.startswith("BEGIN "):
            decoded.append((int(line.split()[1]), []))
        elif not line.startswith("COMMIT "):
            decoded[-1][1].append(_parse_test_decoding(line))

    # Rolled-back transactions never show up; committed ones do, in order, change by change.
    expected = [
        (txn.xid, [RowChange(c.table, c.op, c.key if c.op == "DELETE" else None, c.values)
                   for c in txn.changes])
        for txn in ledger.transactions
    ]
    assert decoded == expected
