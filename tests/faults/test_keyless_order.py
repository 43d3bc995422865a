"""Tables without a primary key under failing Kinesis requests: the ordering rule of the README's Guarantees.

Two keyless tables, one ``REPLICA IDENTITY FULL`` (UPDATE/DELETE carry the old row) and one with the default
identity (they do not), next to a keyed table with hot rows; rows of equal content on purpose. The sink keeps
several requests in flight while the fault proxy fails a third of the entries and whole requests. What must
hold (``check_against_ledger``): nothing lost or duplicated; keyed rows in commit order; in keyless tables a
change is never read out of commit order against a change of the same row content it touches, nor against
any change of the table when it holds the whole table (an UPDATE/DELETE without the old row, a TRUNCATE).
Inserts of keyless rows may overtake each other: the test counts how often that happened.
"""

from __future__ import annotations

import random
from itertools import pairwise
from typing import Any

from pg2kinesis_dagster.devstack.moto import MotoServer
from pg2kinesis_dagster.devstack.postgres import PostgresServer
from pg2kinesis_dagster.devstack.workload import LedgerTransaction, RowChange
from pg2kinesis_dagster.kinesis.sink import KinesisSink, make_kinesis_client
from pg2kinesis_dagster.pipeline import ReplicationSettings, Replicator
from tests.faults.harness import PROFILE, SlotMonitor, report_line
from tests.faults.proxy import FaultProxy, Faults
from tests.helpers import _id_order, assert_no_loss_no_reordering, check_against_ledger, pg_settings, read_json

SCHEMA = """
CREATE TABLE items (id int PRIMARY KEY, n int);
CREATE TABLE events_full (tag text, n int);
ALTER TABLE events_full REPLICA IDENTITY FULL;
CREATE TABLE events_plain (tag text, n int);
"""


def _row(values: tuple[Any, ...]) -> dict[str, str | None]:
    return {"tag": values[0], "n": values[1]}


def _statement(cur: Any, rng: random.Random, txn: LedgerTransaction) -> None:
    roll = rng.random()
    table = "events_full" if rng.random() < 0.6 else "events_plain"
    if roll < 0.25:
        item = rng.randrange(4 if rng.random() < 0.5 else 200)
        cur.execute("INSERT INTO items VALUES (%s, 0) ON CONFLICT (id) DO UPDATE SET n = items.n + 1 "
                    "RETURNING id::text, n::text, (xmax = 0)", (item,))
        key, n, inserted = cur.fetchone()
        txn.changes.append(RowChange("public.items", "INSERT" if inserted else "UPDATE", {"id": key},
                                     {"id": key, "n": n}))
    elif roll < 0.75:
        # Few distinct contents: equal rows are common, and must stay ordered among themselves.
        cur.execute(f"INSERT INTO {table} VALUES (%s, %s) RETURNING tag, n::text",
                    (f"t{rng.randrange(20)}", rng.randrange(3)))
        txn.changes.append(RowChange(f"public.{table}", "INSERT", None, _row(cur.fetchone())))
    else:
        cur.execute(f"SELECT ctid, tag, n::text FROM {table} ORDER BY random() LIMIT 1 FOR UPDATE")
        picked = cur.fetchone()
        if picked is None:
            return
        ctid, old = picked[0], _row(picked[1:])
        if roll < 0.92:
            cur.execute(f"UPDATE {table} SET n = n + 1 WHERE ctid = %s RETURNING tag, n::text", (ctid,))
            txn.changes.append(RowChange(f"public.{table}", "UPDATE", None, _row(cur.fetchone()), old))
        else:
            cur.execute(f"DELETE FROM {table} WHERE ctid = %s", (ctid,))
            txn.changes.append(RowChange(f"public.{table}", "DELETE", None, None, old))


def run_workload(conn: Any, transactions: int, seed: int) -> list[LedgerTransaction]:
    rng = random.Random(seed)
    ledger = []
    conn.autocommit = False
    with conn.cursor() as cur:
        for _ in range(transactions):
            cur.execute("SELECT (txid_current() % 4294967296)::bigint")
            txn = LedgerTransaction(xid=int(cur.fetchone()[0]))
            for _ in range(rng.randint(1, 8)):
                _statement(cur, rng, txn)
            conn.commit()
            if txn.changes:
                ledger.append(txn)
    conn.autocommit = True
    return ledger


def keyless_insert_inversions(records: list[dict[str, Any]]) -> int:
    """Adjacent keyless inserts (in consumer order) read out of commit order: the relaxation at work."""
    inserts = [r for r in sorted(records, key=lambda r: r["_pos"])
               if r["pk"] is None and r["op"] == "INSERT"]
    return sum(1 for a, b in pairwise(inserts)
               if a["table"] == b["table"] and _id_order(b["id"]) < _id_order(a["id"]))


def test_keyless_tables_keep_their_ordering_rule_under_failing_requests(
    pg_server: PostgresServer, pg_database: str, pg_conn: Any, moto_server: MotoServer, kinesis_stream: str,
) -> None:
    with pg_conn.cursor() as cur:
        cur.execute(SCHEMA)
    faults = Faults(entry_failure_rate=0.3, request_failure_rate=0.1,
                    request_faults=("http500", "http503", "throttle400", "reset"))  # none applied: no duplicates
    transactions = PROFILE.throttle_transactions
    with FaultProxy(moto_server.endpoint_url, seed=11, faults=faults) as proxy:
        client = make_kinesis_client(region_name=moto_server.region, endpoint_url=proxy.endpoint_url,
                                     connect_timeout=1, read_timeout=5, max_attempts=1)
        sink = KinesisSink(client, kinesis_stream, max_retry_seconds=60.0, base_backoff=0.01, max_backoff=0.2)
        settings = ReplicationSettings(create_slot=True, message_formatter="JSON", max_changes=400)
        with Replicator(pg_settings(pg_server, pg_database), sink, settings) as replicator:
            replicator.prepare()
            monitor = SlotMonitor(pg_server, pg_database).start()
            ledger = run_workload(pg_conn, transactions, seed=11)
            try:
                result = replicator.drain()
            finally:
                monitor.stop()
        counts = proxy.snapshot()
    records = read_json(moto_server, kinesis_stream)
    report = check_against_ledger(records, ledger)
    inversions = keyless_insert_inversions(records)
    report_line("keyless_order", {"windows": result.windows, "proxy": counts, "keyless_insert_inversions": inversions,
                                  **report.as_dict()})
    assert counts.get("entry_ProvisionedThroughputExceededException", 0) + counts.get("entry_InternalFailure", 0) > 0
    assert not monitor.backwards
    assert_no_loss_no_reordering(report, max_duplicates=0)
    ops = {(r["table"], r["op"]) for r in records}
    assert {("public.events_full", "UPDATE"), ("public.events_full", "DELETE"),
            ("public.events_plain", "UPDATE")} <= ops, ops
