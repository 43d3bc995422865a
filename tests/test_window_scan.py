"""The COPY window writer: the compiled one (core/_window_scan.pyx) against the reference, on any COPY stream."""

from __future__ import annotations

import io
import itertools
import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pg2kinesis_dagster.core.changes import format_lsn
from pg2kinesis_dagster.core.copy_text import format_row, iter_rows
from pg2kinesis_dagster.core.window_scan import MESSAGE_HEADS, PyCopyWindowWriter, WindowFull
from pg2kinesis_dagster.native import load

native = load("pg2kinesis_dagster.core._window_scan")
requires_native = pytest.mark.skipif(
    native is None and os.environ.get("PG2K_REQUIRE_NATIVE") != "1",
    reason="native accelerators not built (PG2K_REQUIRE_NATIVE=1 makes this a failure)",
)

text = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=30)
TD_DATA = st.one_of(
    st.builds(lambda n: f"BEGIN {n}", st.integers(1, 10**6)),
    st.builds(lambda n, t: f"COMMIT {n} (at {t})", st.integers(1, 10**6), text),
    st.just("COMMIT"),
    st.builds(lambda v: f"table public.t: INSERT: a[text]:'{v}'", text),
    st.builds(lambda v: f"{MESSAGE_HEADS['test_decoding'].decode()}pg2kinesis.snapshot, sz: 3 content:{v}", text),
    st.builds(lambda v: f"message: transactional: 1 prefix: x, sz: 1 content:{v}", text),
    text,
)
W2J_DATA = st.one_of(
    st.builds(lambda n: f'{{"action":"B","xid":{n}}}', st.integers(1, 10**6)),
    st.builds(lambda n: f'{{"action":"C","xid":{n},"timestamp":"x"}}', st.integers(1, 10**6)),
    st.builds(lambda v: f'{{"action":"I","xid":1,"table":"{v}"}}', text),
    st.builds(lambda v: f'{{"action":"M","transactional":false,"prefix":"p","content":"{v}"}}', text),
    st.builds(lambda v: f'{v}"action":"C"', text),
)


def _stream(rows: list[str]) -> bytes:
    return b"".join(format_row(format_lsn(1000 + i * 37), 700 + i, data) for i, data in enumerate(rows))


def _splits(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    return [data[a:b] for a, b in itertools.pairwise(points)]


def _run(cls: type, plugin: str, pieces: list[bytes], **limits: int | None) -> tuple[dict[str, object], bytes]:
    out = io.BytesIO()
    calls: list[tuple[int, str]] = []

    def on_message(lsn: int, data: str) -> bool:
        calls.append((lsn, data))
        # A stand-in for the snapshot merger: "low" opens, "high" closes and is a boundary.
        if "low" in data:
            writer.holding = True
            return False
        if "high" in data:
            writer.holding = False
            return True
        return False

    writer = cls(out, plugin=plugin, on_message=on_message, **limits)
    stopped_at = None
    for i, piece in enumerate(pieces):
        try:
            writer.write(piece)
        except WindowFull:
            stopped_at = i
            break
    writer.finish()
    names = ("rows", "data_bytes", "transactions", "offset", "last_commit", "committed_rows", "committed_bytes",
             "committed_transactions", "committed_offset", "limited", "holding")
    state = {name: getattr(writer, name) for name in names}
    state["stopped_at"] = stopped_at
    state["calls"] = calls
    return state, out.getvalue()


@requires_native
@settings(max_examples=300, deadline=None)
@given(
    plugin=st.sampled_from(["test_decoding", "wal2json"]),
    data=st.data(),
    cuts=st.lists(st.integers(0, 10**6), max_size=12),
    max_rows=st.none() | st.integers(1, 30),
    max_bytes=st.none() | st.integers(1, 3000),
)
def test_native_writer_equals_reference(plugin: str, data: st.DataObject, cuts: list[int], max_rows: int | None,
                                        max_bytes: int | None) -> None:
    rows = data.draw(st.lists(TD_DATA if plugin == "test_decoding" else W2J_DATA, max_size=40))
    stream = _stream(rows)
    pieces = _splits(stream, cuts)
    expected = _run(PyCopyWindowWriter, plugin, pieces, max_rows=max_rows, max_bytes=max_bytes)
    got = _run(native.CopyWindowWriter, plugin, pieces, max_rows=max_rows, max_bytes=max_bytes)
    assert got == expected


@given(rows=st.lists(TD_DATA, max_size=30))
@settings(max_examples=100, deadline=None)
def test_reference_counts_and_cuts_after_the_last_boundary(rows: list[str]) -> None:
    stream = _stream(rows)
    state, written = _run(PyCopyWindowWriter, "test_decoding", [stream])
    parsed = [row for row, _ in iter_rows(stream)]
    assert state["rows"] == len(parsed)
    assert state["data_bytes"] == sum(len(r[2].encode()) for r in parsed)
    assert state["transactions"] == sum(r[2].startswith("COMMIT") for r in parsed)
    # The file ends right after the last boundary row.
    kept = [row for row, _ in iter_rows(written)]
    assert kept == parsed[: state["committed_rows"]]
    if kept and state["last_commit"] is not None:
        assert kept[-1][0] == state["last_commit"]


def test_budget_stops_at_the_first_boundary_past_it() -> None:
    rows = ["BEGIN 1", "table public.t: INSERT: a[text]:'x'", "COMMIT 1"] * 5
    for cls in filter(None, [PyCopyWindowWriter, native and native.CopyWindowWriter]):
        state, written = _run(cls, "test_decoding", [_stream(rows)], max_rows=4)
        assert state["limited"] and state["committed_rows"] == 6 and state["committed_transactions"] == 2
        assert len(list(iter_rows(written))) == 6
