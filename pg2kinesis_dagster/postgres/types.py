"""Catalog adapters for the wal2json and pgoutput decoders, and the pgoutput publication.

The decoders are pure code: what they need from the catalog is injected as callables.

* :class:`TypeNames` -- ``(oid, typmod) -> name`` via ``format_type``: typmod -1 gives
  ``format_type_be`` output, the names test_decoding prints (note that
  ``format_type(oid, -1)`` would not: it prints ``bpchar`` and ``"bit"``).
* :class:`TableColumns` -- ``(schema, table) -> {attnum: (name, type)}`` of the live
  columns, for wal2json's unchanged TOAST columns.
* :func:`decoder_options` -- the keyword arguments ``decoder_for(plugin, **kwargs)``
  needs for a plugin, built on those two.
* :func:`ensure_publication` -- the publication pgoutput reads. It must exist before
  the slot reaches the changes to decode (pgoutput looks it up in the historic
  catalog), so create it before the slot.

Each loader opens a short-lived connection per catalog query and caches the answers;
a name not found is looked up again (a type or table created since).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Literal

import psycopg2.extensions
from psycopg2 import sql

from pg2kinesis_dagster.core.errors import ConfigError, SourceError
from pg2kinesis_dagster.postgres.connection import PostgresSettings

Connect = Callable[[], psycopg2.extensions.connection]

# Every type of the database at once: one query serves a whole session in the common case.
_ALL_TYPES_SQL = "SELECT oid::bigint, format_type(oid, NULL) FROM pg_type"
_ONE_TYPE_SQL = "SELECT format_type(%s::oid, %s)"
_COLUMNS_SQL = """
SELECT a.attnum::int, a.attname::text, format_type(a.atttypid, NULL)
FROM pg_attribute a
JOIN pg_class c ON c.oid = a.attrelid
JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE n.nspname = %s AND c.relname = %s AND a.attnum > 0 AND NOT a.attisdropped
ORDER BY a.attnum
"""


def _connector(settings: PostgresSettings | Connect) -> Connect:
    if isinstance(settings, PostgresSettings):
        return lambda: settings.connect(autocommit=True)
    return settings


def _query(connect: Connect, query: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
    conn = connect()
    try:
        with conn.cursor() as cur:
            cur.execute(query, params)
            return cur.fetchall()
    finally:
        conn.close()


class TypeNames:
    """``(oid, typmod) -> format_type(oid, typmod)``, cached; the decoders' ``type_name``.

    ``settings`` is the source's :class:`PostgresSettings` or a zero-argument function
    returning a new connection (closed after each query).
    """

    def __init__(self, settings: PostgresSettings | Connect) -> None:
        self._connect = _connector(settings)
        self._names: dict[tuple[int, int], str] = {}
        self._loaded = False
        self._lock = threading.Lock()

    def __call__(self, oid: int, typmod: int = -1) -> str:
        key = (oid, typmod if typmod >= 0 else -1)
        name = self._names.get(key)
        if name is not None:
            return name
        with self._lock:
            if not self._loaded:
                self._names.update(((int(o), -1), n) for o, n in _query(self._connect, _ALL_TYPES_SQL))
                self._loaded = True
                name = self._names.get(key)
            if name is None:
                # A type created since the load, or a typmod: ask for that one. typmod -1 must be
                # passed as NULL: format_type(oid, -1) differs from format_type_be for bpchar and bit.
                (name,) = _query(self._connect, _ONE_TYPE_SQL, (oid, typmod if typmod >= 0 else None))[0]
                if name is None or name == "???":
                    raise SourceError(f"type OID {oid} does not exist in the source database (dropped?): "
                                      "cannot name the column's type")
                self._names[key] = name
            return name


class TableColumns:
    """``(schema, table) -> {attnum: (name, type)}`` of the live columns, cached per table."""

    def __init__(self, settings: PostgresSettings | Connect) -> None:
        self._connect = _connector(settings)
        self._tables: dict[tuple[str, str], dict[int, tuple[str, str]]] = {}

    def __call__(self, schema: str, table: str) -> Mapping[int, tuple[str, str]]:
        key = (schema, table)
        columns = self._tables.get(key)
        if columns is None:
            rows = _query(self._connect, _COLUMNS_SQL, key)
            columns = self._tables[key] = {int(n): (name, type_) for n, name, type_ in rows}
        return columns

    def invalidate(self, schema: str | None = None, table: str | None = None) -> None:
        """Forget one table (or all): the next call reads the catalog again."""
        if schema is None or table is None:
            self._tables.clear()
        else:
            self._tables.pop((schema, table), None)


def decoder_options(
    plugin: str, settings: PostgresSettings | Connect, *, publication: str = "pg2kinesis"
) -> dict[str, Any]:
    """Keyword arguments for ``decoder_for(plugin, **kwargs)`` with catalog adapters on ``settings``."""
    if plugin == "pgoutput":
        return {"publication": publication, "type_name": TypeNames(settings)}
    if plugin == "wal2json":
        return {"type_name": TypeNames(settings), "columns": TableColumns(settings)}
    return {}


TableSpec = str | tuple[str, str]


def _table_ident(spec: TableSpec) -> sql.Identifier:
    if isinstance(spec, tuple):
        schema, table = spec
    else:
        schema, dot, table = spec.partition(".")
        if not dot:
            schema, table = "public", spec
    return sql.Identifier(schema, table)


# Tables that PostgreSQL would refuse to UPDATE/DELETE once published: no replica identity.
_NO_IDENTITY_SQL = """
SELECT n.nspname::text, c.relname::text
FROM pg_class c
JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE c.relkind IN ('r', 'p')
  AND n.nspname NOT IN ('pg_catalog', 'information_schema')
  AND n.nspname NOT LIKE 'pg\\_toast%%' AND n.nspname NOT LIKE 'pg\\_temp%%'
  AND (c.relreplident = 'n'
       OR (c.relreplident = 'd' AND NOT EXISTS (
             SELECT 1 FROM pg_index i WHERE i.indrelid = c.oid AND i.indisprimary))
       OR (c.relreplident = 'i' AND NOT EXISTS (
             SELECT 1 FROM pg_index i WHERE i.indrelid = c.oid AND i.indisreplident)))
