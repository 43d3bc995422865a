"""The logical replication slot: check, create, peek, advance, lag.

Two-phase use: :meth:`ReplicationSlot.peek` never consumes anything; only
:meth:`ReplicationSlot.advance`, called after Kinesis acknowledged a batch,
moves the slot. Advancing is idempotent and never moves the slot backwards.

While a process works on a slot it holds a session-level advisory lock named
after the slot, so two runs on one slot cannot interleave; the lock goes away
with the connection, so a crashed process never leaves it behind.
"""

from __future__ import annotations

import contextlib
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

import psycopg2
import psycopg2.errors
import psycopg2.extensions
from psycopg2 import sql

from pg2kinesis_dagster.core.changes import SlotRow, format_lsn, parse_lsn
from pg2kinesis_dagster.core.errors import ConfigError, SourceError, SourceUnavailableError
from pg2kinesis_dagster.core.window_scan import WindowFull
from pg2kinesis_dagster.postgres.connection import PostgresSettings
from pg2kinesis_dagster.postgres.types import ensure_publication

# PostgreSQL's own rule for slot names (ReplicationSlotValidateName).
_SLOT_NAME = re.compile(r"^[a-z0-9_]{1,63}$")
# Constant first half of the two-int advisory lock key, so our locks never collide with an application's.
_LOCK_CLASS = 0x70673271  # "pg2q"
_FETCH_ROWS = 5000
# How long a peek waits for a slot that another backend holds for a moment.
SLOT_BUSY_WAIT_SECONDS = 10.0
# SQLSTATEs of a connection that is gone or going: connection exceptions, admin/crash shutdown, starting up.
_CONNECTION_LOST_STATES = ("08", "57P01", "57P02", "57P03")


class SupportsWrite(Protocol):
    def write(self, data: bytes, /) -> object: ...


def _connection_lost(exc: psycopg2.Error) -> bool:
    """Whether ``exc`` means the session is gone (the server restarted, the network broke), not a bad query."""
    if not isinstance(exc, psycopg2.OperationalError | psycopg2.InterfaceError):
        return False
    code = exc.pgcode or ""
    return not code or code.startswith(_CONNECTION_LOST_STATES)


# This session holds the slot's lock: if the process on the other end vanishes without closing it (its
# machine lost, a network partition), the server must notice within a minute and drop the lock, not when
# TCP gives up hours later. USERSET settings, so any role may set them; a server without one skips it.
_DEAD_PEER_SETTINGS = (
    ("tcp_keepalives_idle", "20"),
    ("tcp_keepalives_interval", "5"),
    ("tcp_keepalives_count", "4"),
    ("client_connection_check_interval", "10000"),  # PostgreSQL 14+: checked during long queries too
)


def _detect_dead_peer(conn: psycopg2.extensions.connection) -> None:
    for name, value in _DEAD_PEER_SETTINGS:
        try:
            with conn.cursor() as cur:
                cur.execute("SELECT set_config(%s, %s, false)", (name, value))
        except psycopg2.Error:
            if conn.closed:
                raise
            # Unknown setting (an older server) or refused by a proxy: keep the defaults.


def _quote_ident(name: str) -> str:
    """An identifier as it must be written in SQL (for the fixes our messages suggest)."""
    if re.fullmatch(r"[a-z_][a-z0-9_]*", name or ""):
        return name
    return '"' + (name or "").replace('"', '""') + '"'


def validate_slot_name(name: str) -> str:
    if not _SLOT_NAME.match(name or ""):
        raise ConfigError(
            f"invalid replication slot name {name!r}: use 1-63 lower-case letters, digits or underscores "
            "(PostgreSQL's rule for slot names)"
        )
    return name


@dataclass(frozen=True)
class SlotState:
    name: str
    plugin: str
    database: str
    active_pid: int | None
    confirmed_flush_lsn: int | None
    restart_lsn: int | None


@dataclass(frozen=True)
class AdvanceResult:
    before: int | None
    after: int | None
    target: int
    moved: bool


