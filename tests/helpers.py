"""Shared test helpers: build a Replicator on the throwaway stack and check Kinesis against a ledger."""

from __future__ import annotations

import json
from collections import defaultdict
from typing import Any

from pg2kinesis_dagster.devstack.moto import MotoServer
from pg2kinesis_dagster.devstack.postgres import PostgresServer
from pg2kinesis_dagster.devstack.workload import WorkloadLedger
from pg2kinesis_dagster.kinesis.sink import KinesisSink, make_kinesis_client
from pg2kinesis_dagster.pipeline import ReplicationSettings, Replicator
from pg2kinesis_dagster.postgres.connection import PostgresSettings


def pg_settings(server: PostgresServer, dbname: str, user: str = "postgres", password: str | None = None
                ) -> PostgresSettings:
    return PostgresSettings(host=server.host, port=server.port, dbname=dbname, user=user, password=password)


def make_sink(moto: MotoServer, stream: str, **kwargs: Any) -> KinesisSink:
    client = make_kinesis_client(region_name=moto.region, endpoint_url=moto.endpoint_url)
    kwargs.setdefault("max_retry_seconds", 20.0)
    return KinesisSink(client, stream, **kwargs)


def make_replicator(
    server: PostgresServer, dbname: str, moto: MotoServer, stream: str, *,
    user: str = "postgres", password: str | None = None, **settings: Any,
) -> Replicator:
    settings.setdefault("create_slot", True)
    settings.setdefault("message_formatter", "JSON")
    return Replicator(
        pg_settings(server, dbname, user, password), make_sink(moto, stream), ReplicationSettings(**settings)
    )


def confirmed_flush(server: PostgresServer, dbname: str, slot: str = "pg2kinesis") -> str | None:
    conn = server.connect(dbname)
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = %s", (slot,))
            row = cur.fetchone()
            return row[0] if row else None
    finally:
        conn.close()


def read_json(moto: MotoServer, stream: str) -> list[dict[str, Any]]:
    """Every record of the stream as its JSON change, plus shard and sequence number."""
    out = []
    for rec in moto.read_stream(stream):
        change = json.loads(rec["data"])
        change["_shard"] = rec["shard_id"]
        change["_seq"] = int(rec["sequence_number"])
        change["_partition_key"] = rec["partition_key"]
        out.append(change)
    return out


def _id_order(change_id: str) -> tuple[int, int]:
    lsn, _, index = change_id.rpartition(":")
    high, _, low = lsn.partition("/")
    return ((int(high, 16) << 32) | int(low, 16), int(index))


def dedupe(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Keep each change id's first occurrence in its shard order, as a consumer would."""
    seen: set[str] = set()
    out = []
    for rec in sorted(records, key=lambda r: (r["_shard"], r["_seq"])):
        if rec["id"] not in seen:
            seen.add(rec["id"])
            out.append(rec)
    return out


def assert_matches_ledger(records: list[dict[str, Any]], ledger: WorkloadLedger) -> None:
    """Every committed change arrived once (after dedup), with the source's values, in order."""
    unique = dedupe(records)
    in_commit_order = sorted(unique, key=lambda r: _id_order(r["id"]))
    expected = list(ledger.changes())
    assert len(in_commit_order) == len(expected), (len(in_commit_order), len(expected))
    # Commit order: transactions appear in the ledger's order with the ledger's xids.
    xids = []
    for rec in in_commit_order:
        if not xids or xids[-1] != rec["xid"]:
            xids.append(rec["xid"])
    assert xids == [t.xid for t in ledger.transactions if t.changes]
    for got, want in zip(in_commit_order, expected, strict=True):
        assert got["table"] == want.table, (got, want)
        assert got["op"] == want.op, (got, want)
        assert got["pk"] == want.key, (got, want)
        if want.op in ("INSERT", "UPDATE"):
            assert got["after"] == want.values, (got, want)
        else:
            assert got["after"] is None
    assert_per_key_order(unique)


def assert_per_key_order(unique: list[dict[str, Any]]) -> None:
    """In each shard's sequence order, a row's changes come in commit order."""
    by_key: dict[tuple[str, str], list[tuple[int, tuple[int, int]]]] = defaultdict(list)
    for rec in unique:
        if rec["pk"] is not None:
            key = (rec["table"], json.dumps(rec["pk"], sort_keys=True))
            by_key[key].append((rec["_seq"], _id_order(rec["id"])))
    shards_per_key: dict[tuple[str, str], set[str]] = defaultdict(set)
    for rec in unique:
        if rec["pk"] is not None:
            shards_per_key[(rec["table"], json.dumps(rec["pk"], sort_keys=True))].add(rec["_shard"])
    for key, entries in by_key.items():
        assert len(shards_per_key[key]) == 1, f"row {key} spread over shards {shards_per_key[key]}"
        ordered = [order for _, order in sorted(entries)]
        assert ordered == sorted(ordered), f"row {key} out of commit order"
