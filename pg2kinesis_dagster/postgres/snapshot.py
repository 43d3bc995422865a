"""Table snapshots into the slot: keyset chunks in short transactions between two watermarks.

For each chunk (see :mod:`pg2kinesis_dagster.core.snapshot` for why this is in order with the stream):

1. write the low watermark (``pg_logical_emit_message``, non-transactional: in the WAL at once);
2. wait until every transaction that holds a write lock on the table has ended (one whose commit record
   precedes the low watermark may still be invisible to a new snapshot while it flushes or waits for a
   synchronous standby);
3. read the next ``chunk_rows`` rows after the last key, ordered by the primary key, with
   ``COPY (SELECT ...) TO STDOUT`` in one short transaction (values in their types' output functions' text,
   what the plugins print; memory holds one chunk);
4. write the high watermark carrying the rows, then commit a tiny transaction so that the WAL is flushed
   (logical decoding reads only flushed WAL);
5. record the chunk's last key in a small state file: a crash resumes after the last finished chunk.

Nothing is published here: the chunks are queued in the slot, and the next replication run (``pg2k``,
``pg2k --once`` or a Dagster run) publishes them in order with the table's changes. The snapshot role
needs ``SELECT`` on the table (the replication role does not); no transaction stays open longer than one
chunk, so ``restart_lsn`` is never pinned by a snapshot.
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg2
import psycopg2.extensions
from psycopg2 import sql

from pg2kinesis_dagster.core.errors import ConfigError, SourceError
from pg2kinesis_dagster.core.snapshot import (
    DEFAULT_CHUNK_BYTES,
    DEFAULT_CHUNK_ROWS,
    FLUSH_PREFIX,
    SNAPSHOT_PREFIX,
    Session,
    copy_field,
    encode_high,
    encode_low,
)
from pg2kinesis_dagster.postgres.connection import PostgresSettings
from pg2kinesis_dagster.spool import default_spool_root, slot_key

log = logging.getLogger(__name__)

DEFAULT_WRITER_WAIT_SECONDS = 300.0
# How long an open chunk waits for the table's writers before it steps aside (replication waits meanwhile).
HOLD_SECONDS = 2.0


class SnapshotError(SourceError):
    """A table cannot be snapshotted (missing, no key, no privilege, writers that never end)."""


def parse_table_name(text: str) -> tuple[str, str]:
    """``schema.table`` (schema ``public`` when omitted; names with dots double-quoted as in SQL)."""
    parts = re.findall(r'"((?:[^"]|"")*)"|([^."]+)', text.strip())
    names = [quoted.replace('""', '"') if quoted else bare for quoted, bare in parts]
    if not names or len(names) > 2 or not all(names):
        raise ConfigError(f"invalid table {text!r}: use schema.table (double-quote names that hold a dot)")
    return ("public", names[0]) if len(names) == 1 else (names[0], names[1])


@dataclass(frozen=True)
class TableShape:
    oid: int
    schema: str
    table: str
    columns: tuple[tuple[str, str], ...]  # (name, type as the plugins print it), in column order
    key: tuple[str, ...]
    key_sql_types: tuple[str, ...]  # with typmods: what a key value is cast back to

    @property
    def qualified(self) -> str:
        return f"{self.schema}.{self.table}"


@dataclass
class SnapshotProgress:
    """What a table's snapshot did so far; also the state file's content (the last key is text values)."""

    table: str
    key: list[str]
    last_key: list[str | None] | None = None
    chunks: int = 0
    rows: int = 0
    seconds: float = 0.0
    resumed: bool = False
    done: bool = False

    @property
    def rows_per_second(self) -> float:
        return self.rows / self.seconds if self.seconds else 0.0

    def to_state(self) -> dict[str, Any]:
        return {"table": self.table, "key": self.key, "last_key": self.last_key, "chunks": self.chunks,
                "rows": self.rows, "seconds": self.seconds}

    def summary(self) -> dict[str, Any]:
        return {"table": self.table, "rows": self.rows, "chunks": self.chunks, "seconds": round(self.seconds, 3),
                "rows_per_second": round(self.rows_per_second), "resumed": self.resumed,
                "published": "queued in the slot: the next replication run publishes it in order"}


_TABLE_SQL = """
SELECT c.oid::bigint, n.nspname::text, c.relname::text, c.relkind::text,
       has_table_privilege(c.oid, 'SELECT'), current_user::text
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE n.nspname = %s AND c.relname = %s
"""
_COLUMNS_SQL = """
SELECT a.attname::text, format_type(a.atttypid, NULL), format_type(a.atttypid, a.atttypmod)
FROM pg_attribute a
WHERE a.attrelid = %s AND a.attnum > 0 AND NOT a.attisdropped AND a.attgenerated = ''
ORDER BY a.attnum
"""
_KEY_SQL = """
SELECT a.attname::text
FROM pg_index i CROSS JOIN LATERAL unnest(i.indkey) WITH ORDINALITY AS k(attnum, ord)
JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum
WHERE i.indrelid = %s AND i.indisprimary
ORDER BY k.ord
"""
# Transactions holding a write lock on the table (any mode above ROW SHARE), other than ours.
_WRITERS_SQL = """
SELECT DISTINCT x.transactionid::text, x.pid
FROM pg_locks r
JOIN pg_locks x ON x.pid = r.pid AND x.locktype = 'transactionid' AND x.mode = 'ExclusiveLock' AND x.granted
WHERE r.locktype = 'relation' AND r.granted AND r.relation = %s
  AND r.database = (SELECT oid FROM pg_database WHERE datname = current_database())
  AND r.mode NOT IN ('AccessShareLock', 'RowShareLock') AND r.pid <> pg_backend_pid()
