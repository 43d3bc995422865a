"""The pure window model: what a rerun still sends, budgets, and handles that survive JSON."""

from __future__ import annotations

import json
from collections import Counter

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pg2kinesis_dagster.core.batching import Record
from pg2kinesis_dagster.core.changes import format_lsn
from pg2kinesis_dagster.core.errors import ConfigError
from pg2kinesis_dagster.core.records import BatchStats
from pg2kinesis_dagster.core.window import (
    MAX_TABLES_IN_HANDLE,
    FormattedWindow,
    PeekedWindow,
    PublishedWindow,
    PutTotals,
    RecordChunk,
    RecordChunkInfo,
    TransactionProgress,
    WindowBudget,
)


@st.composite
def chunks(draw: st.DrawFn) -> RecordChunk:
    """Records of consecutive transactions (commit LSNs increasing), each with increasing change indexes."""
    chunk = RecordChunk()
    lsn = draw(st.integers(1, 1000))
    for _ in range(draw(st.integers(0, 6))):
        lsn += draw(st.integers(1, 50))
        index = draw(st.integers(0, 5))
        for _ in range(draw(st.integers(1, 5))):
            index += draw(st.integers(1, 3))  # filtered changes leave gaps
            chunk.add(Record(b"x", "k", ("t", index), f"{format_lsn(lsn)}:{index}"), lsn)
    return chunk


@given(chunk=chunks(), data=st.data())
def test_after_drops_exactly_what_the_slot_or_the_progress_covers(chunk: RecordChunk, data: st.DataObject) -> None:
    lsns = sorted(set(chunk.commit_lsns)) or [10]
    confirmed = data.draw(st.one_of(st.none(), st.sampled_from([0, *lsns, lsns[-1] + 1])))
    progress = data.draw(st.one_of(st.none(), st.builds(
        TransactionProgress, st.sampled_from(lsns), st.integers(-1, 30))))

    def still_to_send(record: Record, lsn: int) -> bool:
        if confirmed is not None and lsn <= confirmed:
            return False
        index = int(record.record_id.rpartition(":")[2])
        return not (progress is not None and lsn == progress.commit_lsn and index <= progress.acked_index)

    expected = [r for r, lsn in zip(chunk.records, chunk.commit_lsns, strict=True) if still_to_send(r, lsn)]
    assert chunk.after(confirmed, progress) == expected


def test_budget_rejects_non_positive_limits_and_caps_the_chunk() -> None:
    with pytest.raises(ConfigError, match="max_changes must be positive"):
        WindowBudget(max_changes=0)
    assert WindowBudget(max_changes=100, chunk_changes=5000).chunk_changes == 100


def test_handles_round_trip_through_json_and_stay_small_with_many_tables() -> None:
    stats = BatchStats(transactions=3, changes=9000, published=9000, record_bytes=123456)
    stats.by_table_op = Counter({f"public.t{i} INSERT": i + 1 for i in range(5000)})
    stats.no_key_tables = {f"public.t{i}" for i in range(5000)}
    window = PeekedWindow("slot", "w1", 1, 99, 90, 90, True, 3, 9006, 500_000, 2, 0.5)
    formatted = FormattedWindow(window, (RecordChunkInfo(0, 9000, 123456, 10, 90, 90),), stats, 1.0, 1)
    published = PublishedWindow(formatted, PutTotals(kinesis_records=20, changes=9000, checkpoints=1), 90)
    text = json.dumps(published.to_dict())
    assert len(text) < 8000, len(text)  # a handle in Dagster's event log does not grow with the tables
    back = PublishedWindow.from_dict(json.loads(text))
    assert back.window == window and back.put == published.put and back.checkpoint_lsn == 90
    assert back.formatted.stats.changes == 9000 and back.formatted.chunks == ()
    assert len(back.formatted.stats.by_table_op) == MAX_TABLES_IN_HANDLE + 1  # the largest, plus the rest
    assert sum(back.formatted.stats.by_table_op.values()) == sum(stats.by_table_op.values())
    with_chunks = FormattedWindow.from_dict(json.loads(json.dumps(formatted.to_dict(with_chunks=True))))
    assert with_chunks.chunks == formatted.chunks
