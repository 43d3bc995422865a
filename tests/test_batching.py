"""Pure tests of request planning: Kinesis limits and the per-key order rule."""

from __future__ import annotations

import random
import time
from collections import defaultdict
from collections.abc import Hashable, Sequence

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pg2kinesis_dagster.core.batching import (
    MAX_PARTITION_KEY_CHARS,
    MAX_RECORD_BYTES,
    MAX_RECORDS_PER_REQUEST,
    MAX_REQUEST_BYTES,
    Record,
    check_record,
    next_request,
    plan_batch,
    remove_acknowledged,
)
from pg2kinesis_dagster.core.errors import RecordTooLargeError, SinkError


def rec(i: int, key: Hashable | None = None, size: int = 10, pk: str | None = None) -> Record:
    return Record(
        data=b"x" * size,
        partition_key=pk if pk is not None else f"pk{key if key is not None else i}",
        ordering_key=key if key is not None else i,
        record_id=f"r{i}",
    )


def assert_valid_request(pending: Sequence[Record], chosen: list[int]) -> None:
    assert chosen == sorted(set(chosen))
    assert 1 <= len(chosen) <= MAX_RECORDS_PER_REQUEST
    assert sum(pending[i].size for i in chosen) <= MAX_REQUEST_BYTES
    # No chosen record has an earlier pending record with the same key.
    first_index: dict[Hashable, int] = {}
    for i, r in enumerate(pending):
        first_index.setdefault(r.ordering_key, i)
    for i in chosen:
        assert first_index[pending[i].ordering_key] == i


# -- record checks -------------------------------------------------------------


def test_constants_match_kinesis_limits() -> None:
    assert MAX_RECORDS_PER_REQUEST == 500
    assert MAX_REQUEST_BYTES == 5 * 1024 * 1024
    assert MAX_RECORD_BYTES == 1024 * 1024
    assert MAX_PARTITION_KEY_CHARS == 256


def test_size_counts_data_and_utf8_partition_key() -> None:
    assert Record(b"abc", "k", 1, "r").size == 4
    assert Record(b"abc", "é", 1, "r").size == 5  # 2 UTF-8 bytes
    assert Record(b"", "€€", 1, "r").size == 6


def test_record_of_exactly_1_mib_including_key_passes() -> None:
    check_record(Record(b"x" * (MAX_RECORD_BYTES - 3), "abc", 1, "r1"))


def test_record_over_1_mib_counting_key_is_rejected_with_id_size_and_fix() -> None:
    record = Record(b"x" * MAX_RECORD_BYTES, "k", 1, "public.t:42@0/16B3748")
    with pytest.raises(RecordTooLargeError) as info:
        check_record(record)
    text = str(info.value)
    assert "public.t:42@0/16B3748" in text
    assert str(MAX_RECORD_BYTES + 1) in text
    assert str(MAX_RECORD_BYTES) in text
    assert "exclude" in text.lower() or "trim" in text.lower()
    assert isinstance(info.value, SinkError)


def test_non_ascii_key_bytes_count_towards_record_limit() -> None:
    with pytest.raises(RecordTooLargeError):
        check_record(Record(b"x" * (MAX_RECORD_BYTES - 1), "é", 1, "r"))


@pytest.mark.parametrize("key", ["", "k" * (MAX_PARTITION_KEY_CHARS + 1)])
def test_bad_partition_key_length_is_rejected(key: str) -> None:
    with pytest.raises(SinkError, match="partition key") as info:
        check_record(Record(b"x", key, 1, "r7"))
    assert not isinstance(info.value, RecordTooLargeError)
    assert "r7" in str(info.value)


def test_partition_key_limit_is_in_characters_not_bytes() -> None:
    check_record(Record(b"x", "k" * MAX_PARTITION_KEY_CHARS, 1, "r"))
    check_record(Record(b"x", "€" * MAX_PARTITION_KEY_CHARS, 1, "r"))  # 768 bytes, 256 chars


# -- request limits ---------------------------------------------------------------


def test_empty_pending_plans_nothing() -> None:
    assert next_request([]) == []
    assert list(plan_batch([])) == []


def test_at_most_500_records_per_request() -> None:
    records = [rec(i) for i in range(1201)]
    requests = list(plan_batch(records))
    assert [len(r) for r in requests] == [500, 500, 201]
    assert [i for r in requests for i in r] == list(range(1201))


def test_at_most_5_mib_per_request_including_keys() -> None:
    # Each record is exactly 1 MiB with its 3-character key: 5 fit, not 6.
    records = [Record(b"x" * (MAX_RECORD_BYTES - 3), f"k{i:02d}", i, f"r{i}") for i in range(12)]
    requests = list(plan_batch(records))
    assert [len(r) for r in requests] == [5, 5, 2]
    for r in requests:
        assert sum(records[i].size for i in r) <= MAX_REQUEST_BYTES


def test_bytes_limit_is_exact() -> None:
    # 4 records of 1 MiB + one that fills the request to exactly 5 MiB.
    big = [Record(b"x" * (MAX_RECORD_BYTES - 2), f"k{i}", i, f"r{i}") for i in range(4)]
    last = Record(b"x" * (MAX_RECORD_BYTES - 2), "k4", 4, "r4")
    assert next_request([*big, last]) == [0, 1, 2, 3, 4]
    over = Record(b"x" * (MAX_RECORD_BYTES - 1), "k4", 4, "r4")
    assert next_request([*big, over]) == [0, 1, 2, 3]


# -- per-key order rule --------------------------------------------------------


