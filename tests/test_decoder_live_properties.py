"""Live property test (issue 3): generated tables and rows go through a real PostgreSQL, and
each of the three output plugins, decoded by the project's decoders, must give back exactly
PostgreSQL's own text output of every written value.

Per example: a fresh schema (hostile name) with 1-3 tables (hostile table and column names,
many column types, an enum and a composite type, keyed or REPLICA IDENTITY FULL), a random
sequence of INSERT/UPDATE/DELETE whose every written row is captured with ``RETURNING`` as
the type output function's text, then the three slots (test_decoding, wal2json, pgoutput;
created once per test function, advanced past everything before each example) are peeked and
decoded. The expected text is ``format('%s', col)`` (the output function) rather than
``col::text``: the latter differs for boolean (``true`` vs ``t``), inet/cidr (mask added)
and character(n) (trailing blanks trimmed).

Plugin limits that are asserted as such rather than hidden (wal2json 2.5, see the docstring
of core/decoders/wal2json.py): numeric/real/double precision NaN and +-Infinity arrive as
NULL. (A type name starting with a double quote, e.g. ``"My Schema".mood``, is printed by
wal2json unescaped, which is not JSON: the pipeline's decoder therefore asks wal2json for no
type names and names types by OID from the catalog, and such examples are compared too.)

Example counts come from HYPOTHESIS_PROFILE: "default" (25 examples, for every run) or
"fuzz" (thousands).
"""

from __future__ import annotations

import dataclasses
import ipaddress
import itertools
import json
import os
from collections.abc import Callable, Iterator
from datetime import date, timedelta, timezone
from typing import Any

import psycopg2.extensions
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from psycopg2 import sql

from pg2kinesis_dagster.core.changes import Change, Operation, parse_lsn
from pg2kinesis_dagster.core.decoders import decoder_for
from pg2kinesis_dagster.devstack.postgres import PostgresServer
from pg2kinesis_dagster.postgres.types import decoder_options, ensure_publication

_HEALTH = [HealthCheck.too_slow, HealthCheck.function_scoped_fixture, HealthCheck.data_too_large]
_PROFILES = {
    "default": settings(max_examples=25, deadline=None, suppress_health_check=_HEALTH),
    "fuzz": settings(max_examples=2000, deadline=None, suppress_health_check=_HEALTH),
}
_profile = _PROFILES.get(os.environ.get("HYPOTHESIS_PROFILE", "default"), _PROFILES["default"])

PLUGINS = ("test_decoding", "wal2json", "pgoutput")
PUBLICATION = "live props"  # a name that needs quoting in publication_names
SLOTS = {"test_decoding": "lp_td", "wal2json": "lp_wj", "pgoutput": "lp_po"}
SPECIAL_NUMBERS = frozenset({"NaN", "Infinity", "-Infinity"})
NUMBER_TYPES = frozenset({"numeric", "real", "double precision"})
SYSTEM_COLUMNS = frozenset({"tableoid", "xmin", "cmin", "xmax", "cmax", "ctid"})

# -- hostile text and identifiers -----------------------------------------------------

# Any character PostgreSQL can store (UTF8 server): no NUL, no lone surrogates.
ANY_CHAR = st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00")
TRICKY = [
    "'", "''", '"', '""', "\\", "\\\\", "\n", "\r\n", "\t", " ", "", "😀", "é", "日本", "\u2028", "\x85", "]:",
    "[", "]", ":", ".", ",", "{", "}", "(", ")", "NULL", "null", " new-tuple:", " old-key:", " (no-tuple-data)",
    "unchanged-toast-datum", "B'01'", " x[integer]:1", "%s", "%(x)s", "E'\\x'", "\\x00",
]
hostile_text = st.lists(st.one_of(st.text(ANY_CHAR, max_size=6), st.sampled_from(TRICKY)), max_size=5).map("".join)

KEYWORDS = ["select", "table", "user", "order", "group", "from", "integer", "null", "true", "end", "column",
            "primary", "check", "natural", "timestamp", "char", "varchar", "all", "default", "when", "type"]
