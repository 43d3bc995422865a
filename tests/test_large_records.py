"""Streams that take records up to 10 MiB: the limit is read from the stream, not assumed."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest

from pg2kinesis_dagster.core.batching import MAX_REQUEST_BYTES, request_bytes_limit
from pg2kinesis_dagster.core.errors import RecordTooLargeError
from pg2kinesis_dagster.devstack.moto import MotoServer
from pg2kinesis_dagster.devstack.postgres import PostgresServer
from pg2kinesis_dagster.kinesis.sink import KinesisSink, make_kinesis_client
from pg2kinesis_dagster.pipeline import ReplicationSettings, Replicator
from tests.helpers import confirmed_flush, pg_settings
from tests.large_records_proxy import MIB, LargeRecordsProxy
from tests.test_aggregation import deaggregate


def test_request_limit_grows_with_the_record_limit() -> None:
    assert request_bytes_limit() == MAX_REQUEST_BYTES == 5 * MIB
    assert request_bytes_limit(8 * MIB) == 8 * MIB and request_bytes_limit(10 * MIB) == 10 * MIB
    assert request_bytes_limit(64 * MIB) == 10 * MIB


@pytest.fixture
def large_rows(pg_conn) -> Iterator[None]:
    with pg_conn.cursor() as cur:
        cur.execute("CREATE TABLE docs (id int PRIMARY KEY, body text)")
    yield


def _replicator(server: PostgresServer, db: str, endpoint: str, stream: str, **settings: object) -> Replicator:
    sink = KinesisSink(make_kinesis_client(region_name=MotoServer.region, endpoint_url=endpoint), stream,
                       max_retry_seconds=20.0, aggregate=bool(settings.pop("aggregate", False)))
    return Replicator(pg_settings(server, db), sink,
                      ReplicationSettings(create_slot=True, message_formatter="JSON", **settings))  # type: ignore[arg-type]


def _write(pg_conn) -> None:
    with pg_conn.cursor() as cur:
        cur.execute("BEGIN")
        # Two 4 MiB documents and small rows around them, in one transaction.
        cur.execute("INSERT INTO docs SELECT g, 'small' FROM generate_series(1, 20) g")
        cur.execute("INSERT INTO docs VALUES (100, repeat('a', 4 * 1024 * 1024)), (101, repeat('b', 4 * 1024 * 1024))")
        cur.execute("UPDATE docs SET body = 'edited' WHERE id <= 5")
        cur.execute("COMMIT")


@pytest.mark.parametrize("aggregate", [False, True])
def test_a_stream_with_10_mib_records_takes_them_whole(
    aggregate: bool, pg_server: PostgresServer, pg_database: str, pg_conn, large_rows: None,
    moto_server: MotoServer, kinesis_stream: str,
) -> None:
    with LargeRecordsProxy(moto_server.endpoint_url, max_record_kib=10240) as proxy, \
            _replicator(pg_server, pg_database, proxy.endpoint_url, kinesis_stream, aggregate=aggregate) as replicator:
        replicator.prepare()
        assert replicator.sink.max_record_bytes == 10 * MIB
        assert replicator.builder.max_record_bytes == 10 * MIB
        _write(pg_conn)
        result = replicator.drain()
        assert result.stats.published == 27
    assert proxy.violations == []
    assert max(proxy.record_bytes) > 4 * MIB, "the large documents went as records of their own"
    assert max(proxy.request_bytes) > MAX_REQUEST_BYTES, "a request beyond 5 MiB, as such a stream allows"
    bodies: dict[str, str] = {}
    for record in moto_server.read_stream(kinesis_stream):
        data = proxy.original(record["data"] if isinstance(record["data"], bytes) else record["data"].encode())
        for _key, user in deaggregate(data, record["partition_key"]):  # plain records pass through
            change = json.loads(user)
            bodies[change["id"]] = change["after"]["body"]
    assert sorted(len(b) for b in bodies.values())[-2:] == [4 * MIB, 4 * MIB]
    assert len(bodies) == 27


def test_without_the_field_the_limit_stays_1_mib(
    pg_server: PostgresServer, pg_database: str, pg_conn, large_rows: None, moto_server: MotoServer,
    kinesis_stream: str,
) -> None:
    with LargeRecordsProxy(moto_server.endpoint_url, max_record_kib=None) as proxy, \
            _replicator(pg_server, pg_database, proxy.endpoint_url, kinesis_stream) as replicator:
        replicator.prepare()
        assert replicator.sink.max_record_bytes == MIB
        before = confirmed_flush(pg_server, pg_database)
        _write(pg_conn)
        with pytest.raises(RecordTooLargeError, match="accepts at most 1048576 bytes \\(1 MiB\\)") as err:
            replicator.drain()
        assert "update-max-record-size" in str(err.value)
    assert confirmed_flush(pg_server, pg_database) == before, "nothing was advanced"
    assert proxy.request_bytes == [], "nothing was sent"


def test_truncation_aims_at_the_streams_limit(
    pg_server: PostgresServer, pg_database: str, pg_conn, large_rows: None, moto_server: MotoServer,
    kinesis_stream: str,
) -> None:
    with LargeRecordsProxy(moto_server.endpoint_url, max_record_kib=5 * 1024) as proxy, \
            _replicator(pg_server, pg_database, proxy.endpoint_url, kinesis_stream, oversized="truncate") as replicator:
        replicator.prepare()
        _write(pg_conn)
        result = replicator.drain()
    # 4 MiB documents fit a 5 MiB stream: nothing was truncated (a 1 MiB assumption would have cut both).
    assert result.stats.truncated_records == 0 and proxy.violations == []
