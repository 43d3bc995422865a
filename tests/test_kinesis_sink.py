"""KinesisSink: happy path and errors against moto over HTTP; retry logic with a fake client."""

from __future__ import annotations

import random
import socket
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from typing import Any

import boto3
import pytest
from botocore.config import Config
from botocore.exceptions import (
    ClientError,
    ConnectionClosedError,
    EndpointConnectionError,
    ReadTimeoutError,
)

from pg2kinesis_dagster.core.batching import MAX_RECORD_BYTES, Record
from pg2kinesis_dagster.core.errors import RecordTooLargeError, SinkError
from pg2kinesis_dagster.devstack.moto import MotoServer
from pg2kinesis_dagster.kinesis.sink import KinesisSink, PutReport, make_kinesis_client


def make_records(n: int, keys: int, size: int = 40) -> list[Record]:
    out = []
    for i in range(n):
        key = i % keys
        payload = f"{key}:{i}:".encode()
        out.append(Record(payload + b"." * max(0, size - len(payload)), f"row-{key}", key, f"c{i}"))
    return out


def by_partition_key(read: list[dict[str, Any]]) -> dict[str, list[bytes]]:
    grouped: dict[str, list[bytes]] = defaultdict(list)
    for r in read:
        grouped[r["partition_key"]].append(r["data"])
    return grouped


# -- against the moto server ------------------------------------------------------


def test_put_2000_records_and_read_back_in_order(
    moto_server: MotoServer, kinesis_client: Any, kinesis_stream: str
) -> None:
    records = make_records(2000, keys=37)
    sink = KinesisSink(kinesis_client, kinesis_stream)
    assert sink.check_stream()["StreamStatus"] == "ACTIVE"

    report = sink.put(records)

    assert isinstance(report, PutReport)
    assert report.records == 2000
    assert report.retried_entries == 0
    # 37 keys: at most 37 records per request, one per key.
    assert report.requests == -(-2000 // 37)
    read = moto_server.read_stream(kinesis_stream)
    assert len(read) == 2000
    assert len({r["shard_id"] for r in read}) == 2  # the keys spread over both shards
    expected: dict[str, list[bytes]] = defaultdict(list)
    for r in records:
        expected[r.partition_key].append(r.data)
    assert by_partition_key(read) == expected


def test_rows_keep_order_when_partition_key_is_coarser(
    moto_server: MotoServer, kinesis_client: Any, kinesis_stream: str
) -> None:
    # Partition by table, order by row: many rows per request, each row in order.
    records = [
        Record(f"{row}:{version}".encode(), f"table-{row % 2}", ("t", row), f"c{row}-{version}")
        for version in range(5)
        for row in range(300)
    ]
    report = KinesisSink(kinesis_client, kinesis_stream).put(records)
    assert report.records == 1500
    versions: dict[str, list[int]] = defaultdict(list)
    for r in moto_server.read_stream(kinesis_stream):
        row, version = r["data"].decode().split(":")
        versions[row].append(int(version))
    assert len(versions) == 300
    assert all(v == [0, 1, 2, 3, 4] for v in versions.values())


def test_missing_stream_is_a_clear_error(kinesis_client: Any, moto_server: MotoServer) -> None:
    sink = KinesisSink(kinesis_client, "no-such-stream")
    with pytest.raises(SinkError) as info:
        sink.check_stream()
    text = str(info.value)
    assert "'no-such-stream' does not exist" in text
    assert "create-stream" in text and "--stream-name" in text
    assert "us-east-1" in text and moto_server.endpoint_url in text
    assert "testing" not in text  # no credentials in messages

    with pytest.raises(SinkError, match="does not exist") as put_info:
        sink.put(make_records(3, keys=3))
    assert "0 of 3 records were acknowledged" in str(put_info.value)


def test_oversized_record_fails_before_anything_is_sent(
    moto_server: MotoServer, kinesis_client: Any, kinesis_stream: str
) -> None:
    records = make_records(10, keys=10)
    records.insert(7, Record(b"x" * MAX_RECORD_BYTES, "big", "big", "public.blobs:1@0/AB"))
    with pytest.raises(RecordTooLargeError, match=r"public\.blobs:1@0/AB"):
        KinesisSink(kinesis_client, kinesis_stream).put(records)
    assert moto_server.read_stream(kinesis_stream) == []


def test_make_kinesis_client_uses_endpoint_from_environment(
    kinesis_stream: str, aws_fake_env: str
) -> None:
    # aws_fake_env set AWS_ENDPOINT_URL_KINESIS; endpoint_url=None must honour it.
    client = make_kinesis_client(region_name="us-east-1")
    assert client.meta.endpoint_url == aws_fake_env
    sink = KinesisSink(client, kinesis_stream)
    sink.check_stream()
    assert sink.put(make_records(5, keys=2)).records == 5


def test_unreachable_endpoint_is_retried_then_reported() -> None:
    # A port nothing listens on: real botocore connection errors, retried until
    # the (short) deadline.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    client = boto3.session.Session(
        aws_access_key_id="testing", aws_secret_access_key="testing", region_name="us-east-1"
    ).client(
        "kinesis",
        endpoint_url=f"http://127.0.0.1:{port}",
        config=Config(connect_timeout=1, retries={"max_attempts": 1}),
    )
    sink = KinesisSink(client, "s", max_retry_seconds=0.5, base_backoff=0.01, max_backoff=0.05)
    started = time.monotonic()
    with pytest.raises(SinkError, match="0 of 4 records were acknowledged") as info:
        sink.put(make_records(4, keys=4))
    assert time.monotonic() - started < 10
    assert "EndpointConnectionError" in str(info.value)
    assert "not be advanced" in str(info.value)