HOSTILE_NAMES = ["Upper", "MiXeD", "a b", " lead", "trail ", 'x"y', '"', '""', "a.b", ".", "x[1]", "[]", "a]:b",
                 ":", "a:b", "é", "ünï", "😀", "日本", "$x", "1abc", "new-tuple:", "old-key:", " (no-tuple-data)",
                 "a, b", "tab\tname", "new\nline", "back\\slash", "it's", "null", "unchanged-toast-datum",
                 "B'01'", "%s", "%(x)s", "{}", "()", "a=b"]


def _name_ok(name: str) -> bool:
    # Longer names would be truncated to 63 bytes by PostgreSQL (NAMEDATALEN): keep a margin
    # for the unique suffixes added to schema names.
    return 0 < len(name.encode()) <= 40 and "\x00" not in name


identifiers = st.one_of(
    st.from_regex(r"[a-z_][a-z0-9_]{0,10}", fullmatch=True),
    st.sampled_from(KEYWORDS),
    st.sampled_from(HOSTILE_NAMES),
    st.lists(st.one_of(st.text(ANY_CHAR, min_size=1, max_size=4), st.sampled_from(HOSTILE_NAMES)),
             min_size=1, max_size=3).map("".join),
).filter(_name_ok)
column_names = identifiers.filter(lambda n: n not in SYSTEM_COLUMNS)

# -- values: PostgreSQL input text per type ---------------------------------------------


def _ints(bits: int) -> st.SearchStrategy[str]:
    return st.integers(-(2 ** (bits - 1)), 2 ** (bits - 1) - 1).map(str)


def _float_text(width: int) -> st.SearchStrategy[str]:
    return st.one_of(
        st.floats(width=width, allow_nan=False, allow_infinity=False).map(repr),  # type: ignore[arg-type]
        st.sampled_from(["NaN", "Infinity", "-Infinity", "-0", "1e-300" if width == 64 else "1e-40", "0.1"]),
    )


numeric_text = st.one_of(
    st.from_regex(r"-?[0-9]{1,40}(\.[0-9]{1,40})?", fullmatch=True),
    st.decimals(allow_nan=False, allow_infinity=False, min_value=-(10**30), max_value=10**30).map(str),
    st.integers(1, 400).map(lambda n: "9" * n + "." + "0" * (n // 2) + "1"),  # huge precision
    st.sampled_from(["NaN", "Infinity", "-Infinity", "-0", "0.000", "1e-20", "-1.5E+30"]),
)
numeric_12_3_text = st.one_of(
    st.decimals(min_value=-(10**8), max_value=10**8, places=3, allow_nan=False, allow_infinity=False).map(str),
    st.just("NaN"),
)
json_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False, allow_infinity=False),
              hostile_text),
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(hostile_text, inner, max_size=3)),
    max_leaves=8,
)
json_text = st.one_of(
    st.builds(lambda v, indent, ascii_: json.dumps(v, indent=indent, ensure_ascii=ascii_),
              json_values, st.sampled_from([None, 1]), st.booleans()),
    st.sampled_from(['{"a": 1, "a": 2}', ' [ 1 , 2.50 , "x" ] ', '{"\\u00e9": "\\ud83d\\ude00"}',
                     "12345678901234567890.5"]),
)


def _render_array(value: list[Any], quote_all: bool) -> str:
    """An array literal as array_in reads it; elements quoted when needed (or always)."""
    parts = []
    for item in value:
        if item is None:
            parts.append("NULL")
        elif isinstance(item, list):
            parts.append(_render_array(item, quote_all))
        else:
            text = str(item)
            plain = text and text.upper() != "NULL" and not any(c in text for c in '{}",\\ \t\n\r\v\f')
            parts.append(text if plain and not quote_all else
                         '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"')
    return "{" + ",".join(parts) + "}"