class ReplicationSlot:
    """One logical slot in one database, reached through its own connection."""

    def __init__(
        self, settings: PostgresSettings, slot_name: str, plugin: str, *, publication: str | None = None
    ) -> None:
        self.settings = settings
        self.name = validate_slot_name(slot_name)
        self.plugin = plugin
        # pgoutput decodes only the tables of this publication; it must exist before the slot's first change.
        self.publication = publication
        self._conn: psycopg2.extensions.connection | None = None
        self._locked = False

    # -- connection and lock -------------------------------------------------------------
    @property
    def conn(self) -> psycopg2.extensions.connection:
        if self._conn is None or self._conn.closed:
            self._conn = self.settings.connect(autocommit=True)
            self._locked = False
            _detect_dead_peer(self._conn)
        return self._conn

    def close(self) -> None:
        conn, self._conn = self._conn, None
        locked, self._locked = self._locked, False
        if conn is None or conn.closed:
            return
        if locked:
            # Released before the session ends, so the next run (already waiting) gets it at once; a broken
            # session releases it anyway when it ends.
            with contextlib.suppress(psycopg2.Error), conn.cursor() as cur:
                cur.execute("SELECT pg_advisory_unlock(%s, hashtext(%s))", (_LOCK_CLASS, self.name))
        conn.close()

    def __enter__(self) -> ReplicationSlot:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _query(self, query: str | sql.Composable, params: tuple[object, ...] = ()) -> list[tuple]:
        try:
            with self.conn.cursor() as cur:
                cur.execute(query, params)
                return cur.fetchall() if cur.description else []
        except psycopg2.Error as exc:
            if not _connection_lost(exc):
                raise
            raise self._lost(exc, "query") from None

    def _lost(self, exc: psycopg2.Error, action: str) -> SourceUnavailableError:
        """The connection broke: drop it (the next call reconnects and takes the lock again) and say so."""
        self.close()
        text = str(exc).strip()
        reason = text.splitlines()[0] if text else type(exc).__name__
        return SourceUnavailableError(
            f"lost the connection to PostgreSQL ({self.settings.describe()}) during {action} of slot "
            f"{self.name!r}: {reason}. Nothing is lost: the slot only moves after a batch is published, so "
            "the next attempt resumes from its confirmed position."
        )

    def lock(self) -> None:
        """Take the slot's advisory lock for this connection's lifetime; fail if another process has it."""
        if self._locked and self._conn is not None and not self._conn.closed:
            return
        (got,) = self._query(
            "SELECT pg_try_advisory_lock(%s, hashtext(%s))", (_LOCK_CLASS, self.name)
        )[0]
        if not got:
            holders = self._query(
                "SELECT l.pid FROM pg_locks l WHERE l.locktype = 'advisory' AND l.classid = %s "
                "AND l.objid = hashtext(%s)::oid AND l.granted",
                (_LOCK_CLASS, self.name),
            )
            pid = holders[0][0] if holders else "?"
            raise SourceError(
                f"replication slot {self.name!r} is being replicated by another pg2kinesis process or run "
                f"(PostgreSQL backend PID {pid} holds its lock): wait for it to finish, stop it, or use "
                "another slot. Nothing was read or advanced."
            )
        self._locked = True

    # -- checks ------------------------------------------------------------------------
    def state(self) -> SlotState | None:
        rows = self._query(
            "SELECT slot_name::text, coalesce(plugin::text, ''), coalesce(database::text, ''), active_pid, "
            "confirmed_flush_lsn::text, restart_lsn::text, slot_type FROM pg_replication_slots "
            "WHERE slot_name = %s",
            (self.name,),
        )
        if not rows:
            return None
        name, plugin, database, pid, confirmed, restart, slot_type = rows[0]
        if slot_type != "logical":
            raise SourceError(
                f"replication slot {self.name!r} is a {slot_type} slot; a logical slot is needed: "
                "choose another --pg-slot-name or drop it and use --create-slot"
            )
        return SlotState(
            name=name,
            plugin=plugin,
            database=database,
            active_pid=pid,
            confirmed_flush_lsn=parse_lsn(confirmed) if confirmed else None,
            restart_lsn=parse_lsn(restart) if restart else None,
        )

    def check_server(self) -> None:
        """wal_level and the role's REPLICATION right, with the fix in the message."""
        (wal_level,) = self._query("SHOW wal_level")[0]
        if wal_level != "logical":
            raise SourceError(
                f"wal_level is {wal_level!r} on {self.settings.describe()}; logical decoding needs "
                "wal_level = logical: set it in postgresql.conf (on Amazon RDS: rds.logical_replication = 1 "
                "in the DB parameter group) and restart PostgreSQL"
            )
        (user, can_replicate) = self._query(
            "SELECT current_user::text, rolreplication OR rolsuper OR EXISTS ("
            "  SELECT 1 FROM pg_roles r WHERE r.rolname = 'rds_replication'"
            "  AND pg_has_role(current_user, r.oid, 'MEMBER')) "
            "FROM pg_roles WHERE rolname = current_user"
        )[0]
        if not can_replicate:
            ident = _quote_ident(user)
            raise SourceError(
                f"role {user!r} may not use replication slots: run ALTER ROLE {ident} REPLICATION "
                f"(on Amazon RDS: GRANT rds_replication TO {ident})"
            )

    def ensure(self, *, create: bool = False, recreate: bool = False) -> SlotState:
        """Check the server and the slot, creating or recreating it when asked."""
        self.check_server()
        self.lock()
        current = self.state()
        if current is not None and recreate:
            self.drop()
            current = None
        if current is None:
            if not (create or recreate):
                raise SourceError(
                    f"replication slot {self.name!r} does not exist in {self.settings.describe()}: "
                    f"pass --create-slot, or run SELECT pg_create_logical_replication_slot('{self.name}', "
                    f"'{self.plugin}')"
                )
            self.create()
            current = self.state()
            assert current is not None
        self._check_matches(current)
        return current

    def _check_matches(self, state: SlotState) -> None:
        (dbname,) = self._query("SELECT current_database()::text")[0]
        if state.database != dbname:
            raise SourceError(
                f"replication slot {self.name!r} belongs to database {state.database!r}, not {dbname!r}: "
                "connect to that database (--pg-dbname) or use another slot"
            )
        if state.plugin != self.plugin:
            raise SourceError(
                f"replication slot {self.name!r} uses output plugin {state.plugin!r} but "
                f"{self.plugin!r} was asked for: pass --pg-slot-output-plugin {state.plugin}, or "
                "--recreate-slot (which drops the changes still pending on the slot)"
            )
        if state.active_pid is not None and state.active_pid != self.conn.get_backend_pid():
            raise SourceError(
                f"replication slot {self.name!r} is in use by PostgreSQL backend PID {state.active_pid} "
                "(another pg2kinesis, pg_recvlogical or a subscriber): stop that client or use another slot"
            )

    def create(self) -> None:
        if self.publication:
            # Changes written before the publication exists cannot be decoded by pgoutput, so it comes first.
            ensure_publication(self.conn, self.publication, "ALL")
        try:
            self._query(
                "SELECT pg_create_logical_replication_slot(%s, %s)", (self.name, self.plugin)
            )
        except psycopg2.errors.UndefinedFile:
            raise SourceError(
                f"output plugin {self.plugin!r} is not installed on the server: install it "
                "(Debian: postgresql-15-wal2json for wal2json) or choose test_decoding"
            ) from None
        except psycopg2.Error as exc:
            raise self._translate(exc, "create the slot") from None

    def drop(self) -> None:
        self._query("SELECT pg_drop_replication_slot(%s)", (self.name,))

    # -- reading -----------------------------------------------------------------------
    def current_wal_lsn(self) -> int:
        """The WAL position a read may be bounded by: the *flush* position, not ``pg_current_wal_lsn()``.

        Logical decoding only reads flushed WAL, while ``pg_current_wal_lsn()`` is the write position,
        which runs ahead of the flush with asynchronous commit (``synchronous_commit = off``) or when
        WAL buffers fill up. A peek bounded by the write position that found nothing would advance the
        idle slot to it, and once the flush caught up a commit between the two would be skipped for good.
        """
        (lsn,) = self._query("SELECT pg_current_wal_flush_lsn()::text")[0]
        return parse_lsn(lsn)

    def lag_bytes(self) -> int | None:
        rows = self._query(
            "SELECT (pg_current_wal_lsn() - confirmed_flush_lsn)::bigint FROM pg_replication_slots "
            "WHERE slot_name = %s",
            (self.name,),
        )
        return int(rows[0][0]) if rows and rows[0][0] is not None else None

    def has_pending(self, options: tuple[str, ...] = (), *, binary: bool = False) -> bool:
        """Whether the slot holds at least one change: a cheap peek of one transaction.

        ``options``/``binary``: the plugin's peek options (pgoutput needs its publication and binary peeks).
        """
        self._require_exists()
        function = "pg_logical_slot_peek_binary_changes" if binary else "pg_logical_slot_peek_changes"
        query = sql.SQL("SELECT count(*) FROM {}(%s, NULL, 1, VARIADIC %s::text[])").format(sql.Identifier(function))
        try:
            rows = self._query(query, (self.name, list(options)))
        except psycopg2.Error as exc:
            raise self._translate(exc, "peek the slot") from None
        return bool(rows[0][0])

    def sessions_named(self, application_names: list[str]) -> set[str]:
        """Which of ``application_names`` have a session on the server now (visible to every role)."""
        if not application_names:
            return set()
        rows = self._query(
            "SELECT DISTINCT application_name::text FROM pg_stat_activity WHERE application_name = ANY(%s)",
            (application_names,),
        )
        return {name for (name,) in rows}

    def live_sessions(self, sessions: list[tuple[int, int]]) -> set[tuple[int, int]]:
        """Those of these sessions, as (pid, backend start in microseconds since the epoch), that still exist."""
        if not sessions:
            return set()
        rows = self._query(
            "SELECT s.pid, s.started FROM pg_stat_activity a JOIN unnest(%s::int[], %s::bigint[]) AS s(pid, started) "
            "ON a.pid = s.pid AND (extract(epoch FROM a.backend_start) * 1000000)::bigint = s.started",
            ([pid for pid, _ in sessions], [started for _, started in sessions]),
        )
        return {(int(pid), int(started)) for pid, started in rows}

    def read_rows(
        self,
        *,
        options: tuple[str, ...],
        upto_lsn: int,
        upto_nchanges: int | None = None,
        binary: bool = False,
    ) -> Iterator[SlotRow]:
        """Stream the slot's pending rows up to ``upto_lsn`` without consuming them.

        PostgreSQL hands over whole transactions (``upto_nchanges`` stops after the transaction
        that reaches it). Rows arrive through a server-side cursor in a transaction of their own, a
        few thousand at a time: the caller may stop reading at any point (closing the generator
        closes the cursor), and memory holds one fetch, not the result.
        """
        self.lock()
        self._require_exists()
        function = "pg_logical_slot_peek_binary_changes" if binary else "pg_logical_slot_peek_changes"
        query = sql.SQL(
            "SELECT lsn::text, xid::text::bigint, data FROM {}(%s, %s::pg_lsn, %s, VARIADIC %s::text[])"
        ).format(sql.Identifier(function))
        params = (self.name, format_lsn(upto_lsn), upto_nchanges, list(options))
        busy_until = time.monotonic() + SLOT_BUSY_WAIT_SECONDS
        started = False
        while True:
            conn = self.settings.connect(autocommit=False)
            try:
                with conn.cursor(name=f"pg2k_peek_{self.name}") as cur:
                    cur.itersize = _FETCH_ROWS
                    cur.execute(query, params)
                    while True:
                        chunk = cur.fetchmany(_FETCH_ROWS)
                        if not chunk:
                            break
                        started = True
                        for lsn_text, xid, data in chunk:
                            yield (parse_lsn(lsn_text), xid, bytes(data) if binary else data)
                conn.rollback()
                return
            except psycopg2.Error as exc:
                # Another backend holds the slot for a moment (the sensor's one-row peek, a DBA's look):
                # the slot is acquired before any row comes, so wait briefly instead of failing the run.
                if exc.pgcode != "55006" or started or time.monotonic() > busy_until:
                    raise self._translate(exc, "peek the slot") from None
                time.sleep(0.2)
            finally:
                conn.close()

    def copy_rows(
        self,
        out: SupportsWrite,
        *,
        options: tuple[str, ...],
        upto_lsn: int,
        upto_nchanges: int | None = None,
    ) -> bool:
        """Send the slot's pending rows up to ``upto_lsn`` to ``out.write`` in COPY text form
        (:mod:`~pg2kinesis_dagster.core.copy_text`), without consuming them; text plugins only.

        One ``COPY ... TO STDOUT`` of ``pg_logical_slot_peek_changes``: no Python work per row here, and the
        slot is released before the first row is sent (PostgreSQL decodes the whole result first). ``out``
        may raise :class:`~pg2kinesis_dagster.core.window_scan.WindowFull` to stop early: the rest is not
        read. Returns whether it stopped so.
        """
        self.lock()
        self._require_exists()
        busy_until = time.monotonic() + SLOT_BUSY_WAIT_SECONDS
        while True:
            conn = self.settings.connect(autocommit=True)
            try:
                with conn.cursor() as cur:
                    query = cur.mogrify(
                        "COPY (SELECT lsn, xid, data FROM pg_logical_slot_peek_changes(%s, %s::pg_lsn, %s, "
                        "VARIADIC %s::text[])) TO STDOUT",
                        (self.name, format_lsn(upto_lsn), upto_nchanges, list(options)),
                    ).decode()
                    cur.copy_expert(query, out)
                return False
            except WindowFull:
                return True  # the connection is mid-COPY: closing it ends the statement
            except psycopg2.Error as exc:
                # Another backend holds the slot for a moment (the sensor's one-row peek, a DBA's look): the
                # slot is acquired before any row is decoded, so nothing was written; wait briefly and retry.
                if exc.pgcode != "55006" or time.monotonic() > busy_until:
                    raise self._translate(exc, "peek the slot") from None
                time.sleep(0.2)
            finally:
                conn.close()

    # -- advancing ---------------------------------------------------------------------
    def advance(self, target: int) -> AdvanceResult:
        """Move the slot to ``target`` unless it is already there or further: never backwards."""
        self.lock()
        state = self._require_exists()
        before = state.confirmed_flush_lsn
        if before is not None and before >= target:
            return AdvanceResult(before=before, after=before, target=target, moved=False)
        try:
            (end,) = self._query(
                "SELECT end_lsn::text FROM pg_replication_slot_advance(%s, %s::pg_lsn)",
                (self.name, format_lsn(target)),
            )[0]
        except psycopg2.Error as exc:
            raise self._translate(exc, "advance the slot") from None
        after = parse_lsn(end) if end else None
        return AdvanceResult(before=before, after=after, target=target, moved=True)

    # -- helpers -----------------------------------------------------------------------
    def _require_exists(self) -> SlotState:
        state = self.state()
        if state is None:
            raise SourceError(
                f"replication slot {self.name!r} does not exist in {self.settings.describe()}: "
                "pass --create-slot (or create it with pg_create_logical_replication_slot)"
            )
        return state

    def _translate(self, exc: psycopg2.Error, action: str) -> SourceError:
        """A PostgreSQL error, said with the slot's name and the fix."""
        if _connection_lost(exc):
            return self._lost(exc, action.replace(" the slot", ""))
        message = (exc.pgerror or str(exc)).strip().splitlines()[0] if (exc.pgerror or str(exc)) else ""
        code = exc.pgcode or ""
        if code == "55006":  # object_in_use: another backend has acquired the slot
            fix = (
                "another client is reading this slot: stop it (pg_recvlogical, a subscriber) "
                "or use another slot"
            )
        elif code == "42501":  # insufficient_privilege
            fix = (
                "the role lacks the right: ALTER ROLE <role> REPLICATION "
                "(on Amazon RDS: GRANT rds_replication TO <role>)"
            )
        elif code == "42704" and self.publication and "publication" in message:
            fix = (
                f"create the publication first (CREATE PUBLICATION {_quote_ident(self.publication)} FOR ALL "
                "TABLES, or for chosen tables), then recreate the slot: pgoutput cannot decode changes made "
                "before it existed"
            )
        elif code == "42704":  # undefined_object: slot missing
            fix = "create the slot (--create-slot)"
        elif code == "55000":  # object_not_in_prerequisite_state, e.g. wal_level
            fix = "check wal_level = logical and that the slot is a logical slot of this database"
        elif code in ("58P01", "22023"):
            fix = f"check that the output plugin {self.plugin!r} is installed and its options are valid"
        else:
            fix = "see PostgreSQL's message"
        return SourceError(
            f"could not {action} {self.name!r} ({self.settings.describe()}): {message} [{code}]: {fix}. "
            "The slot was not advanced."
        )
