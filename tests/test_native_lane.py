"""The compiled test_decoding lane (core/_td_lane.pyx) against the Python path and the pipeline's loop.

Every comparison runs three ways over the same COPY buffer: the reference loop (decoder -> keys -> merger ->
builder), the driver's Python path and the driver with the lane; records (every field), commit LSNs, advance
points, statistics and errors must agree. Without the compiled module these tests skip, unless
PG2K_REQUIRE_NATIVE=1 (CI), where they fail.
"""

from __future__ import annotations

import os

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pg2kinesis_dagster.core.changes import format_lsn
from pg2kinesis_dagster.core.copy_text import format_row, iter_rows
from pg2kinesis_dagster.core.copy_window import LaneCounts, record_chunks_from_copy
from pg2kinesis_dagster.core.decoders import TestDecodingDecoder
from pg2kinesis_dagster.core.records import BatchStats
from tests.copy_lane_support import Setup, collect, compare, lane_module, setups, windows
from tests.test_decoder_properties import ANY_CHAR, hostile_text, row_changes

# HYPOTHESIS_PROFILE=fuzz multiplies the examples (as tests/test_decoder_properties.py's profiles).
_SCALE = 20 if os.environ.get("HYPOTHESIS_PROFILE") == "fuzz" else 1
_SETTINGS = settings(max_examples=300 * _SCALE, deadline=None, suppress_health_check=list(HealthCheck))
KEYED = ((("public", "t"), ("id",)),)


@pytest.fixture(autouse=True)
def _module() -> None:
    lane_module()


def _buf(*rows: str, xid: int = 7) -> bytes:
    lines = [format_row("0/10", xid, f"BEGIN {xid}")]
    lines += [format_row(f"0/{0x20 + i:X}", xid, data) for i, data in enumerate(rows)]
    lines.append(format_row("0/1000", xid, f"COMMIT {xid} (at 2026-01-01 00:00:00+00)"))
    return b"".join(lines)


def _counts(buf: bytes, setup: Setup) -> LaneCounts:
    counts = LaneCounts()
    decoder, builder, schema_keys, merger = setup.objects()
    for _ in record_chunks_from_copy(buf, 0, len(buf), decoder=decoder, builder=builder, schema_keys=schema_keys,
                                     merger=merger, chunk_changes=setup.chunk_changes, chunk_bytes=setup.chunk_bytes,
                                     stats=BatchStats(), counts=counts):
        pass
    return counts


@_SETTINGS
@given(st.data())
def test_lane_equals_python_path_and_reference(data: st.DataObject) -> None:
    window = data.draw(windows())
    compare(window.buf, data.draw(setups(window)), window.commits)


@_SETTINGS
@given(st.data())
def test_lane_equals_python_path_on_lane_friendly_windows(data: st.DataObject) -> None:
    window = data.draw(windows(friendly=True))
    compare(window.buf, data.draw(setups(window)), window.commits)


@settings(max_examples=60 * _SCALE, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.data())
def test_large_transactions_over_tiny_chunks(data: st.DataObject) -> None:
    window = data.draw(windows(max_transactions=2, big=True))
    setup = data.draw(setups(window))
    setup = Setup(**{**setup.__dict__, "chunk_changes": data.draw(st.integers(1, 5))})
    compare(window.buf, setup, window.commits)


@pytest.mark.parametrize("fmt", ["CSV", "CSVPayload", "JSON"])
def test_common_rows_stay_in_the_lane(fmt: str) -> None:
    rows = [f"table public.t: INSERT: id[integer]:{i} v[text]:'x{i}' n[numeric]:1.5e+10 b[boolean]:true "
            f"s[bit(4)]:B'0101' z[text]:null" for i in range(50)]
    rows += ["table public.t: UPDATE: id[integer]:3 v[text]:'y'", "table public.t: DELETE: id[integer]:4",
             "table public.k: INSERT: a[text]:'1' b[text]:'2'", "table public.k: DELETE: a[text]:'1'"]
    buf = _buf(*rows)
    setup = Setup(keys=(*KEYED, (("public", "k"), ("a", "b"))), fmt=fmt, chunk_changes=7)
    out = compare(buf, setup, [0x1000])
    assert len(out.records) == 54
    counts = _counts(buf, setup)
    assert counts.lane_records == 53 and counts.python_rows == 1 and counts.python_units == 0  # the DELETE of k:
    # its image lacks key column b


