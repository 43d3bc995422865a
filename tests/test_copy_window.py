"""core.copy_window's driver: the same record chunks as the pipeline's loop over decoded rows, from COPY text.

Its Python path (``native=False``) against the reference loop (tests/copy_lane_support.py); the compiled lane's
own comparisons are in tests/test_native_lane.py.
"""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pg2kinesis_dagster.core.copy_text import format_row
from pg2kinesis_dagster.core.copy_window import record_chunks_from_copy
from pg2kinesis_dagster.core.decoders import Wal2JsonDecoder
from pg2kinesis_dagster.core.formats import CSVPayloadFormatter
from pg2kinesis_dagster.core.records import BatchStats, RecordBuilder
from pg2kinesis_dagster.core.schema_keys import SchemaFollowingKeys
from pg2kinesis_dagster.core.snapshot import SnapshotMerger
from tests.copy_lane_support import Setup, StaticCatalog, compare, setups, windows

_SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))


@_SETTINGS
@given(st.data())
def test_python_path_is_the_reference(data: st.DataObject) -> None:
    window = data.draw(windows())
    compare(window.buf, data.draw(setups(window)), window.commits, lane=False)


def test_a_transaction_larger_than_a_chunk_is_split_and_stamped() -> None:
    lines = [format_row("0/10", 7, "BEGIN 7")]
    lines += [format_row(f"0/{0x20 + i:X}", 7, f"table public.t: INSERT: id[integer]:{i}") for i in range(25)]
    lines.append(format_row("1/0", 7, "COMMIT 7 (at 2026-01-01 00:00:00+00)"))
    buf = b"".join(lines)
    setup = Setup(keys=((("public", "t"), ("id",)),), chunk_changes=4)
    out = compare(buf, setup, [1 << 32], lane=False)
    assert len(out.records) == 25 and out.records[-1][3] == "1/0:24"
    assert [count for count, _ in out.advances] == [25]


def test_wal2json_goes_the_python_path() -> None:
    rows = [
        (0x10, 5, '{"action":"B","xid":5}'),
        (0x11, 5, '{"action":"I","xid":5,"schema":"public","table":"t","columns":[{"name":"id","type":"integer",'
                  '"typeoid":23,"value":1,"position":1}]}'),
        (0x12, 5, '{"action":"C","xid":5}'),
    ]
    buf = b"".join(format_row(f"0/{lsn:X}", xid, data) for lsn, xid, data in rows)
    schema_keys = SchemaFollowingKeys(StaticCatalog({("public", "t"): ("id",)}), max_age_seconds=None)
    builder = RecordBuilder(CSVPayloadFormatter(), schema_keys.key_columns)
    stats = BatchStats()
    [chunk] = record_chunks_from_copy(buf, 0, len(buf), decoder=Wal2JsonDecoder(), builder=builder,
                                      schema_keys=schema_keys, merger=SnapshotMerger(), chunk_changes=10,
                                      chunk_bytes=1 << 20, stats=stats)
    assert [r.data for r in chunk.records] == [b'0,CDC,{"xid": "5", "table": "public.t", "operation": "INSERT", '
                                               b'"pkey": "1"}']
    assert chunk.advance_to == 0x12 and stats.transactions == 1
