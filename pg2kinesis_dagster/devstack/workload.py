"""A sample schema and a deterministic write workload, for the demo and the tests.

The schema covers the shapes CDC has to get right: a serial key
(``public.customers``), a composite key (``public.order_items``), no primary
key at all (``public.audit_log``) and names that need quoting
(``public."Mixed Case"``).

:func:`run_sample_workload` commits a seeded random mix of multi-statement
transactions and returns a :class:`WorkloadLedger`: exactly what was committed,
row by row, in commit order and, inside a transaction, in WAL order. Tests compare
what reached Kinesis against it.

Ledger shape (all values are PostgreSQL's text form, ``None`` is SQL NULL)::

    WorkloadLedger
      .transactions: list[LedgerTransaction]         # committed ones, in commit order
          .xid: int                                  # 32-bit xid, as decoders print it
          .changes: list[RowChange]                  # in execution (= WAL) order
              .table: "public.customers"             # "schema.table", unquoted
              .op: "INSERT" | "UPDATE" | "DELETE" | "TRUNCATE"
              .key: {"id": "7"} | None               # primary key; None for audit_log/TRUNCATE
              .values: {"id": "7", "name": ...} | None   # row after the change; None for DELETE/TRUNCATE
              .old_values: {...} | None              # row before UPDATE/DELETE; None for INSERT/TRUNCATE
      .initial_state / .final_state()                # {"schema.table": [row dict, ...]} (sorted)
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from typing import Any

from psycopg2 import sql
from psycopg2.extensions import TRANSACTION_STATUS_IDLE
from psycopg2.extensions import connection as PgConnection

Row = dict[str, str | None]
Key = dict[str, str]
TableState = dict[str, list[Row]]

INSERT, UPDATE, DELETE, TRUNCATE = "INSERT", "UPDATE", "DELETE", "TRUNCATE"


@dataclass(frozen=True)
class SampleTable:
    """One table of the sample schema: its columns in order and its primary key."""

    schema: str
    name: str
    columns: tuple[str, ...]
    key: tuple[str, ...]  # empty: no primary key

    @property
    def qualified(self) -> str:
        """``schema.table`` unquoted, like :attr:`Change.qualified_table`."""
        return f"{self.schema}.{self.name}"

    @property
    def ident(self) -> sql.Composable:
        return sql.Identifier(self.schema, self.name)


CUSTOMERS = SampleTable("public", "customers", ("id", "name", "email", "balance", "updated_at"), ("id",))
ORDER_ITEMS = SampleTable(
    "public", "order_items", ("order_id", "line_no", "sku", "qty", "note"), ("order_id", "line_no")
)
AUDIT_LOG = SampleTable("public", "audit_log", ("at", "message"), ())
MIXED_CASE = SampleTable("public", "Mixed Case", ("Id", "Value Text"), ("Id",))
SAMPLE_TABLES: tuple[SampleTable, ...] = (CUSTOMERS, ORDER_ITEMS, AUDIT_LOG, MIXED_CASE)

SAMPLE_SCHEMA_SQL = """
CREATE TABLE IF NOT EXISTS public.customers (
    id serial PRIMARY KEY,
    name text,
    email text,
    balance numeric(12,2),
    updated_at timestamptz
);
CREATE TABLE IF NOT EXISTS public.order_items (
    order_id bigint,
    line_no int,
    sku text,
    qty int,
    note text NULL,
    PRIMARY KEY (order_id, line_no)
);
CREATE TABLE IF NOT EXISTS public.audit_log (
    at timestamptz,
    message text
);
CREATE TABLE IF NOT EXISTS public."Mixed Case" (
    "Id" int PRIMARY KEY,
    "Value Text" text
);
"""


@dataclass(frozen=True)
class RowChange:
    """One row change (or one TRUNCATE) as committed; see the module docstring."""

    table: str
    op: str
    key: Key | None
    values: Row | None
    old_values: Row | None = None


@dataclass
class LedgerTransaction:
    """A committed transaction: its xid and its changes in execution order."""

    xid: int
    changes: list[RowChange] = field(default_factory=list)


@dataclass
class WorkloadLedger:
    """What :func:`run_sample_workload` committed; see the module docstring for the shape."""

    seed: int
    initial_state: TableState
    transactions: list[LedgerTransaction] = field(default_factory=list)
    rolled_back: int = 0  # transactions run then rolled back: they must never reach Kinesis

    def changes(self) -> Iterator[RowChange]:
        """Every change of every committed transaction, in commit order."""
        for txn in self.transactions:
            yield from txn.changes

    def counts(self) -> Counter[tuple[str, str]]:
        """``{(table, op): number of changes}``."""
        return Counter((c.table, c.op) for c in self.changes())

    def key_history(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], list[RowChange]]:
        """Changes of keyed tables grouped by ``(table, key items)``, in commit order.

        Per-key order is what a Kinesis partition key must preserve.
        """
        history: dict[tuple[str, tuple[tuple[str, str], ...]], list[RowChange]] = {}
        for change in self.changes():
            if change.key is not None:
                history.setdefault((change.table, tuple(change.key.items())), []).append(change)
        return history

    def final_state(self) -> TableState:
        """The tables' contents after the last transaction, in :func:`snapshot_tables`' shape."""
        state = {name: list(rows) for name, rows in self.initial_state.items()}
        for change in self.changes():
            rows = state.setdefault(change.table, [])
            if change.op == TRUNCATE:
                rows.clear()
                continue
            if change.old_values is not None:
                rows.remove(change.old_values)  # one copy: keyless tables may hold duplicates
            if change.values is not None:
                rows.append(change.values)
        return {name: _sorted_rows(rows) for name, rows in state.items()}


def create_sample_schema(conn: PgConnection) -> list[str]:
    """Create the four sample tables (if missing); returns their ``schema.table`` names."""
    with conn.cursor() as cur:
        cur.execute(SAMPLE_SCHEMA_SQL)
    if not conn.autocommit:
        conn.commit()
    return [t.qualified for t in SAMPLE_TABLES]


def snapshot_tables(conn: PgConnection, tables: Sequence[SampleTable] = SAMPLE_TABLES) -> TableState:
    """Every row of ``tables`` as text, sorted, keyed by ``schema.table``."""
    state: TableState = {}
    ours = _idle(conn)
    with conn.cursor() as cur:
        for table in tables:
            cur.execute(sql.SQL("SELECT {} FROM {}").format(_text_columns(table), table.ident))
            state[table.qualified] = _sorted_rows([_row(table, r) for r in cur.fetchall()])
    if ours and not conn.autocommit:
        conn.commit()  # end the read transaction we started; never the caller's
    return state


def run_sample_workload(
    conn: PgConnection,
    transactions: int,
    seed: int = 0,
    *,
    truncate_every: int | None = 25,
    rollback_ratio: float = 0.05,
) -> WorkloadLedger:
    """Commit ``transactions`` seeded random transactions over the sample tables.

    Each transaction runs 1 to 6 statements: INSERT, UPDATE and DELETE on all four
    tables, some touching several rows at once, with updates concentrated on a few
    hot rows so that per-key order matters. Every ``truncate_every``-th transaction
    also truncates ``audit_log`` (``None``: never). About ``rollback_ratio`` extra
    transactions are rolled back; they are counted but not recorded.

    Same seed and same starting contents give the same ledger (xids aside). The
    sample schema must exist (:func:`create_sample_schema`); the connection must
    not be inside a transaction. Its autocommit setting is restored afterwards.
    """
    if transactions < 0:
        raise ValueError(f"transactions must be >= 0, not {transactions}")
    if not _idle(conn):
        raise ValueError("run_sample_workload needs a connection that is not inside a transaction")
    saved_autocommit = conn.autocommit
    initial = snapshot_tables(conn)
    conn.autocommit = False
    try:
        run = _Workload(conn, random.Random(seed), initial, _text_ctids(conn))
        ledger = WorkloadLedger(seed=seed, initial_state=initial)
        while len(ledger.transactions) < transactions:
            index = len(ledger.transactions)
            truncate = truncate_every is not None and index % truncate_every == truncate_every - 1
            if run.rng.random() < rollback_ratio:
                run.transaction(truncate=False, commit=False)
                ledger.rolled_back += 1
            else:
                ledger.transactions.append(run.transaction(truncate=truncate, commit=True))
        return ledger
    except BaseException:
        conn.rollback()
        raise
    finally:
        conn.autocommit = saved_autocommit


# -- internals ---------------------------------------------------------------------

_BASE_TIME = datetime(2024, 1, 1, tzinfo=timezone.utc)
_NAMES = ("Ada", "Grace", "Linus", "Zoë", "O'Brien", "Dr. \"Who\"", "Back\\slash", "李雷", "Ünïcødé 🚀")
_NOTES = (None, None, "gift wrap", "line1\nline2", "tab\there", "quote ' and \"", "{json: [1, 2]}", "🚀", "")
_WORDS = ("alpha", "beta", "gamma", "delta", "with space", "it's", "ünï", "NULL", "")
_MIXED_IDS = range(1, 16)  # small: deleted ids come back, so a key sees INSERT after DELETE
_ORDER_IDS = (*range(1, 9), 2**40 + 1, 2**40 + 2)  # bigint beyond int4 too
_HOT_ROWS = 3
_MAX_ROWS = 40  # per table, so long runs update and delete instead of only growing


def _text_columns(table: SampleTable, prefix: Sequence[str] = ()) -> sql.Composable:
    return sql.SQL(", ").join(
        [sql.SQL(p) for p in prefix]
        + [sql.SQL("{}::text").format(sql.Identifier(c)) for c in table.columns]
    )


def _row(table: SampleTable, values: Sequence[Any]) -> Row:
    return dict(zip(table.columns, values, strict=True))


def _key(table: SampleTable, row: Row) -> Key:
    return {c: str(row[c]) for c in table.key}


def _sorted_rows(rows: list[Row]) -> list[Row]:
    return sorted(rows, key=lambda r: [(v is None, v or "") for v in r.values()])


def _idle(conn: PgConnection) -> bool:
    return conn.info.transaction_status == TRANSACTION_STATUS_IDLE


def _text_ctids(conn: PgConnection) -> dict[str, Row]:
    """audit_log rows by ctid: the only handle on a row without a primary key.

    Called right after :func:`snapshot_tables` on an idle connection, so the commit
    below ends only our own read transaction.
    """
    with conn.cursor() as cur:
        cur.execute(
            sql.SQL("SELECT {} FROM {}").format(_text_columns(AUDIT_LOG, ["ctid::text"]), AUDIT_LOG.ident)
        )
        rows = {r[0]: _row(AUDIT_LOG, r[1:]) for r in cur.fetchall()}
    if not conn.autocommit:
        conn.commit()
    return rows


class _Workload:
    """Generates statements and keeps a mirror of the tables to pick existing rows.

    The mirror is copied per transaction and only kept on commit, so a rolled-back
    transaction leaves no trace.
    """

    def __init__(self, conn: PgConnection, rng: random.Random, initial: TableState,
                 audit: dict[str, Row]) -> None:
        self.conn = conn
        self.rng = rng
        self.counter = 0  # makes timestamps and audit messages unique and ordered
        # Keyed tables: key tuple -> row. audit_log: ctid -> row.
        self.rows: dict[str, dict[Any, Row]] = {
            t.qualified: {tuple(_key(t, r).values()): r for r in initial[t.qualified]}
            for t in SAMPLE_TABLES
            if t.key
        }
        self.rows[AUDIT_LOG.qualified] = audit

    def transaction(self, *, truncate: bool, commit: bool) -> LedgerTransaction:
        saved = {name: dict(rows) for name, rows in self.rows.items()}
        with self.conn.cursor() as cur:
            cur.execute("SELECT (txid_current() % 4294967296)::bigint")
            txn = LedgerTransaction(xid=int(cur.fetchone()[0]))
            statements = self.rng.randint(1, 6)
            truncate_at = self.rng.randrange(statements) if truncate else -1
            for i in range(statements):
                if i == truncate_at:
                    cur.execute(sql.SQL("TRUNCATE {}").format(AUDIT_LOG.ident))
                    self.rows[AUDIT_LOG.qualified].clear()
                    txn.changes.append(RowChange(AUDIT_LOG.qualified, TRUNCATE, None, None))
                txn.changes.extend(self.statement(cur))
        if commit:
            self.conn.commit()
        else:
            self.conn.rollback()
            self.rows = saved
        return txn

    def statement(self, cur: Any) -> list[RowChange]:
        table = self.rng.choices(SAMPLE_TABLES, weights=(35, 30, 15, 20))[0]
        rows = self.rows[table.qualified]
        multi = self.rng.random() < 0.2
        roll = self.rng.random()
        wants_insert = not rows or roll < 0.4 or (table is MIXED_CASE and roll < 0.55)
        if wants_insert and len(rows) < _MAX_ROWS:
            return self.insert(cur, table, 2 if multi else 1)
        if roll < 0.85 or not rows:
            return self.update(cur, table, multi)
        return self.delete(cur, table, multi)

    # Each method below executes one statement and returns its changes in the order
    # PostgreSQL returned them (RETURNING order = the order rows were written).

    def _tick(self) -> datetime:
        self.counter += 1
        return _BASE_TIME + timedelta(seconds=37 * self.counter, microseconds=self.counter)

    def _new_values(self, table: SampleTable, rows: dict[Any, Row], taken: set[Any]) -> list[Any] | None:
        rng = self.rng
        if table is CUSTOMERS:
            name = rng.choice(_NAMES)
            email = None if rng.random() < 0.2 else f"{name.lower()}.{self.counter}@example.com"
            balance = Decimal(rng.randint(-100_000, 10_000_000)) / 100
            return [name, email, balance, self._tick()]
        if table is ORDER_ITEMS:
            order_id = rng.choice(_ORDER_IDS)
            used = [k[1] for k in (*rows, *taken) if k[0] == str(order_id)]
            line_no = max((int(n) for n in used), default=0) + 1
            taken.add((str(order_id), str(line_no)))
            sku = f"SKU-{rng.randint(1, 999):04d}"
            return [order_id, line_no, sku, rng.randint(1, 10), rng.choice(_NOTES)]
        if table is AUDIT_LOG:
            at = self._tick()
            return [at, f"event {self.counter}: {rng.choice(_WORDS)}"]
        free = [i for i in _MIXED_IDS if (str(i),) not in rows and (str(i),) not in taken]
        if not free:
            return None
        mixed_id = rng.choice(free)
        taken.add((str(mixed_id),))
        return [mixed_id, rng.choice(_WORDS)]

    def insert(self, cur: Any, table: SampleTable, count: int) -> list[RowChange]:
        rows = self.rows[table.qualified]
        columns = table.columns[1:] if table is CUSTOMERS else table.columns  # id is serial
        taken: set[Any] = set()
        values = [v for v in (self._new_values(table, rows, taken) for _ in range(count)) if v is not None]
        if not values:
            return self.update(cur, table, multi=False)
        query = sql.SQL("INSERT INTO {} ({}) VALUES {} RETURNING {}").format(
            table.ident,
            sql.SQL(", ").join(map(sql.Identifier, columns)),
            sql.SQL(", ").join(sql.SQL("({})").format(sql.SQL(", ").join(sql.Placeholder() * len(columns)))
                               for _ in values),
            _text_columns(table, ["ctid::text"]),
        )
        cur.execute(query, [v for row in values for v in row])
        return [self._record(table, INSERT, r, None) for r in cur.fetchall()]

    def _pick(self, table: SampleTable, many: bool) -> list[Any]:
        # Keyed tables: by key. audit_log: by age (dict order), since ctids depend on
        # free space (autovacuum timing) and would make the choice non-deterministic.
        rows = self.rows[table.qualified]
        keys = sorted(rows) if table.key else list(rows)
        # Mostly the first few rows: the same keys change again and again.
        pool = keys[:_HOT_ROWS] if self.rng.random() < 0.6 else keys
        return self.rng.sample(pool, min(len(pool), 3 if many else 1))

    def _where(self, table: SampleTable, picked: list[Any]) -> tuple[sql.Composable, list[Any]]:
        if not table.key:
            return sql.SQL("ctid = ANY(%s::tid[])"), [list(picked)]
        # Row-wise IN over the key columns, compared as text to reuse the mirror's keys.
        cols = sql.SQL(", ").join(sql.SQL("{}::text").format(sql.Identifier(c)) for c in table.key)
        return sql.SQL("({}) IN %s").format(cols), [tuple(picked)]

    def update(self, cur: Any, table: SampleTable, multi: bool) -> list[RowChange]:
        if not self.rows[table.qualified]:
            return []
        # audit_log rows are found by their old ctid, which RETURNING cannot give back:
        # update them one at a time so that each new row is paired with its old one.
        picked = self._pick(table, multi and bool(table.key))
        rng = self.rng
        params: list[Any]
        if table is CUSTOMERS:
            assignments = sql.SQL("balance = balance + %s, updated_at = %s, name = CASE WHEN %s THEN "
                                  "name || '!' ELSE name END")
            params = [Decimal(rng.randint(-5000, 5000)) / 100, self._tick(), rng.random() < 0.3]
        elif table is ORDER_ITEMS:
            assignments = sql.SQL("qty = qty + 1, note = %s")
            params = [rng.choice(_NOTES)]
        elif table is AUDIT_LOG:
            assignments = sql.SQL("message = message || %s")
            params = [" (edited)"]
        else:
            assignments = sql.SQL('"Value Text" = %s')
            params = [rng.choice(_WORDS)]
        where, where_params = self._where(table, picked)
        cur.execute(
            sql.SQL("UPDATE {} SET {} WHERE {} RETURNING {}").format(
                table.ident, assignments, where, _text_columns(table, ["ctid::text"])
            ),
            params + where_params,
        )
        return [self._record(table, UPDATE, r, picked[0] if not table.key else None) for r in cur.fetchall()]

    def delete(self, cur: Any, table: SampleTable, multi: bool) -> list[RowChange]:
        picked = self._pick(table, multi)
        where, where_params = self._where(table, picked)
        cur.execute(
            sql.SQL("DELETE FROM {} WHERE {} RETURNING {}").format(
                table.ident, where, _text_columns(table, ["ctid::text"])
            ),
            where_params,
        )
        changes = []
        for ctid, *values in cur.fetchall():
            row = _row(table, values)
            handle = ctid if not table.key else tuple(_key(table, row).values())
            old = self.rows[table.qualified].pop(handle)
            changes.append(RowChange(table.qualified, DELETE, _key(table, row) if table.key else None,
                                     None, old))
        return changes

    def _record(
        self, table: SampleTable, op: str, returned: Sequence[Any], old_ctid: str | None
    ) -> RowChange:
        ctid, *values = returned
        row = _row(table, values)
        rows = self.rows[table.qualified]
        if table.key:
            handle: Any = tuple(_key(table, row).values())
            old = rows.get(handle) if op == UPDATE else None
        else:
            handle = ctid
            old = rows.pop(old_ctid) if op == UPDATE else None
        rows[handle] = row
        return RowChange(table.qualified, op, _key(table, row) if table.key else None, row, old)
