"""Property tests: render changes exactly as test_decoding prints them, decode, compare.

The renderer mimics PostgreSQL 15's quote_identifier() (ruleutils.c) and
test_decoding.c's print_literal()/tuple_to_stringinfo(). Example counts come
from a profile chosen by the HYPOTHESIS_PROFILE environment variable: "default"
(quick, for every run) or "fuzz" (long). The profiles are applied to this
file's tests only, so the global Hypothesis settings of other tests are untouched.
"""

from __future__ import annotations

import contextlib
import os
import re
from dataclasses import dataclass

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pg2kinesis_dagster.core.changes import Change, Column, Operation, SlotRow, Transaction
from pg2kinesis_dagster.core.decoders import TestDecodingDecoder
from pg2kinesis_dagster.core.errors import DecodeError

_PROFILES = {
    "default": settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow]),
    "fuzz": settings(max_examples=5000, deadline=None, suppress_health_check=[HealthCheck.too_slow]),
}
_profile = _PROFILES.get(os.environ.get("HYPOTHESIS_PROFILE", "default"), _PROFILES["default"])

# Keywords quote_identifier() quotes (reserved, col_name, type_func_name): a
# representative subset; the decoder accepts either form anyway.
KEYWORDS = frozenset({
    "all", "and", "any", "array", "as", "asc", "between", "bigint", "bit", "boolean", "both",
    "case", "cast", "char", "character", "check", "coalesce", "collate", "column", "constraint",
    "create", "cross", "current_date", "current_user", "default", "deferrable", "desc", "distinct",
    "do", "else", "end", "except", "exists", "extract", "false", "fetch", "float", "for", "foreign",
    "from", "full", "grant", "group", "having", "ilike", "in", "inner", "int", "integer",
    "interval", "into", "is", "join", "leading", "left", "like", "limit", "natural", "not", "null",
    "numeric", "offset", "on", "only", "or", "order", "outer", "overlaps", "primary", "real",
    "references", "returning", "right", "row", "select", "similar", "smallint", "some", "table",
    "then", "time", "timestamp", "to", "trailing", "true", "union", "unique", "user", "using",
    "values", "varchar", "verbose", "when", "where", "window", "with",
})

_SAFE = re.compile(r"[a-z_][a-z0-9_]*")


def quote_identifier(ident: str) -> str:
    if _SAFE.fullmatch(ident) and ident not in KEYWORDS:
        return ident
    return '"' + ident.replace('"', '""') + '"'


@dataclass(frozen=True)
class Value:
    """One column value: what test_decoding prints and what the decoder must return."""

    printed: str
    value: str | None
    unchanged_toast: bool = False


def print_literal_text(text: str) -> Value:
    # print_literal() default branch: single quotes, only ' doubled (no backslash escaping).
    return Value("'" + text.replace("'", "''") + "'", text)


# -- strategies ------------------------------------------------------------------

# Any character PostgreSQL can store in text: no NUL; no lone surrogates (not UTF-8).
ANY_CHAR = st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00")
TRICKY = [
    "'", "''", "' '", '"', '""', "]:", "[", "]", ":", " ", ".", ", ", "\n", "\t", "\r\n", "\\", "é", "😀",
    " new-tuple:", " old-key:", " (no-tuple-data)", "null", "unchanged-toast-datum", "B'01'",
    " x[integer]:1", ": TRUNCATE: cascade", "table ", "COMMIT", "\u2028", "\x85",
]
hostile_text = st.lists(st.one_of(st.text(ANY_CHAR, max_size=8), st.sampled_from(TRICKY)), max_size=6).map("".join)

identifiers = st.one_of(
    st.from_regex(r"[a-z_][a-z0-9_]{0,12}", fullmatch=True),
    st.sampled_from(sorted(KEYWORDS)),
    st.sampled_from(["Upper", "a b", 'x"y', '"', "a.b", "x[1]", "a]:b", "é", "ünï", "😀", "$x", "1abc",
                     "new-tuple", " ", "a, b"]),
    hostile_text.filter(bool),
)

BUILTIN_TYPES = [
    "text", "character varying", "character varying[]", "timestamp with time zone", "jsonb",
    "uuid", "bytea", "interval", '"char"', "character", "time without time zone", "inet", "text[]",
    "numeric(10,2)", "character varying(20)[]", "timestamp(3) with time zone", "integer[]",
]


@st.composite
def type_names(draw: st.DrawFn) -> str:
    """format_type_be() output: a builtin name or a (schema-qualified) user type, maybe an array."""
    if draw(st.booleans()):
        return draw(st.sampled_from(BUILTIN_TYPES))
    name = quote_identifier(draw(identifiers))
    if draw(st.booleans()):
        name = quote_identifier(draw(identifiers)) + "." + name
    return name + draw(st.sampled_from(["", "[]"]))