@st.composite
def array_text(draw: st.DrawFn, elements: st.SearchStrategy[Any]) -> str:
    """A rectangular array of 1-3 dimensions (or empty), as text."""
    if draw(st.integers(0, 9)) == 0:
        return "{}"
    dims = draw(st.lists(st.integers(1, 3), min_size=1, max_size=3))

    def build(level: int) -> list[Any]:
        if level == len(dims) - 1:
            return [draw(elements) for _ in range(dims[level])]
        return [build(level + 1) for _ in range(dims[level])]

    return _render_array(build(0), draw(st.booleans()))


tz_offsets = st.integers(-15 * 60 + 1, 15 * 60 - 1).map(lambda m: timezone(timedelta(minutes=m)))


@st.composite
def interval_text(draw: st.DrawFn) -> str:
    if draw(st.integers(0, 4)) == 0:
        return draw(st.sampled_from(["P1Y2M3DT4H5M6.5S", "@ 1 day ago", "-1 mons", "0", "1 week", "-00:00:00.000001"]))
    y, mo, d = draw(st.integers(-1000, 1000)), draw(st.integers(-50, 50)), draw(st.integers(-10000, 10000))
    h, s, us = draw(st.integers(-100000, 100000)), draw(st.integers(-59, 59)), draw(st.integers(0, 999999))
    return f"{y} years {mo} mons {d} days {h} hours {s}.{us:06d} seconds"


@st.composite
def inet_text(draw: st.DrawFn, network: bool) -> str:
    address = draw(st.ip_addresses())
    bits = 32 if address.version == 4 else 128
    prefix = draw(st.integers(0, bits))
    if network:
        return str(ipaddress.ip_network(f"{address}/{prefix}", strict=False))
    return str(address) if draw(st.booleans()) else f"{address}/{prefix}"


@st.composite
def range_text(draw: st.DrawFn) -> str:
    if draw(st.integers(0, 9)) == 0:
        return "empty"
    lo, hi = sorted(draw(st.lists(st.integers(-(2**31), 2**31 - 2), min_size=2, max_size=2)))
    lo_text = "" if draw(st.integers(0, 5)) == 0 else str(lo)
    hi_text = "" if draw(st.integers(0, 5)) == 0 else str(hi)
    return f"{draw(st.sampled_from('[('))}{lo_text},{hi_text}{draw(st.sampled_from('])'))}"


@st.composite
def composite_text(draw: st.DrawFn) -> str:
    """record_in input of (a int, b text): NULL fields empty, text quoted with escapes."""
    a = draw(st.one_of(st.none(), _ints(32)))
    b = draw(st.one_of(st.none(), hostile_text))
    b_text = "" if b is None else '"' + b.replace("\\", "\\\\").replace('"', '""') + '"'
    return f"({'' if a is None else a},{b_text})"


@st.composite
def tsvector_text(draw: st.DrawFn) -> str:
    lexemes = draw(st.lists(hostile_text.filter(bool), max_size=4))
    out = []
    for lexeme in lexemes:
        quoted = "'" + lexeme.replace("\\", "\\\\").replace("'", "''") + "'"
        positions = draw(st.lists(st.integers(1, 16383), max_size=3))
        if positions:
            quoted += ":" + ",".join(f"{p}{draw(st.sampled_from(['', 'A', 'B', 'C']))}" for p in positions)
        out.append(quoted)
    return " ".join(out)


def _float_or_nan(x: float | None) -> str:
    return "NaN" if x is None else repr(x)


point_text = st.builds(lambda x, y: f"({_float_or_nan(x)},{_float_or_nan(y)})",
                       *[st.one_of(st.none(), st.floats(allow_nan=False, allow_infinity=False))] * 2)


@dataclasses.dataclass(frozen=True)
class ColType:
    """A column type: how to write it in DDL and casts, and values as PostgreSQL input text."""

    label: str
    ddl: sql.Composable = dataclasses.field(repr=False)
    values: st.SearchStrategy[str] = dataclasses.field(repr=False)
    user_type: bool = dataclasses.field(default=False, repr=False)  # an enum or composite of the example


