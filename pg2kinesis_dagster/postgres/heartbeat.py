"""An optional heartbeat: a non-transactional logical message written into the replicated database.

Not needed in general: an idle slot is advanced to the flushed WAL position anyway (the replication sensor
requests a run once enough idle WAL waits behind it). The heartbeat is for setups where that is not enough --
a small disk for which waiting for the sensor's idle threshold is too long, or monitoring that expects the
replicated database itself to produce WAL at a steady pace: each message is a decodable record in this
database, so the slot sees pending data and the next run moves past it. Every decoder ignores messages of this
prefix, so nothing is published for them. Non-transactional: written at once, whatever transaction the session is in,
and no xid is taken (so it cannot pin restart_lsn).
"""

from __future__ import annotations

import time

from pg2kinesis_dagster.core.changes import parse_lsn
from pg2kinesis_dagster.postgres.connection import PostgresSettings

HEARTBEAT_PREFIX = "pg2kinesis.heartbeat"


def emit_heartbeat(
    settings: PostgresSettings, prefix: str = HEARTBEAT_PREFIX, *, flush_timeout: float = 10.0
) -> int:
    """Write one heartbeat message and wait until it is flushed (decoding reads only flushed WAL); its LSN.

    Nothing commits, so nothing flushes the message at once: the WAL writer does within a few
    ``wal_writer_delay`` (200 ms by default).
    """
    conn = settings.connect(autocommit=True)
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT pg_logical_emit_message(false, %s, now()::text)::text", (prefix,))
            (lsn,) = cur.fetchone()
            deadline = time.monotonic() + flush_timeout
            while True:
                cur.execute("SELECT pg_current_wal_flush_lsn() >= %s::pg_lsn", (lsn,))
                if cur.fetchone()[0] or time.monotonic() > deadline:
                    break
                time.sleep(0.05)
    finally:
        conn.close()
    return parse_lsn(lsn)
