"""Read a slot's health from PostgreSQL: one snapshot for :func:`pg2kinesis_dagster.core.health.evaluate`.

Everything comes from views every role may read: ``pg_replication_slots`` (as JSON, so that the columns
of newer versions -- ``invalidation_reason``, ``conflicting`` -- are used when they exist),
``pg_stat_replication_slots``, ``pg_stat_activity``, ``pg_prepared_xacts`` and ``pg_settings``. Other
roles' sessions show their pid, user, database, application and xid to everyone, but their state,
client and transaction start only to roles with ``pg_read_all_stats`` (``pg_monitor`` includes it): the snapshot
says which, and the finding asks for the grant.
"""

from __future__ import annotations

from dataclasses import replace

import psycopg2
import psycopg2.extensions
from psycopg2 import sql

from pg2kinesis_dagster.core.changes import parse_lsn
from pg2kinesis_dagster.core.health import PreparedTransaction, Session, SlotHealth
from pg2kinesis_dagster.postgres.connection import PostgresSettings

_SLOT_SQL = "SELECT to_jsonb(s) FROM pg_replication_slots s WHERE slot_name = %s"
_SERVER_SQL = """
SELECT pg_current_wal_lsn()::text,
       current_user::text,
       pg_has_role(current_user, 'pg_read_all_stats', 'USAGE'),
       (SELECT setting::bigint FROM pg_settings WHERE name = 'max_slot_wal_keep_size'),
       (SELECT unit FROM pg_settings WHERE name = 'max_slot_wal_keep_size')
"""
_STATS_SQL = "SELECT to_jsonb(s) FROM pg_stat_replication_slots s WHERE slot_name = %s"
# Transactions holding an xid pin restart_lsn (read-only ones do not): oldest xid first.
_SESSIONS_SQL = """
SELECT pid, usename::text, datname::text, backend_xid::text::bigint, nullif(application_name, ''), state,
       xact_start, host(client_addr)
FROM pg_stat_activity
WHERE backend_xid IS NOT NULL AND pid <> pg_backend_pid()
ORDER BY age(backend_xid) DESC
LIMIT 10
"""
_PREPARED_SQL = """
SELECT gid, owner::text, database::text, transaction::text::bigint, prepared
FROM pg_prepared_xacts
ORDER BY age(transaction) DESC
LIMIT 10
"""
_UNITS = {"B": 1, "kB": 1024, "MB": 1024**2, "GB": 1024**3, "TB": 1024**4}


def _lsn(value: object) -> int | None:
    return parse_lsn(str(value)) if value else None


def read_slot_health(
    settings: PostgresSettings,
    slot_name: str,
    *,
    peek_options: tuple[str, ...] | None = (),
    binary: bool = False,
) -> SlotHealth:
    """A snapshot of ``slot_name`` and the server; raises SourceUnavailableError when PostgreSQL is unreachable.

    ``peek_options``: the plugin options replication reads the slot with (the decoder's ``slot_options``);
    with them, whether a change is pending is found out by peeking one transaction, when no other backend
    is reading the slot (otherwise, and with ``None``, ``pending`` stays None). ``binary``: pgoutput.
    """
    conn = settings.connect(autocommit=True)
    try:
        with conn.cursor() as cur:
            cur.execute(_SERVER_SQL)
            current, role, can_see, keep, unit = cur.fetchone()
            keep_bytes = -1 if keep is None or int(keep) < 0 else int(keep) * _UNITS.get(unit or "MB", 1024**2)
            cur.execute(_SLOT_SQL, (slot_name,))
            row = cur.fetchone()
            cur.execute(_SESSIONS_SQL)
            sessions = tuple(
                Session(pid=pid, user=user, database=db, xid=xid, application=app, state=state,
                        xact_start=started, client=client)
                for pid, user, db, xid, app, state, started, client in cur.fetchall()
            )
            cur.execute(_PREPARED_SQL)
            prepared = tuple(
                PreparedTransaction(gid=gid, owner=owner, database=db, xid=xid, prepared=at)
                for gid, owner, db, xid, at in cur.fetchall()
            )
            base = dict(
                slot_name=slot_name, where=settings.describe(), current_wal_lsn=parse_lsn(current),
                max_slot_wal_keep_size=keep_bytes, sessions=sessions, prepared=prepared,
                can_see_all_sessions=bool(can_see), role=role,
            )
            if row is None:
                return SlotHealth(exists=False, **base)  # type: ignore[arg-type]
            slot = row[0]
            cur.execute(_STATS_SQL, (slot_name,))
            stats_row = cur.fetchone()
            stats = {k: int(v) for k, v in (stats_row[0] if stats_row else {}).items()
                     if isinstance(v, int) and not isinstance(v, bool)}
        invalidation = slot.get("invalidation_reason") or ("conflicting" if slot.get("conflicting") else None)
        health = SlotHealth(
            exists=True,
            plugin=slot.get("plugin"),
            database=slot.get("database"),
            active_pid=slot.get("active_pid"),
            confirmed_flush_lsn=_lsn(slot.get("confirmed_flush_lsn")),
            restart_lsn=_lsn(slot.get("restart_lsn")),
            wal_status=slot.get("wal_status"),
            safe_wal_size=slot.get("safe_wal_size"),
            invalidation=invalidation,
            decoding_stats=stats,
            **base,  # type: ignore[arg-type]
        )
        if peek_options is not None and not health.lost and health.active_pid is None:
            health = replace(health, pending=_peek_pending(conn, slot_name, peek_options, binary))
        return health
    finally:
        conn.close()


def _peek_pending(
    conn: psycopg2.extensions.connection, slot_name: str, options: tuple[str, ...], binary: bool
) -> bool | None:
    """Whether the slot holds a change up to the flushed WAL; None when another backend took the slot."""
    function = "pg_logical_slot_peek_binary_changes" if binary else "pg_logical_slot_peek_changes"
    query = sql.SQL("SELECT count(*) FROM {}(%s, pg_current_wal_flush_lsn(), 1, VARIADIC %s::text[])").format(
        sql.Identifier(function))
    try:
        with conn.cursor() as cur:
            cur.execute(query, (slot_name, list(options)))
            (count,) = cur.fetchone()
    except psycopg2.Error as exc:
        # 55006 object_in_use: a replication run is reading it right now. Any other error of the server's
        # (a missing publication, say) fails replication as well: the freshness check then goes by checkpoints.
        if exc.pgcode is None:
            raise
        return None
    return bool(count)
