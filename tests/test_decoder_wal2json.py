"""The wal2json decoder: unit tests on captured format-version 2 output, and on a live
server the same WAL decoded by test_decoding and wal2json gives equal Change objects up to
the differences wal2json cannot avoid (documented in the decoder's docstring).

``WJ_ROWS_RAW`` was captured together with the test_decoding and pgoutput rows of
``tests/test_decoder_pgoutput.py`` (same statements, same WAL), from wal2json 2.5.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator, Mapping
from typing import Any

import psycopg2.extensions
import pytest

from pg2kinesis_dagster.core.changes import Change, Column, Operation, SlotRow, Transaction, parse_lsn
from pg2kinesis_dagster.core.decoders import Decoder, TestDecodingDecoder, Wal2JsonDecoder, decoder_for
from pg2kinesis_dagster.core.decoders.wal2json import strip_typmod
from pg2kinesis_dagster.core.errors import DecodeError
from pg2kinesis_dagster.devstack.postgres import PostgresServer
from tests.test_decoder_pgoutput import (
    BIG,
    SLOTS,
    TD_ROWS,
    assert_same_changes,
    capture_three_plugins,
    changes_of,
    text_rows,
)

WJ_ROWS_RAW: list[tuple[str, int, str]] = [
    ('0/1930908', 726, '{"action":"B","xid":726,"timestamp":"2026-11-26 05:07:38.286272+00"}'),
    ('0/1930908', 726,
        '{"action":"I","xid":726,"timestamp":"2026-11-26 05:07:38.286272+00","schema":"public","table":"t","colum'
        'ns":[{"name":"id","type":"integer","typeoid":23,"value":2,"position":1},{"name":"n","type":"numeric(10,2'
        ')","typeoid":1700,"value":12.50,"position":2},{"name":"f","type":"double precision","typeoid":701,"value'
        '":null,"position":3},{"name":"b","type":"boolean","typeoid":16,"value":true,"position":4},{"name":"txt",'
        '"type":"text","typeoid":25,"value":"it\'s\\n\\"q\\" 😀","position":5},{"name":"by","type":"bytea","typeoi'
        'd":17,"value":"00ff","position":6},{"name":"arr","type":"text[]","typeoid":1009,"value":"{\\"a b\\",NULL'
        ',\\"q\\\\\\"x\\"}","position":7},{"name":"ts","type":"timestamp with time zone","typeoid":1184,"value":"'
        '2026-01-02 03:04:05.1+00","position":8},{"name":"bt","type":"bit(4)","typeoid":1560,"value":"1010","posi'
        'tion":9},{"name":"e","type":"mood","typeoid":16386,"value":"it\'s ok","position":10},{"name":"vc","type"'
        ':"character varying(5)","typeoid":1043,"value":"ab","position":11},{"name":"big","type":"text","typeoid"'
        ':25,"value":null,"position":12}]}'),
    ('0/1930A30', 726,
        '{"action":"U","xid":726,"timestamp":"2026-11-26 05:07:38.286272+00","schema":"public","table":"t","colum'
        'ns":[{"name":"id","type":"integer","typeoid":23,"value":1,"position":1},{"name":"n","type":"numeric(10,2'
        ')","typeoid":1700,"value":null,"position":2},{"name":"f","type":"double precision","typeoid":701,"value"'
        ':null,"position":3},{"name":"b","type":"boolean","typeoid":16,"value":null,"position":4},{"name":"txt","'
        'type":"text","typeoid":25,"value":"new","position":5},{"name":"by","type":"bytea","typeoid":17,"value":n'
        'ull,"position":6},{"name":"arr","type":"text[]","typeoid":1009,"value":null,"position":7},{"name":"ts","'
        'type":"timestamp with time zone","typeoid":1184,"value":null,"position":8},{"name":"bt","type":"bit(4)",'
        '"typeoid":1560,"value":null,"position":9},{"name":"e","type":"mood","typeoid":16386,"value":null,"positi'
        'on":10},{"name":"vc","type":"character varying(5)","typeoid":1043,"value":null,"position":11}],"identity'
        '":[{"name":"id","type":"integer","typeoid":23,"value":1}]}'),
    ('0/1930A98', 726,
        '{"action":"U","xid":726,"timestamp":"2026-11-26 05:07:38.286272+00","schema":"public","table":"t","colum'
        'ns":[{"name":"id","type":"integer","typeoid":23,"value":3,"position":1},{"name":"n","type":"numeric(10,2'
        ')","typeoid":1700,"value":12.50,"position":2},{"name":"f","type":"double precision","typeoid":701,"value'
        '":null,"position":3},{"name":"b","type":"boolean","typeoid":16,"value":true,"position":4},{"name":"txt",'
        '"type":"text","typeoid":25,"value":"it\'s\\n\\"q\\" 😀","position":5},{"name":"by","type":"bytea","typeoi'
        'd":17,"value":"00ff","position":6},{"name":"arr","type":"text[]","typeoid":1009,"value":"{\\"a b\\",NULL'
        ',\\"q\\\\\\"x\\"}","position":7},{"name":"ts","type":"timestamp with time zone","typeoid":1184,"value":"'
        '2026-01-02 03:04:05.1+00","position":8},{"name":"bt","type":"bit(4)","typeoid":1560,"value":"1010","posi'
        'tion":9},{"name":"e","type":"mood","typeoid":16386,"value":"it\'s ok","position":10},{"name":"vc","type"'
        ':"character varying(5)","typeoid":1043,"value":"ab","position":11},{"name":"big","type":"text","typeoid"'
        ':25,"value":null,"position":12}],"identity":[{"name":"id","type":"integer","typeoid":23,"value":2}]}'),
    ('0/1930BA8', 726,
        '{"action":"I","xid":726,"timestamp":"2026-11-26 05:07:38.286272+00","schema":"Mixed Case","table":"We\\"'
        'ird [col]","columns":[{"name":"K ey","type":"integer","typeoid":23,"value":1,"position":1},{"name":"x\\"'
        'y","type":"text","typeoid":25,"value":"v","position":2}]}'),
    ('0/1930CB8', 726, '{"action":"C","xid":726,"timestamp":"2026-11-26 05:07:38.286272+00"}'),
    ('0/1930CB8', 727, '{"action":"B","xid":727,"timestamp":"2026-11-26 05:07:38.289927+00"}'),
    ('0/1930CF0', 727,
        '{"action":"U","xid":727,"timestamp":"2026-11-26 05:07:38.289927+00","schema":"public","table":"full_t","'
        'columns":[{"name":"id","type":"integer","typeoid":23,"value":1,"position":1},{"name":"v","type":"text","'
        'typeoid":25,"value":"b","position":2}],"identity":[{"name":"id","type":"integer","typeoid":23,"value":1}'
        ',{"name":"v","type":"text","typeoid":25,"value":"a"},{"name":"big","type":"text","typeoid":25,"value":"{'
        'BIG}"}]}'),
    ('0/1931598', 727,
        '{"action":"D","xid":727,"timestamp":"2026-11-26 05:07:38.289927+00","schema":"public","table":"full_t","'
        'identity":[{"name":"id","type":"integer","typeoid":23,"value":1},{"name":"v","type":"text","typeoid":25,'
        '"value":"b"},{"name":"big","type":"text","typeoid":25,"value":"{BIG}"}]}'),
    ('0/1931EB8', 727, '{"action":"C","xid":727,"timestamp":"2026-11-26 05:07:38.289927+00"}'),
    ('0/1931EB8', 728, '{"action":"B","xid":728,"timestamp":"2026-11-26 05:07:38.291225+00"}'),
    ('0/1931EB8', 728,
        '{"action":"D","xid":728,"timestamp":"2026-11-26 05:07:38.291225+00","schema":"public","table":"t","ident'
        'ity":[{"name":"id","type":"integer","typeoid":23,"value":3}]}'),
    ('0/1931F38', 728,
        '{"action":"M","xid":728,"timestamp":"2026-11-26 05:07:38.291225+00","transactional":true,"prefix":"pfx",'
        '"content":"hi"}'),
    ('0/1933608', 728,
        '{"action":"T","xid":728,"timestamp":"2026-11-26 05:07:38.291225+00","schema":"Mixed Case","table":"We\\"'
        'ird [col]"}'),
    ('0/1933608', 728,
        '{"action":"T","xid":728,"timestamp":"2026-11-26 05:07:38.291225+00","schema":"public","table":"t"}'),
    ('0/19338D8', 728, '{"action":"C","xid":728,"timestamp":"2026-11-26 05:07:38.291225+00"}'),
]

WJ_ROWS = text_rows(WJ_ROWS_RAW)
_SPECIAL_NUMBERS = {"NaN", "Infinity", "-Infinity"}
_NUMBER_TYPES = {"numeric", "double precision", "real"}


def wal2json_view(changes: list[Change], *, toast_tables: set[str] | None = None) -> list[Change]:
    """test_decoding's changes as wal2json 2.5 can give them (see Wal2JsonDecoder's docstring).

    NaN/Infinity become NULL (and, NULL, leave old images), TRUNCATE has no flags, and the
    unchanged TOAST columns of ``toast_tables`` are left out (no catalog lookup).
    """

    def special(c: Column) -> Column:
        if c.type in _NUMBER_TYPES and c.value in _SPECIAL_NUMBERS:
            return dataclasses.replace(c, value=None)
        return c

    out = []
    for change in changes:
        after = change.after
        if after is not None:
            after = tuple(special(c) for c in after
                          if not (c.unchanged_toast and toast_tables and change.table in toast_tables))
        before = change.before
        if before is not None:
            before = tuple(c for c in map(special, before) if c.value is not None or c.unchanged_toast)
        out.append(dataclasses.replace(change, after=after, before=before, truncate_flags=()))
    return out


def wj_decode(rows: list[SlotRow], **kwargs: Any) -> list[Transaction]:
    return list(Wal2JsonDecoder(**kwargs).decode(rows))


# -- plumbing --------------------------------------------------------------------------


def test_decoder_for_wal2json_and_slot_options() -> None:
    decoder = decoder_for("wal2json")
    assert isinstance(decoder, Wal2JsonDecoder)
    assert isinstance(decoder, Decoder)
    assert decoder.plugin == "wal2json"
    options = dict(zip(decoder.slot_options[::2], decoder.slot_options[1::2], strict=True))
    assert options["format-version"] == "2"
    assert options["include-xids"] == options["include-timestamp"] == options["include-type-oids"] == "1"
    assert options["include-column-positions"] == "1"
    assert "numeric-data-types-as-string" not in options  # wal2json 2.5 rejects it
    assert Wal2JsonDecoder(numbers_as_strings=True).slot_options[-2:] == ("numeric-data-types-as-string", "1")


@pytest.mark.parametrize(
    ("text", "name"),
    [
        ("numeric(10,2)", "numeric"),
        ("character varying(10)[]", "character varying[]"),
        ("timestamp(3) with time zone", "timestamp with time zone"),
        ("geometry(Point,4326)", "geometry"),
        ('"we(ird)"', '"we(ird)"'),
        ('public."a(b)"(3)', 'public."a(b)"'),
        ("text", "text"),
    ],
)
def test_strip_typmod(text: str, name: str) -> None:
    assert strip_typmod(text) == name


# -- captured output -------------------------------------------------------------------


def test_captured_output_equals_test_decoding_up_to_documented_losses() -> None:
    expected = list(TestDecodingDecoder().decode(TD_ROWS))
    got = wj_decode(WJ_ROWS)
    # Without a catalog lookup, the unchanged TOAST column of public.t (not FULL) stays out.
    assert_same_changes(wal2json_view(changes_of(expected), toast_tables={"t"}), changes_of(got))
    assert [(t.xid, t.begin_lsn, t.commit_lsn, t.commit_time) for t in got] == [
        (t.xid, t.begin_lsn, t.commit_lsn, t.commit_time) for t in expected
    ]
    assert got[0].size == sum(len(data) for _, xid, data in WJ_ROWS if xid == 726)


def test_captured_output_with_catalog_lookup_restores_unchanged_toast() -> None:
    def columns(schema: str, table: str) -> Mapping[int, tuple[str, str]]:
        assert (schema, table) == ("public", "t")
        names = ["id", "n", "f", "b", "txt", "by", "arr", "ts", "bt", "e", "vc", "big"]
        types = ["integer", "numeric", "double precision", "boolean", "text", "bytea", "text[]",
                 "timestamp with time zone", "bit", "mood", "character varying", "text"]
        return dict(enumerate(zip(names, types, strict=True), start=1))

    expected = changes_of(TestDecodingDecoder().decode(TD_ROWS))
    got = changes_of(Wal2JsonDecoder(columns=columns).decode(WJ_ROWS))
    assert_same_changes(wal2json_view(expected), got)
    toast_update = got[1]
    assert toast_update.after is not None and toast_update.after[-1] == Column("big", "text", None, True)


def test_captured_values_and_types() -> None:
    first, second, third = wj_decode(WJ_ROWS)
    insert = first.changes[0]
    assert insert.after is not None
    values = {c.name: (c.type, c.value) for c in insert.after}
    assert values["n"] == ("numeric", "12.50")  # the exact text, not 12.5
    assert values["f"] == ("double precision", None)  # -Infinity: wal2json 2.5 prints null
    assert values["b"] == ("boolean", "t")
    assert values["by"] == ("bytea", "\\x00ff")
    assert values["txt"] == ("text", "it's\n\"q\" \U0001F600")
    assert values["arr"] == ("text[]", '{"a b",NULL,"q\\"x"}')
    assert values["bt"] == ("bit", "1010")
    assert values["e"] == ("mood", "it's ok")
    assert values["vc"] == ("character varying", "ab")
    toast_update, key_update = first.changes[1:3]
    assert toast_update.before is None  # identity copied from the new row: no old key
    assert key_update.before == (Column("id", "integer", "2"),)
    full_update, full_delete = second.changes
    assert full_update.before == (Column("id", "integer", "1"), Column("v", "text", "a"),
                                  Column("big", "text", "y" * BIG))
    # Restored from the FULL old row: wal2json left the unchanged TOAST column out.
    assert full_update.after == (Column("id", "integer", "1"), Column("v", "text", "b"),
                                 Column("big", "text", None, True))
    assert full_delete.before is not None and len(full_delete.before) == 3
    assert [(c.table, c.op, c.truncate_flags) for c in third.changes[1:]] == [
        ('We"ird [col]', Operation.TRUNCATE, ()), ("t", Operation.TRUNCATE, ())]


def test_injected_type_name_is_used_by_oid() -> None:
    calls: list[tuple[int, int]] = []

    def type_name(oid: int, typmod: int) -> str:
        calls.append((oid, typmod))
        return f"t{oid}"

    [first, *_] = wj_decode(WJ_ROWS, type_name=type_name)
    assert first.changes[0].after is not None
    assert first.changes[0].after[1] == Column("n", "t1700", "12.50")
    assert calls and all(typmod == -1 for _, typmod in calls)
    assert len(calls) == len(set(calls)), "type names are cached"


# -- synthetic documents: the rules one at a time --------------------------------------


def col_doc(name: str, value: Any, position: int, type_: str = "text", oid: int = 25) -> dict[str, Any]:
    return {"name": name, "type": type_, "typeoid": oid, "value": value, "position": position}


def txn_rows(*docs: dict[str, Any], xid: int = 800) -> list[SlotRow]:
    rows: list[SlotRow] = [(0x100, xid, json.dumps({"action": "B", "xid": xid, "timestamp": "T"}))]
    for i, doc in enumerate(docs):
        rows.append((0x101 + i, xid, json.dumps({"action": "U", "xid": xid, "schema": "s", "table": "t", **doc})))
    rows.append((0x200, xid, json.dumps({"action": "C", "xid": xid, "timestamp": "T"})))
    return rows


def one_change(doc: dict[str, Any], **kwargs: Any) -> Change:
    [txn] = wj_decode(txn_rows(doc), **kwargs)
    [change] = txn.changes
    return change


def identity(*cols: dict[str, Any]) -> list[dict[str, Any]]:
    return [{k: v for k, v in c.items() if k != "position"} for c in cols]


def test_update_identity_rules() -> None:
    new = [col_doc("id", 1, 1, "integer", 23), col_doc("v", "b", 2)]
    # Key unchanged: wal2json copies the key from the new row; test_decoding prints no old key.
    assert one_change({"columns": new, "identity": identity(new[0])}).before is None
    # Key changed: the old key.
    old_key = identity(col_doc("id", 7, 1, "integer", 23))
    assert one_change({"columns": new, "identity": old_key}).before == (Column("id", "integer", "7"),)
    # REPLICA IDENTITY FULL no-op update: the whole row, kept.
    assert one_change({"columns": new, "identity": identity(*new)}).before == (
        Column("id", "integer", "1"), Column("v", "text", "b"))
    # FULL old row: NULL columns dropped, as test_decoding prints old tuples.
    with_null = identity(col_doc("id", 1, 1, "integer", 23), col_doc("v", None, 2))
    assert one_change({"columns": new, "identity": with_null}).before == (Column("id", "integer", "1"),)
    # No identity at all (wal2json prints none for an UPDATE it cannot identify).
    assert one_change({"columns": new}).before is None


def test_values_are_postgres_text() -> None:
    change = one_change({"columns": [
        col_doc("t", True, 1, "boolean", 16), col_doc("f", False, 2, "boolean", 16),
        col_doc("by", "dead", 3, "bytea", 17), col_doc("n", None, 4),
    ]})
    assert change.after == (Column("t", "boolean", "t"), Column("f", "boolean", "f"),
                            Column("by", "bytea", "\\xdead"), Column("n", "text", None))
    # Numbers keep their exact text.
    rows = txn_rows({"columns": []})
    rows[1] = (0x101, 800, '{"action":"I","schema":"s","table":"t","columns":[{"name":"a","type":"numeric",'
                           '"typeoid":1700,"value":1.10,"position":1},{"name":"b","type":"double precision",'
                           '"typeoid":701,"value":-1.5e+300,"position":2},{"name":"c","type":"bigint",'
                           '"typeoid":20,"value":9223372036854775807,"position":3},{"name":"d","type":"numeric",'
                           '"typeoid":1700,"value":"NaN","position":4}]}')
    [txn] = wj_decode(rows)
    assert txn.changes[0].after == (Column("a", "numeric", "1.10"), Column("b", "double precision", "-1.5e+300"),
                                    Column("c", "bigint", "9223372036854775807"), Column("d", "numeric", "NaN"))


def test_catalog_lookup_is_reloaded_once_when_stale() -> None:
    class Lookup:
        def __init__(self) -> None:
            self.calls = 0
            self.invalidated = 0

        def __call__(self, schema: str, table: str) -> Mapping[int, tuple[str, str]]:
            self.calls += 1
            if self.invalidated:
                return {1: ("id", "integer"), 2: ("big", "text"), 3: ("v", "text")}
            return {1: ("id", "integer"), 2: ("big", "text"), 3: ("v before a rename", "text")}

        def invalidate(self, schema: str, table: str) -> None:
            self.invalidated += 1

    doc = {"columns": [col_doc("id", 1, 1, "integer", 23), col_doc("v", "x", 3)]}
    lookup = Lookup()
    change = one_change(doc, columns=lookup)
    assert change.after == (Column("id", "integer", "1"), Column("big", "text", None, True), Column("v", "text", "x"))
    assert (lookup.calls, lookup.invalidated) == (2, 1)

    def stale(schema: str, table: str) -> Mapping[int, tuple[str, str]]:
        return {1: ("other", "integer"), 2: ("big", "text")}

    # Names that do not match and no way to reload: leave the row as wal2json printed it.
    assert one_change(doc, columns=stale).after == (Column("id", "integer", "1"), Column("v", "text", "x"))


def test_decode_is_lazy_and_streams() -> None:
    def rows() -> Iterator[SlotRow]:
        yield from (row for row in WJ_ROWS if row[1] == 726)
        raise RuntimeError("the decoder read past the first transaction before yielding it")

    transactions = Wal2JsonDecoder().decode(rows())
    assert next(transactions).xid == 726
    with pytest.raises(RuntimeError):
        next(transactions)


def test_messages_outside_transactions_and_trailing_transaction() -> None:
    message = (5, 0, '{"action":"M","xid":null,"timestamp":null,"transactional":false,"prefix":"p","content":"x"}')
    got = wj_decode([message, *WJ_ROWS[:-1]])
    assert [t.xid for t in got] == [726, 727]


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        ([(5, 1, b"{}")], "must be text"),
        ([(5, 1, "{not json")], "invalid wal2json document"),
        ([(5, 1, '{"action":"B"}'), (6, 1, '{"action":"I"}')], "without the expected fields"),
        ([(5, 1, "[1]")], "without the expected fields"),
        ([(5, 1, '{"action":"X"}')], "unknown wal2json action 'X'"),
        ([(5, 1, '{"action":"I","schema":"s","table":"t","columns":[]}')], "outside a transaction"),
        ([(5, 1, '{"action":"T","schema":"s","table":"t"}')], "TRUNCATE outside a transaction"),
        ([(5, 1, '{"action":"B"}'), (6, 1, '{"action":"B"}')], "has no C"),
        ([(5, 1, '{"action":"C"}')], "C without a B"),
        ([(5, 1, '{"action":"B"}'), (6, 1, '{"action":"I","schema":"s","table":"t","columns":[{"name":"a",'
                                           '"type":"x","typeoid":1,"value":[1],"position":1}]}')],
         "unexpected JSON value"),
        # A type name beginning with a quote and holding "" is printed unescaped: invalid JSON.
        ([(5, 1, '{"action":"B"}'), (6, 1, '{"action":"I","schema":"s","table":"t","columns":[{"name":"a",'
                                           '"type":"We""ird","typeoid":16400,"value":"v","position":1}]}')],
         "invalid wal2json document"),
    ],
)
def test_malformed_input_raises_decode_error_with_lsn(rows: list[SlotRow], message: str) -> None:
    with pytest.raises(DecodeError, match=message) as info:
        wj_decode(rows)
    assert info.value.lsn is not None


# -- live server -----------------------------------------------------------------------


def test_wal2json_equals_test_decoding_on_a_live_server(
    pg_server: PostgresServer, pg_database: str, pg_conn: psycopg2.extensions.connection
) -> None:
    changes = capture_three_plugins(pg_server, pg_database, pg_conn)
    expected = changes["test_decoding"]
    assert len(expected) == 23
    # With the catalog adapters (as the pipeline should pass them): only NaN/Infinity and
    # TRUNCATE flags differ.
    assert_same_changes(wal2json_view(expected), changes["wal2json"])

    # Without them: built-in names by OID and the printed names without typmods give the
    # same types; the unchanged TOAST column of a non-FULL table stays out.
    decoder = Wal2JsonDecoder()
    with pg_conn.cursor() as cur:
        cur.execute("SELECT lsn::text, xid::text::bigint, data FROM pg_logical_slot_peek_changes("
                    "%s, NULL, NULL, VARIADIC %s::text[])", (SLOTS["wal2json"], list(decoder.slot_options)))
        rows = [(parse_lsn(lsn), xid, data) for lsn, xid, data in cur.fetchall()]
    assert_same_changes(wal2json_view(expected, toast_tables={"everything"}), changes_of(decoder.decode(rows)))


def test_wal2json_drops_update_and_delete_without_replica_identity(pg_conn: psycopg2.extensions.connection) -> None:
    with pg_conn.cursor() as cur:
        cur.execute("CREATE TABLE no_key (v text)")
        cur.execute("SELECT pg_create_logical_replication_slot('nk_td', 'test_decoding')")
        cur.execute("SELECT pg_create_logical_replication_slot('nk_wj', 'wal2json')")
        cur.execute("INSERT INTO no_key VALUES ('a'); UPDATE no_key SET v = 'b'; DELETE FROM no_key")
        got: dict[str, list[Change]] = {}
        for slot, decoder in (("nk_td", TestDecodingDecoder()), ("nk_wj", Wal2JsonDecoder())):
            cur.execute("SELECT lsn::text, xid::text::bigint, data FROM pg_logical_slot_peek_changes("
                        "%s, NULL, NULL, VARIADIC %s::text[])", (slot, list(decoder.slot_options)))
            got[slot] = changes_of(decoder.decode([(parse_lsn(lsn), xid, data) for lsn, xid, data in cur]))
    assert [c.op for c in got["nk_td"]] == [Operation.INSERT, Operation.UPDATE, Operation.DELETE]
    # wal2json only warns on the server: the UPDATE and DELETE are not in its output.
    assert [c.op for c in got["nk_wj"]] == [Operation.INSERT]
    assert got["nk_wj"][0] == got["nk_td"][0]
