"""The pipeline end to end: the throwaway PostgreSQL, the moto server over HTTP, nothing mocked."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from pg2kinesis_dagster.core.errors import SinkError
from pg2kinesis_dagster.devstack.moto import MotoServer
from pg2kinesis_dagster.devstack.postgres import PostgresServer
from pg2kinesis_dagster.devstack.workload import create_sample_schema, run_sample_workload
from pg2kinesis_dagster.postgres.slot import ReplicationSlot
from tests.helpers import assert_matches_ledger, confirmed_flush, dedupe, make_replicator, read_json


@pytest.fixture
def sample_db(pg_server: PostgresServer, pg_database: str, pg_conn) -> str:
    create_sample_schema(pg_conn)
    return pg_database


def test_round_trip_many_batches_every_change_in_order(
    pg_server: PostgresServer, sample_db: str, pg_conn, moto_server: MotoServer, kinesis_stream: str
) -> None:
    with make_replicator(pg_server, sample_db, moto_server, kinesis_stream, max_changes=300) as replicator:
        replicator.prepare()
        ledger = run_sample_workload(pg_conn, transactions=400, seed=7)
        result = replicator.drain()
    assert result.windows > 3, "small windows must have split the backlog"
    records = read_json(moto_server, kinesis_stream)
    # Normal operation: no duplicates at all.
    assert len({r["id"] for r in records}) == len(records)
    assert_matches_ledger(records, ledger)
    counts = Counter((r["table"], r["op"]) for r in records)
    assert counts == ledger.counts()
    assert {op for _, op in counts} == {"INSERT", "UPDATE", "DELETE", "TRUNCATE"}
    assert ("public.order_items", "UPDATE") in counts and ("public.audit_log", "INSERT") in counts
    # Drained: the slot stands at or past the last commit and nothing is pending.
    with make_replicator(pg_server, sample_db, moto_server, kinesis_stream) as again:
        assert again.drain().stats.changes == 0


def test_csv_formats_match_pg2kinesis(
    pg_server: PostgresServer, sample_db: str, pg_conn, moto_server: MotoServer, kinesis_stream: str
) -> None:
    with make_replicator(pg_server, sample_db, moto_server, kinesis_stream, message_formatter="CSV") as r:
        r.prepare()
        with pg_conn.cursor() as cur:
            cur.execute("BEGIN; INSERT INTO customers (id, name) VALUES (41, 'a'); "
                        "UPDATE customers SET name = 'b' WHERE id = 41; SELECT txid_current(); ")
            xid = cur.fetchone()[0]
            cur.execute("COMMIT")
        r.drain()
    csv = [rec["data"].decode() for rec in moto_server.read_stream(kinesis_stream)]
    assert sorted(csv) == sorted([f"0,CDC,{xid},public.customers,INSERT,41", f"0,CDC,{xid},public.customers,UPDATE,41"])

    with make_replicator(
        pg_server, sample_db, moto_server, kinesis_stream, message_formatter="CSVPayload"
    ) as r:
        with pg_conn.cursor() as cur:
            cur.execute("BEGIN; DELETE FROM customers WHERE id = 41; SELECT txid_current(); ")
            xid = cur.fetchone()[0]
            cur.execute("COMMIT")
        r.drain()
    last = moto_server.read_stream(kinesis_stream)[-1]["data"].decode()
    assert last == "0,CDC," + json.dumps(
        {"xid": str(xid), "table": "public.customers", "operation": "DELETE", "pkey": "41"}
    )


def test_failure_between_publish_and_advance_loses_nothing(
    pg_server: PostgresServer, sample_db: str, pg_conn, moto_server: MotoServer, kinesis_stream: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    with make_replicator(pg_server, sample_db, moto_server, kinesis_stream, max_changes=200) as r:
        r.prepare()
    before = confirmed_flush(pg_server, sample_db)
    ledger = run_sample_workload(pg_conn, transactions=150, seed=3)

    def crash(self: ReplicationSlot, target: int) -> None:
        raise RuntimeError("simulated crash after publish, before advance")

    with monkeypatch.context() as mp:
        mp.setattr(ReplicationSlot, "advance", crash)
        with (
            make_replicator(pg_server, sample_db, moto_server, kinesis_stream, max_changes=200) as r,
            pytest.raises(RuntimeError, match="simulated crash"),
        ):
            r.run_window()
    assert confirmed_flush(pg_server, sample_db) == before, "the slot moved although advance failed"
    first_attempt = read_json(moto_server, kinesis_stream)
    assert first_attempt, "the first batch was published"

    with make_replicator(pg_server, sample_db, moto_server, kinesis_stream, max_changes=200) as r:
        r.drain()
    records = read_json(moto_server, kinesis_stream)
    duplicates = len(records) - len(dedupe(records))
    # The failed batch is published again: exactly its records are duplicates.
    assert duplicates == len(first_attempt)
    assert_matches_ledger(records, ledger)


def test_slot_not_advanced_when_publishing_fails(
    pg_server: PostgresServer, sample_db: str, pg_conn, moto_server: MotoServer, kinesis_stream: str
) -> None:
    with make_replicator(pg_server, sample_db, moto_server, kinesis_stream) as r:
        r.prepare()
        run_sample_workload(pg_conn, transactions=20, seed=1)
        before = confirmed_flush(pg_server, sample_db)
        moto_server.client().delete_stream(StreamName=kinesis_stream)
        with pytest.raises(SinkError, match=kinesis_stream):
            r.drain()
    assert confirmed_flush(pg_server, sample_db) == before


def test_filters_and_no_key_policy(
    pg_server: PostgresServer, sample_db: str, pg_conn, moto_server: MotoServer, kinesis_stream: str
) -> None:
    with make_replicator(
        pg_server, sample_db, moto_server, kinesis_stream,
        table_pat=r"^public\.(customers|audit_log)$", operations="insert,update", no_primary_key="skip",
    ) as r:
        r.prepare()
        ledger = run_sample_workload(pg_conn, transactions=100, seed=5)
        result = r.drain()
    records = read_json(moto_server, kinesis_stream)
    expected = [c for c in ledger.changes() if c.table == "public.customers" and c.op in ("INSERT", "UPDATE")]
    assert len(records) == len(expected)
    assert {r["table"] for r in records} == {"public.customers"}
    skipped = sum(1 for c in ledger.changes() if c.table == "public.audit_log" and c.op in ("INSERT", "UPDATE"))
    assert result.stats.skipped_no_key == skipped > 0
    assert result.stats.changes == sum(1 for _ in ledger.changes())
    assert result.stats.published + result.stats.filtered + result.stats.skipped_no_key == result.stats.changes