def test_one_record_per_ordering_key_per_request() -> None:
    a1, b1, a2, c1, a3 = rec(0, "a"), rec(1, "b"), rec(2, "a"), rec(3, "c"), rec(4, "a")
    pending = [a1, b1, a2, c1, a3]
    assert next_request(pending) == [0, 1, 3]
    remove_acknowledged(pending, [0, 1, 3])
    assert pending == [a2, a3]
    assert next_request(pending) == [0]
    remove_acknowledged(pending, [0])
    assert next_request(pending) == [0]


def test_unacknowledged_record_blocks_later_changes_of_its_key() -> None:
    a1, b1, a2, b2 = rec(0, "a"), rec(1, "b"), rec(2, "a"), rec(3, "b")
    pending = [a1, b1, a2, b2]
    chosen = next_request(pending)
    assert chosen == [0, 1]
    remove_acknowledged(pending, [1])  # a1 failed, b1 acknowledged
    assert pending == [a1, a2, b2]
    assert next_request(pending) == [0, 2]  # a1 again, b2; never a2


def test_ordering_key_is_independent_of_partition_key() -> None:
    # Same partition key (e.g. the table), distinct rows: all may go together.
    records = [rec(i, key=("t", i), pk="table-t") for i in range(10)]
    assert next_request(records) == list(range(10))
    # Distinct partition keys, same row: one at a time.
    records = [rec(i, key="row-1", pk=f"p{i}") for i in range(3)]
    assert next_request(records) == [0]


def test_record_that_does_not_fit_blocks_its_key_and_ends_the_request() -> None:
    half = MAX_REQUEST_BYTES // 2
    pending = [
        Record(b"x" * (MAX_RECORD_BYTES - 2), "k0", "a", "r0"),
        Record(b"x" * (MAX_RECORD_BYTES - 2), "k1", "b", "r1"),
        Record(b"x" * (MAX_RECORD_BYTES - 2), "k2", "c", "r2"),
        Record(b"x" * (MAX_RECORD_BYTES - 2), "k3", "d", "r3"),
        Record(b"x" * (half - 10), "k4", "e", "r4"),  # does not fit any more
        Record(b"x" * 10, "k5", "e", "r5"),  # same key as the one that did not fit
    ]
    assert next_request(pending) == [0, 1, 2, 3]


def test_plan_batch_is_lazy() -> None:
    gen = plan_batch([rec(i) for i in range(1000)])
    assert len(next(gen)) == 500


# -- speed ---------------------------------------------------------------------------


def test_planning_100k_mostly_distinct_keys_is_fast() -> None:
    records = [rec(i, key=i % 90_000) for i in range(100_000)]
    started = time.perf_counter()
    requests = list(plan_batch(records))
    elapsed = time.perf_counter() - started
    assert sorted(i for r in requests for i in r) == list(range(100_000))
    assert elapsed < 5.0, f"planning took {elapsed:.2f}s"


def test_next_request_stops_scanning_when_full() -> None:
    pending = [rec(i) for i in range(200_000)]
    started = time.perf_counter()
    for _ in range(200):
        assert len(next_request(pending)) == 500
    elapsed = time.perf_counter() - started
    assert elapsed < 2.0, f"200 plans over 200k pending took {elapsed:.2f}s"


# -- property: random failures never reorder a key and never lose a record ------


@st.composite
def batches(draw: st.DrawFn) -> list[Record]:
    n = draw(st.integers(min_value=0, max_value=400))
    keys = draw(st.integers(min_value=1, max_value=30))
    big = draw(st.booleans())
    records = []
    for i in range(n):
        key = draw(st.integers(min_value=0, max_value=keys - 1))
        # Occasionally large records so the byte limit matters too.
        size = draw(st.sampled_from([1, 100, 300_000, 1_048_000])) if big else draw(st.integers(0, 50))
        records.append(Record(b"x" * size, f"pk{key % 7}", key, f"r{i}"))
    return records


@given(
    records=batches(),
    failure_rate=st.floats(min_value=0.0, max_value=0.9),
    rnd=st.randoms(use_true_random=False),
)
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_random_entry_failures_keep_per_key_order_and_ack_everything(
    records: list[Record], failure_rate: float, rnd: random.Random
) -> None:
    pending = list(records)
    acknowledged: list[Record] = []
    rounds = 0
    while pending:
        rounds += 1
        assert rounds < 100_000, "no progress"
        chosen = next_request(pending)
        assert_valid_request(pending, chosen)
        acked = [i for i in chosen if rnd.random() >= failure_rate]
        acknowledged.extend(pending[i] for i in acked)
        remove_acknowledged(pending, acked)

    assert len(acknowledged) == len(records)
    assert {id(r) for r in acknowledged} == {id(r) for r in records}
    expected: dict[Hashable, list[str]] = defaultdict(list)
    got: dict[Hashable, list[str]] = defaultdict(list)
    for r in records:
        expected[r.ordering_key].append(r.record_id)
    for r in acknowledged:
        got[r.ordering_key].append(r.record_id)
    assert got == expected


def test_split_at_barriers_isolates_each_barrier_in_order() -> None:
    from pg2kinesis_dagster.core.batching import split_at_barriers

    def rec(i: int, barrier: bool = False) -> Record:
        return Record(data=b"x", partition_key="k", ordering_key=i, record_id=str(i), barrier=barrier)

    records = [rec(0), rec(1), rec(2, True), rec(3), rec(4, True), rec(5, True)]
    segments = split_at_barriers(records)
    assert [[r.record_id for r in s] for s in segments] == [["0", "1"], ["2"], ["3"], ["4"], ["5"]]
    assert split_at_barriers([rec(0), rec(1)]) == [[rec(0), rec(1)]]
    assert split_at_barriers([]) == []
