"""Typed JSON values (core/typed.py, JSONFormatter(typed=True)).

Pure, table-driven tests for every mapped type; Hypothesis round trips of PostgreSQL array
literals; and a live check: rows of every type written to the throwaway PostgreSQL,
decoded from a test_decoding slot, formatted typed, compared with ``to_jsonb(row)``.
"""

from __future__ import annotations

import base64
import json
import math
import os
from decimal import Decimal
from typing import Any

import psycopg2.extensions
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pg2kinesis_dagster.core.changes import Change, Column, Operation, parse_lsn
from pg2kinesis_dagster.core.decoders import TestDecodingDecoder
from pg2kinesis_dagster.core.errors import ConfigError
from pg2kinesis_dagster.core.formats import JSONFormatter, make_formatter
from pg2kinesis_dagster.core.typed import parse_array, render_array, typed_value

_PROFILES = {
    "default": settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow]),
    "fuzz": settings(max_examples=5000, deadline=None, suppress_health_check=[HealthCheck.too_slow]),
}
_profile = _PROFILES.get(os.environ.get("HYPOTHESIS_PROFILE", "default"), _PROFILES["default"])

KEEP = object()  # expected: the text unchanged

# (type name, PostgreSQL's text, expected JSON value or KEEP)
CASES: list[tuple[str, str, object]] = [
    # integers
    ("smallint", "-32768", -32768),
    ("integer", "42", 42),
    ("integer", "0", 0),
    ("bigint", "9223372036854775807", 9223372036854775807),
    ("bigint", "-9223372036854775808", -9223372036854775808),
    ("oid", "4294967295", KEEP),  # as to_jsonb(): an identifier, a string
    ("int4", "7", 7),  # a domain's base type as pgoutput names it without the catalog
    ("integer", "1.0", KEEP),  # not what int4out prints: keep
    ("integer", "", KEEP),
    # floats
    ("double precision", "1.5", 1.5),
    ("double precision", "-0", -0.0),
    ("double precision", "1e+300", 1e300),
    ("double precision", "2.2250738585072014e-308", 2.2250738585072014e-308),
    ("double precision", "0.30000000000000004", 0.30000000000000004),
    ("real", "0.1", 0.1),
    ("real", "3.4028235e+38", 3.4028235e38),
    ("real", "NaN", "NaN"),
    ("double precision", "Infinity", "Infinity"),
    ("double precision", "-Infinity", "-Infinity"),
    ("double precision", "1e999", KEEP),  # beyond a double: never an inf
    ("double precision", "0.100000000000000000000001", KEEP),  # more digits than a double holds
    ("double precision", "0.10000000000000001", KEEP),  # extra_float_digits = 3: not the double's shortest
    ("double precision", "1.2345678901234567", 1.2345678901234567),  # 17 digits, shortest form
    ("real", "abc", KEEP),
    # numeric: always its text (precision)
    ("numeric", "12.50", "12.50"),
    ("numeric", "NaN", "NaN"),
    ("numeric", "-Infinity", "-Infinity"),
    ("numeric", "1" * 100 + "." + "0" * 50, "1" * 100 + "." + "0" * 50),
    ("numeric(10,2)", "1.00", "1.00"),
    # boolean
    ("boolean", "t", True),
    ("boolean", "f", False),
    ("bool", "t", True),
    ("boolean", "true", KEEP),
    # json / jsonb
    ("json", '{"a": 1, "b": [true, null, "x"]}', {"a": 1, "b": [True, None, "x"]}),
    ("jsonb", '{"a": 1.50, "n": 12345678901234567890}', {"a": 1.5, "n": 12345678901234567890}),
    ("json", '"just a string"', "just a string"),
    ("json", "[]", []),
    ("json", "null", None),  # a JSON null, not SQL NULL: the column's value is null either way
    ("jsonb", '{"e": "\\u00e9\\n", "emoji": "\U0001F600"}', {"e": "é\n", "emoji": "\U0001F600"}),
    ("json", '{"a": 1, "a": 2}', KEEP),  # duplicate keys: the json type keeps both
    ("json", '{"x": 0.1000000000000000000001}', KEEP),  # more precision than a double
    ("json", '{"x": 1e400}', KEEP),
    ("json", '"\\ud800"', KEEP),  # a lone surrogate: not encodable as UTF-8
    ("json", '"\\ud83d\\ude00"', "\U0001F600"),  # a surrogate pair is fine
    ("json", "[" * 100_000 + "]" * 100_000, KEEP),  # deeper than Python's recursion limit
    ("jsonb", "[" * 201 + "]" * 201, KEEP),  # deep enough to break json.dumps of the record
    ("jsonb", "[" * 200 + "]" * 200, json.loads("[" * 200 + "]" * 200)),
    ("jsonb", "[" + "[1]," * 300 + "{}]", json.loads("[" + "[1]," * 300 + "{}]")),  # many brackets, shallow
    ("json", "not json", KEEP),
    # bytea
    ("bytea", "\\x00ff10", base64.b64encode(b"\x00\xff\x10").decode()),
    ("bytea", "\\x", ""),
    ("bytea", "\\x0", KEEP),
    ("bytea", "\\xZZ", KEEP),
    ("bytea", "abc\\000", KEEP),  # bytea_output = escape: not decoded
    # arrays
    ("integer[]", "{1,2,3}", [1, 2, 3]),
    ("integer[]", "{}", []),
    ("integer[]", "{{1,2},{NULL,4}}", [[1, 2], [None, 4]]),
    ("bigint[]", "{{{1}},{{2}}}", [[[1]], [[2]]]),
    ("text[]", '{"a b",NULL,"q\\"x","NULL","","\\\\",plain,null}',
     ["a b", None, 'q"x', "NULL", "", "\\", "plain", None]),
    ("character varying[]", '{"x,y","{z}",é}', ["x,y", "{z}", "é"]),
    ("character varying(20)[]", "{ab,cd}", ["ab", "cd"]),
    ("text[]", '{"line\\\\n: no newline","tab\there","\\n"}', ["line\\n: no newline", "tab\there", "n"]),
    ("double precision[]", "{1.5,NaN,-Infinity,NULL}", [1.5, "NaN", "-Infinity", None]),
    ("numeric[]", "{1.50,NaN}", ["1.50", "NaN"]),
    ("boolean[]", "{t,f,NULL}", [True, False, None]),
    ("jsonb[]", '{"{\\"a\\": 1}","[1, 2]",NULL}', [{"a": 1}, [1, 2], None]),
    ("json[]", '{"{\\"a\\": 1, \\"a\\": 2}","[1]"}', KEEP),  # one element cannot convert: all text
    ("bytea[]", '{"\\\\x00ff",NULL}', ["AP8=", None]),
    ("mood[]", '{happy,NULL,"it\'s ok"}', ["happy", None, "it's ok"]),  # an enum: elements stay text
    ("uuid[]", "{a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11}", ["a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11"]),
    ("integer[]", "[0:1]={1,2}", KEEP),  # lower bound other than 1: a JSON array would lose it
    ("integer[]", "{1,x}", KEEP),
    ("integer[]", "{1,", KEEP),
    ("integer[]", "{1}}", KEEP),
    ("integer[]", "{{1},2}", KEEP),
    ("integer[]", "{1,{2}}", KEEP),
    ("integer[]", "{{}}", KEEP),
    ("integer[]", "{,}", KEEP),
    ("integer[]", "{1 ,2}", KEEP),  # array_out never prints unquoted whitespace
    ("text[]", "{a\\b}", KEEP),  # nor an unquoted backslash
    ("text[]", '{"unterminated}', KEEP),
    ("box[]", "{(1,2),(0,0);(3,3),(2,2)}", KEEP),  # box's delimiter is ';'
    ("mybox[]", "{(1,2),(0,0);(3,3),(2,2)}", KEEP),  # unknown type, unquoted ';': maybe another delimiter
    ("mood[]", '{"a;b",c}', ["a;b", "c"]),  # a quoted ';' is just a character
    ("text[]", "{a;b}", ["a;b"]),  # text's delimiter is ','
    # everything else: text
    ("date", "2026-01-02", KEEP),
    ("timestamp without time zone", "2026-01-02 03:04:05.123", KEEP),
    ("timestamp with time zone", "2026-01-02 01:04:05.1+00", KEEP),
    ("time without time zone", "12:34:56.789", KEEP),
    ("interval", "1 day 02:03:04.5", KEEP),
    ("uuid", "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11", KEEP),
    ("inet", "10.0.0.1/8", KEEP),
    ("cidr", "10.0.0.0/8", KEEP),
    ("macaddr", "08:00:2b:01:02:03", KEEP),
    ("money", "$12.34", KEEP),
    ("mood", "it's ok", KEEP),
    ("int4range", "[1,5)", KEEP),
    ("pair", '(1,"x,""y""")', KEEP),
    ("tsvector", "'a' 'b':1", KEEP),
    ("point", "(1.5,-2)", KEEP),
    ("bit", "1010", KEEP),
    ("bit varying", "101", KEEP),
    ("text", "42", KEEP),
    ("character varying", "t", KEEP),
    ('"Mixed Case".mood', "x", KEEP),
    ("xml", "<a/>", KEEP),
]