# -- retry logic with a fake client -------------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        assert seconds >= 0
        self.sleeps.append(seconds)
        self.now += seconds


class MaxRng:
    """Full jitter draws uniform(0, cap); returning the cap makes delays predictable."""

    def uniform(self, a: float, b: float) -> float:
        return b


Behaviour = Callable[[int, list[dict[str, Any]]], Any]


class FakeKinesis:
    """Records every PutRecords call; ``behaviour(call_no, entries)`` returns per-entry
    error codes (None = success) or raises."""

    class meta:  # mimics botocore's client.meta
        region_name = "eu-west-1"
        endpoint_url = "https://kinesis.eu-west-1.amazonaws.com"

    def __init__(self, behaviour: Behaviour | None = None) -> None:
        self.behaviour = behaviour or (lambda n, entries: [None] * len(entries))
        self.calls: list[list[dict[str, Any]]] = []
        self.stored: list[dict[str, Any]] = []
        self.summary_status = "ACTIVE"
        self.summary_error: Exception | None = None

    def put_records(self, *, StreamName: str, Records: list[dict[str, Any]]) -> dict[str, Any]:
        self.calls.append(list(Records))
        codes = self.behaviour(len(self.calls), Records)
        if isinstance(codes, dict):
            return codes  # a raw (possibly malformed) response
        results = []
        for entry, code in zip(Records, codes, strict=True):
            if code is None:
                self.stored.append(entry)
                results.append({"SequenceNumber": str(len(self.stored)), "ShardId": "shardId-0"})
            else:
                results.append({"ErrorCode": code, "ErrorMessage": f"{code} message"})
        return {"FailedRecordCount": sum(c is not None for c in codes), "Records": results}

    def describe_stream_summary(self, *, StreamName: str) -> dict[str, Any]:
        if self.summary_error is not None:
            raise self.summary_error
        return {"StreamDescriptionSummary": {"StreamName": StreamName, "StreamStatus": self.summary_status}}


def client_error(code: str, status: int = 400, message: str = "boom") -> ClientError:
    return ClientError(
        {"Error": {"Code": code, "Message": message}, "ResponseMetadata": {"HTTPStatusCode": status}},
        "PutRecords",
    )


def make_sink(client: FakeKinesis, clock: FakeClock, **kwargs: Any) -> KinesisSink:
    # One request at a time: these tests pin the exact retry schedule (concurrency: test_sink_concurrency.py).
    kwargs.setdefault("max_in_flight", 1)
    return KinesisSink(client, "orders", sleep=clock.sleep, clock=clock, rng=MaxRng(), **kwargs)  # type: ignore[arg-type]


def keys_in_order(entries: Sequence[dict[str, Any]]) -> dict[str, list[bytes]]:
    out: dict[str, list[bytes]] = defaultdict(list)
    for e in entries:
        out[e["PartitionKey"]].append(e["Data"])
    return out


def test_failed_entries_are_retried_alone_and_keep_key_order() -> None:
    records = make_records(12, keys=4)  # 3 changes of each of 4 rows

    def behaviour(n: int, entries: list[dict[str, Any]]) -> list[str | None]:
        if n == 1:  # first request: rows 0..3 first change; fail rows 1 and 3
            return [None, "ProvisionedThroughputExceededException", None, "InternalFailure"]
        return [None] * len(entries)

    client, clock = FakeKinesis(behaviour), FakeClock()
    report = make_sink(client, clock).put(records)

    assert [e["Data"][:4] for e in client.calls[1]] == [b"1:1:", b"3:3:", b"0:4:", b"2:6:"]
    assert report.records == 12
    assert report.retried_entries == 2
    assert report.throttled_entries == 1
    assert report.requests == len(client.calls)
    assert len(client.stored) == 12
    assert keys_in_order(client.stored) == keys_in_order(
        [{"Data": r.data, "PartitionKey": r.partition_key} for r in records]
    )
    assert clock.sleeps == [0.1]  # one backoff after the round with failures


