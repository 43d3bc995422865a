"""PutRecords bodies built by kinesis/put_records_body.py: botocore's, byte for byte, and what moto stores."""

from __future__ import annotations

import re
import uuid
from typing import Any

import botocore.session
import pytest
from botocore.serialize import create_serializer
from hypothesis import given, settings
from hypothesis import strategies as st

from pg2kinesis_dagster.devstack.moto import MotoServer
from pg2kinesis_dagster.kinesis import put_records_body
from pg2kinesis_dagster.kinesis.put_records_body import STAND_IN
from pg2kinesis_dagster.kinesis.sink import make_kinesis_client

_PUT_RECORDS = botocore.session.get_session().get_service_model("kinesis").operation_model("PutRecords")
_NO_SURROGATES = st.characters(blacklist_categories=("Cs",))  # a str blob is UTF-8 encoded: no lone surrogates


def botocore_body(params: dict[str, Any]) -> bytes:
    return create_serializer("json").serialize_to_request(params, _PUT_RECORDS)["body"]


def _entry(data: bytes | str, key: str, explicit: str | None) -> dict[str, Any]:
    # Fields in the order the sink builds them (botocore keeps the caller's order).
    entry: dict[str, Any] = {"Data": data, "PartitionKey": key}
    if explicit is not None:
        entry["ExplicitHashKey"] = explicit
    return entry


entries = st.builds(
    _entry,
    st.binary(max_size=400) | st.text(_NO_SURROGATES, max_size=60),
    st.text(min_size=1, max_size=256),
    st.none() | st.integers(0, 2**128 - 1).map(str),
)


@settings(max_examples=300, deadline=None)
@given(st.text(min_size=1, max_size=128), st.lists(entries, min_size=1, max_size=12))
def test_body_is_botocores_byte_for_byte(stream_name: str, records: list[dict[str, Any]]) -> None:
    params = {"StreamName": stream_name, "Records": records}
    assert put_records_body.put_records_body(stream_name, records) == botocore_body(params)


def test_the_hooks_swap_the_body_and_moto_stores_every_record(
    moto_server: MotoServer, aws_fake_env: str
) -> None:
    client = make_kinesis_client(endpoint_url=moto_server.endpoint_url)
    stream = f"body-{uuid.uuid4().hex[:12]}"
    moto_server.create_stream(stream, shards=2)
    sent: list[bytes] = []
    client.meta.events.register("before-send.kinesis.PutRecords", lambda request, **_: sent.append(request.body))
    records = [
        _entry(bytes(range(256)) * 3, 'quote " backslash \\ newline \n é ☃', None),
        _entry(b"", "empty data", None),
        _entry("a str blob, é", "str", None),
        _entry(b"\x00explicit", "explicit", str(2**127)),
    ]

    answer = client.put_records(StreamName=stream, Records=records)

    assert answer["FailedRecordCount"] == 0 and len(answer["Records"]) == len(records)
    # The body on the wire is the one built here (botocore's stand-in never left).
    assert sent == [botocore_body({"StreamName": stream, "Records": records})]
    stored = sorted((r["partition_key"], r["data"]) for r in moto_server.read_stream(stream))
    expected = sorted(
        (e["PartitionKey"], e["Data"].encode() if isinstance(e["Data"], str) else e["Data"]) for e in records
    )
    assert stored == expected


def test_other_parameters_go_through_botocore_untouched() -> None:
    arn = "arn:aws:kinesis:us-east-1:123456789012:stream/s"
    for params in (
        {"StreamARN": arn, "Records": [{"Data": b"x", "PartitionKey": "k"}]},
        {"StreamName": "s", "StreamARN": arn, "Records": [{"Data": b"x", "PartitionKey": "k"}]},
        {"StreamName": "s", "Records": [{"Data": b"x", "PartitionKey": "k", "Unknown": 1}]},
        {"StreamName": "s", "Records": [{"Data": 5, "PartitionKey": "k"}]},
        {"StreamName": "s", "Records": []},
    ):
        before = repr(params)
        context: dict[str, Any] = {}
        put_records_body._build_body(params, context=context)
        assert repr(params) == before and context == {}


def test_without_a_context_nothing_is_replaced() -> None:
    params: dict[str, Any] = {"StreamName": "s", "Records": [{"Data": b"x", "PartitionKey": "k"}]}
    put_records_body._build_body(params, context=None)
    assert params["Records"] == [{"Data": b"x", "PartitionKey": "k"}]


def test_the_stand_in_is_refused_by_kinesis_if_it_were_ever_sent() -> None:
    """The stand-in's explicit hash key breaks the API's pattern: AWS answers ValidationException."""
    shape = _PUT_RECORDS.input_shape.members["Records"].member.members["ExplicitHashKey"]
    assert re.fullmatch(shape.metadata["pattern"], "12345")
    assert not re.fullmatch(shape.metadata["pattern"], STAND_IN["ExplicitHashKey"])


@pytest.mark.parametrize("count", [1, 500])
def test_a_request_of_many_entries_is_one_body(count: int) -> None:
    records = [_entry(bytes([i % 256]) * 10, f"k{i}", None) for i in range(count)]
    params: dict[str, Any] = {"StreamName": "s", "Records": list(records)}
    context: dict[str, Any] = {}
    put_records_body._build_body(params, context=context)
    assert params["Records"] == [STAND_IN]
    request: dict[str, Any] = {"body": b"botocore's"}
    put_records_body._use_body(request, context=context)
    assert request["body"] == botocore_body({"StreamName": "s", "Records": records}) and context == {}