def builtin_types(n: int) -> list[ColType]:
    """The built-in column types; ``n`` sizes varchar/char/bit."""
    return [
        ColType("int2", sql.SQL("int2"), _ints(16)),
        ColType("int4", sql.SQL("int4"), _ints(32)),
        ColType("int8", sql.SQL("int8"), _ints(64)),
        ColType("numeric", sql.SQL("numeric"), numeric_text),
        ColType("numeric(12,3)", sql.SQL("numeric(12,3)"), numeric_12_3_text),
        ColType("float4", sql.SQL("float4"), _float_text(32)),
        ColType("float8", sql.SQL("float8"), _float_text(64)),
        ColType("bool", sql.SQL("boolean"), st.sampled_from(["true", "false", "t", "f", "yes", "off", "1", "0"])),
        ColType("text", sql.SQL("text"), hostile_text),
        ColType("varchar", sql.SQL(f"varchar({n})"), hostile_text),  # explicit casts truncate
        ColType("char", sql.SQL(f"char({n})"), hostile_text),
        ColType("bytea", sql.SQL("bytea"), st.binary(max_size=16).map(lambda b: "\\x" + b.hex())),
        ColType("uuid", sql.SQL("uuid"), st.uuids().map(str).flatmap(
            lambda u: st.sampled_from([u, u.upper(), "{" + u + "}"]))),
        ColType("json", sql.SQL("json"), json_text),
        ColType("jsonb", sql.SQL("jsonb"), json_text),
        ColType("int4[]", sql.SQL("int4[]"), array_text(st.one_of(st.none(), st.integers(-(2**31), 2**31 - 1)))),
        ColType("text[]", sql.SQL("text[]"), array_text(st.one_of(st.none(), hostile_text))),
        ColType("date", sql.SQL("date"), st.one_of(st.dates().map(date.isoformat),
                                                   st.sampled_from(["infinity", "-infinity", "0001-01-01 BC"]))),
        ColType("timestamp", sql.SQL("timestamp"), st.one_of(
            st.datetimes().map(lambda d: d.isoformat(sep=" ")), st.sampled_from(["infinity", "-infinity"]))),
        ColType("timestamptz", sql.SQL("timestamptz"), st.datetimes(timezones=tz_offsets).map(
            lambda d: d.isoformat(sep=" "))),
        ColType("interval", sql.SQL("interval"), interval_text()),
        ColType("inet", sql.SQL("inet"), inet_text(False)),
        ColType("cidr", sql.SQL("cidr"), inet_text(True)),
        ColType("macaddr", sql.SQL("macaddr"), st.binary(min_size=6, max_size=6).map(
            lambda b: ":".join(f"{x:02x}" for x in b))),
        ColType("money", sql.SQL("money"), st.integers(-(10**15), 10**15).map(
            lambda c: f"{'-' if c < 0 else ''}{abs(c) // 100}.{abs(c) % 100:02d}")),
        ColType("int4range", sql.SQL("int4range"), range_text()),
        ColType("tsvector", sql.SQL("tsvector"), tsvector_text()),
        ColType("point", sql.SQL("point"), point_text),
        ColType("bit", sql.SQL(f"bit({n})"), st.text("01", min_size=n, max_size=n)),
        ColType("varbit", sql.SQL("varbit"), st.text("01", max_size=12)),
    ]


# -- the generated schema ---------------------------------------------------------------


@dataclasses.dataclass
class Table:
    name: str
    columns: list[tuple[str, ColType]]
    key: list[str] | None  # primary-key columns; None: no key, REPLICA IDENTITY FULL
    type_names: list[str] = dataclasses.field(default_factory=list)  # format_type, filled after CREATE

    @property
    def names(self) -> list[str]:
        return [name for name, _ in self.columns]


@dataclasses.dataclass
class Example:
    schema: str
    type_schema: str  # where the enum and the composite live: the tables' schema or another one
    enum: str
    labels: list[str]
    composite: str
    tables: list[Table]