@pytest.mark.parametrize(("type_name", "text", "expected"), CASES, ids=[f"{t}:{v[:20]}" for t, v, _ in CASES])
def test_typed_value(type_name: str, text: str, expected: object) -> None:
    got = typed_value(type_name, text)
    want = text if expected is KEEP else expected
    assert got == want and type(got) is type(want)
    if isinstance(want, float) and want == 0:
        assert math.copysign(1, got) == math.copysign(1, want)  # type: ignore[arg-type]
    # Whatever comes out is valid, UTF-8-encodable JSON (the formatter's constraint).
    json.dumps(got, ensure_ascii=False, allow_nan=False).encode()


@pytest.mark.parametrize("type_name", sorted({t for t, _, _ in CASES}))
def test_null_is_null_for_every_type(type_name: str) -> None:
    assert typed_value(type_name, None) is None


def test_bytea_hex_option() -> None:
    assert typed_value("bytea", "\\x00ff10", bytea="hex") == "00ff10"
    assert typed_value("bytea[]", '{"\\\\x00ff"}', bytea="hex") == ["00ff"]
    assert typed_value("bytea", "\\x", bytea="hex") == ""
    with pytest.raises(ValueError, match="bytea"):
        typed_value("bytea", "\\x00", bytea="base32")


# -- the formatter ----------------------------------------------------------------------