def test_entry_dicts_are_reused_not_rebuilt() -> None:
    records = make_records(3, keys=3)

    def behaviour(n: int, entries: list[dict[str, Any]]) -> list[str | None]:
        return ["InternalFailure", None, None] if n == 1 else [None]

    client, clock = FakeKinesis(behaviour), FakeClock()
    make_sink(client, clock).put(records)
    assert client.calls[1][0] is client.calls[0][0]


@pytest.mark.parametrize(
    "error",
    [
        client_error("ProvisionedThroughputExceededException"),
        client_error("ThrottlingException"),
        client_error("InternalFailure", 500),
        client_error("SomethingNew", 503),
        client_error("KMSThrottlingException"),
        EndpointConnectionError(endpoint_url="https://kinesis.example"),
        ConnectionClosedError(endpoint_url="https://kinesis.example"),
        ReadTimeoutError(endpoint_url="https://kinesis.example"),
    ],
    ids=lambda e: (
        f"ClientError-{e.response['Error']['Code']}" if isinstance(e, ClientError) else type(e).__name__
    ),
)
def test_whole_request_failures_are_retried_with_all_entries(error: Exception) -> None:
    records = make_records(6, keys=6)

    def behaviour(n: int, entries: list[dict[str, Any]]) -> list[str | None]:
        if n <= 2:
            raise error
        return [None] * len(entries)

    client, clock = FakeKinesis(behaviour), FakeClock()
    report = make_sink(client, clock).put(records)
    assert len(client.calls) == 3
    assert client.calls[0] == client.calls[1] == client.calls[2]
    assert len(client.stored) == 6
    assert report.retried_entries == 12
    assert clock.sleeps == [0.1, 0.2]


@pytest.mark.parametrize(
    ("code", "expected"),
    [
        ("ResourceNotFoundException", "does not exist"),
        ("AccessDeniedException", "kinesis:PutRecords"),
        ("ValidationException", "invalid"),
        ("InvalidArgumentException", "invalid"),
        ("KMSDisabledException", "KMS key"),
        ("KMSNotFoundException", "KMS key"),
        ("KMSAccessDeniedException", "KMS key"),
    ],
)
def test_non_retryable_request_errors_raise_at_once(code: str, expected: str) -> None:
    def behaviour(n: int, entries: list[dict[str, Any]]) -> Any:
        raise client_error(code)

    client, clock = FakeKinesis(behaviour), FakeClock()
    with pytest.raises(SinkError, match=expected) as info:
        make_sink(client, clock).put(make_records(5, keys=5))
    assert len(client.calls) == 1
    assert clock.sleeps == []
    assert "0 of 5 records were acknowledged, 5 were not" in str(info.value)


def test_per_entry_kms_key_error_raises_at_once() -> None:
    def behaviour(n: int, entries: list[dict[str, Any]]) -> list[str | None]:
        return [None, "KMSDisabledException", None]

    client, clock = FakeKinesis(behaviour), FakeClock()
    with pytest.raises(SinkError, match="KMSDisabledException") as info:
        make_sink(client, clock).put(make_records(3, keys=3))
    assert "2 of 3 records were acknowledged, 1 were not" in str(info.value)
    assert len(client.calls) == 1


def test_unknown_per_entry_error_is_retried() -> None:
    def behaviour(n: int, entries: list[dict[str, Any]]) -> list[str | None]:
        return ["SomeFutureError"] * len(entries) if n == 1 else [None] * len(entries)

    client, clock = FakeKinesis(behaviour), FakeClock()
    assert make_sink(client, clock).put(make_records(3, keys=3)).retried_entries == 3


def test_backoff_is_exponential_capped_and_jittered() -> None:
    def behaviour(n: int, entries: list[dict[str, Any]]) -> list[str | None]:
        return ["ProvisionedThroughputExceededException"] * len(entries) if n <= 8 else [None] * len(entries)

    client, clock = FakeKinesis(behaviour), FakeClock()
    make_sink(client, clock, base_backoff=0.1, max_backoff=2.0).put(make_records(2, keys=2))
    assert clock.sleeps == pytest.approx([0.1, 0.2, 0.4, 0.8, 1.6, 2.0, 2.0, 2.0])

    # Real jitter: every delay within [0, cap].
    client, clock = FakeKinesis(behaviour), FakeClock()
    KinesisSink(client, "orders", sleep=clock.sleep, clock=clock, rng=random.Random(1),  # type: ignore[arg-type]
                max_backoff=2.0).put(make_records(2, keys=2))
    caps = [0.1, 0.2, 0.4, 0.8, 1.6, 2.0, 2.0, 2.0]
    assert all(0 <= s <= c for s, c in zip(clock.sleeps, caps, strict=True))
    assert clock.sleeps != caps