number_literals = st.one_of(
    st.integers(min_value=-(2**63), max_value=2**64).map(str),
    st.floats(allow_nan=False, allow_infinity=False).map(lambda f: repr(f).replace(".0e", "e")).filter(
        lambda s: re.fullmatch(r"-?[0-9]+(\.[0-9]+)?(e[+-][0-9]+)?", s) is not None),
    st.decimals(allow_nan=False, allow_infinity=False, places=4).map(lambda d: format(d, "f")),
    st.sampled_from(["NaN", "Infinity", "-Infinity", "-0", "1e-05", "1.5e+300", "12.50"]),
)


@st.composite
def typed_values(draw: st.DrawFn) -> tuple[str, Value]:
    """(type, value) pairs covering every print_literal() branch and the special words."""
    kind = draw(st.sampled_from(["text", "text", "text", "number", "bool", "bits", "null", "toast"]))
    if kind == "number":
        literal = draw(number_literals)
        return draw(st.sampled_from(["integer", "bigint", "smallint", "oid", "real", "double precision",
                                     "numeric"])), Value(literal, literal)
    if kind == "bool":
        flag = draw(st.booleans())
        return "boolean", Value("true" if flag else "false", "t" if flag else "f")
    if kind == "bits":
        bits = draw(st.text("01", max_size=12))
        return draw(st.sampled_from(["bit", "bit varying", "bit(4)"])), Value(f"B'{bits}'", bits)
    type_name = draw(type_names())
    if kind == "null":
        return type_name, Value("null", None)
    if kind == "toast":
        return type_name, Value("unchanged-toast-datum", None, True)
    return type_name, print_literal_text(draw(hostile_text))


columns = st.lists(st.tuples(identifiers, typed_values()), max_size=6)


def render_tuple(cols: list[tuple[str, tuple[str, Value]]], skip_nulls: bool) -> tuple[str, tuple[Column, ...]]:
    """tuple_to_stringinfo(): ' name[type]:value' per column; old keys skip NULLs."""
    printed: list[str] = []
    expected: list[Column] = []
    for name, (type_name, value) in cols:
        if skip_nulls and value.printed == "null":
            continue
        printed.append(f" {quote_identifier(name)}[{type_name}]:{value.printed}")
        expected.append(Column(name, type_name, value.value, value.unchanged_toast))
    return "".join(printed), tuple(expected)


@dataclass
class Rendered:
    line: str
    changes: list[Change]  # xid/lsn/index/commit fields filled in by the transaction


@st.composite
def row_changes(draw: st.DrawFn) -> Rendered:
    schema, table = draw(identifiers), draw(identifiers)
    head = f"table {quote_identifier(schema)}.{quote_identifier(table)}:"
    op = draw(st.sampled_from([Operation.INSERT, Operation.UPDATE, Operation.DELETE]))
    after = before = None
    no_tuple = draw(st.integers(0, 9)) == 0
    if op is Operation.INSERT:
        if no_tuple:
            body = " (no-tuple-data)"
        else:
            body, after = render_tuple(draw(columns), skip_nulls=False)
        line = f"{head} INSERT:{body}"
    elif op is Operation.UPDATE:
        line = f"{head} UPDATE:"
        if draw(st.booleans()):
            old, before = render_tuple(draw(columns), skip_nulls=True)
            line += f" old-key:{old} new-tuple:"
        if no_tuple:
            line += " (no-tuple-data)"
        else:
            new, after = render_tuple(draw(columns), skip_nulls=False)
            line += new
    else:
        if no_tuple:
            body = " (no-tuple-data)"
        else:
            body, before = render_tuple(draw(columns), skip_nulls=True)
        line = f"{head} DELETE:{body}"
    return Rendered(line, [Change(0, 0, 0, schema, table, op, after, before)])


@st.composite
def truncates(draw: st.DrawFn) -> Rendered:
    tables = draw(st.lists(st.tuples(identifiers, identifiers), min_size=1, max_size=4))
    flags = draw(st.sampled_from([(), ("restart_seqs",), ("cascade",), ("restart_seqs", "cascade")]))
    names = ", ".join(f"{quote_identifier(s)}.{quote_identifier(t)}" for s, t in tables)
    line = f"table {names}: TRUNCATE: {' '.join(flags) if flags else '(no-flags)'}"
    return Rendered(line, [Change(0, 0, 0, s, t, Operation.TRUNCATE, truncate_flags=flags) for s, t in tables])