_counter = itertools.count(1)


def _distinct(names: list[str]) -> list[str]:
    """Names made distinct by suffixing repeats with their position (cheaper than filtering draws)."""
    seen: set[str] = set()
    out = []
    for i, name in enumerate(names):
        while name in seen:
            name = f"{name}{i}"
        seen.add(name)
        out.append(name)
    return out


@st.composite
def examples(draw: st.DrawFn) -> Example:
    n = next(_counter)
    # Unique per example (the counter), hostile otherwise; "pg_" prefixes are reserved.
    schema = draw(identifiers.filter(lambda s: not s.startswith("pg_"))) + f" #{n}"
    type_schema = draw(st.sampled_from([schema, f"types_{n}"]))
    enum, composite, *table_names = _distinct(draw(st.lists(identifiers, min_size=5, max_size=5)))
    # Enum labels: 1 to 63 bytes, distinct.
    labels = _distinct([label[:12] or "''" for label in draw(st.lists(hostile_text, min_size=1, max_size=4))])
    user_types = [
        ColType("enum", sql.Identifier(type_schema, enum), st.sampled_from(labels), True),
        ColType("composite", sql.Identifier(type_schema, composite), composite_text(), True),
    ]
    tables = []
    for table_name in table_names[: draw(st.integers(1, 3))]:
        types = builtin_types(draw(st.integers(1, 6))) + user_types
        key_kind = draw(st.sampled_from(["int", "int+text", "none"]))
        n_cols = draw(st.integers(0 if key_kind != "none" else 1, 6))
        col_names = _distinct(draw(st.lists(column_names, min_size=n_cols + 2, max_size=n_cols + 2)))
        columns = [(name, draw(st.sampled_from(types))) for name in col_names[2:]]
        key: list[str] | None = None
        if key_kind != "none":
            key_cols = [(col_names[0], ColType("key int", sql.SQL("int4"), _ints(32)))]
            if key_kind == "int+text":
                key_cols.append((col_names[1], ColType("key text", sql.SQL("text"), hostile_text)))
            # Key columns anywhere in the column order, not only first.
            for col in key_cols:
                columns.insert(draw(st.integers(0, len(columns))), col)
            key = [name for name, _ in key_cols]
        tables.append(Table(table_name, columns, key))
    return Example(schema, type_schema, enum, labels, composite, tables)


# -- the live server --------------------------------------------------------------------


def _output_text(column: str) -> sql.Composable:
    # The type's output function, as the plugins print it (not col::text: see the module docstring).
    # num_nulls() tells a NULL from a composite whose fields are all NULL ("(,)").
    ident = sql.Identifier(column)
    return sql.SQL("CASE WHEN num_nulls({0}) = 1 THEN NULL ELSE format('%s', {0}) END").format(ident)


@dataclasses.dataclass
class Event:
    table: Table
    op: Operation
    old: dict[str, str | None] | None
    new: dict[str, str | None] | None


