"""Which options the installed output plugin accepts, found out by asking it once.

wal2json 2.6 added ``numeric-data-types-as-string``, which prints numbers as JSON strings so that numeric
``NaN`` and ``Infinity`` stay distinct from NULL; wal2json 2.5 (Debian's package for PostgreSQL 15) rejects
it (``option "..." is unknown``). A peek bounded to the first WAL record after the slot's start runs the
plugin's startup callback -- where options are checked -- and decodes next to nothing.
"""

from __future__ import annotations

import psycopg2
from psycopg2 import sql

from pg2kinesis_dagster.postgres.slot import ReplicationSlot

WAL2JSON_NUMBERS_AS_STRINGS = "numeric-data-types-as-string"
# (where, slot, option) -> accepted; a process asks each server once.
_ACCEPTED: dict[tuple[str, str, str], bool] = {}


def plugin_accepts_option(slot: ReplicationSlot, base_options: tuple[str, ...], option: str, value: str = "1") -> bool:
    """Whether the slot's plugin takes ``option``; False on its "unknown option" error, other errors raised.

    A slot busy with another reader right now answers False without remembering it (asked again next time).
    """
    key = (slot.settings.describe(), slot.name, option)
    if key in _ACCEPTED:
        return _ACCEPTED[key]
    function = "pg_logical_slot_peek_binary_changes" if slot.plugin == "pgoutput" else "pg_logical_slot_peek_changes"
    query = sql.SQL("SELECT count(*) FROM {}(%s, '0/1'::pg_lsn, 1, VARIADIC %s::text[])").format(
        sql.Identifier(function))
    try:
        slot._query(query, (slot.name, [*base_options, option, value]))
    except psycopg2.Error as exc:
        text = exc.pgerror or str(exc)
        if exc.pgcode == "22023" and ("is unknown" in text or "unrecognized" in text):
            _ACCEPTED[key] = False
            return False
        if exc.pgcode == "55006":  # in use by another backend for a moment: do not decide now
            return False
        raise slot._translate(exc, f"ask the output plugin about option {option!r} on the slot") from None
    _ACCEPTED[key] = True
    return True
