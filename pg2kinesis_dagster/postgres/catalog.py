"""Primary keys and replica identity, read from the system catalogs (never guessed from plugin output)."""

from __future__ import annotations

from dataclasses import dataclass

from pg2kinesis_dagster.postgres.connection import PostgresSettings

REPLICA_IDENTITY = {"d": "DEFAULT", "n": "NOTHING", "f": "FULL", "i": "INDEX"}

# One row per ordinary or partitioned table outside the system schemas, with its primary-key
# columns in key order (empty arrays when it has none).
_TABLES_SQL = """
SELECT n.nspname::text,
       c.relname::text,
       c.relreplident::text,
       coalesce(array_agg(a.attname::text ORDER BY k.ord) FILTER (WHERE a.attname IS NOT NULL), '{}'),
       coalesce(array_agg(format_type(a.atttypid, a.atttypmod) ORDER BY k.ord)
                FILTER (WHERE a.attname IS NOT NULL), '{}'),
       -- The youngest xmin of the table's catalog rows: the transaction that last created, keyed or altered it.
       (SELECT x FROM (SELECT c.xmin AS x
                       UNION ALL SELECT ix.xmin FROM pg_index ix WHERE ix.indrelid = c.oid
                       UNION ALL SELECT at.xmin FROM pg_attribute at WHERE at.attrelid = c.oid AND at.attnum > 0
                      ) AS rows ORDER BY age(x) LIMIT 1)::text::bigint
FROM pg_class c
JOIN pg_namespace n ON n.oid = c.relnamespace
LEFT JOIN pg_index i ON i.indrelid = c.oid AND i.indisprimary
LEFT JOIN LATERAL unnest(i.indkey::int2[]) WITH ORDINALITY AS k(attnum, ord) ON true
LEFT JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum = k.attnum
WHERE c.relkind IN ('r', 'p')
  AND n.nspname NOT IN ('pg_catalog', 'information_schema')
  AND n.nspname NOT LIKE 'pg\\_toast%%'
  AND n.nspname NOT LIKE 'pg\\_temp%%'
GROUP BY n.nspname, c.relname, c.relreplident, c.oid, c.xmin
ORDER BY 1, 2
"""


@dataclass(frozen=True)
class TableKey:
    schema: str
    table: str
    key_columns: tuple[str, ...]
    key_types: tuple[str, ...]
    replica_identity: str
    # The transaction that last changed the table's catalog rows (created it, added or dropped its key or a
    # column), when known: lets a reader of older WAL switch to this key at that transaction, not before.
    changed_by_xid: int | None = None

    @property
    def qualified_name(self) -> str:
        return f"{self.schema}.{self.table}"

    @property
    def has_primary_key(self) -> bool:
        return bool(self.key_columns)


def load_table_keys(settings: PostgresSettings) -> dict[tuple[str, str], TableKey]:
    """Every user table of the database with its primary key (composite keys in key order)."""
    conn = settings.connect(autocommit=True)
    try:
        with conn.cursor() as cur:
            cur.execute(_TABLES_SQL)
            rows = cur.fetchall()
    finally:
        conn.close()
    return {
        (schema, table): TableKey(
            schema=schema,
            table=table,
            key_columns=tuple(columns),
            key_types=tuple(types),
            replica_identity=REPLICA_IDENTITY.get(ident, ident),
            changed_by_xid=changed_by,
        )
        for schema, table, ident, columns, types, changed_by in rows
    }
