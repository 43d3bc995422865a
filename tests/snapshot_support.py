"""Helpers of the snapshot tests: a concurrent workload, tables' contents as text, and a consumer applying records.

The consumer reads every shard in sequence order (deaggregating KPL records) and applies each record to a
dictionary by key: INSERT, UPDATE and SNAPSHOT set the row, DELETE removes it, an UPDATE that changes the key
removes the old key. A row's records share a shard, except the old key of a key change, whose removal travels
with the new key: the workload never reuses a key, so such a removal is final (a later record of the old key
in WAL order, by id, is reported as stale).
"""

from __future__ import annotations

import base64
import json
import random
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import psycopg2
import psycopg2.extensions
from aws_kinesis_agg.deaggregator import iter_deaggregate_records

from pg2kinesis_dagster.devstack.moto import MotoServer
from pg2kinesis_dagster.devstack.postgres import PostgresServer

KPL_MAGIC = b"\xf3\x89\x9a\xc2"

# Two tables: a single-column and a composite key, values of a few types.
TABLES = {
    "public.items": ("id",),
    "public.pairs": ("a", "b"),
}
SCHEMA_SQL = """
CREATE TABLE public.items (id bigint PRIMARY KEY, v integer NOT NULL, note text, flag boolean,
                           amount numeric(12,2), at timestamptz DEFAULT now());
CREATE TABLE public.pairs (a integer, b text, v integer NOT NULL, tags text[], PRIMARY KEY (a, b));
"""


def create_tables(conn: psycopg2.extensions.connection, rows: int) -> None:
    """The two tables with ``rows`` rows each (keys 1..rows), written before the slot exists."""
    with conn.cursor() as cur:
        cur.execute(SCHEMA_SQL)
        cur.execute("INSERT INTO public.items (id, v, note, flag, amount) SELECT g, g, 'row ' || g, g %% 2 = 0, "
                    "g / 7.0 FROM generate_series(1, %s) g", (rows,))
        cur.execute("INSERT INTO public.pairs (a, b, v, tags) SELECT g, 'k' || g, g, ARRAY['x', 'y ' || g] "
                    "FROM generate_series(1, %s) g", (rows,))


def table_contents(conn: psycopg2.extensions.connection, table: str) -> dict[tuple[str | None, ...], dict[str, Any]]:
    """Every row as PostgreSQL's text values (the output functions, as the plugins print them), by key."""
    key = TABLES[table]
    raw = psycopg2.extensions.new_type
    with conn.cursor() as cur:
        cur.execute(f"SELECT * FROM {table} LIMIT 0")
        oids = tuple({d.type_code for d in cur.description})
        psycopg2.extensions.register_type(raw(oids, "RAW_TEXT_TEST", lambda v, c: v), cur)
        cur.execute(f"SELECT * FROM {table}")
        names = [d.name for d in cur.description]
        out = {}
        for row in cur.fetchall():
            values = dict(zip(names, row, strict=True))
            out[tuple(values[k] for k in key)] = values
    return out


@dataclass
class Workload:
    """Inserts, updates, deletes and key changes in small transactions until stopped; fresh keys only."""

    server: PostgresServer
    dbname: str
    rows: int
    seed: int = 1
    # Pause between transactions: keeps the volume the test publishes (into moto, slow) proportionate.
    pace_seconds: float = 0.002
    transactions: int = 0
    stop: threading.Event = field(default_factory=threading.Event)
    error: BaseException | None = None

    def __post_init__(self) -> None:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._next = self.rows + 1
        self._live = {t: list(range(1, self.rows + 1)) for t in TABLES}

    def start(self) -> Workload:
        self._thread.start()
        return self

    def wait_for(self, transactions: int, timeout: float = 60.0) -> None:
        """Until the workload committed ``transactions`` (it runs on its own pace, whatever else is fast or slow)."""
        deadline = time.monotonic() + timeout
        while self.transactions < transactions and self.error is None and not self.stop.is_set():
            assert time.monotonic() < deadline, f"the workload made {self.transactions} transactions in {timeout}s"
            time.sleep(0.01)

    def finish(self) -> None:
        self.stop.set()
        self._thread.join(60)
        assert not self._thread.is_alive(), "the workload did not stop"
        if self.error is not None:
            raise self.error

    def _fresh(self) -> int:
        self._next += 1
        return self._next

    def _pick(self, table: str, rng: random.Random) -> int:
        live = self._live[table]
        i = rng.randrange(len(live))
        live[i], live[-1] = live[-1], live[i]
        return live.pop()

    def _run(self) -> None:
        rng = random.Random(self.seed)
        conn = self.server.connect(self.dbname)
        conn.autocommit = False
        try:
            with conn.cursor() as cur:
                while not self.stop.is_set():
                    for _ in range(rng.randint(1, 4)):
                        self._statement(cur, rng)
                    conn.commit()
                    self.transactions += 1
                    self.stop.wait(self.pace_seconds)
        except BaseException as exc:  # reported by finish()
            self.error = exc
        finally:
            conn.close()

    def _statement(self, cur: psycopg2.extensions.cursor, rng: random.Random) -> None:
        table = rng.choice(list(TABLES))
        kind = rng.random()
        items = table == "public.items"
        if kind < 0.25:
            key = self._fresh()
            if items:
                cur.execute("INSERT INTO public.items (id, v, note, flag, amount) VALUES (%s, 0, 'new', true, 1.5)",
                            (key,))
            else:
                cur.execute("INSERT INTO public.pairs VALUES (%s, %s, 0, '{new}')", (key, f"k{key}"))
            self._live[table].append(key)
        elif kind < 0.65:
            key = self._pick(table, rng)
            if items:
                cur.execute("UPDATE public.items SET v = v + 1, note = %s, flag = NOT flag WHERE id = %s",
                            (f"upd {rng.random():.6f}", key))
            else:
                cur.execute("UPDATE public.pairs SET v = v + 1, tags = tags || 'u'::text WHERE a = %s AND b = %s",
                            (key, f"k{key}"))
            self._live[table].append(key)
        elif kind < 0.85:
            key = self._pick(table, rng)
            if items:
                cur.execute("DELETE FROM public.items WHERE id = %s", (key,))
            else:
                cur.execute("DELETE FROM public.pairs WHERE a = %s AND b = %s", (key, f"k{key}"))
        else:
            old, new = self._pick(table, rng), self._fresh()
            if items:
                cur.execute("UPDATE public.items SET id = %s, v = v + 100 WHERE id = %s", (new, old))
            else:
                cur.execute("UPDATE public.pairs SET a = %s, b = %s, v = v + 100 WHERE a = %s AND b = %s",
                            (new, f"k{new}", old, f"k{old}"))
            self._live[table].append(new)