class Live:
    """One database with a publication and the three slots; examples come and go as schemas."""

    def __init__(self, server: PostgresServer, database: str, conn: psycopg2.extensions.connection) -> None:
        self.server = server
        self.database = database
        self.conn = conn
        with conn.cursor() as cur:
            # Before the slots: pgoutput looks the publication up in the historic catalog.
            ensure_publication(conn, PUBLICATION, "ALL")
            for plugin, slot in SLOTS.items():
                cur.execute("SELECT pg_create_logical_replication_slot(%s, %s)", (slot, plugin))

    def connect(self) -> psycopg2.extensions.connection:
        return self.server.connect(self.database)

    def execute(self, query: sql.Composable | str) -> list[tuple[Any, ...]]:
        # Never with parameters: psycopg2 would read a '%' inside a quoted identifier as one.
        with self.conn.cursor() as cur:
            cur.execute(query)
            return cur.fetchall() if cur.description is not None else []

    def advance(self) -> None:
        """Move every slot past all WAL so far: each example reads only its own changes."""
        for slot in SLOTS.values():
            self.execute(sql.SQL("SELECT pg_replication_slot_advance({}, pg_current_wal_lsn())").format(
                sql.Literal(slot)))

    def create(self, ex: Example) -> None:
        statements: list[sql.Composable] = [sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(ex.schema))]
        if ex.type_schema != ex.schema:
            statements.append(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(ex.type_schema)))
        statements.append(sql.SQL("CREATE TYPE {} AS ENUM ({})").format(
            sql.Identifier(ex.type_schema, ex.enum), sql.SQL(", ").join(map(sql.Literal, ex.labels))))
        statements.append(sql.SQL("CREATE TYPE {} AS (a int, b text)").format(
            sql.Identifier(ex.type_schema, ex.composite)))
        for table in ex.tables:
            ident = sql.Identifier(ex.schema, table.name)
            parts = [sql.SQL("{} {}").format(sql.Identifier(name), col.ddl) for name, col in table.columns]
            if table.key is not None:
                parts.append(sql.SQL("PRIMARY KEY ({})").format(sql.SQL(", ").join(map(sql.Identifier, table.key))))
            statements.append(sql.SQL("CREATE TABLE {} ({})").format(ident, sql.SQL(", ").join(parts)))
            if table.key is None:
                # Without it pgoutput's publication refuses UPDATE/DELETE and wal2json skips them.
                statements.append(sql.SQL("ALTER TABLE {} REPLICA IDENTITY FULL").format(ident))
        self.execute(sql.SQL("; ").join(statements))
        for table in ex.tables:
            rows = self.execute(sql.SQL(
                "SELECT format_type(a.atttypid, NULL) FROM pg_attribute a WHERE a.attrelid = {}::regclass "
                "AND a.attnum > 0 AND NOT a.attisdropped ORDER BY a.attnum").format(
                sql.Literal(sql.Identifier(ex.schema, table.name).as_string(self.conn))))
            table.type_names = [name for (name,) in rows]

    def drop(self, ex: Example) -> None:
        for schema in {ex.schema, ex.type_schema}:
            self.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(schema)))

    def write(self, ex: Example, data: st.DataObject) -> list[Event]:
        """A random sequence of INSERT/UPDATE/DELETE, in one or more transactions."""
        live_rows: dict[str, list[tuple[str, dict[str, str | None]]]] = {t.name: [] for t in ex.tables}
        used_keys: set[int] = set()
        events: list[Event] = []
        self.execute("BEGIN")
        try:
            for _ in range(data.draw(st.integers(1, 10), label="statements")):
                table = data.draw(st.sampled_from(ex.tables), label="table")
                rows = live_rows[table.name]
                op = data.draw(st.sampled_from([Operation.INSERT, Operation.UPDATE, Operation.DELETE])
                               if rows else st.just(Operation.INSERT), label="op")
                ident = sql.Identifier(ex.schema, table.name)
                returning = sql.SQL(", ").join([sql.SQL("ctid::text"), *map(_output_text, table.names)])
                if op is Operation.INSERT:
                    values = {name: self._value(data, table, name, col, used_keys) for name, col in table.columns}
                    query = sql.SQL("INSERT INTO {} ({}) VALUES ({}) RETURNING {}").format(
                        ident, sql.SQL(", ").join(map(sql.Identifier, table.names)),
                        sql.SQL(", ").join(values.values()), returning)
                    old = None
                else:
                    index = data.draw(st.integers(0, len(rows) - 1), label="row")
                    ctid, old = rows.pop(index)
                    where = sql.SQL("ctid = {}::tid").format(sql.Literal(ctid))
                    if op is Operation.UPDATE:
                        changed = data.draw(st.lists(st.sampled_from(table.columns), min_size=1, max_size=3,
                                                     unique_by=lambda c: c[0]), label="columns")
                        assignments = [sql.SQL("{} = {}").format(
                            sql.Identifier(name), self._value(data, table, name, col, used_keys))
                            for name, col in changed]
                        query = sql.SQL("UPDATE {} SET {} WHERE {} RETURNING {}").format(
                            ident, sql.SQL(", ").join(assignments), where, returning)
                    else:
                        query = sql.SQL("DELETE FROM {} WHERE {} RETURNING {}").format(ident, where, returning)
                [(new_ctid, *texts)] = self.execute(query)
                row = dict(zip(table.names, texts, strict=True))
                if op is Operation.DELETE:
                    events.append(Event(table, op, old, None))
                else:
                    rows.append((new_ctid, row))
                    events.append(Event(table, op, old, row))
                if data.draw(st.integers(0, 3), label="commit") == 0:
                    self.execute("COMMIT")
                    self.execute("BEGIN")
            self.execute("COMMIT")
        except BaseException:
            self.execute("ROLLBACK")
            raise
        return events

    @staticmethod
    def _value(data: st.DataObject, table: Table, name: str, col: ColType, used_keys: set[int]) -> sql.Composable:
        if table.key is not None and name == table.key[0]:
            # Unique ints: a duplicate key would abort the transaction, not test a decoder.
            value = data.draw(st.integers(-(2**31), 2**31 - 2), label=name)
            while value in used_keys:  # made unique by construction: filtering small draws gives up
                value = value + 1 if value < 2**31 - 1 else -(2**31)
            used_keys.add(value)
            return sql.SQL("{}::int4").format(sql.Literal(str(value)))
        nullable = table.key is None or name not in table.key
        if nullable and data.draw(st.integers(0, 5), label=f"{name} null") == 0:
            return sql.SQL("NULL::{}").format(col.ddl)
        return sql.SQL("{}::{}").format(sql.Literal(data.draw(col.values, label=name)), col.ddl)

    def read(self, plugin: str) -> tuple[Callable[[], Iterator[Change]], int]:
        """(a function decoding the slot's rows into changes, the number of rows)."""
        decoder = decoder_for(plugin, **decoder_options(plugin, self.connect, publication=PUBLICATION))
        function = "pg_logical_slot_peek_binary_changes" if plugin == "pgoutput" else "pg_logical_slot_peek_changes"
        with self.conn.cursor() as cur:
            cur.execute(f"SELECT lsn::text, xid::text::bigint, data FROM {function}(%s, NULL, NULL, "
                        "VARIADIC %s::text[])", (SLOTS[plugin], list(decoder.slot_options)))
            rows = [(parse_lsn(lsn), xid, bytes(data) if plugin == "pgoutput" else data)
                    for lsn, xid, data in cur.fetchall()]

        def changes() -> Iterator[Change]:
            for txn in decoder.decode(rows):
                yield from txn.changes

        return changes, len(rows)