@st.composite
def messages(draw: st.DrawFn) -> Rendered:
    content = draw(hostile_text)
    prefix = draw(hostile_text)
    transactional = draw(st.sampled_from("01"))
    return Rendered(f"message: transactional: {transactional} prefix: {prefix}, sz: {len(content.encode())} "
                    f"content:{content}", [])


@st.composite
def transactions(draw: st.DrawFn) -> tuple[list[SlotRow], list[Transaction]]:
    """Several transactions as slot rows, plus the transactions the decoder must yield."""
    rows: list[SlotRow] = []
    expected: list[Transaction] = []
    lsn = draw(st.integers(0, 2**40))
    for _ in range(draw(st.integers(0, 3))):
        xid = draw(st.integers(1, 2**32 - 1))
        with_xid, with_time = draw(st.booleans()), draw(st.booleans())
        begin = f"BEGIN {xid}" if with_xid else "BEGIN"
        txn = Transaction(xid, lsn, 0, None, [], 0)
        rows.append((lsn, xid, begin))
        size = len(begin)
        for rendered in draw(st.lists(st.one_of(row_changes(), row_changes(), truncates(), messages()),
                                      max_size=5)):
            lsn += draw(st.integers(0, 500))
            rows.append((lsn, xid, rendered.line))
            size += len(rendered.line)
            for change in rendered.changes:
                change.xid, change.lsn, change.index = xid, lsn, len(txn.changes)
                txn.changes.append(change)
        lsn += draw(st.integers(1, 500))
        commit_time = draw(st.sampled_from(["2026-11-26 05:00:00.123456+00", "2026-11-26 10:30:00+05:30"]))
        commit = f"COMMIT {xid}" if with_xid else "COMMIT"
        if with_time:
            commit += f" (at {commit_time})"
        rows.append((lsn, xid, commit))
        txn.commit_lsn, txn.commit_time, txn.size = lsn, commit_time if with_time else None, size + len(commit)
        for change in txn.changes:
            change.commit_lsn, change.commit_time = txn.commit_lsn, txn.commit_time
        expected.append(txn)
        if draw(st.integers(0, 4)) == 0:  # a non-transactional message between transactions
            rows.append((lsn, 0, draw(messages()).line.replace("transactional: 1", "transactional: 0", 1)))
    return rows, expected


# -- properties ------------------------------------------------------------------


@_profile
@given(transactions())
def test_decode_returns_what_was_rendered(case: tuple[list[SlotRow], list[Transaction]]) -> None:
    rows, expected = case
    assert list(TestDecodingDecoder().decode(rows)) == expected


@_profile
@given(identifiers, type_names(), hostile_text)
def test_single_column_round_trip(name: str, type_name: str, text: str) -> None:
    value = print_literal_text(text)
    line = f"table public.t: INSERT: {quote_identifier(name)}[{type_name}]:{value.printed} z[integer]:1"
    rows: list[SlotRow] = [(1, 2, "BEGIN 2"), (3, 2, line), (4, 2, "COMMIT 2")]
    [txn] = TestDecodingDecoder().decode(rows)
    assert txn.changes[0].after == (Column(name, type_name, text), Column("z", "integer", "1"))


@_profile
@given(row_changes(), st.data())
def test_damaged_lines_decode_or_raise_decode_error(rendered: Rendered, data: st.DataObject) -> None:
    """Cutting or corrupting a valid line never crashes the decoder with another exception."""
    line = rendered.line
    cut = data.draw(st.integers(0, len(line)))
    junk = data.draw(st.sampled_from(["", "'", '"', " ", "]", "[", ":", "x", "''", " a[b]:"]))
    damaged = line[:cut] + junk + line[cut + data.draw(st.integers(0, 3)):]
    rows: list[SlotRow] = [(1, 2, "BEGIN 2"), (3, 2, damaged), (4, 2, "COMMIT 2")]
    try:
        list(TestDecodingDecoder().decode(rows))
    except DecodeError as exc:
        assert exc.lsn == 3


@_profile
@given(st.text(ANY_CHAR, max_size=60))
def test_arbitrary_tuple_text_never_crashes(text: str) -> None:
    rows: list[SlotRow] = [(1, 2, "BEGIN 2"), (3, 2, "table public.t: UPDATE: old-key:" + text), (4, 2, "COMMIT 2")]
    with contextlib.suppress(DecodeError):
        list(TestDecodingDecoder().decode(rows))


@pytest.mark.parametrize("name", ["default", "fuzz"])
def test_profiles_exist(name: str) -> None:
    assert _PROFILES[name].max_examples >= 200