ORDER BY 1, 2
"""


def _check_identity(cur: psycopg2.extensions.cursor, tables: list[sql.Identifier] | None) -> None:
    cur.execute(_NO_IDENTITY_SQL)
    lacking = [(s, t) for s, t in cur.fetchall() if tables is None or sql.Identifier(s, t).strings in
               {i.strings for i in tables}]
    if lacking:
        shown = ", ".join(f"{s}.{t}" for s, t in lacking[:10]) + (" ..." if len(lacking) > 10 else "")
        raise SourceError(
            f"{len(lacking)} table(s) to publish have no replica identity ({shown}): once published, PostgreSQL "
            "would refuse every UPDATE and DELETE on them. Give each a primary key or run ALTER TABLE ... "
            "REPLICA IDENTITY FULL, or publish only other tables (pass check_identity=False to publish anyway)"
        )


def ensure_publication(
    conn: psycopg2.extensions.connection,
    name: str,
    tables: Literal["ALL"] | Iterable[TableSpec] = "ALL",
    *,
    check_identity: bool = True,
) -> bool:
    """Create publication ``name`` for all tables or for ``tables`` unless it exists.

    ``tables``: ``"ALL"`` (``FOR ALL TABLES``; needs a superuser) or table names as
    ``"schema.table"`` (split at the first dot; no dot means ``public``) or
    ``(schema, table)``. An existing publication gets the listed tables it lacks; one
    that is not FOR ALL TABLES when that was asked for is an error, not altered.
    Returns whether anything was created or added. Run it before creating the slot,
    with ``conn`` in autocommit mode (or commit afterwards).

    A published table without replica identity (no primary key, not FULL) can no longer
    be updated or deleted from (PostgreSQL raises an error in the application's
    session): unless ``check_identity`` is False, such tables make this raise
    :class:`SourceError` before anything is created.
    """
    if not name:
        raise ConfigError("the publication name must not be empty")
    with conn.cursor() as cur:
        cur.execute("SELECT oid, puballtables FROM pg_publication WHERE pubname = %s", (name,))
        found = cur.fetchone()
        if isinstance(tables, str):
            if tables != "ALL":
                raise ConfigError(f"tables must be 'ALL' or a list of tables, not {tables!r}")
            if found is None:
                if check_identity:
                    _check_identity(cur, None)
                cur.execute(sql.SQL("CREATE PUBLICATION {} FOR ALL TABLES").format(sql.Identifier(name)))
                return True
            if not found[1]:
                raise SourceError(
                    f"publication {name!r} exists but is not FOR ALL TABLES: drop it, or list its tables, "
                    "or use another publication name"
                )
            return False
        idents = [_table_ident(t) for t in tables]
        if not idents:
            raise ConfigError(f"no tables given for publication {name!r}: pass 'ALL' or at least one table")
        if check_identity:
            _check_identity(cur, idents)
        if found is None:
            cur.execute(sql.SQL("CREATE PUBLICATION {} FOR TABLE {}").format(
                sql.Identifier(name), sql.SQL(", ").join(idents)))
            return True
        if found[1]:
            return False  # FOR ALL TABLES already covers them
        cur.execute(
            "SELECT n.nspname::text, c.relname::text FROM pg_publication_rel pr "
            "JOIN pg_class c ON c.oid = pr.prrelid JOIN pg_namespace n ON n.oid = c.relnamespace "
            "WHERE pr.prpubid = %s",
            (found[0],),
        )
        present = {sql.Identifier(s, t).strings for s, t in cur.fetchall()}
        missing = [i for i in idents if i.strings not in present]
        if not missing:
            return False
        cur.execute(sql.SQL("ALTER PUBLICATION {} ADD TABLE {}").format(
            sql.Identifier(name), sql.SQL(", ").join(missing)))
        return True
