"""The pure snapshot core: watermark messages as each plugin prints them, and the key-drop merge."""

from __future__ import annotations

import json
import struct

from hypothesis import given
from hypothesis import strategies as st

from pg2kinesis_dagster.core.changes import Change, Column, Operation, Transaction, format_lsn
from pg2kinesis_dagster.core.decoders import decoder_for
from pg2kinesis_dagster.core.snapshot import (
    SNAPSHOT_PREFIX,
    Session,
    SnapshotMerger,
    decode_header,
    decode_rows,
    encode_copy_rows,
    encode_high,
    encode_low,
    message_transaction,
    snapshot_content,
)

values = st.one_of(st.none(),
                   st.text(alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00")))


def _plugin_row(plugin: str, content: str, transactional: bool = False) -> str | bytes:
    """A slot row for a logical message, byte for byte as each plugin prints it (checked against PostgreSQL 15
    in tests/test_snapshot.py, which runs the same decoders on the real server)."""
    flag = int(transactional)
    if plugin == "test_decoding":
        return (f"message: transactional: {flag} prefix: {SNAPSHOT_PREFIX}, sz: {len(content.encode())} "
                f"content:{content}")
    if plugin == "wal2json":
        return json.dumps({"action": "M", "xid": None, "timestamp": None, "transactional": transactional,
                           "prefix": SNAPSHOT_PREFIX, "content": content}, separators=(",", ":"),
                          ensure_ascii=False)
    raw = content.encode()
    return (b"M" + bytes([flag]) + struct.pack("!Q", 0x1924BC0) + SNAPSHOT_PREFIX.encode() + b"\x00"
            + struct.pack("!I", len(raw)) + raw)


@given(rows=st.lists(st.lists(values, min_size=2, max_size=2), max_size=5), chunk=st.text(min_size=1, max_size=20))
def test_watermarks_survive_every_plugin_and_decoder(rows: list[list[str | None]], chunk: str) -> None:
    columns = [("id", "integer"), ("v", "text")]
    high = encode_high(chunk, "s", "t", ["id"], columns, encode_copy_rows(rows), "2026-01-01 00:00:00+00")
    low = encode_low(chunk, "s", "t", ["id"], Session(42, 1_700_000_000_000_000))
    for plugin in ("test_decoding", "wal2json", "pgoutput"):
        for content in (low, high):
            assert snapshot_content(plugin, _plugin_row(plugin, content)) == content
            assert snapshot_content(plugin, _plugin_row(plugin, content, transactional=True)) is None
        decoder = decoder_for(plugin, **({"type_name": lambda oid, typmod: "integer"} if plugin != "test_decoding"
                                         else {}))
        (txn,) = decoder.decode([(0x1924BC0, 0, _plugin_row(plugin, high))])
        assert txn.message == high and txn.commit_lsn == 0x1924BC0 and not txn.changes
    mark = decode_header(high)
    assert (mark.kind, mark.chunk, mark.key, mark.columns) == ("high", chunk, ("id",), tuple(columns))
    assert decode_rows(high) == rows
    assert decode_header(low).session == Session(42, 1_700_000_000_000_000)


def _change(op: Operation, after: int | None, before: int | None, lsn: int) -> Transaction:
    """A one-change transaction of table s.t: ``after`` the new row's key, ``before`` the old key."""
    new_row = (Column("id", "integer", str(after)), Column("v", "text", "x")) if after is not None else None
    old_key = (Column("id", "integer", str(before)),) if before is not None else None
    change = Change(7, lsn, 0, "s", "t", op, after=new_row, before=old_key)
    txn = Transaction(7, lsn, lsn, None, [change])
    txn.commit(lsn, None)
    return txn


changes = st.lists(st.tuples(st.sampled_from(["insert", "update", "delete", "move", "truncate", "other"]),
                             st.integers(0, 20), st.integers(0, 20)), max_size=15)


@given(chunk_keys=st.sets(st.integers(0, 20), max_size=10), between=changes, after=changes)
def test_merge_drops_exactly_the_keys_changed_between_the_watermarks(
        chunk_keys: set[int], between: list[tuple[str, int, int]], after: list[tuple[str, int, int]]) -> None:
    columns = [("id", "integer"), ("v", "text")]
    rows = [[str(k), f"row {k}"] for k in sorted(chunk_keys)]
    lsn = iter(range(100, 10_000, 10))

    def txns(events: list[tuple[str, int, int]]) -> tuple[list[Transaction], set[int], bool]:
        out, touched, truncated = [], set(), False
        for kind, a, b in events:
            if kind == "insert":
                out.append(_change(Operation.INSERT, a, None, next(lsn)))
                touched.add(a)
            elif kind == "update":
                out.append(_change(Operation.UPDATE, a, None, next(lsn)))
                touched.add(a)
            elif kind == "delete":
                out.append(_change(Operation.DELETE, None, a, next(lsn)))
                touched.add(a)
            elif kind == "move":
                out.append(_change(Operation.UPDATE, b, a, next(lsn)))
                touched |= {a, b}
            elif kind == "truncate":
                txn = _change(Operation.TRUNCATE, None, None, next(lsn))
                out.append(txn)
                truncated = True
            else:  # another table
                txn = _change(Operation.UPDATE, a, None, next(lsn))
                txn.changes[0].table = "other"
                out.append(txn)
        return out, touched, truncated

    low = message_transaction(next(lsn), encode_low("c", "s", "t", ["id"], Session(1, 2)), 10)
    streamed, touched, truncated = txns(between)
    high_lsn = next(lsn)
    high = message_transaction(high_lsn, encode_high("c", "s", "t", ["id"], columns, encode_copy_rows(rows), "now"), 10)
    later, _, _ = txns(after)
    merger = SnapshotMerger()
    stream = [low, *streamed, high, *later]
    out = []
    for txn in merger.follow(stream):
        out.append((txn, merger.open))
    # Everything but the low watermark comes through, in order; no advance point while the chunk is open.
    assert [t for t, _ in out] == [*streamed, out[len(streamed)][0], *later]
    assert [is_open for _, is_open in out] == [True] * len(streamed) + [False] * (len(later) + 1)
    snapshot = out[len(streamed)][0]
    assert snapshot.commit_lsn == high_lsn and snapshot.commit_time == "now"
    expected = [] if truncated else [k for k in sorted(chunk_keys) if k not in touched]
    assert [int(c.after[0].value) for c in snapshot.changes] == expected
    assert all(c.op is Operation.SNAPSHOT and c.commit_lsn == high_lsn and c.lsn == high_lsn for c in snapshot.changes)
    # Ids are the high watermark's LSN and the row's index in the chunk.
    indexes = {str(k): i for i, k in enumerate(sorted(chunk_keys))}
    assert [c.id for c in snapshot.changes] == [f"{format_lsn(high_lsn)}:{indexes[c.after[0].value]}"
                                                for c in snapshot.changes]


def test_orphans_publish_nothing_and_never_hold_the_merge_open() -> None:
    columns = [("id", "integer")]
    high = message_transaction(200, encode_high("gone", "s", "t", ["id"], columns, "1\n", "now"), 10)
    merger = SnapshotMerger()
    (out,) = merger.follow([high])
    assert out.changes == [] and not merger.open and merger.stats.orphan_high == 1
    # An abandoned chunk's low watermark is ignored: its high watermark, if any, is an orphan.
    low = message_transaction(100, encode_low("dead", "s", "t", ["id"], Session(1, 2)), 10)
    merger = SnapshotMerger(abandoned=["dead"])
    assert list(merger.follow([low])) == [] and not merger.open
    high = message_transaction(200, encode_high("dead", "s", "t", ["id"], columns, "1\n", "now"), 10)
    (out,) = merger.follow([high])
    assert out.changes == []
