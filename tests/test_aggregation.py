"""KPL aggregation: shard map hashing, aggregate limits and order, and the sink with aggregate=True.

Aggregates are read back with awslabs' ``aws-kinesis-agg`` deaggregator, as a consumer would.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import random
import uuid
from collections import Counter, defaultdict
from collections.abc import Callable, Hashable, Iterator, Sequence
from typing import Any

import aws_kinesis_agg
import pytest
from aws_kinesis_agg.deaggregator import (  # messages_pb2 needs the sys.path entry its modules add
    iter_deaggregate_records,
    messages_pb2,
)
from botocore.exceptions import ClientError
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pg2kinesis_dagster.core.batching import (
    MAX_RECORD_BYTES,
    OrderingKeys,
    Record,
    check_record,
    next_request,
    remove_acknowledged,
)
from pg2kinesis_dagster.core.errors import RecordTooLargeError, SinkError
from pg2kinesis_dagster.devstack.moto import MotoServer
from pg2kinesis_dagster.kinesis.aggregation import (
    AggregatedRecord,
    Shard,
    ShardMap,
    ShardMapError,
    aggregate,
    partition_key_hash,
)
from pg2kinesis_dagster.kinesis.sink import KinesisSink, PutReport
from tests.test_kinesis_sink import FakeClock, MaxRng

H = 2**128  # size of the hash key space


def halves() -> ShardMap:
    return ShardMap([Shard("s0", 0, H // 2 - 1), Shard("s1", H // 2, H - 1)])


def make_records(n: int, keys: Sequence[str], size: int = 40, seed: int = 7, hot: float = 0.5) -> list[Record]:
    """``n`` changes over ``keys``; a ``hot`` share of them on the first three keys."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        key = rng.choice(keys[:3]) if rng.random() < hot else rng.choice(keys)
        payload = f"{key}:{i}:".encode()
        out.append(Record(payload + b"." * max(0, size - len(payload)), f"public.t:{key}", key, f"c{i}"))
    return out


def kpl_bytes(users: Sequence[Record]) -> bytes:
    """The KPL encoding of ``users``, built here from the protobuf schema (independent of AggRecord)."""
    message = messages_pb2.AggregatedRecord()
    table: dict[str, int] = {}
    for u in users:
        if u.partition_key not in table:
            table[u.partition_key] = len(table)
            message.partition_key_table.append(u.partition_key)
        entry = message.records.add()
        entry.partition_key_index = table[u.partition_key]
        entry.data = u.data
    body = message.SerializeToString()
    return aws_kinesis_agg.MAGIC + body + hashlib.md5(body).digest()


def deaggregate(data: bytes, partition_key: str) -> list[tuple[str, bytes]]:
    """(partition key, data) of the user records in one Kinesis record, via aws-kinesis-agg."""
    raw = {"Data": data, "PartitionKey": partition_key, "SequenceNumber": "1", "ApproximateArrivalTimestamp": 0}
    out = []
    for user in iter_deaggregate_records([raw], data_format="Boto3"):
        k = user["kinesis"]
        # Aggregated user records come base64-encoded (Lambda style); plain ones as they were.
        out.append((k["partitionKey"], base64.b64decode(k["data"]) if k.get("aggregated") else k["data"]))
    return out


def users_of(record: Record) -> tuple[Record, ...]:
    assert isinstance(record, AggregatedRecord)
    return record.user_records


# -- ShardMap ----------------------------------------------------------------------------


def test_partition_key_hash_is_md5_of_utf8_as_128_bit_integer() -> None:
    assert partition_key_hash("a") == int(hashlib.md5(b"a").hexdigest(), 16)
    assert partition_key_hash("é") == int.from_bytes(hashlib.md5("é".encode()).digest(), "big")
    assert 0 <= partition_key_hash("x" * 256) < H