@pytest.mark.parametrize("fmt", ["CSV", "CSVPayload", "JSON"])
@pytest.mark.parametrize("code", range(0x80))
def test_every_ascii_code_point_in_values_names_and_keys(fmt: str, code: int) -> None:
    ch = chr(code)
    text = ch.replace("'", "''")
    name = '"' + ch.replace('"', '""') + 'c"' if code else "c"
    rows = [f"table public.t: INSERT: id[text]:'k{text}' {name}[text]:'{text}x{text}'",
            f"table public.\"{ch.replace(chr(34), chr(34) * 2)}z\": INSERT: a[text]:'{text}'",
            f"table public.k: INSERT: a[text]:'{text}' b[text]:'{text}{text}'"]
    if code == 0:
        rows = rows[:1]  # PostgreSQL text never holds NUL; the decoder's names never do either
        rows[0] = rows[0].replace("\x00", "")
    setup = Setup(keys=(*KEYED, (("public", "k"), ("a", "b"))), fmt=fmt)
    out = compare(_buf(*rows), setup, [0x1000])
    assert out.error is None
    assert _counts(_buf(*rows), setup).python_rows == 0


@settings(max_examples=300, deadline=None)
@given(st.text(ANY_CHAR, max_size=40))
def test_json_strings_as_orjson(text: str) -> None:
    literal = "'" + text.replace("'", "''") + "'"
    buf = _buf(f"table public.t: INSERT: id[text]:{literal} v[text]:{literal}")
    for fmt in ("JSON", "CSVPayload", "CSV"):
        out = compare(buf, Setup(keys=KEYED, fmt=fmt), [0x1000])
        if fmt == "JSON":
            assert orjson.loads(out.records[0][0])["after"] == {"id": text, "v": text}


@settings(max_examples=200 * _SCALE, deadline=None, suppress_health_check=list(HealthCheck))
@given(row_changes(), st.data())
def test_damaged_rows_raise_the_same_decode_error(rendered: object, data: st.DataObject) -> None:
    line = rendered.line  # type: ignore[attr-defined]
    cut = data.draw(st.integers(0, len(line)))
    junk = data.draw(st.sampled_from(["", "'", '"', " ", "]", "[", ":", "x", "''", " a[b]:", "\\", "\udcff"]))
    damaged = line[:cut] + junk + line[cut + data.draw(st.integers(0, 3)):]
    rows = ["table public.t: INSERT: id[integer]:1", damaged, "table public.t: INSERT: id[integer]:2"]
    try:
        buf = _buf(*rows)
    except UnicodeEncodeError:  # a lone surrogate: bytes PostgreSQL never sends, which Python cannot decode
        buf = _buf(rows[0], "SURROGATE").replace(b"SURROGATE", b"table public.t: INSERT: id[text]:'\xed\xb3\xbf'")
    compare(buf, Setup(keys=KEYED, fmt=data.draw(st.sampled_from(["CSV", "CSVPayload", "JSON"]))), [0x1000])


