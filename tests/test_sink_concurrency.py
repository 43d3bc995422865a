"""Several PutRecords requests in flight, per-row order kept (kinesis.sink with max_in_flight > 1).

A thread-safe fake Kinesis answers after a random few milliseconds and fails a random share of the entries. It
checks, as each request arrives, the guarantee itself: no record is sent while an earlier record it must follow
(same row; for keyless tables the rules of core.keys) is unacknowledged.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Hashable
from typing import Any

import pytest

from pg2kinesis_dagster.core.batching import OrderingKeys, Record, SharedKey, next_request
from pg2kinesis_dagster.kinesis.sink import KinesisSink
from tests.test_kinesis_sink import FakeClock, MaxRng


def _parts(key: Hashable) -> list[tuple[Hashable, bool]]:
    """(key, exclusive) of each identity of an ordering key."""
    if type(key) is OrderingKeys:
        return [(p.key, False) if type(p) is SharedKey else (p, True) for p in key]
    return [(key, True)]


def must_follow(records: list[Record]) -> list[set[int]]:
    """For each record, the earlier records it must not overtake (both use a key, at least one of them whole)."""
    users: dict[Hashable, list[tuple[int, bool]]] = {}
    out: list[set[int]] = []
    for i, record in enumerate(records):
        earlier: set[int] = set()
        for key, exclusive in _parts(record.ordering_key):
            for j, other_exclusive in users.get(key, ()):
                if exclusive or other_exclusive:
                    earlier.add(j)
        for key, exclusive in _parts(record.ordering_key):
            users.setdefault(key, []).append((i, exclusive))
        out.append(earlier)
    return out


class ConcurrentFake:
    class meta:
        region_name = "eu-west-1"
        endpoint_url = "https://kinesis.eu-west-1.amazonaws.com"

    def __init__(self, records: list[Record], seed: int, failure_rate: float) -> None:
        self.index = {r.data: i for i, r in enumerate(records)}
        self.follows = must_follow(records)
        self.rng = random.Random(seed)
        self.failure_rate = failure_rate
        self.lock = threading.Lock()
        self.acked: set[int] = set()
        self.ack_order: list[int] = []
        self.violations: list[str] = []
        self.in_flight = 0
        self.max_in_flight = 0

    def put_records(self, *, StreamName: str, Records: list[dict[str, Any]]) -> dict[str, Any]:
        with self.lock:
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
            for entry in Records:
                i = self.index[entry["Data"]]
                missing = self.follows[i] - self.acked
                if missing:
                    self.violations.append(f"record {i} sent before {sorted(missing)[:3]} were acknowledged")
            delay = self.rng.uniform(0.0005, 0.004)
            codes = [("ProvisionedThroughputExceededException" if self.rng.random() < self.failure_rate else None)
                     for _ in Records]
        time.sleep(delay)  # the round trip, concurrently with the other requests in flight
        with self.lock:
            self.in_flight -= 1
            results = []
            for entry, code in zip(Records, codes, strict=True):
                if code is None:
                    i = self.index[entry["Data"]]
                    self.acked.add(i)
                    self.ack_order.append(i)
                    results.append({"SequenceNumber": str(len(self.ack_order)), "ShardId": "shardId-0"})
                else:
                    results.append({"ErrorCode": code, "ErrorMessage": "Rate exceeded"})
            return {"FailedRecordCount": sum(c is not None for c in codes), "Records": results}


def workload(n: int, seed: int) -> list[Record]:
    """Keyed rows (some hot), keyless inserts (table shared + content), keyless table-wide changes."""
    rng = random.Random(seed)
    table = ("table", "public", "events")
    out = []
    for i in range(n):
        roll = rng.random()
        if roll < 0.4:
            key: Hashable = ("row", "public", "items", (str(rng.randrange(3 if rng.random() < 0.05 else 5000)),))
        elif roll < 0.55:
            old, new = rng.randrange(5000), rng.randrange(5000)
            key = OrderingKeys((("row", "public", "items", (str(old),)), ("row", "public", "items", (str(new),))))
        elif roll < 0.999:
            key = OrderingKeys((SharedKey(table), ("image", "public", "events", (("n", str(rng.randrange(100_000))),))))
        else:
            key = table  # an UPDATE/DELETE without the old row: the whole table
        out.append(Record(f"{i}".encode(), f"pk{rng.randrange(50)}", key, f"c{i}"))
    return out


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_requests_overlap_and_nothing_overtakes_what_it_must_follow(seed: int) -> None:
    records = workload(3000, seed)
    client = ConcurrentFake(records, seed, failure_rate=0.2)
    clock = FakeClock()
    sink = KinesisSink(client, "s", sleep=clock.sleep, clock=clock, rng=MaxRng(), max_in_flight=8)  # type: ignore[arg-type]
    report = sink.put(records)
    assert client.violations == []
    assert client.acked == set(range(len(records)))
    assert report.user_records == len(records) and report.retried_entries > 0
    assert client.max_in_flight > 1, "requests never overlapped"
    # Per conflict, acknowledgement order is input order.
    position = {i: p for p, i in enumerate(client.ack_order)}
    for i, earlier in enumerate(client.follows):
        assert all(position[j] < position[i] for j in earlier)


def test_keyless_inserts_travel_together_but_a_table_wide_change_waits_for_them_all() -> None:
    table = ("table", "public", "events")
    inserts = [Record(b"%d" % i, "t", OrderingKeys((SharedKey(table), ("image", i))), f"c{i}") for i in range(5)]
    wide = Record(b"w", "t", table, "cw")
    after = Record(b"a", "t", OrderingKeys((SharedKey(table), ("image", 99))), "ca")
    pending = [*inserts, wide, after]
    assert next_request(pending) == [0, 1, 2, 3, 4]  # distinct rows: one request
    assert next_request(pending[5:]) == [0]  # the table-wide change alone once they are acknowledged
    assert next_request([inserts[0], *pending[5:]]) == [0]  # ... and not before; nor what follows it


def test_one_request_at_a_time_when_asked() -> None:
    records = workload(500, 4)
    client = ConcurrentFake(records, 4, failure_rate=0.1)
    clock = FakeClock()
    KinesisSink(client, "s", sleep=clock.sleep, clock=clock, rng=MaxRng(), max_in_flight=1).put(records)  # type: ignore[arg-type]
    assert client.max_in_flight == 1 and client.violations == []