def test_shard_map_maps_hash_keys_to_inclusive_ranges() -> None:
    m = ShardMap([Shard("b", 100, H - 1), Shard("a", 0, 99)])  # any input order
    assert [s.shard_id for s in m.shards] == ["a", "b"]
    assert m.shard_for_hash(0).shard_id == "a"
    assert m.shard_for_hash(99).shard_id == "a"
    assert m.shard_for_hash(100).shard_id == "b"
    assert m.shard_for_hash(H - 1).shard_id == "b"
    assert m.shard_for("k", explicit_hash_key="99").shard_id == "a"
    assert m.shard_for("k").shard_id == ("a" if partition_key_hash("k") < 100 else "b")
    with pytest.raises(ValueError):
        m.shard_for_hash(H)
    assert m.get("b") == Shard("b", 100, H - 1) and m.get("zz") is None


@pytest.mark.parametrize(
    "shards",
    [
        [Shard("a", 0, 99), Shard("b", 101, H - 1)],  # gap
        [Shard("a", 0, 100), Shard("b", 100, H - 1)],  # overlap
        [Shard("a", 0, 99)],  # does not reach the top
        [Shard("a", 1, H - 1)],  # does not start at 0
        [],
    ],
    ids=["gap", "overlap", "short", "late-start", "empty"],
)
def test_shard_map_rejects_listings_that_do_not_tile_the_hash_space(shards: list[Shard]) -> None:
    with pytest.raises(ShardMapError, match="resharded"):
        ShardMap(shards)


def listing(shard_id: str, start: int, end: int, closed: bool = False) -> dict[str, Any]:
    seq: dict[str, str] = {"StartingSequenceNumber": "1"}
    if closed:
        seq["EndingSequenceNumber"] = "99"
    return {
        "ShardId": shard_id,
        "HashKeyRange": {"StartingHashKey": str(start), "EndingHashKey": str(end)},
        "SequenceNumberRange": seq,
    }


class PagedShards:
    """list_shards in pages, checking the NextToken protocol."""

    def __init__(self, pages: list[list[dict[str, Any]]]) -> None:
        self.pages = pages
        self.calls: list[dict[str, Any]] = []

    def list_shards(self, **kwargs: Any) -> dict[str, Any]:
        self.calls.append(kwargs)
        index = int(kwargs["NextToken"]) if "NextToken" in kwargs else 0
        assert ("StreamName" in kwargs) == (index == 0)
        page: dict[str, Any] = {"Shards": self.pages[index]}
        if index + 1 < len(self.pages):
            page["NextToken"] = str(index + 1)
        return page