@pytest.mark.parametrize("data", [
    b"table public.t: INSERT: id[integer]:1 v[text]:'a\\qb'",  # an unknown COPY escape
    b"table public.t: INSERT: id[integer]:1 v[text]:'\xff'",  # not UTF-8
    b"table public.t: INSERT: id[integer]:1 v[text]:'\xed\xa0\x80'",  # a surrogate
    b"table public.t: INSERT: id[integer]:1 v[text]:'\xc0\xaf'",  # overlong
    b"table public.t: INSERT: id[integer]:1 v[text]:'a\\",  # an escape cut short
    b"table public.t: INSERT: id[integer]:1 v[text]:'a' ",
    b"table public.t: INSERT: id[integer]:1x",
    b"table public.t: INSERT: id[integer]:--1",
    b"table public.t: INSERT: id[integer]:1.",
    b"table public.t: INSERT: id[integer]:1e5",
    b"table public.t: INSERT: id[integer]:nulll",
    b"table public.t: INSERT: id[integer:1",
    b"table public.t: INSERT: id[[]]:1",
    b"table public.t: INSERT: id[a[b]:1",
    b"table public.t: INSERTX: id[integer]:1",
    b"table public.t INSERT: id[integer]:1",
    b"table public: INSERT: id[integer]:1",
    b"table \"pub\"lic\".t: INSERT: id[integer]:1",
    b"BEGIN 8",
    b"COMMITTED",
    b"whatever",
    b"table public.t: INSERT: id[integer]:1\tmore",
])
def test_malformed_rows(data: bytes) -> None:
    head = format_row("0/10", 7, "BEGIN 7") + format_row("0/11", 7, "table public.t: INSERT: id[integer]:0")
    buf = head + b"0/12\t7\t" + data + b"\n" + format_row("0/13", 7, "COMMIT 7")
    for fmt in ("CSV", "JSON"):
        out = compare(buf, Setup(keys=KEYED, fmt=fmt), [0x13])
        assert (out.error is None) == (data == b"table public.t: INSERT: id[[]]:1")  # type "[]": valid


@pytest.mark.parametrize("begin,commit", [
    ("BEGIN 7", "COMMIT 8"), ("BEGIN 07", "COMMIT 7"), ("BEGIN x", "COMMIT 7"), ("BEGIN 7", "COMMIT 7 (at )"),
    ("BEGIN 7", "COMMIT 7 (at a(b)"), ("BEGIN 7", "COMMIT 7 (at a)x"), ("BEGIN 7", "COMMIT  7"),
    ("BEGIN", "COMMIT"), ("BEGIN 7", None),
])
@pytest.mark.parametrize("chunk", [1, 100])
def test_begin_and_commit_pairs(begin: str, commit: str | None, chunk: int) -> None:
    lines = [format_row("0/10", 7, begin)]
    lines += [format_row(f"0/{0x20 + i:X}", 7, f"table public.t: INSERT: id[integer]:{i}") for i in range(3)]
    if commit is not None:
        lines.append(format_row("0/100", 7, commit))
    compare(b"".join(lines), Setup(keys=KEYED, chunk_changes=chunk), [0x100])


def test_partition_keys_past_the_fast_case() -> None:
    long = "x" * 300
    rows = [f"table public.t: INSERT: id[text]:'{long}'", f"table public.t: INSERT: id[text]:'{'é' * 250}'",
            "table public.k: INSERT: a[text]:'é\"' b[text]:'\\\\'",
            f"table public.k: INSERT: a[text]:'{long}' b[text]:'1'"]
    for fmt in ("CSV", "CSVPayload", "JSON"):
        out = compare(_buf(*rows), Setup(keys=(*KEYED, (("public", "k"), ("a", "b"))), fmt=fmt), [0x1000])
        assert len(out.records) == 4


def test_empty_transactions_reload_keys_between_lane_stretches() -> None:
    """A DDL (BEGIN/COMMIT only) makes the keys be read again: the lane's tables are dropped and asked again."""
    lines = []
    for n, xid in enumerate((10, 11, 12)):
        lines.append(format_row(f"0/{0x100 * n + 1:X}", xid, f"BEGIN {xid}"))
        if xid != 11:
            lines.append(format_row(f"0/{0x100 * n + 2:X}", xid, "table public.t: INSERT: id[integer]:1"))
        lines.append(format_row(f"0/{0x100 * n + 3:X}", xid, f"COMMIT {xid}"))
    compare(b"".join(lines), Setup(keys=KEYED), [0x3, 0x103, 0x203])


