"""The compiled KPL aggregation (kinesis/_kpl.pyx) against its pure-Python reference.

For every input, ``_kpl.aggregate`` must give what ``aggregation.aggregate_python`` gives, field by field and
in the same order (the same Record objects inside), or raise the same error; ``_kpl.first_invalid`` must find
the first record ``check_record`` rejects. Hypothesis generates the inputs; aws-kinesis-agg reads the
aggregates back.

The module is imported directly (not through ``native.load``), so these tests compare both paths even under
``PG2K_NATIVE=0``. Without the module they skip, unless ``PG2K_REQUIRE_NATIVE=1`` (CI), where they fail.
"""

from __future__ import annotations

import hashlib
import importlib
import os
from collections.abc import Callable, Hashable, Iterator
from types import ModuleType
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pg2kinesis_dagster.core.batching import (
    MAX_RECORD_BYTES,
    OrderingKeys,
    Record,
    SharedKey,
    check_record,
    new_record,
)
from pg2kinesis_dagster.core.errors import RecordTooLargeError, SinkError
from pg2kinesis_dagster.kinesis import aggregation
from pg2kinesis_dagster.kinesis.aggregation import AggregatedRecord, Shard, ShardMap, aggregate_python
from pg2kinesis_dagster.kinesis.sink import KinesisSink
from tests.test_aggregation import deaggregate

H = 2**128
MODULE = "pg2kinesis_dagster.kinesis._kpl"


@pytest.fixture(scope="module")
def kpl() -> ModuleType:
    try:
        return importlib.import_module(MODULE)
    except ImportError as exc:
        if os.environ.get("PG2K_REQUIRE_NATIVE") == "1":
            pytest.fail(f"{MODULE} is not built ({exc}) and PG2K_REQUIRE_NATIVE=1 requires it")
        pytest.skip(f"{MODULE} is not built ({exc}); `make install` builds it")


# -- comparing results -------------------------------------------------------------------------------------


def fields(a: AggregatedRecord) -> tuple[Any, ...]:
    """Everything observable of an aggregate: values, the frozenset's iteration order, the user records' identity."""
    key = a.ordering_key
    return (
        type(a), a.data, a.partition_key, type(key), key, list(key) if isinstance(key, frozenset) else None,
        a.record_id, a.explicit_hash_key, a.barrier, a.size, [id(u) for u in a.user_records], a.shard_id,
        a.aggregated,
    )


def outcome(f: Callable[[], list[AggregatedRecord]]) -> tuple[Any, ...]:
    try:
        return ("ok", [fields(a) for a in f()])
    except Exception as exc:  # the same error, whatever it is
        return ("raised", type(exc), str(exc))


def assert_same(kpl: ModuleType, records: list[Record], m: ShardMap, max_bytes: int,
                max_record_bytes: int | None) -> list[AggregatedRecord] | None:
    """Native and reference agree; returns the aggregates (None when both raised)."""
    want = outcome(lambda: aggregate_python(records, m, max_bytes, max_record_bytes))
    got = outcome(lambda: kpl.aggregate(records, m, max_bytes, max_record_bytes))
    assert got == want
    return None if want[0] == "raised" else kpl.aggregate(records, m, max_bytes, max_record_bytes)


def assert_reads_back(aggs: list[AggregatedRecord]) -> None:
    """aws-kinesis-agg deaggregates each aggregate into its user records' keys and data."""
    for a in aggs:
        if a.aggregated:
            assert deaggregate(a.data, a.partition_key) == [(u.partition_key, u.data) for u in a.user_records]
        else:
            assert len(a.user_records) == 1 and a.data == a.user_records[0].data


# -- generated inputs --------------------------------------------------------------------------------------