"""
_STILL_RUNNING_SQL = """
SELECT x.transactionid::text, x.pid FROM pg_locks x
WHERE x.locktype = 'transactionid' AND x.mode = 'ExclusiveLock' AND x.granted AND x.transactionid::text = ANY(%s)
"""


class TableSnapshot:
    """Snapshots one table into the slot's WAL, chunk by chunk, resumable from its state file."""

    def __init__(
        self,
        pg: PostgresSettings,
        table: str | tuple[str, str],
        *,
        slot_name: str = "pg2kinesis",
        chunk_rows: int = DEFAULT_CHUNK_ROWS,
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
        state_dir: str | os.PathLike[str] | None = None,
        writer_wait_seconds: float = DEFAULT_WRITER_WAIT_SECONDS,
        statement_timeout_ms: int = 60_000,
        publication: str = "pg2kinesis",
    ) -> None:
        if chunk_rows < 1:
            raise ConfigError(f"snapshot chunk size must be at least 1 row, got {chunk_rows}")
        self.pg = pg
        self.schema, self.table = parse_table_name(table) if isinstance(table, str) else table
        self.slot_name = slot_name
        self.publication = publication  # pgoutput slots only
        self._plugin: str | None = None
        self.chunk_rows = chunk_rows
        self.chunk_bytes = chunk_bytes
        self.writer_wait_seconds = writer_wait_seconds
        self.statement_timeout_ms = statement_timeout_ms
        root = Path(state_dir) if state_dir else default_spool_root() / ".snapshots"
        # Per slot and server, as the spool: the chunks are queued in that slot.
        safe = re.sub(r"[^A-Za-z0-9_.-]", "_", f"{self.schema}.{self.table}")
        self.state_path = root / slot_key(slot_name, pg.describe(with_user=False)) / f"{safe}.json"
        self._conn: psycopg2.extensions.connection | None = None

    # -- state -----------------------------------------------------------------------------------------
    def read_state(self) -> dict[str, Any] | None:
        try:
            data = json.loads(self.state_path.read_text())
        except (FileNotFoundError, ValueError):
            return None
        return data if isinstance(data, dict) else None

    def _write_state(self, progress: SnapshotProgress) -> None:
        self.state_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.state_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(progress.to_state()))
        os.replace(tmp, self.state_path)

    def reset(self) -> None:
        """Forget a snapshot in progress: the next run starts from the table's first key."""
        self.state_path.unlink(missing_ok=True)

    # -- catalog ---------------------------------------------------------------------------------------
    def _connect(self) -> psycopg2.extensions.connection:
        if self._conn is None or self._conn.closed:
            self._conn = self.pg.connect(autocommit=True)
        return self._conn

    def close(self) -> None:
        if self._conn is not None and not self._conn.closed:
            self._conn.close()
        self._conn = None

    def shape(self) -> TableShape:
        """The table's columns and key; a clear error when it cannot be snapshotted."""
        self._check_slot()
        with self._connect().cursor() as cur:
            cur.execute(_TABLE_SQL, (self.schema, self.table))
            found = cur.fetchone()
            name = f"{self.schema}.{self.table}"
            if found is None:
                raise SnapshotError(f"table {name} does not exist (give --table as schema.table)")
            oid, schema, table, kind, can_select, role = found
            if kind == "p":
                # Its changes stream under the partitions' names: the merge by table would miss them.
                raise SnapshotError(f"{name} is a partitioned table: snapshot its partitions (--table each leaf)")
            if kind != "r":
                raise SnapshotError(f"{name} is not a table (relkind {kind!r}): only tables can be snapshotted")
            if not can_select:
                raise SnapshotError(
                    f"role {role} cannot read {name}: the snapshot needs SELECT on the table (the replication "
                    f"role does not): GRANT SELECT ON {sql_name(schema, table)} TO {role};")
            self._check_published(cur, schema, table)
            cur.execute(_COLUMNS_SQL, (oid,))
            columns = cur.fetchall()
            cur.execute(_KEY_SQL, (oid,))
            key = tuple(r[0] for r in cur.fetchall())
        if not key:
            raise SnapshotError(
                f"table {name} has no primary key: a snapshot is chunked by primary key and merged with the "
                "stream by key, so tables without one are not snapshotted; add a primary key (or copy the table "
                "yourself with COPY while nothing writes to it)")
        types = {n: sql_type for n, _, sql_type in columns}
        return TableShape(oid=oid, schema=schema, table=table, columns=tuple((n, t) for n, t, _ in columns),
                          key=key, key_sql_types=tuple(types[k] for k in key))

    def _check_slot(self) -> None:
        """The rows are queued in the slot's WAL: without the slot nothing would ever read them."""
        with self._connect().cursor() as cur:
            cur.execute("SELECT slot_type::text, database::text = current_database(), plugin::text "
                        "FROM pg_replication_slots WHERE slot_name = %s", (self.slot_name,))
            found = cur.fetchone()
            if found is None or found[:2] != ("logical", True):
                raise SnapshotError(
                    f"replication slot {self.slot_name!r} does not exist in this database: the snapshot is queued "
                    "in the slot, so create it first (pg2k --create-slot, or add --create-slot here) and snapshot then")
            self._plugin = found[2]

    def _check_published(self, cur: psycopg2.extensions.cursor, schema: str, table: str) -> None:
        """pgoutput streams only the publication's tables: a snapshot of another table could not be merged."""
        if self._plugin != "pgoutput":
            return
        cur.execute("SELECT 1 FROM pg_publication_tables WHERE pubname = %s AND schemaname = %s AND tablename = %s",
                    (self.publication, schema, table))
        if cur.fetchone() is None:
            raise SnapshotError(
                f"table {schema}.{table} is not in publication {self.publication!r}: pgoutput does not stream its "
                f"changes, so its snapshot could not be ordered with them; ALTER PUBLICATION "
                f"{self.publication} ADD TABLE {sql_name(schema, table)}; (or give the publication with --publication)")

    # -- the snapshot ----------------------------------------------------------------------------------
    def run(self, on_chunk: Callable[[SnapshotProgress], None] | None = None,
            should_stop: Callable[[], bool] | None = None) -> SnapshotProgress:
        """Snapshot the table from where its state file says (or from the start); the state file is removed
        once the last chunk is queued."""
        shape = self.shape()
        state = self.read_state()
        progress = SnapshotProgress(table=shape.qualified, key=list(shape.key))
        if state is not None and state.get("key") == list(shape.key) and state.get("table") == shape.qualified:
            progress.last_key = state.get("last_key")
            progress.chunks = int(state.get("chunks", 0))
            progress.rows = int(state.get("rows", 0))
            progress.seconds = float(state.get("seconds", 0.0))
            progress.resumed = True
            log.info("snapshot of %s resumes after chunk %d (%d rows)", shape.qualified, progress.chunks,
                     progress.rows)
        elif state is not None:
            log.warning("snapshot state %s is for another key or table: starting %s over", self.state_path,
                        shape.qualified)
        conn = self._connect()
        session = self._session(conn)
        snapshot_id = uuid.uuid4().hex[:12]
        query = self._chunk_query(shape)
        attempt_seq = 0
        # Rows per chunk: chunk_rows, fewer where rows are large (a chunk's rows stay near chunk_bytes); the
        # first chunk is small, to learn the rows' size.
        limit = min(self.chunk_rows, 1000)
        try:
            while should_stop is None or not should_stop():
                started = time.perf_counter()
                attempt_seq += 1
                chunk_id = f"{snapshot_id}:{progress.chunks}:{attempt_seq}"
                rows, size, last_key = self._chunk(conn, shape, query, chunk_id, session, progress.last_key, limit)
                progress.seconds += time.perf_counter() - started
                if rows == 0:
                    progress.done = True
                    break
                limit = max(1, min(self.chunk_rows, int(self.chunk_bytes / (size / rows))))
                progress.chunks += 1
                progress.rows += rows
                progress.last_key = last_key
                self._write_state(progress)
                if on_chunk is not None:
                    on_chunk(progress)
        finally:
            self.close()
        if progress.done:
            self.reset()
        return progress

    def _session(self, conn: psycopg2.extensions.connection) -> Session:
        with conn.cursor() as cur:
            cur.execute("SELECT pg_backend_pid(), (extract(epoch FROM backend_start) * 1000000)::bigint "
                        "FROM pg_stat_activity WHERE pid = pg_backend_pid()")
            pid, started = cur.fetchone()
        return Session(int(pid), int(started))

    def _chunk_query(self, shape: TableShape) -> tuple[sql.Composed, sql.Composed]:
        """(first chunk, next chunk) queries: keyset pagination by the primary key."""
        columns = sql.SQL(", ").join(sql.Identifier(n) for n, _ in shape.columns)
        key = sql.SQL(", ").join(sql.Identifier(k) for k in shape.key)
        table = sql.Identifier(shape.schema, shape.table)
        first = sql.SQL("SELECT {} FROM {} ORDER BY {} LIMIT %s").format(columns, table, key)
        after = sql.SQL(", ").join(sql.SQL("CAST(%s AS {})").format(sql.SQL(t)) for t in shape.key_sql_types)
        following = sql.SQL("SELECT {} FROM {} WHERE ({}) > ({}) ORDER BY {} LIMIT %s").format(
            columns, table, key, after, key)
        return first, following

    def _chunk(self, conn: psycopg2.extensions.connection, shape: TableShape,
               queries: tuple[sql.Composed, sql.Composed], chunk_id: str, session: Session,
               last_key: Sequence[str | None] | None, limit: int) -> tuple[int, int, list[str | None] | None]:
        """One chunk between its watermarks: (rows, bytes, the last row's key); (0, 0, None) at the table's end.

        Replication holds its window before an open chunk's low watermark, so the chunk does not wait long for
        the table's writers while open: when they have not ended within ``HOLD_SECONDS`` it closes the chunk
        empty, waits for them without holding replication, and tries again.
        """
        attempt = 0
        while True:
            attempt += 1
            mark = f"{chunk_id}.{attempt}"
            with conn.cursor() as cur:
                cur.execute("SELECT pg_logical_emit_message(false, %s, %s)",
                            (SNAPSHOT_PREFIX, encode_low(mark, shape.schema, shape.table, shape.key, session)))
            try:
                writers = self._writers(conn, shape)
                running = self._wait_for(conn, shape, writers, HOLD_SECONDS)
                if not running:
                    text, read_at = self._select(conn, shape, queries, last_key, limit)
            except BaseException:
                # Close the chunk (publishing nothing of it) so that replication never waits on it; then fail.
                self._emit_high(conn, shape, mark, "", "")
                raise
            if not running:
                break
            self._emit_high(conn, shape, mark, "", "")  # nothing of it is published; replication moves on
            log.info("snapshot of %s waits for transactions writing the table (pid/xid %s)", shape.qualified,
                     ", ".join(f"{pid}/{xid}" for xid, pid in running))
            still = self._wait_for(conn, shape, [xid for xid, _ in running], self.writer_wait_seconds)
            if still:
                raise SnapshotError(
                    f"snapshot of {shape.qualified}: transactions that write the table did not end within "
                    f"{self.writer_wait_seconds:.0f}s (pid/xid: {', '.join(f'{pid}/{xid}' for xid, pid in still)}); "
                    "each chunk waits for the transactions writing the table when it starts: commit or roll "
                    "them back (or pg_terminate_backend), then rerun to resume")
        self._emit_high(conn, shape, mark, text, read_at)
        if not text:
            return 0, 0, None
        rows = text.count("\n")
        last_line = text[text.rfind("\n", 0, len(text) - 1) + 1:-1]
        fields = last_line.split("\t")
        names = [n for n, _ in shape.columns]
        return rows, len(text), [copy_field(fields[names.index(k)]) for k in shape.key]

    def _emit_high(self, conn: psycopg2.extensions.connection, shape: TableShape, chunk_id: str, rows_json: str,
                   read_at: str) -> None:
        if conn.closed:
            return
        if not conn.autocommit:
            conn.rollback()
            conn.autocommit = True
        content = encode_high(chunk_id, shape.schema, shape.table, shape.key, shape.columns, rows_json, read_at)
        with conn.cursor() as cur:
            cur.execute("SELECT pg_logical_emit_message(false, %s, %s)", (SNAPSHOT_PREFIX, content))
            # Decoding reads only flushed WAL: a committed transaction flushes everything before its commit.
            cur.execute("BEGIN")
            cur.execute("SET LOCAL synchronous_commit = on")
            cur.execute("SELECT pg_logical_emit_message(true, %s, '')", (FLUSH_PREFIX,))
            cur.execute("COMMIT")

    def _writers(self, conn: psycopg2.extensions.connection, shape: TableShape) -> list[str]:
        """The transactions (xids) that hold a write lock on the table now."""
        with conn.cursor() as cur:
            cur.execute(_WRITERS_SQL, (shape.oid,))
            return [xid for xid, _ in cur.fetchall()]

    def _wait_for(self, conn: psycopg2.extensions.connection, shape: TableShape, xids: list[str],
                  seconds: float) -> list[tuple[str, int]]:
        """Wait up to ``seconds`` for these transactions to end; the (xid, pid) of those still running.

        A transaction releases its locks only after it left the process array, so once its xid lock is gone every
        new snapshot sees it committed (or not at all)."""
        if not xids:
            return []
        deadline = time.monotonic() + seconds
        delay = 0.001
        with conn.cursor() as cur:
            while True:
                cur.execute(_STILL_RUNNING_SQL, (xids,))
                running = [(xid, pid) for xid, pid in cur.fetchall()]
                if not running or time.monotonic() > deadline:
                    return running
                time.sleep(delay)
                delay = min(delay * 2, 0.05)

    def _select(self, conn: psycopg2.extensions.connection, shape: TableShape,
                queries: tuple[sql.Composed, sql.Composed], last_key: Sequence[str | None] | None,
                limit: int) -> tuple[str, str]:
        """The chunk's rows in one short transaction, as ``COPY ... TO STDOUT`` text (each value its type's output
        function's text, what the plugins print), and the transaction's time."""
        first, following = queries
        conn.autocommit = False
        try:
            with conn.cursor() as cur:
                cur.execute("SET LOCAL statement_timeout = %s", (self.statement_timeout_ms,))
                cur.execute("SET LOCAL lock_timeout = %s", (min(self.statement_timeout_ms, 10_000),))
                cur.execute("SELECT now()::text")
                (read_at,) = cur.fetchone()
                query = first if last_key is None else following
                params = (limit,) if last_key is None else (*last_key, limit)
                copy = sql.SQL("COPY ({}) TO STDOUT").format(query).as_string(conn)
                out = io.StringIO()
                cur.copy_expert(cur.mogrify(copy, params).decode(psycopg2.extensions.encodings[conn.encoding]), out)
            conn.commit()
        except psycopg2.errors.InsufficientPrivilege as exc:
            conn.rollback()
            raise SnapshotError(f"cannot read {shape.qualified}: {str(exc).strip()} (GRANT SELECT ON "
                                f"{sql_name(shape.schema, shape.table)} TO the snapshot role)") from None
        except BaseException:
            if not conn.closed:
                conn.rollback()
            raise
        finally:
            if not conn.closed:
                conn.autocommit = True
        return out.getvalue(), read_at


def sql_name(schema: str, table: str) -> str:
    def quote(name: str) -> str:
        return name if re.fullmatch(r"[a-z_][a-z0-9_$]*", name) else '"' + name.replace('"', '""') + '"'

    return f"{quote(schema)}.{quote(table)}"