@pytest.fixture
def live(pg_server: PostgresServer, pg_database: str, pg_conn: psycopg2.extensions.connection) -> Live:
    return Live(pg_server, pg_database, pg_conn)


# -- the checks -------------------------------------------------------------------------


def _json_token_ok(type_name: str) -> bool:
    """Whether wal2json's verbatim type name is still one JSON string (see the module docstring)."""
    if not type_name.startswith('"'):
        return True  # escaped by wal2json
    try:
        return isinstance(json.loads(type_name), str)
    except ValueError:
        return False


def _plugin_view(plugin: str, type_name: str, text: str | None) -> str | None:
    """What ``plugin`` can give for a value whose output-function text is ``text``."""
    if plugin == "wal2json" and type_name in NUMBER_TYPES and text in SPECIAL_NUMBERS:
        return None  # wal2json 2.5 prints NaN/Infinity as null
    return text


def _expected_before(plugin: str, event: Event) -> dict[str, str | None] | None:
    table, old, new = event.table, event.old, event.new
    assert old is not None
    types = dict(zip(table.names, table.type_names, strict=True))
    if table.key is None:
        # REPLICA IDENTITY FULL: the old row, printed without its NULL columns.
        view = {name: _plugin_view(plugin, types[name], text) for name, text in old.items()}
        return {name: text for name, text in view.items() if text is not None}
    key = {name: old[name] for name in table.key}
    if event.op is Operation.DELETE:
        return key
    assert new is not None
    if any(old[name] != new[name] for name in table.key):
        return key  # the key changed: its old value is logged
    if plugin == "wal2json" and len(table.key) == len(table.columns):
        # Documented ambiguity: the identity of a table whose key is every column looks like
        # an old row (wal2json.py docstring): the key comes back as before.
        return key
    return None


