"""--exclude-columns: personal data stays in the database, from every format; key columns cannot be excluded."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pg2kinesis_dagster.core.columns import ColumnExclusion
from pg2kinesis_dagster.core.errors import ConfigError
from pg2kinesis_dagster.devstack.moto import MotoServer
from pg2kinesis_dagster.devstack.postgres import PostgresServer
from tests.faults.harness import run_once, stack_args
from tests.helpers import confirmed_flush, make_replicator, read_json


def test_spec_grammar() -> None:
    spec = ColumnExclusion.parse(['public.users:ssn,password_hash;billing.cards:number', 'users:email'])
    assert spec.by_table == {("public", "users"): frozenset({"ssn", "password_hash", "email"}),
                             ("billing", "cards"): frozenset({"number"})}
    odd = ColumnExclusion.parse('"My Schema"."Odd, Table":"a:b","Quote""d";x.y:z')
    assert odd.by_table == {("My Schema", "Odd, Table"): frozenset({"a:b", 'Quote"d'}), ("x", "y"): frozenset({"z"})}
    assert not ColumnExclusion.parse(None) and not ColumnExclusion.parse("  ")
    for bad in ("users", "users:", "a.b.c:x", "users:a,,b", "users:a,", ':a', '"unclosed:a', 'users:""'):
        with pytest.raises(ConfigError, match="exclude-columns"):
            ColumnExclusion.parse(bad)


_names = st.text(st.characters(codec="utf-8", exclude_characters="\x00"), min_size=1, max_size=12)


@given(schema=_names, table=_names, columns=st.lists(_names, min_size=1, max_size=4, unique=True))
def test_any_names_round_trip_when_quoted(schema: str, table: str, columns: list[str]) -> None:
    def q(name: str) -> str:
        return '"' + name.replace('"', '""') + '"'

    spec = f"{q(schema)}.{q(table)}:{','.join(q(c) for c in columns)}"
    assert ColumnExclusion.parse(spec).by_table == {(schema, table): frozenset(columns)}


@pytest.mark.parametrize("plugin", ["test_decoding", "wal2json", "pgoutput"])
def test_excluded_columns_never_reach_kinesis(
    plugin: str, pg_server: PostgresServer, pg_database: str, pg_conn, moto_server: MotoServer, kinesis_stream: str,
) -> None:
    with pg_conn.cursor() as cur:
        cur.execute("CREATE TABLE users (id int PRIMARY KEY, name text, ssn text, password_hash text)")
        cur.execute("ALTER TABLE users REPLICA IDENTITY FULL")  # old rows carry every column: excluded there too
    for formatter in ("JSON", "CSVPayload"):
        stream_records = len(read_json(moto_server, kinesis_stream)) if formatter == "CSVPayload" else 0
        with make_replicator(pg_server, pg_database, moto_server, kinesis_stream, output_plugin=plugin,
                             message_formatter=formatter, full_change=True, typed_json=formatter == "JSON",
                             exclude_columns="public.users:ssn,password_hash") as replicator:
            replicator.prepare()
            with pg_conn.cursor() as cur:
                cur.execute("INSERT INTO users VALUES (1, 'Ann', '078-05-1120', 'secret-hash-1')")
                cur.execute("UPDATE users SET name = 'Anne', ssn = '219-09-9999' WHERE id = 1")
                cur.execute("DELETE FROM users WHERE id = 1")
            replicator.drain()
        data = [r["data"] for r in moto_server.read_stream(kinesis_stream)][stream_records:]
        assert len(data) == 3
        for record in data:
            text = record.decode() if isinstance(record, bytes) else record
            assert "078-05-1120" not in text and "219-09-9999" not in text and "secret-hash" not in text
            assert "ssn" not in text and "password_hash" not in text
        if formatter == "JSON":
            changes = [json.loads(d) for d in data]
            assert changes[0]["after"] == {"id": 1, "name": "Ann"} and changes[1]["before"] == {"id": 1, "name": "Ann"}
            assert [c["pk"] for c in changes] == [{"id": 1}] * 3


def test_a_key_column_cannot_be_excluded(
    pg_server: PostgresServer, pg_database: str, pg_conn, moto_server: MotoServer, kinesis_stream: str,
    tmp_path: Path,
) -> None:
    with pg_conn.cursor() as cur:
        cur.execute("CREATE TABLE users (id int PRIMARY KEY, ssn text)")
    proc = run_once([*stack_args(pg_server, pg_database, moto_server.endpoint_url, kinesis_stream),
                     "--create-slot", "--exclude-columns", "public.users:id,ssn"], tmp_path, "cli")
    assert proc.poll() == 1
    assert "pg2k: error: --exclude-columns names id of public.users, part of its primary key (id)" in proc.stderr
    # A table created later with its key excluded: refused when its first change comes, the slot stays.
    with make_replicator(pg_server, pg_database, moto_server, kinesis_stream,
                         exclude_columns="public.later:code") as replicator:
        replicator.prepare()
        with pg_conn.cursor() as cur:
            cur.execute("CREATE TABLE later (code text PRIMARY KEY, v text)")
            cur.execute("INSERT INTO later VALUES ('k', 'v')")
        before = confirmed_flush(pg_server, pg_database)
        with pytest.raises(ConfigError, match="a key column cannot be excluded"):
            replicator.drain()
        assert confirmed_flush(pg_server, pg_database) == before
    assert read_json(moto_server, kinesis_stream) == []


def test_the_environment_variable_works_for_pg2k(
    pg_server: PostgresServer, pg_database: str, pg_conn, moto_server: MotoServer, kinesis_stream: str,
    tmp_path: Path,
) -> None:
    with pg_conn.cursor() as cur:
        cur.execute("CREATE TABLE users (id int PRIMARY KEY, ssn text)")
    args = [*stack_args(pg_server, pg_database, moto_server.endpoint_url, kinesis_stream)]
    assert run_once([*args, "--create-slot"], tmp_path, "create").poll() == 0
    with pg_conn.cursor() as cur:
        cur.execute("INSERT INTO users VALUES (1, '078-05-1120')")
    proc = run_once(args, tmp_path, "drain", env={"PG2K_EXCLUDE_COLUMNS": "users:ssn"})
    assert proc.poll() == 0, proc.stderr
    (record,) = read_json(moto_server, kinesis_stream)
    assert record["after"] == {"id": "1"}
