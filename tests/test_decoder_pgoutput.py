"""The pgoutput decoder: unit tests on captured protocol messages, and on a live server
the same WAL decoded by test_decoding, wal2json and pgoutput gives equal Change objects.

The ``*_ROWS_RAW`` lists were captured once from PostgreSQL 15 (Debian 15.18) with the
decoders' ``slot_options``, by running ``CAPTURE_SETUP`` then ``CAPTURE_STATEMENTS``
after creating one slot per plugin (the toasted ``big`` values are 2100 repeated
letters, shortened to ``{BIG}`` placeholders here).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from datetime import timedelta, timezone
from typing import Any

import psycopg2.extensions
import pytest

from pg2kinesis_dagster.core.changes import Change, Column, Operation, SlotRow, Transaction, parse_lsn
from pg2kinesis_dagster.core.decoders import (
    Decoder,
    PgOutputDecoder,
    TestDecodingDecoder,
    Wal2JsonDecoder,
    decoder_for,
)
from pg2kinesis_dagster.core.decoders.pgoutput import BUILTIN_TYPE_NAMES, format_commit_time, quote_ident
from pg2kinesis_dagster.core.errors import ConfigError, DecodeError, SourceError
from pg2kinesis_dagster.devstack.postgres import PostgresServer
from pg2kinesis_dagster.postgres.types import TableColumns, TypeNames, decoder_options, ensure_publication

BIG = 2100
CAPTURE_SETUP = """
CREATE TYPE mood AS ENUM ('happy', 'it''s ok');
CREATE SCHEMA "Mixed Case";
CREATE TABLE t (id int PRIMARY KEY, n numeric(10,2), f float8, b bool, txt text, by bytea, arr text[],
                ts timestamptz, bt bit(4), e mood, vc varchar(5), big text);
ALTER TABLE t ALTER big SET STORAGE EXTERNAL;
CREATE TABLE "Mixed Case"."We""ird [col]" ("K ey" int PRIMARY KEY, "x""y" text);
CREATE TABLE full_t (id int, v text, big text);
ALTER TABLE full_t REPLICA IDENTITY FULL;
ALTER TABLE full_t ALTER big SET STORAGE EXTERNAL;
INSERT INTO t (id, big) VALUES (1, repeat('x', 2100));
INSERT INTO full_t VALUES (1, 'a', repeat('y', 2100));
CREATE PUBLICATION pg2kinesis FOR ALL TABLES;
"""
CAPTURE_STATEMENTS = [
    r"""BEGIN;
INSERT INTO t VALUES (2, 12.50, '-Infinity', true, E'it''s\n"q" \U0001F600', '\x00ff', '{"a b",NULL,"q\"x"}',
                      '2026-01-02 03:04:05.1+00', B'1010', 'it''s ok', 'ab', NULL);
UPDATE t SET txt = 'new' WHERE id = 1;
UPDATE t SET id = 3 WHERE id = 2;
INSERT INTO "Mixed Case"."We""ird [col]" VALUES (1, 'v');
COMMIT""",
    "BEGIN; UPDATE full_t SET v = 'b'; DELETE FROM full_t; COMMIT",
    """BEGIN; DELETE FROM t WHERE id = 3; SELECT pg_logical_emit_message(true, 'pfx', 'hi');
