"""The fast formatters write the bytes the straightforward json.dumps code wrote (pg2kinesis compatibility)."""

from __future__ import annotations

import json

from hypothesis import given, settings
from hypothesis import strategies as st

from pg2kinesis_dagster.core.changes import Change, Column, Operation, format_lsn
from pg2kinesis_dagster.core.formats import CSVPayloadFormatter, JSONFormatter, dumps, pkey_text, row_object

TEXT = st.text(st.characters(blacklist_categories=("Cs",)), max_size=12)
VALUE = st.none() | TEXT


@st.composite
def changes(draw: st.DrawFn) -> Change:
    columns = draw(st.lists(st.tuples(TEXT, VALUE), min_size=1, max_size=4, unique_by=lambda c: c[0]))
    image = tuple(Column(name, "text", value) for name, value in columns)
    op = draw(st.sampled_from(list(Operation)))
    keys = draw(st.integers(0, len(columns)))
    change = Change(draw(st.integers(0, 2**32 - 1)), draw(st.integers(0, 2**64 - 1)), draw(st.integers(0, 10**6)),
                    draw(TEXT), draw(TEXT), op, image if op is not Operation.DELETE else None,
                    draw(st.none() | st.just(image)), commit_lsn=draw(st.integers(0, 2**64 - 1)),
                    commit_time=draw(st.none() | TEXT))
    change.pk = {name: value for name, value in columns[:keys]} or None
    return change


def reference_csv_payload(change: Change) -> bytes:
    payload = {"xid": str(change.xid), "table": change.qualified_table, "operation": change.op.value,
               "pkey": pkey_text(change)}
    return ("0,CDC," + json.dumps(payload, ensure_ascii=False)).encode()


def reference_json(change: Change) -> bytes:
    payload = {"id": change.id, "lsn": format_lsn(change.lsn), "commit_lsn": format_lsn(change.commit_lsn),
               "xid": change.xid, "commit_ts": change.commit_time, "table": change.qualified_table,
               "op": change.op.value, "pk": change.pk, "after": row_object(change.after),
               "before": row_object(change.before)}
    return json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode()


@settings(max_examples=500)
@given(st.lists(changes(), min_size=1, max_size=5))
def test_csv_payload_and_json_bytes_are_the_reference_bytes(batch: list[Change]) -> None:
    csv, js = CSVPayloadFormatter(), JSONFormatter()  # one formatter for the batch: its caches are exercised
    for change in batch:
        assert csv.format(change) == reference_csv_payload(change)
        assert js.format(change) == reference_json(change)


def test_dumps_falls_back_for_what_orjson_refuses() -> None:
    for value in (2**64, -(2**63) - 1, ["x", {"a": 2**70}]):
        assert dumps(value) == json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode()