def _change(**kwargs: Any) -> Change:
    defaults: dict[str, Any] = {"xid": 7, "lsn": 0x10, "index": 0, "schema": "public", "table": "t",
                                "op": Operation.UPDATE, "commit_lsn": 0x20, "commit_time": "2026-01-01 00:00:00+00"}
    defaults.update(kwargs)
    return Change(**defaults)


def test_json_formatter_typed() -> None:
    change = _change(
        after=(Column("id", "integer", "3"), Column("by", "bytea", "\\x00ff"), Column("n", "numeric", "1.50"),
               Column("ok", "boolean", "t"), Column("arr", "text[]", '{a,NULL}'), Column("gone", "text", None),
               Column("big", "text", None, True)),
        before=(Column("id", "integer", "2"),),
        pk={"id": "3"},
    )
    plain = json.loads(JSONFormatter().format(change))
    assert plain["after"] == {"id": "3", "by": "\\x00ff", "n": "1.50", "ok": "t", "arr": "{a,NULL}", "gone": None}
    assert plain["pk"] == {"id": "3"} and plain["before"] == {"id": "2"}
    typed = json.loads(JSONFormatter(typed=True).format(change))
    assert typed["after"] == {"id": 3, "by": "AP8=", "n": "1.50", "ok": True, "arr": ["a", None], "gone": None}
    assert typed["before"] == {"id": 2}
    assert typed["pk"] == {"id": 3}
    assert typed["unchanged_toast"] == ["big"]
    assert {k: v for k, v in typed.items() if k not in ("after", "before", "pk")} == {
        k: v for k, v in plain.items() if k not in ("after", "before", "pk")}
    hexed = json.loads(JSONFormatter(typed=True, bytea="hex").format(change))
    assert hexed["after"]["by"] == "00ff"