@st.composite
def shard_maps(draw: st.DrawFn) -> ShardMap:
    kind = draw(st.sampled_from(["one", "equal", "uneven", "tiny", "same-ids"]))
    if kind == "one":
        return ShardMap([Shard("shardId-000000000000", 0, H - 1)])
    if kind == "equal":
        n = draw(st.integers(2, 16))
        bounds = [i * H // n for i in range(n)] + [H]
    elif kind == "tiny":  # shards of one hash key next to huge ones
        cut = draw(st.integers(1, H - 3))
        bounds = [0, cut, cut + 1, H]
    else:
        bounds = [0, *sorted(set(draw(st.lists(st.integers(1, H - 1), min_size=1, max_size=6)))), H]
    # ListShards' order is not the map's: shards come in shuffled.
    shards = [Shard(f"shardId-{i:012d}", bounds[i], bounds[i + 1] - 1) for i in range(len(bounds) - 1)]
    if kind == "same-ids":  # not a real listing, but ShardMap takes it: aggregates are kept per shard id
        shards = [Shard(f"s{i % 2}", s.starting_hash_key, s.ending_hash_key) for i, s in enumerate(shards)]
    return ShardMap(draw(st.permutations(shards)))


ASCII_KEYS = [f"public.t:{i}" for i in range(12)]
OTHER_KEYS = ["é", "public.tëst:ü", "日本語:1", "😀" * 3, "k" * 256, "é" * 256, "x"]


def row(i: int) -> tuple[Any, ...]:
    return ("row", "public", "t", (i,))


def ordering_keys() -> st.SearchStrategy[Hashable]:
    rows = st.integers(0, 8)
    table = ("table", "public", "k")
    image = st.builds(lambda i: ("image", "public", "k", (("a", i), ("b", "x"))), st.integers(0, 5))
    return st.one_of(
        rows.map(row),  # rows shared by several records
        st.sampled_from(["a", "b", 1, 2, ("x",)]),  # other hashables
        st.builds(lambda old, new: OrderingKeys((row(old), row(new))), rows, rows),  # a key change
        st.builds(lambda imgs: OrderingKeys((SharedKey(table), *imgs)), st.lists(image, min_size=1, max_size=2)),
        st.just(table),  # a keyless change ordered against the whole table
        st.builds(lambda i: OrderingKeys((SharedKey(row(i)), row(i + 1))), rows),
    )


def hash_keys() -> st.SearchStrategy[str | None]:
    return st.one_of(
        st.none(), st.none(), st.none(),
        st.integers(0, H - 1).map(str),
        st.sampled_from(["0", str(H - 1), str(H // 2), str(H // 2 - 1)]),
    )


@st.composite
def scenarios(draw: st.DrawFn) -> tuple[list[Record], ShardMap, int, int | None]:
    m = draw(shard_maps())
    max_bytes = draw(st.one_of(st.integers(1, 80), st.integers(80, 2000), st.just(MAX_RECORD_BYTES)))
    max_record_bytes = draw(st.one_of(st.none(), st.integers(max(1, max_bytes - 50), max_bytes + 3000)))
    limit = max_bytes if max_record_bytes is None else max(max_bytes, max_record_bytes)
    keys = draw(st.lists(st.sampled_from(ASCII_KEYS + OTHER_KEYS) | st.text(min_size=1, max_size=20),
                         min_size=1, max_size=6, unique=True))
    with_hash_keys = draw(st.booleans())
    records = []
    for i in range(draw(st.integers(0, 60))):
        pk = draw(st.sampled_from(keys))
        key_bytes = len(pk.encode())
        # Mostly small, sometimes near or over what an aggregate or the stream takes.
        size = draw(st.one_of(
            st.integers(0, 40), st.integers(0, 40),
            st.integers(max(0, limit - key_bytes - 40), max(0, limit - key_bytes + 2)),
            st.integers(max(0, max_bytes - key_bytes - 60), max(0, max_bytes - key_bytes)),
        ))
        data = bytes([i % 256]) * size
        ehk = draw(hash_keys()) if with_hash_keys else None
        records.append(new_record(data, pk, draw(ordering_keys()), f"public.t:{i}@0/{i:X}",
                                  explicit_hash_key=ehk))
    return records, m, max_bytes, max_record_bytes


SETTINGS = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@SETTINGS
@given(scenarios())
def test_native_aggregate_is_the_reference(kpl: ModuleType,
                                          scenario: tuple[list[Record], ShardMap, int, int | None]) -> None:
    records, m, max_bytes, max_record_bytes = scenario
    aggs = assert_same(kpl, records, m, max_bytes, max_record_bytes)
    if aggs is not None:
        assert_reads_back(aggs)
        assert sorted(id(u) for a in aggs for u in a.user_records) == sorted(map(id, records))


@st.composite
def crossing_rows(draw: st.DrawFn) -> tuple[list[Record], ShardMap, int]:
    """Partition by transaction, order by row: rows' changes cross shards all the time."""
    m = draw(shard_maps())
    records = []
    for i in range(draw(st.integers(1, 200))):
        xid = draw(st.integers(0, 30))
        records.append(new_record(b"d" * draw(st.integers(0, 30)), f"xid-{xid}", row(draw(st.integers(0, 12))),
                                  f"c{i}"))
    return records, m, draw(st.sampled_from([60, 200, 1000, MAX_RECORD_BYTES]))


@SETTINGS
@given(crossing_rows())
def test_rows_crossing_shards_give_the_reference_ordering_keys(
        kpl: ModuleType, scenario: tuple[list[Record], ShardMap, int]) -> None:
    records, m, max_bytes = scenario
    aggs = assert_same(kpl, records, m, max_bytes, None)
    assert aggs is not None
    assert_reads_back(aggs)


# -- chosen inputs -----------------------------------------------------------------------------------------


def eight_shards() -> ShardMap:
    return ShardMap(Shard(f"shardId-{i:012d}", i * H // 8, (i + 1) * H // 8 - 1) for i in range(8))


def bench_records(n: int) -> list[Record]:
    """The benchmark's shape: one insert per row, partition key per row."""
    out = []
    for i in range(n):
        pkey = str(i).encode()
        data = b'0,CDC,{"xid": "1234", "table": "public.bench", "operation": "INSERT", "pkey": "' + pkey + b'"}'
        out.append(new_record(data, f"public.bench:{i}", ("row", "public", "bench", (i,)), f"c{i}"))
    return out


def test_a_full_chunk_is_the_reference(kpl: ModuleType) -> None:
    records = bench_records(10_000)
    for max_bytes in (MAX_RECORD_BYTES, 100_000, 500):
        aggs = assert_same(kpl, records, eight_shards(), max_bytes, None)
        assert aggs is not None
        assert len(aggs) >= 8
    assert_reads_back(kpl.aggregate(records, eight_shards(), 100_000, None))


def test_aggregates_of_many_records_use_long_varints(kpl: ModuleType) -> None:
    # Over 128 (two-byte) and 16,384 (three-byte) partition keys in one aggregate, and data over 16 KiB.
    one = ShardMap([Shard("s", 0, H - 1)])
    records = [new_record(b"v", f"k{i}", i, f"c{i}") for i in range(20_000)]
    records += [new_record(b"x" * 20_000, "k1", "big", "big"), new_record(b"y" * 200, "k20000", 1, "small")]
    aggs = assert_same(kpl, records, one, 10 * MAX_RECORD_BYTES, None)
    assert aggs is not None and len(aggs) == 1
    assert_reads_back(aggs)


def test_record_over_the_limit_raises_the_reference_error(kpl: ModuleType) -> None:
    records = [*bench_records(5), new_record(b"x" * 200, "k", 1, "public.blobs:1@0/AB"), *bench_records(2)]
    for max_record_bytes in (None, 150, 300):
        assert_same(kpl, records, eight_shards(), 150, max_record_bytes)
    with pytest.raises(RecordTooLargeError, match=r"public\.blobs:1@0/AB"):
        kpl.aggregate(records, eight_shards(), 150, None)


def test_record_too_large_for_an_aggregate_goes_plain(kpl: ModuleType) -> None:
    one = ShardMap([Shard("s", 0, H - 1)])
    records = [new_record(b"a", "k", 1, "c0"), new_record(b"b" * 95, "k", 2, "c1"), new_record(b"c", "k", 3, "c2")]
    aggs = assert_same(kpl, records, one, 100, None)
    assert aggs is not None and [a.aggregated for a in aggs] == [True, False, True]


def surrogate_key(record: Record) -> Record:
    """``record`` with a partition key UTF-8 cannot encode (Record itself would not compute its size)."""
    object.__setattr__(record, "partition_key", "bad\ud800")
    return record


def test_unencodable_partition_key_raises_the_reference_error(kpl: ModuleType) -> None:
    records = [new_record(b"a", "ok", 1, "c0"), surrogate_key(new_record(b"b", "k", 2, "c1"))]
    want = outcome(lambda: aggregate_python(records, eight_shards()))
    assert want[0] == "raised" and want[1] is UnicodeEncodeError
    assert outcome(lambda: kpl.aggregate(records, eight_shards(), MAX_RECORD_BYTES, None)) == want
    with_hash_key = [surrogate_key(new_record(b"b", "k", 2, "c1", explicit_hash_key="5"))]
    assert_same(kpl, with_hash_key, eight_shards(), MAX_RECORD_BYTES, None)


@pytest.mark.parametrize("hash_key", ["abc", "-1", str(H), " 12 ", "1_000", "\u0661\u0662", "\u0663", ""])
def test_odd_explicit_hash_keys_behave_as_in_the_reference(kpl: ModuleType, hash_key: str) -> None:
    # Invalid ones raise from int() or the range check; Unicode digits route but cannot go into an aggregate.
    records = [new_record(b"a", "k", 1, "c0"), new_record(b"b", "k", 2, "c1", explicit_hash_key=hash_key),
               new_record(b"c", "k", 3, "c2", explicit_hash_key="3")]
    assert_same(kpl, records, eight_shards(), MAX_RECORD_BYTES, None)


def test_keys_with_and_without_explicit_hash_keys_share_one_table(kpl: ModuleType) -> None:
    # The same partition key enters an aggregate routed by itself and by explicit hash keys, in both orders.
    one = ShardMap([Shard("s", 0, H - 1)])
    records = [new_record(b"a", "k", 1, "c0"), new_record(b"b", "k", 2, "c1", explicit_hash_key="9"),
               new_record(b"c", "j", 3, "c2", explicit_hash_key="9"), new_record(b"d", "j", 4, "c3"),
               new_record(b"e", "k", 1, "c4")]
    aggs = assert_same(kpl, records, one, MAX_RECORD_BYTES, None)
    assert aggs is not None and len(aggs) == 1
    assert_reads_back(aggs)
    for m in (eight_shards(), ShardMap([Shard("a", 0, 9), Shard("b", 10, H - 1)])):
        assert_same(kpl, records, m, MAX_RECORD_BYTES, None)


class Key(str):
    """A str subclass: a shape the native path hands to the reference."""


@pytest.mark.parametrize("odd", [
    lambda i: Record(bytearray(b"data"), f"k{i}", i, f"c{i}"),
    lambda i: Record(b"data", Key(f"k{i}"), i, f"c{i}"),
    lambda i: Record(b"data", f"k{i}", i, f"c{i}", explicit_hash_key=Key("7")),
    lambda i: AggregatedRecord(b"data", f"k{i}", i, f"c{i}"),
    lambda i: Record(b"data", f"k{i}", i, i),  # record ids are only formatted
    lambda i: Record(b"data", f"k{i}", [i], f"c{i}"),  # unhashable: the same TypeError
])
def test_unusual_record_shapes_give_the_reference_result(kpl: ModuleType, odd: Callable[[int], Record]) -> None:
    records = bench_records(3) + [odd(i) for i in range(3)] + bench_records(2)
    assert_same(kpl, records, eight_shards(), MAX_RECORD_BYTES, None)
    assert_same(kpl, records, eight_shards(), 120, None)


class Records(list[Record]):
    """A list subclass: indexed through a plain copy."""


def test_any_iterable_and_unusual_arguments(kpl: ModuleType) -> None:
    records = bench_records(50)
    want = [fields(a) for a in aggregate_python(records, eight_shards())]

    def gen() -> Iterator[Record]:
        yield from records

    assert [fields(a) for a in kpl.aggregate(gen(), eight_shards(), MAX_RECORD_BYTES, None)] == want
    assert [fields(a) for a in kpl.aggregate(tuple(records), eight_shards(), MAX_RECORD_BYTES, None)] == want
    assert [fields(a) for a in kpl.aggregate(Records(records), eight_shards(), MAX_RECORD_BYTES, None)] == want
    assert_same(kpl, records, eight_shards(), 2**70, None)  # beyond C integers: the reference's arithmetic
    assert_same(kpl, records, eight_shards(), 300, 2**70)
    assert_same(kpl, records, eight_shards(), -5, None)


def test_aggregate_dispatches_to_the_native_one_unless_turned_off(kpl: ModuleType,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    real = kpl.aggregate

    def spy(*args: Any) -> list[AggregatedRecord]:
        calls.append(1)
        return real(*args)  # type: ignore[no-any-return]

    monkeypatch.setattr(kpl, "aggregate", spy)
    monkeypatch.delenv("PG2K_NATIVE", raising=False)
    records = bench_records(10)
    native_result = [fields(a) for a in aggregation.aggregate(records, eight_shards())]
    assert calls == [1]
    monkeypatch.setenv("PG2K_NATIVE", "0")
    assert [fields(a) for a in aggregation.aggregate(records, eight_shards())] == native_result
    assert calls == [1]


def test_fast_paths_are_on(kpl: ModuleType) -> None:
    # Off means Record or AggregatedRecord changed shape: still correct (getattr, the class), but slower.
    assert kpl.fast_paths() == {"record_slots": True, "aggregated_record_slots": True}


# -- the embedded MD5 (routing) ----------------------------------------------------------------------------


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=300))
def test_embedded_md5_is_hashlib(kpl: ModuleType, data: bytes) -> None:
    assert kpl.md5(data) == hashlib.md5(data).digest()


def test_embedded_md5_at_block_boundaries(kpl: ModuleType) -> None:
    for n in (*range(50, 70), *range(110, 135), 1000, 100_000):
        data = bytes(i * 7 % 256 for i in range(n))
        assert kpl.md5(data) == hashlib.md5(data).digest(), n


# -- first_invalid against check_record -------------------------------------------------------------------


def first_rejected(records: list[Record], limit: int, start: int = 0) -> int:
    for i in range(start, len(records)):
        try:
            check_record(records[i], limit)
        except SinkError:
            return i
    return -1


HASH_KEY_CASES = [
    None, "0", "1", "00", "01", "7", str(H - 1), str(H), str(H + 1), "9" * 39, "1" + "0" * 38, "9" * 38,
    "1" * 40, "", "-1", "+1", " 1", "1 ", "abc", "\u0661", "1.0", "0x10", "340282366920938463463374607431768211455",
    "340282366920938463463374607431768211456", "340282366920938463463374607431768211457",
]


@st.composite
def checked_records(draw: st.DrawFn) -> tuple[list[Record], int]:
    """Mostly valid records, a few with one fault each, at either side of its boundary."""
    limit = draw(st.integers(1, 2000))
    records = []
    for i in range(draw(st.integers(0, 30))):
        fault = draw(st.sampled_from(["none", "none", "none", "key", "hash", "size"]))
        alphabet = draw(st.sampled_from(["k", "é", "😀"]))
        chars = draw(st.sampled_from([0, 1, 255, 256, 257, 300]) if fault == "key" else st.integers(1, 5))
        pk = alphabet * chars
        ehk = draw(st.one_of(st.sampled_from(HASH_KEY_CASES), st.integers(0, H + 5).map(str), st.text(max_size=5))
                   if fault == "hash" else st.sampled_from([None, None, "0", str(H - 1)]))
        key_bytes = len(pk.encode())
        size = draw(st.integers(limit - 2, limit + 2) if fault == "size" else st.integers(0, limit))
        records.append(Record(b"d" * max(0, size - key_bytes), pk, i, f"c{i}", explicit_hash_key=ehk))
    return records, limit


@settings(max_examples=800, deadline=None)
@given(checked_records(), st.integers(0, 5))
def test_first_invalid_is_the_first_record_check_record_rejects(
        kpl: ModuleType, case: tuple[list[Record], int], start: int) -> None:
    records, limit = case
    assert kpl.first_invalid(records, limit, 0) == first_rejected(records, limit)
    assert kpl.first_invalid(tuple(records), limit, start) == first_rejected(records, limit, start)


@pytest.mark.parametrize("hash_key", HASH_KEY_CASES)
def test_first_invalid_judges_hash_keys_as_check_record(kpl: ModuleType, hash_key: str | None) -> None:
    records = [Record(b"x", "k", 1, "c0"), Record(b"x", "k", 1, "c1", explicit_hash_key=hash_key)]
    assert kpl.first_invalid(records, MAX_RECORD_BYTES) == first_rejected(records, MAX_RECORD_BYTES)


@pytest.mark.parametrize("chars", [0, 1, 255, 256, 257])
@pytest.mark.parametrize("alphabet", ["k", "é", "😀"])
def test_first_invalid_counts_partition_key_characters(kpl: ModuleType, chars: int, alphabet: str) -> None:
    records = [Record(b"x", "k", 1, "c0"), Record(b"x", alphabet * chars, 1, "c1")]
    assert kpl.first_invalid(records, MAX_RECORD_BYTES) == first_rejected(records, MAX_RECORD_BYTES)


def test_first_invalid_limits(kpl: ModuleType) -> None:
    records = [Record(b"x" * 10, "k", 1, "c0")]  # 11 bytes
    assert [kpl.first_invalid(records, n) for n in (10, 11, 2**70, -(2**70))] == [0, -1, -1, 0]
    assert kpl.first_invalid([], 10) == -1
    assert kpl.first_invalid(Records([records[0], records[0]]), 10, 1) == 1
    assert kpl.first_invalid(iter(records), 10) == 0
    # A Record subclass is judged through getattr; a field of another type is left to check_record (reported
    # as a suspect, which the sink then checks and passes).
    odd = [AggregatedRecord(b"x", "k", 1, "c0"), Record(b"x", Key("k"), 1, "c1")]
    assert (kpl.first_invalid(odd, 100), first_rejected(odd, 100)) == (1, -1)


def test_sink_raises_the_first_invalid_records_error(kpl: ModuleType, monkeypatch: pytest.MonkeyPatch) -> None:
    records = bench_records(1000)
    records[700] = Record(b"x", "", 1, "empty-key")
    records[800] = Record(b"x", "k", 1, "bad-hash", explicit_hash_key="01")
    for native in ("1", "0"):
        monkeypatch.setenv("PG2K_NATIVE", native)
        sink = KinesisSink(object(), "stream")
        with pytest.raises(SinkError, match="record empty-key: partition key '' has 0 characters"):
            sink.put(records)
        with pytest.raises(SinkError, match="record bad-hash: explicit hash key '01'"):
            sink.put(records[:700] + records[701:])


def test_sink_learns_the_streams_limit_before_judging_a_large_record(
        kpl: ModuleType, monkeypatch: pytest.MonkeyPatch) -> None:
    # Larger than 1 MiB: allowed if the stream takes larger records, which the sink asks once.
    big = Record(b"x" * (MAX_RECORD_BYTES + 10), "k", 1, "big")
    huge = Record(b"x" * (3 * MAX_RECORD_BYTES), "k", 1, "huge")
    for native in ("1", "0"):
        monkeypatch.setenv("PG2K_NATIVE", native)
        sink = KinesisSink(object(), "stream")
        checks: list[int] = []

        def check_stream(sink: KinesisSink = sink, checks: list[int] = checks) -> dict[str, Any]:
            checks.append(1)
            sink._max_record_bytes = 2 * MAX_RECORD_BYTES
            return {}

        monkeypatch.setattr(sink, "check_stream", check_stream)
        with pytest.raises(RecordTooLargeError, match="record huge is"):
            sink.put([*bench_records(3), big, *bench_records(3), huge])
        assert checks == [1]