@settings(max_examples=100, deadline=None)
@given(hostile_text)
def test_commit_times(text: str) -> None:
    if "(" in text or ")" in text or not text:
        return
    buf = _buf("table public.t: INSERT: id[integer]:1").replace(b"(at 2026-01-01 00:00:00+00)",
                                                               b"(at " + format_row("", 0, text)[3:-1] + b")")
    out = compare(buf, Setup(keys=KEYED, fmt="JSON"), [0x1000])
    assert out.error is None and orjson.loads(out.records[0][0])["commit_ts"] == text


def test_mmap_buffer(tmp_path: object) -> None:
    import mmap
    from pathlib import Path

    buf = _buf(*[f"table public.t: INSERT: id[integer]:{i}" for i in range(10)])
    path = Path(str(tmp_path)) / "spool"
    path.write_bytes(b"junk" + buf)
    with path.open("rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        setup = Setup(keys=KEYED, chunk_changes=3)
        out = collect(lambda stats: _mm_chunks(mm, setup, stats))
    assert out.error is None
    assert out.records == compare(buf, setup, [0x1000]).records


def _mm_chunks(mm: object, setup: Setup, stats: BatchStats):  # type: ignore[no-untyped-def]
    decoder, builder, schema_keys, merger = setup.objects()
    return record_chunks_from_copy(mm, 4, len(mm), decoder=decoder, builder=builder,  # type: ignore[arg-type]
                                   schema_keys=schema_keys, merger=merger, chunk_changes=setup.chunk_changes,
                                   chunk_bytes=setup.chunk_bytes, stats=stats)


# -- live: a real test_decoding slot, read with COPY ------------------------------------------------------------

SCHEMA = 'Wéird "S" ch\\ema'
LIVE_TABLES = {
    "keyed": ("id",),
    'K"2 \t tab': ("a b", "ß"),
    "nokey": (),
    "nokey_full": (),
}
HOSTILE = ["plain", "it's", "back\\slash", "tab\there", "new\nline", "cr\rlf", "é ü 😀", '"quoted"', "]: [x]",
           " old-key: new-tuple:", "null", "", "\x01\x1f\x7f", "B'01'"]


def _workload(conn) -> None:  # type: ignore[no-untyped-def]
    from psycopg2 import sql

    s = sql.Identifier(SCHEMA)
    with conn.cursor() as cur:
        cur.execute(sql.SQL("CREATE SCHEMA {}").format(s))
        cur.execute(sql.SQL('CREATE TABLE {}.keyed (id bigint PRIMARY KEY, "Val\'ue" text, n numeric, f float8, '
                            'b boolean, bits bit varying, arr text[], j jsonb, ts timestamptz)').format(s))
        cur.execute(sql.SQL('CREATE TABLE {}.{} ("a b" text, "ß" int, "x]:y" text, PRIMARY KEY ("a b", "ß"))')
                    .format(s, sql.Identifier('K"2 \t tab')))
        cur.execute(sql.SQL("CREATE TABLE {}.nokey (v text, w int)").format(s))
        cur.execute(sql.SQL("CREATE TABLE {}.nokey_full (v text, w int)").format(s))
        cur.execute(sql.SQL("ALTER TABLE {}.nokey_full REPLICA IDENTITY FULL").format(s))
        cur.execute("SELECT pg_create_logical_replication_slot('lane_live', 'test_decoding')")
        cur.execute("BEGIN")
        for i, text in enumerate(HOSTILE):
            cur.execute(sql.SQL("INSERT INTO {}.keyed VALUES (%s, %s, %s, %s, %s, %s, %s, %s, now())").format(s),
                        (i, text, ["1.5", "NaN", "-Infinity", "1e-05"][i % 4], [1e300, float("nan"), -0.0][i % 3],
                         i % 2 == 0, "0101" if i % 2 else "", [text, None], f'{{"k": {i}}}'))
            cur.execute(sql.SQL("INSERT INTO {}.{} VALUES (%s, %s, %s)").format(s, sql.Identifier('K"2 \t tab')),
                        (text, i, text))
            cur.execute(sql.SQL("INSERT INTO {}.nokey VALUES (%s, %s)").format(s), (text, i))
            cur.execute(sql.SQL("INSERT INTO {}.nokey_full VALUES (%s, %s)").format(s), (text, None))
        cur.execute("COMMIT")
        cur.execute(sql.SQL("UPDATE {}.keyed SET \"Val'ue\" = 'upd''ated\\' WHERE id < 5").format(s))
        cur.execute(sql.SQL("UPDATE {}.keyed SET id = id + 100 WHERE id = 7").format(s))  # a key change: old-key
        cur.execute(sql.SQL("UPDATE {}.nokey SET w = w + 1").format(s))
        cur.execute(sql.SQL("DELETE FROM {}.nokey_full WHERE v <> 'plain'").format(s))
        cur.execute(sql.SQL("DELETE FROM {}.{} WHERE \"ß\" > 3").format(s, sql.Identifier('K"2 \t tab')))
        cur.execute("SELECT pg_logical_emit_message(true, 'p', 'transactional message')")
        cur.execute("SELECT pg_logical_emit_message(false, 'p', 'non-transactional message')")
        cur.execute(sql.SQL("ALTER TABLE {}.nokey ADD COLUMN extra text").format(s))  # an empty transaction
        cur.execute(sql.SQL("INSERT INTO {}.keyed (id) SELECT g FROM generate_series(1000, 1300) g").format(s))
        cur.execute(sql.SQL("TRUNCATE {}.nokey").format(s))


def test_live_copy_of_a_test_decoding_slot(pg_conn) -> None:  # type: ignore[no-untyped-def]
    import io

    from pg2kinesis_dagster.core.changes import parse_lsn

    _workload(pg_conn)
    options = TestDecodingDecoder.slot_options
    peek = "pg_logical_slot_peek_changes('lane_live', NULL, NULL, " + ", ".join(f"'{o}'" for o in options) + ")"
    out = io.BytesIO()
    with pg_conn.cursor() as cur:
        cur.copy_expert(f"COPY (SELECT lsn, xid, data FROM {peek}) TO STDOUT", out)
        cur.execute(f"SELECT lsn::text, xid::text::bigint, data FROM {peek}")
        rows = [(parse_lsn(lsn), xid, data) for lsn, xid, data in cur.fetchall()]
    buf = out.getvalue()
    assert [row for row, _ in iter_rows(buf)] == rows
    commits = [lsn for lsn, _, data in rows if data.startswith("COMMIT")]
    keys = tuple(((SCHEMA, table), key) for table, key in LIVE_TABLES.items())
    for fmt in ("CSV", "CSVPayload", "JSON"):
        for chunk in (7, 10_000):
            setup = Setup(keys=keys, fmt=fmt, chunk_changes=chunk)
            reference = compare(buf, setup, commits)
            assert reference.error is None and len(reference.records) > 300
            counts = _counts(buf, setup)
            assert counts.lane_records > 0.9 * len(reference.records)



def test_snapshot_watermarks_keep_the_lane_out_while_a_chunk_is_open() -> None:
    """Between a chunk's low and high watermarks the merger must see every change: the Python path reads them."""
    from pg2kinesis_dagster.core.snapshot import Session, encode_copy_rows, encode_high, encode_low

    def message(content: str) -> str:
        return f"message: transactional: 0 prefix: pg2kinesis.snapshot, sz: {len(content.encode())} content:{content}"

    low = encode_low("c1", "public", "t", ["id"], Session(1, 2))
    high = encode_high("c1", "public", "t", ["id"], [("id", "integer"), ("v", "text")],
                       encode_copy_rows([["1", "a"], ["2", "b\tc"], ["3", None]]), "2026-01-01 00:00:00+00")
    lines, lsn = [], 0x100

    def txn(xid: int, *rows: str) -> None:
        nonlocal lsn
        lines.append(format_row(format_lsn(lsn), xid, f"BEGIN {xid}"))
        for data in rows:
            lsn += 1
            lines.append(format_row(format_lsn(lsn), xid, data))
        lsn += 1
        lines.append(format_row(format_lsn(lsn), xid, f"COMMIT {xid}"))
        lsn += 1

    txn(10, "table public.t: INSERT: id[integer]:9 v[text]:'x'")
    lines.append(format_row(format_lsn(lsn), 0, message(low)))
    lsn += 1
    txn(11, "table public.t: UPDATE: id[integer]:2 v[text]:'new'", "table public.u: INSERT: id[integer]:5")
    txn(12, "table public.t: DELETE: id[integer]:3")
    lines.append(format_row(format_lsn(lsn), 0, message(high)))
    lsn += 1
    txn(13, "table public.t: INSERT: id[integer]:4 v[text]:'y'")
    buf = b"".join(lines)
    commits = [lsn for lsn, _, data in (row for row, _ in iter_rows(buf)) if data.startswith(("COMMIT", "message"))]
    for fmt in ("CSV", "JSON"):
        for chunk in (1, 100):
            setup = Setup(keys=(*KEYED, (("public", "u"), ("id",))), fmt=fmt, chunk_changes=chunk)
            out = compare(buf, setup, commits)
            assert out.error is None and len(out.records) == 6  # 4 changes, 1 snapshot row (1), the 2 dropped
            assert _counts(buf, setup).python_units >= 4


@pytest.mark.parametrize("chunk", [3, 100])
def test_a_run_of_rows_the_lane_leaves_goes_python_to_the_commit(chunk: int) -> None:
    """Rows of a table with excluded columns: after a few, the rest of the transaction goes the Python path whole."""
    rows = ["table public.t: INSERT: id[integer]:0"]
    rows += [f"table public.x: INSERT: id[integer]:{i} secret[text]:'s{i}'" for i in range(12)]
    rows += ["table public.t: INSERT: id[integer]:1"]
    buf = _buf(*rows) + _buf("table public.t: INSERT: id[integer]:2", xid=8).replace(b"0/", b"1/")
    keys = (*KEYED, (("public", "x"), ("id",)))
    for fmt in ("CSV", "JSON"):
        setup = Setup(keys=keys, fmt=fmt, exclude_columns="public.x:secret", chunk_changes=chunk)
        out = compare(buf, setup, [0x1000, (1 << 32) + 0x1000])
        assert len(out.records) == 15
        counts = _counts(buf, setup)
        assert counts.python_rows == 3 and counts.python_units == 1 and counts.lane_records == 2


@pytest.mark.parametrize("lookahead", [64, 300, 100_000])
def test_a_commit_beyond_the_lanes_look_ahead_is_found_by_the_driver(
    lookahead: int, monkeypatch: pytest.MonkeyPatch, tmp_path: object
) -> None:
    """A BEGIN whose COMMIT lies further than the lane looks (8 MiB; here a few hundred bytes): the driver finds
    it, in steps that release the mmapped spool's pages, and the lane goes on: same records, all in the lane."""
    import mmap
    from pathlib import Path

    module = lane_module()
    monkeypatch.setattr(module, "COMMIT_LOOKAHEAD", lookahead)
    monkeypatch.setattr("pg2kinesis_dagster.core.copy_text._FIND_STEP", 97)  # odd steps: needles across them
    buf = _buf(*[f"table public.t: INSERT: id[integer]:{i} v[text]:'{'x' * (i % 7)}'" for i in range(40)])
    buf += _buf(*[f"table public.t: INSERT: id[integer]:{100 + i}" for i in range(3)], xid=8)
    setup = Setup(keys=KEYED, fmt="CSVPayload", chunk_changes=6)
    counts = _counts(buf, setup)
    assert counts.lane_records == 43 and counts.python_rows == 0 and counts.python_units == 0
    expected = compare(buf, setup, [0x1000, 0x1000]).records
    path = Path(str(tmp_path)) / "rows.copy"
    path.write_bytes(b"junk" + buf)  # (_mm_chunks reads from byte 4)
    with path.open("rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        out = collect(lambda stats: _mm_chunks(mm, Setup(keys=KEYED, fmt="CSVPayload", chunk_changes=6), stats))
    assert out.error is None and out.records == expected