TRUNCATE "Mixed Case"."We""ird [col]", t RESTART IDENTITY; COMMIT""",
    "BEGIN; INSERT INTO t (id) VALUES (9); ROLLBACK",
]

TD_ROWS_RAW: list[tuple[str, int, str]] = [
    ('0/1930908', 726, 'BEGIN 726'),
    ('0/1930908', 726,
        'table public.t: INSERT: id[integer]:2 n[numeric]:12.50 f[double precision]:-Infinity b[boolean]:true txt'
        '[text]:\'it\'\'s\n"q" 😀\' by[bytea]:\'\\x00ff\' arr[text[]]:\'{"a b",NULL,"q\\"x"}\' ts[timestamp with t'
        "ime zone]:'2026-01-02 03:04:05.1+00' bt[bit]:B'1010' e[mood]:'it''s ok' vc[character varying]:'ab' big[t"
        'ext]:null'),
    ('0/1930A30', 726,
        'table public.t: UPDATE: id[integer]:1 n[numeric]:null f[double precision]:null b[boolean]:null txt[text]'
        ":'new' by[bytea]:null arr[text[]]:null ts[timestamp with time zone]:null bt[bit]:null e[mood]:null vc[ch"
        'aracter varying]:null big[text]:unchanged-toast-datum'),
    ('0/1930A98', 726,
        'table public.t: UPDATE: old-key: id[integer]:2 new-tuple: id[integer]:3 n[numeric]:12.50 f[double precis'
        'ion]:-Infinity b[boolean]:true txt[text]:\'it\'\'s\n"q" 😀\' by[bytea]:\'\\x00ff\' arr[text[]]:\'{"a b",N'
        'ULL,"q\\"x"}\' ts[timestamp with time zone]:\'2026-01-02 03:04:05.1+00\' bt[bit]:B\'1010\' e[mood]:\'it'
        "''s ok' vc[character varying]:'ab' big[text]:null"),
    ('0/1930BA8', 726, 'table "Mixed Case"."We""ird [col]": INSERT: "K ey"[integer]:1 "x""y"[text]:\'v\''),
    ('0/1930CB8', 726, 'COMMIT 726 (at 2026-11-26 05:07:38.286272+00)'),
    ('0/1930CB8', 727, 'BEGIN 727'),
    ('0/1930CF0', 727,
        "table public.full_t: UPDATE: old-key: id[integer]:1 v[text]:'a' big[text]:'{BIG}' new-tuple: id[integer]"
        ":1 v[text]:'b' big[text]:unchanged-toast-datum"),
    ('0/1931598', 727, "table public.full_t: DELETE: id[integer]:1 v[text]:'b' big[text]:'{BIG}'"),
    ('0/1931EB8', 727, 'COMMIT 727 (at 2026-11-26 05:07:38.289927+00)'),
    ('0/1931EB8', 728, 'BEGIN 728'),
    ('0/1931EB8', 728, 'table public.t: DELETE: id[integer]:3'),
    ('0/1931F38', 728, 'message: transactional: 1 prefix: pfx, sz: 2 content:hi'),
    ('0/1933608', 728, 'table "Mixed Case"."We""ird [col]", public.t: TRUNCATE: restart_seqs'),
    ('0/19338D8', 728, 'COMMIT 728 (at 2026-11-26 05:07:38.291225+00)'),
]

PO_ROWS_RAW: list[tuple[str, int, str]] = [
    ('0/1930908', 726, '420000000001930c8800030425b0e5d8c0000002d6'),
    ('0/1930908', 726, '59000040027075626c6963006d6f6f6400'),
    ('0/1930908', 726,
        '52000040087075626c696300740064000c0169640000000017ffffffff006e00000006a4000a0006006600000002bdffffffff00'
        '620000000010ffffffff007478740000000019ffffffff0062790000000011ffffffff0061727200000003f1ffffffff00747300'
        '000004a0ffffffff00627400000006180000000400650000004002ffffffff007663000000041300000009006269670000000019'
        'ffffffff'),
    ('0/1930908', 726,
        '49000040084e000c740000000132740000000531322e353074000000092d496e66696e697479740000000174740000000d697427'
        '730a22712220f09f988074000000065c783030666674000000137b22612062222c4e554c4c2c22715c2278227d74000000183230'
        '32362d30312d30322030333a30343a30352e312b3030740000000431303130740000000769742773206f6b740000000261626e'),
    ('0/1930A30', 726, '55000040084e000c7400000001316e6e6e74000000036e65776e6e6e6e6e6e75'),
    ('0/1930A98', 726,
        '55000040084b000c7400000001326e6e6e6e6e6e6e6e6e6e6e4e000c740000000133740000000531322e353074000000092d496e'
        '66696e697479740000000174740000000d697427730a22712220f09f988074000000065c783030666674000000137b2261206222'
        '2c4e554c4c2c22715c2278227d7400000018323032362d30312d30322030333a30343a30352e312b303074000000043130313074'
        '0000000769742773206f6b740000000261626e'),
    ('0/1930BA8', 726,
        '520000400f4d69786564204361736500576522697264205b636f6c5d00640002014b2065790000000017ffffffff007822790000'
        '000019ffffffff'),
    ('0/1930BA8', 726, '490000400f4e0002740000000131740000000176'),
    ('0/1930CB8', 726, '43000000000001930c880000000001930cb800030425b0e5d8c0'),
    ('0/1930CF0', 727, '420000000001931e8800030425b0e5e707000002d7'),
    ('0/1930CF0', 727,
        '52000040167075626c69630066756c6c5f74006600030169640000000017ffffffff01760000000019ffffffff01626967000000'
        '0019ffffffff'),
    ('0/1930CF0', 727, '55000040164f00037400000001317400000001617400000834{BIGHEX}4e000374000000013174000000016275'),
    ('0/1931598', 727, '44000040164f00037400000001317400000001627400000834{BIGHEX}'),
    ('0/1931EB8', 727, '43000000000001931e880000000001931eb800030425b0e5e707'),
    ('0/1931EB8', 728, '42000000000193363800030425b0e5ec19000002d8'),
    ('0/1931EB8', 728, '44000040084b000c7400000001336e6e6e6e6e6e6e6e6e6e6e'),
    ('0/1933608', 728,
        '520000400f4d69786564204361736500576522697264205b636f6c5d00640002014b2065790000000017ffffffff007822790000'
        '000019ffffffff'),
    ('0/1933608', 728, '59000040027075626c6963006d6f6f6400'),
    ('0/1933608', 728,
        '52000040087075626c696300740064000c0169640000000017ffffffff006e00000006a4000a0006006600000002bdffffffff00'
        '620000000010ffffffff007478740000000019ffffffff0062790000000011ffffffff0061727200000003f1ffffffff00747300'
        '000004a0ffffffff00627400000006180000000400650000004002ffffffff007663000000041300000009006269670000000019'
        'ffffffff'),
    ('0/1933608', 728, '5400000002020000400f00004008'),
    ('0/19338D8', 728, '4300000000000193363800000000019338d800030425b0e5ec19'),
]


def text_rows(raw: list[tuple[str, int, str]]) -> list[SlotRow]:
    """Captured text rows with the placeholders expanded."""
    return [(parse_lsn(lsn), xid, data.replace("{BIG}", "y" * BIG).replace("{BIG_X}", "x" * BIG))
            for lsn, xid, data in raw]


def binary_rows(raw: list[tuple[str, int, str]]) -> list[SlotRow]:
    """Captured pgoutput rows (hex) with the placeholders expanded."""
    return [(parse_lsn(lsn), xid, bytes.fromhex(data.replace("{BIGHEX}", "79" * BIG)))
            for lsn, xid, data in raw]


def changes_of(transactions: Iterator[Transaction] | list[Transaction]) -> list[Change]:
    return [change for txn in transactions for change in txn.changes]


TD_ROWS = text_rows(TD_ROWS_RAW)
PO_ROWS = binary_rows(PO_ROWS_RAW)


def po_decode(rows: list[SlotRow], **kwargs: Any) -> list[Transaction]:
    return list(PgOutputDecoder(**kwargs).decode(rows))


# -- plumbing --------------------------------------------------------------------------


def test_decoder_for_pgoutput_and_slot_options() -> None:
    decoder = decoder_for("pgoutput")
    assert isinstance(decoder, PgOutputDecoder)
    assert isinstance(decoder, Decoder)
    assert decoder.plugin == "pgoutput"
    assert decoder.slot_options == ("proto_version", "1", "messages", "true", "publication_names", "pg2kinesis")
    named = decoder_for("pgoutput", publication="My Pub, 2")
    assert named.slot_options[-1] == '"My Pub, 2"'  # SplitIdentifierString would split/lower-case it
    assert PgOutputDecoder('we"ird').slot_options[-1] == '"we""ird"'
    with pytest.raises(ConfigError, match="publication name"):
        PgOutputDecoder("")


def test_quote_ident() -> None:
    assert quote_ident("abc_1$") == "abc_1$"
    assert quote_ident("Mixed Case") == '"Mixed Case"'
    assert quote_ident('We"ird') == '"We""ird"'
    assert quote_ident("1abc") == '"1abc"'


@pytest.mark.parametrize(
    ("micros", "tz", "text"),
    [
        (0, timezone.utc, "2000-01-01 00:00:00+00"),
        (1, timezone.utc, "2000-01-01 00:00:00.000001+00"),
        (-1, timezone.utc, "1999-12-31 23:59:59.999999+00"),
        (0x0003_0425_B0E5_D8C0, timezone.utc, "2026-11-26 05:07:38.286272+00"),  # captured: COMMIT 726
        (500_000, timezone(timedelta(hours=5, minutes=30)), "2000-01-01 05:30:00.5+05:30"),
        (0, timezone(-timedelta(hours=8)), "1999-12-31 16:00:00-08"),
        (0, timezone(timedelta(hours=1, seconds=7)), "2000-01-01 01:00:07+01:00:07"),
    ],
)
def test_format_commit_time_like_timestamptz_to_str(micros: int, tz: timezone, text: str) -> None:
    assert format_commit_time(micros, tz) == text


def test_builtin_type_names() -> None:
    assert BUILTIN_TYPE_NAMES[1042] == "character"
    assert BUILTIN_TYPE_NAMES[1014] == "character[]"
    assert BUILTIN_TYPE_NAMES[1560] == "bit"
    assert BUILTIN_TYPE_NAMES[1231] == "numeric[]"
    assert BUILTIN_TYPE_NAMES[18] == '"char"'


# -- captured output: equal to test_decoding's -----------------------------------------


def test_captured_output_equals_test_decoding() -> None:
    expected = list(TestDecodingDecoder().decode(TD_ROWS))
    got = po_decode(PO_ROWS)
    assert changes_of(got) == changes_of(expected)
    assert [(t.xid, t.commit_lsn, t.commit_time) for t in got] == [
        (t.xid, t.commit_lsn, t.commit_time) for t in expected
    ]
    # pgoutput (PostgreSQL 15) sends Begin with the first change, so its row LSN may be later.
    assert all(g.begin_lsn >= e.begin_lsn for g, e in zip(got, expected, strict=True))
    assert got[0].size == sum(len(data) for lsn, xid, data in PO_ROWS if xid == 726)


def test_captured_output_details() -> None:
    first, second, third = po_decode(PO_ROWS)
    insert, toast_update, key_update, mixed = first.changes
    assert insert.after is not None and insert.before is None
    values = {c.name: (c.type, c.value) for c in insert.after}
    assert values["n"] == ("numeric", "12.50")
    assert values["f"] == ("double precision", "-Infinity")
    assert values["b"] == ("boolean", "t")
    assert values["txt"] == ("text", "it's\n\"q\" \U0001F600")
    assert values["by"] == ("bytea", "\\x00ff")
    assert values["arr"] == ("text[]", '{"a b",NULL,"q\\"x"}')
    assert values["bt"] == ("bit", "1010")
    assert values["e"] == ("mood", "it's ok")  # from the Type message: a user type
    assert values["vc"] == ("character varying", "ab")
    assert values["big"] == ("text", None)
    assert toast_update.after is not None and toast_update.after[-1] == Column("big", "text", None, True)
    assert toast_update.before is None  # the key did not change
    # K tuple: every column, NULL for non-key ones; test_decoding prints only the key.
    assert key_update.before == (Column("id", "integer", "2"),)
    assert (mixed.schema, mixed.table) == ("Mixed Case", 'We"ird [col]')
    assert mixed.after == (Column("K ey", "integer", "1"), Column('x"y', "text", "v"))
    full_update, full_delete = second.changes
    assert full_update.before == (Column("id", "integer", "1"), Column("v", "text", "a"),
                                  Column("big", "text", "y" * BIG))
    assert full_update.after == (Column("id", "integer", "1"), Column("v", "text", "b"),
                                 Column("big", "text", None, True))
    assert full_delete.op is Operation.DELETE and full_delete.after is None
    delete, truncate_mixed, truncate_t = third.changes
    assert delete.before == (Column("id", "integer", "3"),)
    assert [(c.table, c.op, c.truncate_flags, c.index) for c in (truncate_mixed, truncate_t)] == [
        ('We"ird [col]', Operation.TRUNCATE, ("restart_seqs",), 1),
        ("t", Operation.TRUNCATE, ("restart_seqs",), 2),
    ]
    assert truncate_mixed.lsn == truncate_t.lsn
    assert third.commit_time == "2026-11-26 05:07:38.291225+00"


def test_injected_type_name_is_called_without_typmod_unless_asked() -> None:
    calls: list[tuple[int, int]] = []

    def type_name(oid: int, typmod: int) -> str:
        calls.append((oid, typmod))
        return f"type{oid}" if typmod < 0 else f"type{oid}({typmod})"

    [first, *_] = po_decode(PO_ROWS, type_name=type_name)
    assert first.changes[0].after is not None
    assert first.changes[0].after[1] == Column("n", "type1700", "12.50")
    assert all(typmod == -1 for _, typmod in calls)
    assert len(calls) == len(set(calls)), "type names are cached"
    calls.clear()
    [first, *_] = po_decode(PO_ROWS, type_name=type_name, typmods=True)
    assert first.changes[0].after is not None
    assert first.changes[0].after[1].type == f"type1700({(10 << 16 | 2) + 4})"


def test_relations_are_remembered_across_decode_calls() -> None:
    decoder = PgOutputDecoder()
    head = [row for row in PO_ROWS if row[1] == 726]
    assert [t.xid for t in decoder.decode(head)] == [726]
    # Only the transaction's own rows, without the Relation messages of the first call.
    later = [row for row in PO_ROWS if row[1] == 728 and not row[2].startswith((b"R", b"Y"))]
    [txn] = decoder.decode(later)
    assert [c.op for c in txn.changes] == [Operation.DELETE, Operation.TRUNCATE, Operation.TRUNCATE]
    with pytest.raises(DecodeError, match="without a Relation message"):
        list(PgOutputDecoder().decode(later))


def test_decode_is_lazy_and_streams() -> None:
    def rows() -> Iterator[SlotRow]:
        yield from (row for row in PO_ROWS if row[1] == 726)
        raise RuntimeError("the decoder read past the first transaction before yielding it")

    transactions = PgOutputDecoder().decode(rows())
    assert next(transactions).xid == 726
    with pytest.raises(RuntimeError):
        next(transactions)


def test_trailing_transaction_without_commit_is_not_yielded() -> None:
    assert [t.xid for t in po_decode(PO_ROWS[:-1])] == [726, 727]


# -- errors ----------------------------------------------------------------------------

BEGIN = PO_ROWS[0]
COMMIT = next(row for row in PO_ROWS if row[2][:1] == b"C")


def _replace(row: SlotRow, data: bytes) -> SlotRow:
    return (row[0], row[1], data)


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        ([(5, 1, "BEGIN 1")], "must be bytes"),
        ([_replace(BEGIN, b"")], "empty pgoutput message"),
        ([_replace(BEGIN, b"B\x00\x01")], "malformed pgoutput 'B' message"),
        ([BEGIN, BEGIN], "Begin while the previous transaction has no Commit"),
        ([COMMIT], "Commit without a Begin"),
        ([PO_ROWS[3]], "outside a transaction"),
        ([BEGIN, _replace(BEGIN, b"S\x00")], "unknown pgoutput message type 'S'"),
        ([BEGIN, PO_ROWS[3]], "without a Relation message"),
        ([*PO_ROWS[:3], _replace(PO_ROWS[3], PO_ROWS[3][2][:-3])], "runs past the end"),
        ([*PO_ROWS[:3], _replace(PO_ROWS[3], PO_ROWS[3][2] + b"x")], "bytes after the tuple data"),
        ([*PO_ROWS[:3], _replace(PO_ROWS[3], PO_ROWS[3][2][:5] + b"K" + PO_ROWS[3][2][6:])], "Insert without"),
        ([*PO_ROWS[:3], _replace(PO_ROWS[3], PO_ROWS[3][2][:8] + b"z" + PO_ROWS[3][2][9:])], "column kind 'z'"),
        ([*PO_ROWS[:3], _replace(PO_ROWS[3], PO_ROWS[3][2][:8] + b"b" + PO_ROWS[3][2][9:])], "binary column"),
        ([BEGIN, _replace(BEGIN, b"R\x00\x00\x00\x01s\x00t\x00d\x00\x01\x00c\x00\x00\x01\x00\x00\xff\xff\xff\xff")],
         "type OID 65536 is unknown"),
    ],
)
def test_malformed_input_raises_decode_error_with_lsn(rows: list[SlotRow], message: str) -> None:
    with pytest.raises(DecodeError, match=message) as info:
        po_decode(rows)
    assert info.value.lsn is not None


# -- live server: the three plugins agree ----------------------------------------------

# Many column types, a TOASTed value left unchanged, REPLICA IDENTITY FULL, a composite
# key and hostile identifiers. Every table has a replica identity: pgoutput refuses
# UPDATE/DELETE on a published table without one, and wal2json skips them.
RICH_SCHEMA = r"""
CREATE TYPE mood AS ENUM ('happy', 'sad', 'it''s ok');
CREATE TYPE pair AS (a int, b text);
CREATE DOMAIN posint AS integer CHECK (VALUE > 0);
CREATE SCHEMA "Mixed Case";
CREATE TABLE everything (
    id int PRIMARY KEY, i2 smallint, i8 bigint, n numeric(10,2), nn numeric, f8 float8, f4 real, b bool,
    txt text, vc varchar(10), ch char(3), bp bpchar, by bytea, u uuid, j json, jb jsonb, arr int[],
    tarr text[], varr varchar(4)[], d date, ts timestamp(3), tstz timestamptz, tm time, tmtz timetz,
    iv interval, ivym interval year to month, ip inet, cidr_ cidr, mac macaddr, m money, e mood,
    earr mood[], bt bit(4), vb varbit, c pair, rg int4range, tsr tstzrange, dom posint, oid_ oid,
    xml_ xml, pt point, big text
);
ALTER TABLE everything ALTER big SET STORAGE EXTERNAL;
CREATE TABLE full_row (id int, v text, w text, big text);
ALTER TABLE full_row REPLICA IDENTITY FULL;
ALTER TABLE full_row ALTER big SET STORAGE EXTERNAL;
CREATE TABLE order_lines (order_id bigint, line_no int, qty int, note text, PRIMARY KEY (order_id, line_no));
CREATE TABLE "Mixed Case"."We""ird [col]" ("K ey" int PRIMARY KEY, "x""y" text, "Val" numeric);
"""

RICH_STATEMENTS = [
    r"""INSERT INTO everything VALUES (
        1, -32768, 9223372036854775807, 12.50, 'NaN', 'Infinity', '-Infinity', true,
        E'it''s a "quote"\nnew line\ttab \\ backslash \U0001F600 é', 'vc', 'ab', 'bp', '\x00ff10',
        'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11', '{"a": 1.50, "b": [null]}', '{"b": [1, 2.0], "a": "x"}',
        '{1,NULL,3}', '{"x y","q\"uote",NULL,"NULL","",\\\\}', '{ab,NULL}', '2026-01-02',
        '2026-01-02 03:04:05.123', '2026-01-02 03:04:05.1+02', '12:34:56.789', '12:34:56+05:30',
        '1 day 02:03:04.5', '1 year 2 mons', '10.0.0.1/8', '10.0.0.0/8', '08:00:2b:01:02:03', 12.34,
        'it''s ok', '{happy,NULL,"it''s ok"}', B'1010', B'101', ROW(1, 'x,"y"'), '[1,5)',
        '[2026-01-01 00:00+00,)', 7, 42, '<a>x &amp; y</a>', '(1.5,-2)', repeat('x', 3000))""",
    "INSERT INTO everything (id, f8, f4, nn) VALUES (2, 1.5e300, 0.1, -1.000), (3, -0, 'NaN', 'Infinity')",
    # The TOASTed "big" is not touched: unchanged-toast-datum.
    "UPDATE everything SET txt = 'changed', b = false WHERE id = 1",
    # A key change: the old key is logged.
    "UPDATE everything SET id = 10 WHERE id = 1",
    "DELETE FROM everything WHERE id = 2",
    """BEGIN;
       INSERT INTO full_row VALUES (1, 'a', NULL, repeat('y', 3000)), (2, NULL, 'w', 'small');
       UPDATE full_row SET v = 'b' WHERE id = 1;
       UPDATE full_row SET v = v WHERE id = 2;
       DELETE FROM full_row WHERE id = 1;
       COMMIT""",
    """BEGIN;
       INSERT INTO order_lines VALUES (1, 1, 5, 'x'), (1, 2, 1, NULL), (2, 1, 3, 'y');
       SAVEPOINT s; UPDATE order_lines SET qty = 99; ROLLBACK TO SAVEPOINT s;
       UPDATE order_lines SET line_no = 3 WHERE order_id = 1 AND line_no = 2;
       UPDATE order_lines SET note = 'n' WHERE order_id = 2;
       SELECT pg_logical_emit_message(true, 'pfx', 'ignored');
       DELETE FROM order_lines WHERE order_id = 2;
       COMMIT""",
    "BEGIN; INSERT INTO order_lines VALUES (9, 9, 9, 'rolled back'); ROLLBACK",
    """INSERT INTO "Mixed Case"."We""ird [col]" VALUES (1, 'v', 1.10), (2, E'new\nline', NULL)""",
    """UPDATE "Mixed Case"."We""ird [col]" SET "K ey" = 3, "Val" = 'NaN' WHERE "K ey" = 2""",
    """TRUNCATE "Mixed Case"."We""ird [col]", order_lines RESTART IDENTITY CASCADE""",
    "TRUNCATE full_row",
]

SLOTS = {"test_decoding": "p_td", "wal2json": "p_wj", "pgoutput": "p_po"}


def capture_three_plugins(
    server: PostgresServer, database: str, conn: psycopg2.extensions.connection,
    schema: str = RICH_SCHEMA, statements: list[str] = RICH_STATEMENTS,
) -> dict[str, list[Change]]:
    """Create the schema, a publication and three slots, run the statements, decode each slot."""
    with conn.cursor() as cur:
        cur.execute(schema)
        # Before the slots: pgoutput looks the publication up in the historic catalog.
        ensure_publication(conn, "pg2kinesis", "ALL")
        for plugin, slot in SLOTS.items():
            cur.execute("SELECT pg_create_logical_replication_slot(%s, %s)", (slot, plugin))
        for statement in statements:
            cur.execute(statement)

    def connect() -> psycopg2.extensions.connection:
        return server.connect(database)

    out: dict[str, list[Change]] = {}
    with conn.cursor() as cur:
        for plugin, slot in SLOTS.items():
            decoder = decoder_for(plugin, **decoder_options(plugin, connect))
            function = "pg_logical_slot_peek_binary_changes" if plugin == "pgoutput" else "pg_logical_slot_peek_changes"
            cur.execute(f"SELECT lsn::text, xid::text::bigint, data FROM {function}(%s, NULL, NULL, "
                        "VARIADIC %s::text[])", (slot, list(decoder.slot_options)))
            rows = [(parse_lsn(lsn), xid, bytes(data) if plugin == "pgoutput" else data)
                    for lsn, xid, data in cur.fetchall()]
            out[plugin] = changes_of(decoder.decode(rows))
    return out


def assert_same_changes(expected: list[Change], got: list[Change]) -> None:
    """Equal lists, with a readable first difference."""
    for want, have in zip(expected, got, strict=False):
        if want != have:
            fields = [f.name for f in dataclasses.fields(Change) if getattr(want, f.name) != getattr(have, f.name)]
            details = {name: (getattr(want, name), getattr(have, name)) for name in fields}
            for name in ("after", "before"):
                if name in details and details[name][0] and details[name][1]:
                    # Only the differing columns, not 3000-character values.
                    details[name] = [(a, b) for a, b in zip(details[name][0], details[name][1], strict=False)
                                     if a != b] or details[name]
            shown = repr(details)[:3000]
            pytest.fail(f"change {want.id} ({want.qualified_table} {want.op.value}) differs in {fields}: {shown}")
    assert len(expected) == len(got)


def test_pgoutput_equals_test_decoding_on_a_live_server(
    pg_server: PostgresServer, pg_database: str, pg_conn: psycopg2.extensions.connection
) -> None:
    changes = capture_three_plugins(pg_server, pg_database, pg_conn)
    expected = changes["test_decoding"]
    assert len(expected) == 23
    assert_same_changes(expected, changes["pgoutput"])
    # The interesting cases really happened.
    toast = [c for c in expected if c.after and any(col.unchanged_toast for col in c.after)]
    assert {c.table for c in toast} == {"everything", "full_row"}
    assert any(c.table == "full_row" and c.op is Operation.UPDATE and c.before for c in expected)
    assert {c.truncate_flags for c in expected if c.op is Operation.TRUNCATE} == {("restart_seqs", "cascade"), ()}


def test_pgoutput_without_type_name_uses_builtin_and_type_messages(
    pg_server: PostgresServer, pg_database: str, pg_conn: psycopg2.extensions.connection
) -> None:
    changes = capture_three_plugins(pg_server, pg_database, pg_conn)
    # Same rows, decoded again without the catalog: the built-in table and Type messages.
    with pg_conn.cursor() as cur:
        decoder = PgOutputDecoder()
        cur.execute("SELECT lsn::text, xid::text::bigint, data FROM pg_logical_slot_peek_binary_changes("
                    "%s, NULL, NULL, VARIADIC %s::text[])", (SLOTS["pgoutput"], list(decoder.slot_options)))
        rows = [(parse_lsn(lsn), xid, bytes(data)) for lsn, xid, data in cur.fetchall()]
    got = changes_of(decoder.decode(rows))

    # Documented limits of the Type messages: an array of a user type is named after the
    # array type (_mood), a domain after its base type's internal name (int4).
    fixes = {("earr", "_mood"): "mood[]", ("dom", "int4"): "posint"}

    def fix(columns: tuple[Column, ...] | None) -> tuple[Column, ...] | None:
        if columns is None:
            return None
        return tuple(dataclasses.replace(c, type=fixes.get((c.name, c.type), c.type)) for c in columns)

    assert any(c.after and any((col.name, col.type) in fixes for col in c.after) for c in got)
    normalised = [dataclasses.replace(c, after=fix(c.after), before=fix(c.before)) for c in got]
    assert_same_changes(changes["test_decoding"], normalised)


# -- catalog adapters --------------------------------------------------------------------


def test_type_names_match_format_type_be(
    pg_server: PostgresServer, pg_database: str, pg_conn: psycopg2.extensions.connection
) -> None:
    queries: list[str] = []

    def connect() -> psycopg2.extensions.connection:
        queries.append("connect")
        return pg_server.connect(pg_database)

    names = TypeNames(connect)
    assert names(1042, -1) == "character"  # format_type(oid, -1) would say bpchar
    assert names(1560) == "bit"  # ... and "bit" quoted
    assert names(1014) == "character[]"
    assert names(1700, (10 << 16 | 2) + 4) == "numeric(10,2)"
    assert len(queries) == 2  # one load of every type, one typmod lookup
    assert names(1042, -1) == "character" and len(queries) == 2
    with pg_conn.cursor() as cur:
        cur.execute("""CREATE SCHEMA "Other S"; CREATE TYPE "Other S"."My Type" AS ENUM ('a');
                       SELECT '"Other S"."My Type"'::regtype::oid::int""")
        (oid,) = cur.fetchone()
    assert names(oid) == '"Other S"."My Type"'  # created after the load: looked up alone
    assert names(1231) == BUILTIN_TYPE_NAMES[1231]
    with pytest.raises(SourceError, match="does not exist"):
        names(4_000_000_000)


def test_table_columns_lists_live_columns(
    pg_server: PostgresServer, pg_database: str, pg_conn: psycopg2.extensions.connection
) -> None:
    with pg_conn.cursor() as cur:
        cur.execute('CREATE TABLE "A b" (x int, gone text, "Y" varchar(3)); ALTER TABLE "A b" DROP COLUMN gone')
    columns = TableColumns(lambda: pg_server.connect(pg_database))
    assert dict(columns("public", "A b")) == {1: ("x", "integer"), 3: ("Y", "character varying")}
    assert dict(columns("public", "missing")) == {}
    with pg_conn.cursor() as cur:
        cur.execute('ALTER TABLE "A b" ADD COLUMN z bool')
    assert 4 not in columns("public", "A b")  # cached
    columns.invalidate("public", "A b")
    assert columns("public", "A b")[4] == ("z", "boolean")
    columns.invalidate()


def test_ensure_publication(pg_conn: psycopg2.extensions.connection) -> None:
    with pg_conn.cursor() as cur:
        cur.execute('CREATE SCHEMA "S x"; CREATE TABLE "S x"."T ""1""" (a int PRIMARY KEY);'
                    "CREATE TABLE plain (a int PRIMARY KEY); CREATE TABLE other (a int PRIMARY KEY)")

    def tables(name: str) -> set[tuple[str, str]]:
        with pg_conn.cursor() as cur:
            cur.execute("SELECT schemaname::text, tablename::text FROM pg_publication_tables WHERE pubname = %s",
                        (name,))
            return set(cur.fetchall())

    assert ensure_publication(pg_conn, "Some Pub", [("S x", 'T "1"'), "plain"]) is True
    assert tables("Some Pub") == {("S x", 'T "1"'), ("public", "plain")}
    assert ensure_publication(pg_conn, "Some Pub", ["public.plain"]) is False
    assert ensure_publication(pg_conn, "Some Pub", ["other", "plain"]) is True
    assert ("public", "other") in tables("Some Pub")
    with pytest.raises(SourceError, match="not FOR ALL TABLES"):
        ensure_publication(pg_conn, "Some Pub", "ALL")
    assert ensure_publication(pg_conn, "all_pub", "ALL") is True
    assert ensure_publication(pg_conn, "all_pub", "ALL") is False
    assert ensure_publication(pg_conn, "all_pub", ["plain"]) is False
    with pytest.raises(ConfigError):
        ensure_publication(pg_conn, "x", [])
    # A published table without replica identity could no longer be updated: refused up front.
    with pg_conn.cursor() as cur:
        cur.execute("CREATE TABLE no_key (a int); CREATE TABLE keyed (a int PRIMARY KEY)")
    with pytest.raises(SourceError, match=r"no replica identity \(public.no_key\)"):
        ensure_publication(pg_conn, "p2", ["keyed", "no_key"])
    with pytest.raises(SourceError, match="no_key"):
        ensure_publication(pg_conn, "p3", "ALL")
    assert ensure_publication(pg_conn, "p2", ["keyed"]) is True
    assert ensure_publication(pg_conn, "p4", ["no_key"], check_identity=False) is True
    with pg_conn.cursor() as cur:
        cur.execute("ALTER TABLE no_key REPLICA IDENTITY FULL")
    assert ensure_publication(pg_conn, "p3", "ALL") is True
    with pytest.raises(ConfigError):
        ensure_publication(pg_conn, "x", "SOME")  # type: ignore[arg-type]


def test_decoder_options() -> None:
    def connect() -> Any:
        raise AssertionError("no connection before the first lookup")

    assert decoder_options("test_decoding", connect) == {}
    pg = decoder_options("pgoutput", connect, publication="p")
    assert pg["publication"] == "p" and isinstance(pg["type_name"], TypeNames)
    wj = decoder_options("wal2json", connect)
    assert isinstance(wj["type_name"], TypeNames) and isinstance(wj["columns"], TableColumns)
    assert isinstance(decoder_for("wal2json", **wj), Wal2JsonDecoder)

