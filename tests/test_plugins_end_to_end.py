"""The pipeline end to end with the wal2json and pgoutput plugins: throwaway PostgreSQL, moto, nothing mocked.

Both plugins need the sample schema's ``audit_log`` (no primary key) to be REPLICA IDENTITY
FULL: wal2json silently drops UPDATE/DELETE of a table without replica identity, and a
publication that publishes updates makes PostgreSQL refuse them at the source.
"""

from __future__ import annotations

from collections import Counter

import psycopg2.extensions
import pytest

from pg2kinesis_dagster.core.decoders import PgOutputDecoder, Wal2JsonDecoder
from pg2kinesis_dagster.core.errors import SourceError
from pg2kinesis_dagster.devstack.moto import MotoServer
from pg2kinesis_dagster.devstack.postgres import PostgresServer
from pg2kinesis_dagster.devstack.workload import create_sample_schema, run_sample_workload
from tests.helpers import assert_matches_ledger, make_replicator, read_json


@pytest.fixture
def sample_db(pg_database: str, pg_conn: psycopg2.extensions.connection) -> str:
    create_sample_schema(pg_conn)
    with pg_conn.cursor() as cur:
        cur.execute("ALTER TABLE public.audit_log REPLICA IDENTITY FULL")
    return pg_database


def _round_trip(
    plugin: str, server: PostgresServer, database: str, conn: psycopg2.extensions.connection,
    moto: MotoServer, stream: str,
) -> None:
    with make_replicator(server, database, moto, stream, output_plugin=plugin, max_changes=200) as replicator:
        # Creates the slot (and, for pgoutput, the publication before it).
        replicator.prepare()
        ledger = run_sample_workload(conn, transactions=150, seed=11)
        result = replicator.drain()
    assert result.windows > 1, "small windows must have split the backlog"
    records = read_json(moto, stream)
    assert len({r["id"] for r in records}) == len(records)
    assert_matches_ledger(records, ledger)
    counts = Counter((r["table"], r["op"]) for r in records)
    assert counts == ledger.counts()
    assert {op for _, op in counts} == {"INSERT", "UPDATE", "DELETE", "TRUNCATE"}
    with make_replicator(server, database, moto, stream, output_plugin=plugin) as again:
        assert again.drain().stats.changes == 0


@pytest.mark.parametrize("plugin", ["wal2json", "pgoutput"])
def test_round_trip(
    plugin: str, pg_server: PostgresServer, sample_db: str, pg_conn: psycopg2.extensions.connection,
    moto_server: MotoServer, kinesis_stream: str,
) -> None:
    _round_trip(plugin, pg_server, sample_db, pg_conn, moto_server, kinesis_stream)


def test_pgoutput_refuses_to_publish_tables_without_replica_identity(
    pg_server: PostgresServer, pg_database: str, pg_conn: psycopg2.extensions.connection,
    moto_server: MotoServer, kinesis_stream: str,
) -> None:
    # audit_log has no key and the default identity: publishing it would break the application's UPDATEs.
    create_sample_schema(pg_conn)
    with (
        make_replicator(pg_server, pg_database, moto_server, kinesis_stream, output_plugin="pgoutput") as r,
        pytest.raises(SourceError, match=r"no replica identity \(public.audit_log\).*REPLICA IDENTITY FULL"),
    ):
        r.prepare()


def test_replicator_builds_the_plugin_decoders(
    pg_server: PostgresServer, sample_db: str, moto_server: MotoServer, kinesis_stream: str
) -> None:
    with make_replicator(pg_server, sample_db, moto_server, kinesis_stream, output_plugin="wal2json") as r:
        assert isinstance(r.decoder, Wal2JsonDecoder)
    with make_replicator(pg_server, sample_db, moto_server, kinesis_stream, output_plugin="pgoutput") as r:
        assert isinstance(r.decoder, PgOutputDecoder)
        assert r.decoder.slot_options == ("proto_version", "1", "messages", "true", "publication_names", "pg2kinesis")
