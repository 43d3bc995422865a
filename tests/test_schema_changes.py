"""Keys that follow the schema: DDL inside a live workload, replicated while it runs, with every plugin."""

from __future__ import annotations

import random
import threading
import time
from typing import Any

import pytest

from pg2kinesis_dagster.core.changes import Transaction
from pg2kinesis_dagster.core.schema_keys import SchemaFollowingKeys, xid_precedes
from pg2kinesis_dagster.devstack.moto import MotoServer
from pg2kinesis_dagster.devstack.postgres import PostgresServer
from tests.helpers import dedupe, make_replicator, read_json


class _Key:
    def __init__(self, columns: tuple[str, ...], changed_by: int | None) -> None:
        self.key_columns = columns
        self.changed_by_xid = changed_by


class FakeCatalog:
    """The catalog as of "now": whatever the test says the DDL left."""

    def __init__(self, tables: dict[tuple[str, str], _Key]) -> None:
        self.now = dict(tables)
        self.loads = 0

    def tables(self) -> dict[tuple[str, str], _Key]:
        return self.now

    def reload(self) -> None:
        self.loads += 1

    def key_columns(self, schema: str, table: str) -> tuple[str, ...] | None:
        found = self.now.get((schema, table))
        return found.key_columns if found else None


def _txn(xid: int, tables: list[str]) -> Transaction:
    from pg2kinesis_dagster.core.changes import Change, Operation

    txn = Transaction(xid, 0, 0, None)
    txn.changes = [Change(xid, 0, i, "public", t, Operation.INSERT) for i, t in enumerate(tables)]
    return txn


def test_two_ddl_in_one_batch_each_take_effect_at_their_own_transaction() -> None:
    assert xid_precedes(5, 6) and not xid_precedes(6, 5) and xid_precedes(2**32 - 10, 3)  # across wraparound
    catalog = FakeCatalog({("public", "a"): _Key((), 100), ("public", "b"): _Key(("id", "k"), 100)})
    keys = SchemaFollowingKeys(catalog, max_age_seconds=None)
    seen: list[tuple[int, str, tuple[str, ...] | None]] = []
    # Loaded before the DDL: a has no key, b is keyed by (id, k).
    for txn in keys.follow([_txn(200, ["a", "b"])], object()):
        seen += [(txn.xid, c.table, keys.key_columns("public", c.table)) for c in txn.changes]
    # Then xid 300 adds a's key and xid 301 drops b's column k (keyed by id since); both are in the catalog
    # when the stream reaches 300.
    catalog.now = {("public", "a"): _Key(("id",), 300), ("public", "b"): _Key(("id",), 301)}
    stream = [_txn(299, ["a", "b"]), _txn(300, []), _txn(250, ["a", "b"]), _txn(301, []), _txn(302, ["a", "b"])]
    for txn in keys.follow(stream, object()):
        seen += [(txn.xid, c.table, keys.key_columns("public", c.table)) for c in txn.changes]
    assert seen == [
        (200, "a", ()), (200, "b", ("id", "k")),
        (299, "a", ()), (299, "b", ("id", "k")),
        (250, "a", ("id",)), (250, "b", ("id", "k")),  # after 300 committed, before 301
        (302, "a", ("id",)), (302, "b", ("id",)),
    ]
    assert catalog.loads == 2


def test_empty_last_part_of_a_split_transaction_is_no_schema_change() -> None:
    """A transaction decoded in parts may end with a part without changes: that is no DDL, no catalog read."""
    catalog = FakeCatalog({("public", "a"): _Key(("id",), None)})
    keys = SchemaFollowingKeys(catalog, max_age_seconds=None)
    whole = _txn(200, ["a", "a"])
    part = whole.split()
    stream = [part, whole]  # the last part: no changes left, first_index 2
    generation = keys.generation
    for txn in keys.follow(stream, object()):
        for change in txn.changes:
            keys.key_columns("public", change.table)
    assert not keys.reload_due and keys.reloads == 0 and keys.generation == generation
    for _ in keys.follow([_txn(201, [])], object()):  # a real DDL: BEGIN/COMMIT only
        pass
    assert keys.reload_due
    assert keys.key_columns("public", "a") == ("id",) and keys.reloads == 1 and keys.generation == generation + 1