def test_typed_pk_takes_types_from_before_and_handles_nulls() -> None:
    delete = _change(op=Operation.DELETE, before=(Column("a", "bigint", "5"), Column("b", "text", "x")),
                     pk={"a": "5", "b": "x"})
    assert json.loads(JSONFormatter(typed=True).format(delete))["pk"] == {"a": 5, "b": "x"}
    odd = _change(op=Operation.INSERT, after=(Column("a", "bigint", None),), pk={"a": None, "missing": "1"})
    assert json.loads(JSONFormatter(typed=True).format(odd))["pk"] == {"a": None, "missing": "1"}
    truncate = _change(op=Operation.TRUNCATE, truncate_flags=("cascade",))
    out = json.loads(JSONFormatter(typed=True).format(truncate))
    assert out["pk"] is None and out["after"] is None and out["truncate_flags"] == ["cascade"]


def test_make_formatter_typed_option() -> None:
    formatter = make_formatter("json", typed=True)
    assert isinstance(formatter, JSONFormatter) and formatter.typed
    assert not make_formatter("JSON").typed  # type: ignore[attr-defined]
    for name in ("CSV", "CSVPayload", "tests.test_typed_json:JSONFormatter"):
        with pytest.raises(ConfigError, match="JSON"):
            make_formatter(name, typed=True)
    with pytest.raises(ConfigError, match="bytea"):
        JSONFormatter(typed=True, bytea="base32")


# -- array literals: Hypothesis round trips -----------------------------------------------

_SPECIAL = ['"', "\\", "{", "}", ",", " ", "\t", "\n", "\r", "\v", "\f", "NULL", "null", "NuLl", ";", "é", "😀", ""]
# Any character PostgreSQL can store in text: no NUL; no lone surrogates (not UTF-8).
_ANY_CHAR = st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00")
_element_text = st.lists(st.one_of(st.text(_ANY_CHAR, max_size=5), st.sampled_from(_SPECIAL)), max_size=4).map("".join)
_elements = st.one_of(st.none(), _element_text)


def _pg_render(value: list[Any]) -> str:
    """array_out() with ',' as delimiter, written independently of core.typed.render_array."""
    out = []
    for item in value:
        if item is None:
            out.append("NULL")
        elif isinstance(item, list):
            out.append(_pg_render(item))
        else:
            needs_quotes = (item == "" or item.lower() == "null"
                            or any(ch in item for ch in '{}",\\ \t\n\r\v\f'))
            escaped = "".join("\\" + ch if ch in '"\\' else ch for ch in item)
            out.append(f'"{escaped}"' if needs_quotes else item)
    return "{" + ",".join(out) + "}"


@st.composite
def pg_arrays(draw: st.DrawFn, elements: st.SearchStrategy[Any] = _elements) -> list[Any]:
    """A rectangular PostgreSQL array of 1 to 4 dimensions (or the empty array)."""
    if draw(st.integers(0, 19)) == 0:
        return []
    dims = draw(st.lists(st.integers(1, 4), min_size=1, max_size=4))

    def build(level: int) -> list[Any]:
        if level == len(dims) - 1:
            return [draw(elements) for _ in range(dims[level])]
        return [build(level + 1) for _ in range(dims[level])]

    return build(0)


@_profile
@given(pg_arrays())
def test_text_array_round_trip(value: list[Any]) -> None:
    text = _pg_render(value)
    assert parse_array(text) == value
    assert render_array(value) == text
    assert typed_value("text[]", text) == value
    assert typed_value("character varying[]", text) == value