def read_changes(moto: MotoServer, stream: str) -> list[dict[str, Any]]:
    """Every JSON change in the stream, shard after shard, each in sequence order (KPL records deaggregated)."""
    out: list[dict[str, Any]] = []
    for rec in moto.read_stream(stream):
        data = rec["data"]
        if data.startswith(KPL_MAGIC):
            raw = {"Data": data, "PartitionKey": rec["partition_key"], "SequenceNumber": rec["sequence_number"],
                   "ApproximateArrivalTimestamp": 0}
            for user in iter_deaggregate_records([raw], data_format="Boto3"):
                k = user["kinesis"]
                payload = base64.b64decode(k["data"]) if k.get("aggregated") else k["data"]
                out.append({**json.loads(payload), "_shard": rec["shard_id"]})
        else:
            out.append({**json.loads(data), "_shard": rec["shard_id"]})
    return out


def _id_order(change_id: str) -> tuple[int, int]:
    lsn, _, index = change_id.rpartition(":")
    high, _, low = lsn.partition("/")
    return (int(high, 16) << 32) | int(low, 16), int(index)


@dataclass
class Applied:
    state: dict[tuple[str, tuple[str | None, ...]], dict[str, Any]]
    snapshot_rows: int
    duplicates: int
    stale: list[str]


def apply_by_key(changes: Iterable[dict[str, Any]]) -> Applied:
    """The consumer: dedupe by id, apply each record to a dictionary by key (see the module docstring)."""
    state: dict[tuple[str, tuple[str | None, ...]], dict[str, Any]] = {}
    moved: dict[tuple[str, tuple[str | None, ...]], tuple[int, int]] = {}
    last_seen: dict[tuple[str, tuple[str | None, ...]], tuple[int, int]] = {}
    seen: set[str] = set()
    duplicates = snapshot_rows = 0
    stale: list[str] = []
    for rec in changes:
        if rec["id"] in seen:
            duplicates += 1
            continue
        seen.add(rec["id"])
        table, op, order = rec["table"], rec["op"], _id_order(rec["id"])
        key_columns = TABLES[table]
        snapshot_rows += op == "SNAPSHOT"
        image = rec["after"] if rec["after"] is not None else rec["before"]
        row = (table, tuple(image[k] for k in key_columns))
        if row in moved and order > moved[row]:
            stale.append(f"{rec['id']} {op} of {row} after that key moved away")
        if order < last_seen.get(row, (-1, -1)):
            stale.append(f"{rec['id']} {op} of {row} after a later change of it")
        last_seen[row] = order
        if op in ("INSERT", "UPDATE", "SNAPSHOT"):
            before = rec.get("before")
            if op == "UPDATE" and before is not None:
                old = (table, tuple(before[k] for k in key_columns))
                if old != row:
                    state.pop(old, None)
                    moved[old] = order
            state[row] = rec["after"]
        elif op == "DELETE":
            state.pop(row, None)
        else:
            raise AssertionError(f"unexpected operation {op} in {rec}")
    for row in moved:
        state.pop(row, None)
    return Applied(state, snapshot_rows, duplicates, stale)


def expected_state(conn: psycopg2.extensions.connection) -> dict[tuple[str, tuple[str | None, ...]], dict[str, Any]]:
    return {(table, key): row for table in TABLES for key, row in table_contents(conn, table).items()}