def _fail(plugin: str, index: int, event: Event, what: str, want: Any, got: Any) -> None:
    pytest.fail(f"{plugin}: change {index} ({event.op.value} on {event.table.name!r}): {what} differs\n"
                f"  expected: {want!r}\n  got:      {got!r}")


def check_plugin(plugin: str, events: list[Event], changes: list[Change]) -> None:
    got_ops = [(c.table, c.op) for c in changes]
    want_ops = [(e.table.name, e.op) for e in events]
    if got_ops != want_ops:
        pytest.fail(f"{plugin}: changes differ\n  expected: {want_ops!r}\n  got:      {got_ops!r}")
    for index, (written, change) in enumerate(zip(events, changes, strict=True)):
        table = written.table
        if written.new is not None:
            after = change.after
            if after is None:
                _fail(plugin, index, written, "after", written.new, None)
                return
            if [c.name for c in after] != table.names:
                _fail(plugin, index, written, "column names", table.names, [c.name for c in after])
            if [c.type for c in after] != table.type_names:
                _fail(plugin, index, written, "column types", table.type_names, [c.type for c in after])
            if any(c.unchanged_toast for c in after):
                _fail(plugin, index, written, "unchanged TOAST flags", [],
                      [c.name for c in after if c.unchanged_toast])
            want = {name: _plugin_view(plugin, t, written.new[name])
                    for name, t in zip(table.names, table.type_names, strict=True)}
            got = {c.name: c.value for c in after}
            if got != want:
                diff = {n: (want[n], got.get(n)) for n in want if want[n] != got.get(n)}
                _fail(plugin, index, written, "values (expected, got)", want, diff)
        if written.old is not None:
            want_before = _expected_before(plugin, written)
            got_before = None if change.before is None else {c.name: c.value for c in change.before}
            if got_before != want_before:
                _fail(plugin, index, written, "before", want_before, got_before)
            if change.before is not None and [c.name for c in change.before] != [
                    n for n in table.names if n in (want_before or {})]:
                _fail(plugin, index, written, "before column order", want_before, got_before)


@_profile
@given(data=st.data())
def test_decoders_return_postgres_output_text(live: Live, data: st.DataObject) -> None:
    ex = data.draw(examples(), label="example")
    live.advance()
    try:
        live.create(ex)
        events = live.write(ex, data)
        changed = {e.table.name for e in events}
        quoted_types = any(not _json_token_ok(t) for table in ex.tables if table.name in changed
                           for t in table.type_names)
        # Shown by --hypothesis-show-statistics: what the examples covered.
        event(f"changes: {min(len(events), 10)}{'' if len(events) < 10 else '+'}")
        event(f"type names: {'with a quoted one' if quoted_types else 'plain'}")
        for kind in sorted({e.op.value + (" FULL" if e.table.key is None else "") for e in events}):
            event(f"op: {kind}")
        if any(_plugin_view("wal2json", t, (e.new or {}).get(n)) is None and (e.new or {}).get(n) is not None
               for e in events for n, t in zip(e.table.names, e.table.type_names, strict=True)):
            event("NaN/Infinity in a numeric or float column")
        for plugin in PLUGINS:
            changes, _ = live.read(plugin)
            check_plugin(plugin, events, [c for c in changes() if c.schema == ex.schema])
    finally:
        live.drop(ex)


def test_profiles_exist() -> None:
    assert _PROFILES["default"].max_examples >= 25 and _PROFILES["fuzz"].max_examples >= 1000