@_profile
@given(pg_arrays(st.one_of(st.none(), st.integers(-(2**63), 2**63 - 1))))
def test_integer_array_round_trip(value: list[Any]) -> None:
    def as_text(v: Any) -> Any:
        return [as_text(x) for x in v] if isinstance(v, list) else None if v is None else str(v)

    assert typed_value("bigint[]", _pg_render(as_text(value))) == value


@_profile
@given(pg_arrays(st.one_of(st.none(), st.floats(allow_nan=False))))
def test_float_array_round_trip(value: list[Any]) -> None:
    def as_text(v: Any) -> Any:
        if isinstance(v, list):
            return [as_text(x) for x in v]
        if v is None:
            return None
        return "Infinity" if v == math.inf else "-Infinity" if v == -math.inf else repr(v)

    def expected(v: Any) -> Any:
        if isinstance(v, list):
            return [expected(x) for x in v]
        return as_text(v) if v is not None and math.isinf(v) else v

    assert typed_value("double precision[]", _pg_render(as_text(value))) == expected(value)


_TYPES = [t for t, _, _ in CASES]


@_profile
@given(st.sampled_from(_TYPES), st.one_of(st.text(_ANY_CHAR, max_size=30), _element_text, st.builds(
    _pg_render, pg_arrays())))
def test_any_text_gives_encodable_json_or_the_text(type_name: str, text: str) -> None:
    got = typed_value(type_name, text)
    json.dumps(got, ensure_ascii=False, allow_nan=False).encode()
    if isinstance(got, str) and got != text:
        # Strings other than the text itself only come from bytea, json, float words or arrays.
        assert type_name.startswith(("bytea", "json")) or got in ("NaN", "Infinity", "-Infinity")


# -- live: test_decoding output, typed, against PostgreSQL's to_jsonb(row) ----------------

LIVE_SCHEMA = r"""
CREATE TYPE mood AS ENUM ('happy', 'it''s ok');
CREATE TABLE typed (
    id int PRIMARY KEY, i2 smallint, i8 bigint, o oid, f4 real, f8 float8, n numeric, b bool,
    j json, jb jsonb, by bytea, ia int[], ia2 int[][], ta text[], va varchar(5)[], ba bool[],
    txt text, d date, ts timestamp, tstz timestamptz, iv interval, u uuid, ip inet, m money, e mood,
    rg int4range, pt point
);
"""
LIVE_ROWS = [
    r"""INSERT INTO typed VALUES (1, -32768, 9223372036854775807, 4294967295, 0.1, 1.5e300, 12.50, true,
        '{"a": 1.50, "b": [null, true], "c": "é\n"}', '{"z": 12345678901234567890, "a": [1, 2.5]}', '\x00ff10',
        '{1,NULL,3}', '{{1,2},{3,4}}', '{"x y","q\"uote",NULL,"NULL","",\\,é😀}', '{ab,NULL}', '{t,f,NULL}',
        E'it''s\n"q"', '2026-01-02', '2026-01-02 03:04:05.123', '2026-01-02 03:04:05.1+02', '1 day 02:03',
        'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11', '10.0.0.1/8', 12.34, 'it''s ok', '[1,5)', '(1.5,-2)')""",
    r"""INSERT INTO typed VALUES (2, 0, -9223372036854775808, 0, 'NaN', '-Infinity', 'NaN', false,
        '{"a": 1, "a": 2}', '[]', '\x', '{}', '{}', '{}', '{}', '{}', '', '-infinity', 'infinity', 'epoch',
        '-1 mons', '00000000-0000-0000-0000-000000000000', '::1', -0.01, 'happy', 'empty', '(0,0)')""",
    "INSERT INTO typed (id) VALUES (3)",
    r"""INSERT INTO typed (id, f4, f8, j) VALUES (4, '3.4028235e+38', '-0', '{"x": 0.1000000000000000000001}')""",
]
# Columns whose typed value equals to_jsonb's exactly (as JSON values).
LOSSLESS = {"id", "i2", "i8", "o", "b", "jb", "ia", "ia2", "ta", "va", "ba", "txt", "d", "u", "ip", "e", "rg"}