class Workload:
    """Serial writes with DDL at fixed points; the expected key of every change, per the schema of its time."""

    def __init__(self, conn: Any, seed: int) -> None:
        self.conn = conn
        self.rng = random.Random(seed)
        self.expected: list[tuple[str, str, dict[str, str] | None]] = []  # (table, op, pk), commit order
        self.a_keyed = False
        self.b_key = ("id", "k")
        self.c_exists = False
        self.next_id = {"a": 1, "b": 1, "c": 1}
        self.rows: dict[str, list[int]] = {"a": [], "b": [], "c": []}

    def _pk(self, table: str, row: int) -> dict[str, str] | None:
        if table == "a":
            return {"id": str(row)} if self.a_keyed else None
        if table == "b":
            return {"id": str(row), "k": str(row % 7)} if self.b_key == ("id", "k") else {"id": str(row)}
        return {"id": str(row)}

    def transaction(self) -> None:
        tables = ["a", "b"] + (["c"] if self.c_exists else [])
        changes: list[tuple[str, str, dict[str, str] | None]] = []
        with self.conn.cursor() as cur:
            cur.execute("BEGIN")
            for _ in range(self.rng.randint(1, 3)):
                table = self.rng.choice(tables)
                if self.rows[table] and self.rng.random() < 0.4:
                    row = self.rng.choice(self.rows[table])
                    cur.execute(f"UPDATE {table} SET v = %s WHERE id = %s", (f"u{self.rng.random()}", row))
                    changes.append((f"public.{table}", "UPDATE", self._pk(table, row)))
                else:
                    row = self.next_id[table]
                    self.next_id[table] += 1
                    if table == "b" and self.b_key == ("id", "k"):
                        cur.execute("INSERT INTO b (id, k, v) VALUES (%s, %s, 'x')", (row, row % 7))
                    else:
                        cur.execute(f"INSERT INTO {table} (id, v) VALUES (%s, 'x')", (row,))
                    self.rows[table].append(row)
                    changes.append((f"public.{table}", "INSERT", self._pk(table, row)))
            cur.execute("COMMIT")
        self.expected += changes

    def ddl(self, step: int) -> None:
        with self.conn.cursor() as cur:
            if step == 0:
                cur.execute("ALTER TABLE a ADD PRIMARY KEY (id)")
                self.a_keyed = True
            elif step == 1:
                # A key column dropped (which drops the primary key with it), the table keyed anew.
                cur.execute("ALTER TABLE b DROP COLUMN k, ADD PRIMARY KEY (id)")
                self.b_key = ("id",)
            else:
                cur.execute("CREATE TABLE c (id int PRIMARY KEY, v text)")
                self.c_exists = True


@pytest.mark.parametrize("plugin", ["test_decoding", "wal2json", "pgoutput"])
def test_keys_follow_ddl_inside_a_live_workload(
    plugin: str, pg_server: PostgresServer, pg_database: str, pg_conn, moto_server: MotoServer, kinesis_stream: str,
) -> None:
    with pg_conn.cursor() as cur:
        cur.execute("CREATE TABLE a (id int NOT NULL, v text)")
        cur.execute("ALTER TABLE a REPLICA IDENTITY FULL")  # keyless tables need it for wal2json and pgoutput
        cur.execute("CREATE TABLE b (id int NOT NULL, k int NOT NULL, v text, PRIMARY KEY (id, k))")
    replicator = make_replicator(pg_server, pg_database, moto_server, kinesis_stream, output_plugin=plugin,
                                 max_changes=5)
    workload = Workload(pg_conn, seed=hash(plugin) % 1000)
    stop = threading.Event()
    errors: list[BaseException] = []

    def replicate() -> None:
        try:
            while not stop.is_set():
                replicator.drain()
                time.sleep(0.05)  # let a few transactions and a DDL pile up: batches then straddle the DDL
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    with replicator:
        replicator.prepare()
        workload.transaction()
        replicator.drain()  # keys loaded before any DDL, as in a running deployment
        thread = threading.Thread(target=replicate, daemon=True)
        thread.start()
        try:
            for step in range(3):
                for _ in range(25):
                    workload.transaction()
                workload.ddl(step)
            for _ in range(25):
                workload.transaction()
        finally:
            stop.set()
            thread.join(timeout=120)
        assert not errors, errors
        replicator.drain()
    got = [(r["table"], r["op"], r["pk"]) for r in sorted(dedupe(read_json(moto_server, kinesis_stream)),
                                                          key=lambda r: _order(r["id"]))]
    assert len(got) == len(workload.expected)
    wrong = [(i, g, w) for i, (g, w) in enumerate(zip(got, workload.expected, strict=True)) if g != w]
    assert not wrong, f"{len(wrong)} changes keyed wrongly, first: {wrong[:3]}"
    # The DDL really happened between batches being read, not only before or after all of them.
    assert replicator.schema_keys.reloads >= 1 or plugin != "test_decoding"


def _order(change_id: str) -> tuple[int, int]:
    lsn, _, index = change_id.rpartition(":")
    high, _, low = lsn.partition("/")
    return (int(high, 16) << 32) | int(low, 16), int(index)


def test_keys_are_read_again_after_max_age_and_the_metadata_refreshes_hourly() -> None:
    from pg2kinesis_dagster.defs import build_definitions

    now = [0.0]
    catalog = FakeCatalog({("public", "a"): _Key((), 1)})
    keys = SchemaFollowingKeys(catalog, max_age_seconds=60, clock=lambda: now[0])
    for _ in keys.follow([_txn(10, ["a"])], object()):
        assert keys.key_columns("public", "a") == ()
    catalog.now = {("public", "a"): _Key(("id",), 5)}  # changed by a transaction the stream never shows
    now[0] = 61.0
    for _ in keys.follow([_txn(11, ["a"])], object()):
        assert keys.key_columns("public", "a") == ("id",)
    schedule = build_definitions({}).get_schedule_def("primary_key_metadata_schedule")
    assert schedule.cron_schedule == "0 * * * *" and schedule.default_status.value == "RUNNING"