def test_partial_progress_keeps_backoff_short() -> None:
    # Each round throttles its first entry but acknowledges the rest: the
    # backoff must not escalate while records are being acknowledged.
    def behaviour(n: int, entries: list[dict[str, Any]]) -> list[str | None]:
        if len(entries) == 1:
            return [None]
        return ["ProvisionedThroughputExceededException"] + [None] * (len(entries) - 1)

    client, clock = FakeKinesis(behaviour), FakeClock()
    report = make_sink(client, clock).put(make_records(1000, keys=1000))
    assert report.records == 1000
    assert [len(c) for c in client.calls] == [500, 500, 2, 1]
    assert clock.sleeps == [0.1, 0.1, 0.1]


def test_gives_up_after_max_retry_seconds_without_progress() -> None:
    records = make_records(10, keys=10)

    def behaviour(n: int, entries: list[dict[str, Any]]) -> list[str | None]:
        if n == 1:  # 4 acknowledged, then permanent throttling
            return [None] * 4 + ["ProvisionedThroughputExceededException"] * 6
        return ["ProvisionedThroughputExceededException"] * len(entries)

    client, clock = FakeKinesis(behaviour), FakeClock()
    with pytest.raises(SinkError) as info:
        make_sink(client, clock, max_retry_seconds=30.0).put(records)
    text = str(info.value)
    assert "4 of 10 records were acknowledged, 6 were not" in text
    assert "slot will not be advanced" in text
    assert "ProvisionedThroughputExceededException" in text
    assert "'orders'" in text and "eu-west-1" in text
    assert sum(clock.sleeps) <= 30.0 + 1e-9
    assert sum(clock.sleeps) > 20.0


def test_mismatched_response_is_resent() -> None:
    def behaviour(n: int, entries: list[dict[str, Any]]) -> Any:
        if n == 1:
            return {"FailedRecordCount": 0, "Records": []}
        return [None] * len(entries)

    client, clock = FakeKinesis(behaviour), FakeClock()
    report = make_sink(client, clock).put(make_records(3, keys=3))
    assert client.calls[0] == client.calls[1]
    assert report.records == 3


def test_validation_happens_before_any_request() -> None:
    records = [*make_records(5, keys=5), Record(b"x", "", "k", "bad-key")]
    client, clock = FakeKinesis(), FakeClock()
    with pytest.raises(SinkError, match="bad-key"):
        make_sink(client, clock).put(records)
    assert client.calls == []


def test_empty_put_makes_no_request() -> None:
    client, clock = FakeKinesis(), FakeClock()
    assert make_sink(client, clock).put([]) == PutReport(0, 0, 0, 0, 0.0)
    assert client.calls == []


# -- check_stream with a fake client (states moto cannot produce) ---------------------


@pytest.mark.parametrize(("status", "hint"), [("CREATING", "still being created"), ("DELETING", "deleted")])
def test_check_stream_rejects_inactive_stream(status: str, hint: str) -> None:
    client = FakeKinesis()
    client.summary_status = status
    with pytest.raises(SinkError, match=hint):
        KinesisSink(client, "orders").check_stream()


def test_check_stream_accepts_updating_stream() -> None:
    client = FakeKinesis()
    client.summary_status = "UPDATING"
    KinesisSink(client, "orders").check_stream()


def test_check_stream_access_denied_names_permission() -> None:
    client = FakeKinesis()
    client.summary_error = client_error(
        "AccessDeniedException", message="User: arn:aws:iam::123:user/x is not authorized"
    )
    with pytest.raises(SinkError, match="kinesis:DescribeStreamSummary"):
        KinesisSink(client, "orders").check_stream()


# -- throughput (benchmark) ------------------------------------------------------------------


@pytest.mark.slow
def test_throughput_against_moto(
    moto_server: MotoServer, kinesis_client: Any, kinesis_stream: str, capsys: pytest.CaptureFixture[str]
) -> None:
    records = make_records(20_000, keys=20_000, size=200)
    started = time.perf_counter()
    report = KinesisSink(kinesis_client, kinesis_stream).put(records)
    elapsed = time.perf_counter() - started
    assert report.records == 20_000
    with capsys.disabled():
        print(f"\nput() against moto: {20_000 / elapsed:,.0f} records/s ({report.requests} requests)")
    assert len(moto_server.read_stream(kinesis_stream)) == 20_000