def test_load_paginates_and_skips_closed_shards() -> None:
    q = H // 4
    client = PagedShards(
        [
            [listing("shardId-0", 0, H // 2 - 1, closed=True), listing("shardId-1", H // 2, H - 1)],
            [listing("shardId-2", 0, q - 1)],
            [listing("shardId-3", q, H // 2 - 1)],
        ]
    )
    m = ShardMap.load(client, "orders")
    assert [s.shard_id for s in m.shards] == ["shardId-2", "shardId-3", "shardId-1"]
    assert len(client.calls) == 3
    assert client.calls[0] == {"StreamName": "orders"}


@pytest.fixture
def stream_4(moto_server: MotoServer, aws_fake_env: str) -> Iterator[str]:
    """A fresh 4-shard stream on the moto server."""
    name = f"test4-{uuid.uuid4().hex[:16]}"
    moto_server.create_stream(name, shards=4)
    yield name
    with contextlib.suppress(Exception):
        moto_server.client().delete_stream(StreamName=name, EnforceConsumerDeletion=True)


def test_shard_map_agrees_with_the_shard_moto_puts_records_on(kinesis_client: Any, stream_4: str) -> None:
    m = ShardMap.load(kinesis_client, stream_4)
    assert len(m) == 4
    keys = [f"public.t:{i}" for i in range(300)] + ["é€", "x" * 256]
    for start in range(0, len(keys), 100):
        chunk = keys[start : start + 100]
        response = kinesis_client.put_records(
            StreamName=stream_4, Records=[{"Data": b"x", "PartitionKey": k} for k in chunk]
        )
        for key, result in zip(chunk, response["Records"], strict=True):
            assert result["ShardId"] == m.shard_for(key).shard_id, key
    assert {m.shard_for(k).shard_id for k in keys} == {s.shard_id for s in m.shards}


# -- aggregate() --------------------------------------------------------------------------


def test_aggregate_packs_each_shard_in_order_with_kpl_bytes() -> None:
    m = halves()
    records = make_records(300, [f"k{i}" for i in range(20)])
    aggs = aggregate(records, m)
    assert len(aggs) == 2  # everything fits in one aggregate per shard
    seen: list[Record] = []
    for a in aggs:
        users = users_of(a)
        seen.extend(users)
        shard = m.get(a.shard_id)
        assert shard is not None
        assert all(m.shard_for(u.partition_key) == shard for u in users)
        assert a.aggregated
        assert a.data == kpl_bytes(users)
        assert deaggregate(a.data, a.partition_key) == [(u.partition_key, u.data) for u in users]
        assert a.partition_key == users[0].partition_key
        assert a.explicit_hash_key == str(shard.starting_hash_key)
        assert a.ordering_key == ("shard", a.shard_id)
        assert a.record_id == f"{users[0].record_id}..{users[-1].record_id} ({len(users)} changes)"
        # Input order within the shard.
        assert [records.index(u) for u in users] == sorted(records.index(u) for u in users)
    assert sorted(map(id, seen)) == sorted(map(id, records))


@pytest.mark.parametrize("max_bytes", [300, 1000, 4096])
def test_aggregates_close_exactly_when_the_next_change_would_not_fit(max_bytes: int) -> None:
    m = halves()
    rng = random.Random(max_bytes)
    records = [
        Record(bytes(rng.randrange(256) for _ in range(rng.randrange(0, 120))), f"pk-{rng.randrange(9)}-é",
               i, f"c{i}")
        for i in range(400)
    ]
    aggs = aggregate(records, m, max_bytes=max_bytes)
    by_shard: dict[str, list[AggregatedRecord]] = defaultdict(list)
    for a in aggs:
        by_shard[a.shard_id].append(a)
    for chain in by_shard.values():
        for a, following in zip(chain, [*chain[1:], None], strict=True):
            users = users_of(a)
            # Kinesis counts data plus the UTF-8 partition key: at most max_bytes.
            assert a.size == len(a.data) + len(a.partition_key.encode()) <= max_bytes
            assert a.data == kpl_bytes(users)
            if following is not None:
                # ... and the next change of the shard would have taken it over.
                grown = kpl_bytes([*users, users_of(following)[0]])
                assert len(grown) + len(a.partition_key.encode()) > max_bytes


def test_change_too_large_for_an_envelope_is_sent_plain_in_its_place() -> None:
    m = ShardMap([Shard("s", 0, H - 1)])
    big = Record(b"B" * (MAX_RECORD_BYTES - 10), "k", "big", "public.blobs:1@0/AB")
    records = [Record(b"a", "k", "a", "c0"), big, Record(b"b", "k", "a", "c2")]
    aggs = aggregate(records, m)
    assert [users_of(a) for a in aggs] == [(records[0],), (big,), (records[2],)]
    assert [a.aggregated for a in aggs] == [True, False, True]
    assert aggs[1].data == big.data and aggs[1].record_id == big.record_id
    assert aggs[1].size == big.size
    assert deaggregate(aggs[1].data, aggs[1].partition_key) == [("k", big.data)]
    assert all(a.ordering_key == ("shard", "s") for a in aggs)


def test_change_larger_than_a_record_raises_naming_it() -> None:
    records = [Record(b"a", "k", 1, "c0"), Record(b"x" * MAX_RECORD_BYTES, "k", 2, "public.blobs:9@0/CD")]
    with pytest.raises(RecordTooLargeError, match=r"public\.blobs:9@0/CD"):
        aggregate(records, halves())


def test_single_change_aggregate_keeps_its_id() -> None:
    (a,) = aggregate([Record(b"x", "k", 1, "public.t:1@0/1:0")], halves())
    assert a.record_id == "public.t:1@0/1:0"


def find_keys(m: ShardMap, per_shard: int) -> dict[str, list[str]]:
    """``per_shard`` partition keys for each shard of ``m``."""
    found: dict[str, list[str]] = defaultdict(list)
    i = 0
    while any(len(found[s.shard_id]) < per_shard for s in m.shards):
        key = f"xid-{i}"
        found[m.shard_for(key).shard_id].append(key)
        i += 1
    return {s: keys[:per_shard] for s, keys in found.items()}


def test_row_whose_changes_cross_shards_orders_the_aggregates() -> None:
    # Partition by transaction id: row "r" changes in xid A (shard s0), then B (s1), then C (s0).
    m = halves()
    keys = find_keys(m, 2)
    (xa, xc), (xb, _) = keys["s0"], keys["s1"]
    records = [
        Record(b"r1", xa, "r", "c0"), Record(b"other", xb, "o", "c1"), Record(b"r2", xb, "r", "c2"),
        Record(b"r3", xc, "r", "c3"),
    ]
    aggs = aggregate(records, m)
    assert [[u.record_id for u in users_of(a)] for a in aggs] == [["c0"], ["c1", "c2"], ["c3"]]
    assert [a.shard_id for a in aggs] == ["s0", "s1", "s0"]
    assert aggs[0].ordering_key == OrderingKeys({("shard", "s0"), ("row", "r")})
    assert aggs[1].ordering_key == OrderingKeys({("shard", "s1"), ("row", "r")})
    # The planner now sends them one after the other, though they are on two shards.
    pending: list[Record] = list(aggs)
    sent = []
    while pending:
        chosen = next_request(pending)
        sent.append([pending[i].record_id for i in chosen])
        remove_acknowledged(pending, chosen)
    assert sent == [[aggs[0].record_id], [aggs[1].record_id], [aggs[2].record_id]]


def test_rows_on_one_shard_each_leave_aggregates_whole() -> None:
    records = make_records(2000, [f"k{i}" for i in range(50)])
    aggs = aggregate(records, halves())
    assert all(not isinstance(a.ordering_key, OrderingKeys) for a in aggs)


@st.composite
def scenarios(draw: st.DrawFn) -> tuple[ShardMap, list[Record], int, int]:
    cuts = sorted(set(draw(st.lists(st.integers(1, H - 1), max_size=3))))
    bounds = [0, *cuts, H]
    m = ShardMap(Shard(f"s{i}", bounds[i], bounds[i + 1] - 1) for i in range(len(bounds) - 1))
    max_bytes = draw(st.integers(60, 700))
    n = draw(st.integers(0, 120))
    records = []
    for i in range(n):
        row = draw(st.integers(0, 6))
        # Partition keys independent of rows (like partition by xid): rows cross shards.
        pk = draw(st.sampled_from(["a", "b", "c", "d", "é", "xid-77"]))
        size = draw(st.integers(0, max_bytes - len(pk.encode())))
        records.append(Record(bytes([i % 256]) * size, pk, row, f"c{i}"))
    return m, records, max_bytes, draw(st.integers(0, 2**32))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(scenarios())
def test_planner_never_sends_a_change_before_its_row_predecessor_is_acknowledged(
    scenario: tuple[ShardMap, list[Record], int, int],
) -> None:
    m, records, max_bytes, seed = scenario
    aggs = aggregate(records, m, max_bytes=max_bytes)
    assert sorted(id(u) for a in aggs for u in users_of(a)) == sorted(map(id, records))
    # n-th change of its row, per record.
    nth: dict[int, tuple[Hashable, int]] = {}
    counts: Counter[Hashable] = Counter()
    for r in records:
        nth[id(r)] = (r.ordering_key, counts[r.ordering_key])
        counts[r.ordering_key] += 1
    for a in aggs:
        assert a.size <= max_bytes
        assert all(m.shard_for(u.partition_key).shard_id == a.shard_id for u in users_of(a))
        assert deaggregate(a.data, a.partition_key) == [(u.partition_key, u.data) for u in users_of(a)]

    rng = random.Random(seed)
    acked: Counter[Hashable] = Counter()
    pending: list[Record] = list(aggs)
    while pending:
        chosen = next_request(pending)
        assert chosen
        for i in chosen:
            in_this: Counter[Hashable] = Counter()
            for u in users_of(pending[i]):
                row, n = nth[id(u)]
                # Every earlier change of the row is acknowledged, or earlier in this aggregate.
                assert acked[row] + in_this[row] == n
                in_this[row] += 1
        ok = [i for i in chosen if rng.random() < 0.6]  # the rest fail and stay pending
        for i in ok:
            for u in users_of(pending[i]):
                acked[nth[id(u)][0]] += 1
        remove_acknowledged(pending, ok)
    assert acked == counts


# -- the planner's OrderingKeys and explicit hash keys (batching) -------------------------


def test_next_request_treats_ordering_keys_as_each_of_them() -> None:
    def rec(key: Hashable) -> Record:
        return Record(b"x", "k", key, "r")

    assert next_request([rec(OrderingKeys({"a", "b"})), rec("b"), rec("c"), rec(OrderingKeys({"c", "d"}))]) == [0, 2]
    # A waiting multi-key record blocks all its keys for the records after it.
    assert next_request([rec("a"), rec(OrderingKeys({"a", "b"})), rec("b"), rec("c")]) == [0, 3]


@pytest.mark.parametrize("key", ["0", "1", str(H - 1), "170141183460469231731687303715884105728"])
def test_valid_explicit_hash_keys_pass(key: str) -> None:
    check_record(Record(b"x", "k", 1, "r", explicit_hash_key=key))


@pytest.mark.parametrize("key", ["", "-1", "01", "1.5", "abc", str(H), "9" * 5000, "٣"])
def test_invalid_explicit_hash_keys_are_rejected(key: str) -> None:
    with pytest.raises(SinkError, match="explicit hash key"):
        check_record(Record(b"x", "k", 1, "r7", explicit_hash_key=key))


def test_explicit_hash_key_does_not_count_towards_record_size() -> None:
    assert Record(b"abc", "k", 1, "r", explicit_hash_key="12345").size == 4


def test_put_report_user_records_default_to_records() -> None:
    assert PutReport(5, 1, 0, 0, 0.1).user_records == 5
    assert PutReport(5, 1, 0, 0, 0.1, user_records=900).user_records == 900


# -- the sink against moto ------------------------------------------------------------------


def read_user_records(moto_server: MotoServer, stream: str) -> tuple[int, list[tuple[str, str, bytes]]]:
    """(Kinesis records, [(shard id, partition key, data)] of the deaggregated user records in shard order)."""
    read = moto_server.read_stream(stream)
    users = [(r["shard_id"], pk, data) for r in read for pk, data in deaggregate(r["data"], r["partition_key"])]
    return len(read), users


@pytest.mark.parametrize("shards", [2, 4])
def test_put_20000_aggregated_and_read_back_deaggregated_in_order(
    moto_server: MotoServer, kinesis_client: Any, kinesis_stream: str, shards: int, request: pytest.FixtureRequest
) -> None:
    stream = kinesis_stream if shards == 2 else request.getfixturevalue("stream_4")
    keys = [f"k{i}" for i in range(400)]
    records = make_records(20_000, keys, size=300)  # ~6 MB: several aggregates per shard
    sink = KinesisSink(kinesis_client, stream, aggregate=True)

    report = sink.put(records)

    assert report.user_records == 20_000
    assert report.retried_entries == 0
    kinesis_records, users = read_user_records(moto_server, stream)
    assert report.records == kinesis_records
    assert kinesis_records < 20_000 / 100  # far fewer Kinesis records than changes
    assert kinesis_records >= 6  # ... of at most 1 MiB each
    # Every change exactly once.
    assert Counter(data for _, _, data in users) == Counter(r.data for r in records)
    m = ShardMap.load(kinesis_client, stream)
    on_shards: dict[str, set[str]] = defaultdict(set)
    got: dict[str, list[bytes]] = defaultdict(list)
    for shard_id, pk, data in users:
        on_shards[pk].add(shard_id)
        got[pk].append(data)
    # Each key on one shard, the one its own partition key maps to (what the KCL checks).
    assert all(shard_ids == {m.shard_for(pk).shard_id} for pk, shard_ids in on_shards.items())
    assert len({s for ids in on_shards.values() for s in ids}) == shards
    # Each key's changes in input order.
    expected: dict[str, list[bytes]] = defaultdict(list)
    for r in records:
        expected[r.partition_key].append(r.data)
    assert got == expected


def test_aggregated_put_to_missing_stream_names_list_shards(
    moto_server: MotoServer, kinesis_client: Any
) -> None:
    with pytest.raises(SinkError, match="does not exist") as info:
        KinesisSink(kinesis_client, "no-such-stream", aggregate=True).put(make_records(3, ["a", "b", "c"]))
    assert "0 of 3 records were acknowledged" in str(info.value)


# -- the sink with a fake stream: retries and resharding --------------------------------------


Behaviour = Callable[[int, list[dict[str, Any]]], list[str | None]]


class FakeStream:
    """A stream whose shards are ``actual`` while ListShards answers ``listings`` in turn (then the last).

    Entries are routed like Kinesis routes them: explicit hash key, else the MD5 of the partition key.
    """

    class meta:
        region_name = "eu-west-1"
        endpoint_url = "https://kinesis.eu-west-1.amazonaws.com"

    def __init__(self, actual: ShardMap, listings: list[list[dict[str, Any]]],
                 behaviour: Behaviour | None = None) -> None:
        self.actual = actual
        self.listings = listings
        self.behaviour = behaviour or (lambda n, entries: [None] * len(entries))
        self.list_calls = 0
        self.list_errors: list[Exception] = []
        self.calls: list[list[dict[str, Any]]] = []
        self.stored: dict[str, list[dict[str, Any]]] = defaultdict(list)

    def list_shards(self, **kwargs: Any) -> dict[str, Any]:
        self.list_calls += 1
        if self.list_errors:
            raise self.list_errors.pop(0)
        return {"Shards": self.listings[min(self.list_calls, len(self.listings)) - 1]}

    def put_records(self, *, StreamName: str, Records: list[dict[str, Any]]) -> dict[str, Any]:
        self.calls.append(list(Records))
        codes = self.behaviour(len(self.calls), Records)
        results = []
        for entry, code in zip(Records, codes, strict=True):
            if code is None:
                shard = self.actual.shard_for(entry["PartitionKey"], entry.get("ExplicitHashKey"))
                self.stored[shard.shard_id].append(entry)
                results.append({"SequenceNumber": str(sum(map(len, self.stored.values()))),
                                "ShardId": shard.shard_id})
            else:
                results.append({"ErrorCode": code, "ErrorMessage": f"{code} message"})
        return {"FailedRecordCount": sum(c is not None for c in codes), "Records": results}

    def users_seen_by_kcl(self) -> dict[str, list[tuple[str, bytes]]]:
        """Per shard, the user records a KCL reader keeps: those whose hash the shard covers."""
        out: dict[str, list[tuple[str, bytes]]] = {}
        for shard_id, entries in self.stored.items():
            shard = self.actual.get(shard_id)
            assert shard is not None
            out[shard_id] = [
                (pk, data)
                for e in entries
                for pk, data in deaggregate(e["Data"], e["PartitionKey"])
                if shard.covers(partition_key_hash(pk))
            ]
        return out


def client_error(code: str, status: int = 400, operation: str = "PutRecords") -> ClientError:
    return ClientError(
        {"Error": {"Code": code, "Message": "boom"}, "ResponseMetadata": {"HTTPStatusCode": status}}, operation
    )


def halves_listing() -> list[dict[str, Any]]:
    return [listing("s0", 0, H // 2 - 1), listing("s1", H // 2, H - 1)]


def make_sink(client: FakeStream, clock: FakeClock, **kwargs: Any) -> KinesisSink:
    kwargs.setdefault("max_in_flight", 1)  # the exact retry schedule (concurrency: test_sink_concurrency.py)
    return KinesisSink(client, "orders", sleep=clock.sleep, clock=clock, rng=MaxRng(),  # type: ignore[arg-type]
                       aggregate=True, **kwargs)


def per_key(pairs: Sequence[tuple[str, bytes]]) -> dict[str, list[bytes]]:
    out: dict[str, list[bytes]] = defaultdict(list)
    for pk, data in pairs:
        out[pk].append(data)
    return out


def test_failed_aggregates_are_retried_and_every_row_keeps_its_order() -> None:
    records = make_records(6000, [f"k{i}" for i in range(30)], size=600)  # ~3.6 MB, 2 shards

    def behaviour(n: int, entries: list[dict[str, Any]]) -> list[str | None]:
        if n == 1:
            return ["ProvisionedThroughputExceededException"] + [None] * (len(entries) - 1)
        if n == 3:
            return ["InternalFailure"] * len(entries)
        return [None] * len(entries)

    client, clock = FakeStream(halves(), [halves_listing()], behaviour), FakeClock()
    report = make_sink(client, clock).put(records)

    assert report.user_records == 6000
    assert report.records == sum(map(len, client.stored.values()))
    assert 4 <= report.records < 20
    assert report.retried_entries == 1 + len(client.calls[2])
    assert report.throttled_entries == 1
    assert report.requests == len(client.calls)
    assert client.list_calls == 1
    # At most one aggregate per shard in each request, each pinned to its shard.
    for call in client.calls:
        hash_keys = [e["ExplicitHashKey"] for e in call]
        assert len(hash_keys) == len(set(hash_keys))
    kcl = client.users_seen_by_kcl()
    everything = [pair for pairs in kcl.values() for pair in pairs]
    assert Counter(d for _, d in everything) == Counter(r.data for r in records)  # once each
    assert per_key(everything) == per_key([(r.partition_key, r.data) for r in records])


def test_resharding_during_put_resends_changes_the_new_shards_would_drop() -> None:
    # ListShards said s0 + s1; meanwhile s0 was split into s2 (low half) and s3 (high half).
    q = H // 4
    actual = ShardMap([Shard("s2", 0, q - 1), Shard("s3", q, H // 2 - 1), Shard("s1", H // 2, H - 1)])
    after = [listing("s0", 0, H // 2 - 1, closed=True), listing("s1", H // 2, H - 1),
             listing("s2", 0, q - 1), listing("s3", q, H // 2 - 1)]
    keys = [f"k{i}" for i in range(40)]
    records = make_records(800, keys, size=3000)  # ~2.4 MB: two aggregates per old shard
    assert {actual.shard_for(f"public.t:{k}").shard_id for k in keys} == {"s1", "s2", "s3"}
    client, clock = FakeStream(actual, [halves_listing(), after]), FakeClock()

    report = make_sink(client, clock).put(records)

    assert client.list_calls == 2
    assert clock.sleeps == [0.1]
    assert report.user_records == 800
    assert report.records == sum(map(len, client.stored.values()))
    kcl = client.users_seen_by_kcl()
    everything = [pair for pairs in kcl.values() for pair in pairs]
    # What a KCL reader keeps: every change exactly once, each key's changes in order.
    assert Counter(d for _, d in everything) == Counter(r.data for r in records)
    assert per_key(everything) == per_key([(r.partition_key, r.data) for r in records])
    # The strays of the first s0 aggregate went to s2 and were sent again (at-least-once).
    all_users = [
        u for entries in client.stored.values() for e in entries for u in deaggregate(e["Data"], e["PartitionKey"])
    ]
    assert len(all_users) > 800


def test_the_shard_map_is_listed_once_for_many_puts_and_again_when_a_put_finds_it_stale() -> None:
    q = H // 4
    actual = ShardMap([Shard("s2", 0, q - 1), Shard("s3", q, H // 2 - 1), Shard("s1", H // 2, H - 1)])
    after = [listing("s0", 0, H // 2 - 1, closed=True), listing("s1", H // 2, H - 1),
             listing("s2", 0, q - 1), listing("s3", q, H // 2 - 1)]
    keys = [f"k{i}" for i in range(40)]
    client, clock = FakeStream(halves(), [halves_listing(), after]), FakeClock()
    sink = make_sink(client, clock)
    first, second = make_records(400, keys, size=300), make_records(400, keys, size=300)
    sink.put(first)
    sink.put(first)
    assert client.list_calls == 1, "one listing serves every put while it holds"
    client.actual = actual  # s0 split between two puts: the cached map is stale
    client.stored.clear()  # (what the first puts wrote went to s0, which is closed now)
    sink.put(second)
    assert client.list_calls == 2, "the put that found the map stale listed the shards again"
    sink.put(second)
    assert client.list_calls == 2
    clock.now += 61
    sink.put(second)
    assert client.list_calls == 3, "listed again once the map is a minute old"
    kcl = client.users_seen_by_kcl()
    kept = Counter(d for pairs in kcl.values() for _, d in pairs)
    assert all(kept[r.data] >= 1 for r in second), "no change of the put after the split was dropped by a reader"


def test_shard_map_that_keeps_changing_gives_up() -> None:
    actual = ShardMap([Shard("s2", 0, H // 2 - 1), Shard("s1", H // 2, H - 1)])
    # ListShards keeps answering the stale map: every s0 aggregate lands on s2.
    client, clock = FakeStream(actual, [halves_listing()]), FakeClock()
    keys = [k for k in (f"k{i}" for i in range(100)) if partition_key_hash(f"public.t:{k}") < H // 2]
    with pytest.raises(SinkError, match="kept changing") as info:
        make_sink(client, clock).put(make_records(50, keys))
    assert "slot will not be advanced" in str(info.value)
    assert client.list_calls == 11


def test_list_shards_throttling_is_retried() -> None:
    client, clock = FakeStream(halves(), [halves_listing()]), FakeClock()
    client.list_errors = [client_error("LimitExceededException", operation="ListShards")]
    report = make_sink(client, clock).put(make_records(10, ["a", "b", "c", "d"]))
    assert report.user_records == 10
    assert client.list_calls == 2
    assert clock.sleeps == [0.1]


def test_list_shards_access_denied_names_the_permission() -> None:
    client, clock = FakeStream(halves(), [halves_listing()]), FakeClock()
    client.list_errors = [client_error("AccessDeniedException", operation="ListShards")]
    with pytest.raises(SinkError, match="kinesis:ListShards") as info:
        make_sink(client, clock).put(make_records(10, ["a", "b", "c", "d"]))
    assert "0 of 10 records were acknowledged" in str(info.value)
    assert client.calls == []


def test_without_aggregation_explicit_hash_keys_are_sent_and_nothing_else_changes() -> None:
    client = FakeStream(halves(), [halves_listing()])
    records = [Record(b"a", "k", 1, "c0", explicit_hash_key="0"), Record(b"b", "k", 2, "c1")]
    report = KinesisSink(client, "orders").put(records)
    assert client.list_calls == 0
    assert client.calls == [[{"Data": b"a", "PartitionKey": "k", "ExplicitHashKey": "0"},
                             {"Data": b"b", "PartitionKey": "k"}]]
    assert (report.records, report.user_records) == (2, 2)


# -- KplRecord against aws_kinesis_agg's AggRecord (the reference encoder) ---------------------------


def _reference_agg_record() -> type:
    import sys

    saved = list(sys.path)  # aws_kinesis_agg.aggregator prepends to sys.path; keep it as it was
    try:
        from aws_kinesis_agg.aggregator import AggRecord
    finally:
        sys.path[:] = saved
    return AggRecord


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(40, 3000), st.lists(st.tuples(st.sampled_from([b"k", b"key-\xc3\xa9", b"x" * 200, b"k2"]),
                                                 st.binary(max_size=400),
                                                 st.sampled_from([None, b"0", b"12345", b"9" * 38])),
                                       max_size=60))
def test_kpl_record_is_aws_kinesis_agg_byte_for_byte(max_size: int, users: list[tuple[bytes, bytes, bytes | None]]
                                                     ) -> None:
    from pg2kinesis_dagster.kinesis.aggregation import KplRecord

    reference, ours = _reference_agg_record()(max_size), KplRecord(max_size)
    for pk, data, ehk in users:
        try:
            want = reference.add_user_record(pk, data, ehk)
        except ValueError:
            with pytest.raises(ValueError):
                ours.add_user_record(pk, data, ehk)
            continue
        assert ours.add_user_record(pk, data, ehk) == want
        assert ours.size() == reference.get_size_bytes()
        if not want:
            break
    if ours.count:
        assert ours.serialize() == reference.get_contents()[2]