def test_typed_json_matches_to_jsonb_on_a_live_server(pg_conn: psycopg2.extensions.connection) -> None:
    with pg_conn.cursor() as cur:
        cur.execute(LIVE_SCHEMA)
        cur.execute("SELECT pg_create_logical_replication_slot('typed', 'test_decoding')")
        for statement in LIVE_ROWS:
            cur.execute(statement)
        # jsonb's text, read with exact numbers, is PostgreSQL's own typed view of each row.
        cur.execute("SELECT id, to_jsonb(t)::text FROM typed t ORDER BY id")
        reference = {row_id: json.loads(text, parse_float=Decimal) for row_id, text in cur.fetchall()}
        decoder = TestDecodingDecoder()
        cur.execute("SELECT lsn::text, xid::text::bigint, data FROM pg_logical_slot_peek_changes("
                    "'typed', NULL, NULL, VARIADIC %s::text[])", (list(decoder.slot_options),))
        rows = [(parse_lsn(lsn), xid, data) for lsn, xid, data in cur.fetchall()]
        cur.execute("SELECT pg_drop_replication_slot('typed')")
    formatter = JSONFormatter(typed=True)
    typed = {}
    for txn in decoder.decode(rows):
        for change in txn.changes:
            change.pk = {"id": next(c.value for c in change.after or () if c.name == "id")}
            doc = json.loads(formatter.format(change), parse_float=Decimal)
            assert doc["pk"] == {"id": doc["after"]["id"]}
            typed[doc["after"]["id"]] = doc["after"]
    assert sorted(typed) == [1, 2, 3, 4]

    for row_id, ref in reference.items():
        got = typed[row_id]
        assert got.keys() == ref.keys()
        for name in LOSSLESS:
            assert got[name] == ref[name], (row_id, name)
        # Floats: the same number; NaN/Infinity are strings in both.
        for name in ("f4", "f8"):
            assert got[name] == ref[name] or Decimal(str(got[name])) == Decimal(str(ref[name])), (row_id, name)

    one, two, three, four = (typed[i] for i in (1, 2, 3, 4))
    ref_one, ref_two = reference[1], reference[2]
    # json: the same JSON value; to_jsonb turns json into jsonb (1.50 stays 1.50, we give 1.5).
    assert one["j"] == ref_one["j"]
    # Intentional differences, documented in docs/typed_json.md:
    assert one["n"] == "12.50" and ref_one["n"] == Decimal("12.50")  # numeric: a string, for its precision
    assert two["n"] == "NaN" and ref_two["n"] == "NaN"
    assert one["by"] == "AP8Q" and ref_one["by"] == "\\x00ff10"  # bytea: base64, not PostgreSQL's hex text
    assert two["by"] == "" and ref_two["by"] == "\\x"
    assert one["ts"] == "2026-01-02 03:04:05.123" and ref_one["ts"] == "2026-01-02T03:04:05.123"  # text form
    assert one["tstz"] == "2026-01-02 01:04:05.1+00" and ref_one["tstz"] == "2026-01-02T01:04:05.1+00:00"
    assert one["m"] == "$12.34" and ref_one["m"] == "$12.34"
    assert one["iv"] == ref_one["iv"] == "1 day 02:03:00"
    assert one["pt"] == ref_one["pt"] == "(1.5,-2)"
    # json with duplicate keys stays text (the json type keeps both; jsonb keeps the last).
    assert two["j"] == '{"a": 1, "a": 2}' and ref_two["j"] == {"a": 2}
    # More precision than a double: kept as text; PostgreSQL's jsonb keeps it as an exact number.
    assert four["j"] == '{"x": 0.1000000000000000000001}'
    assert reference[4]["j"]["x"] == Decimal("0.1000000000000000000001")
    assert four["f8"] == 0 and str(four["f8"]) == "-0.0"
    assert all(v is None for k, v in three.items() if k != "id")
