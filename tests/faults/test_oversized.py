"""Rows whose record would exceed Kinesis's 1 MiB limit: ``--oversized fail`` (default) or ``truncate``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pg2kinesis_dagster.core.batching import MAX_RECORD_BYTES
from pg2kinesis_dagster.core.changes import Change, Column, Operation, Transaction, format_lsn
from pg2kinesis_dagster.core.errors import ConfigError, RecordTooLargeError
from pg2kinesis_dagster.core.formats import CSVPayloadFormatter, JSONFormatter
from pg2kinesis_dagster.core.oversize import (
    TRUNCATED_PREFIX,
    OversizedPolicy,
    fit_record,
    is_truncated,
    truncated_marker,
)
from pg2kinesis_dagster.core.records import RecordBuilder
from pg2kinesis_dagster.devstack.moto import MotoServer
from pg2kinesis_dagster.devstack.postgres import PostgresServer
from tests.faults.harness import confirmed_lsn, drain_once, run_once, stack_args
from tests.helpers import read_json

MiB = 1024 * 1024


def _change(op: Operation = Operation.UPDATE, **values: str | None) -> Change:
    after = tuple(Column(name, "text", value) for name, value in values.items())
    before = after if op is Operation.DELETE else None
    return Change(xid=7, lsn=100, index=0, schema="public", table="docs", op=op,
                  after=None if op is Operation.DELETE else after, before=before, commit_lsn=200,
                  pk={"id": values.get("id")})


def test_fitting_record_is_untouched() -> None:
    change = _change(id="1", body="small")
    data, truncated = fit_record(change, JSONFormatter().format, "public.docs:1")
    assert truncated == [] and data == JSONFormatter().format(change)


def test_largest_values_are_truncated_first_until_it_fits_and_the_key_never() -> None:
    change = _change(id="k" * 2000, big="b" * (900 * 1024), medium="m" * (300 * 1024), small="s" * 1000)
    data, truncated = fit_record(change, JSONFormatter().format, "public.docs:k", protected=("id",))
    assert truncated == ["big"], "truncating the largest value is enough"
    assert len(data) + len("public.docs:k") <= MAX_RECORD_BYTES
    after = json.loads(data)["after"]
    assert after["big"] == truncated_marker(900 * 1024) == f"{TRUNCATED_PREFIX}{900 * 1024}"
    assert after["medium"] == "m" * (300 * 1024) and after["id"] == "k" * 2000
    assert is_truncated(after["big"]) and not is_truncated(after["medium"])
    # The change itself is not modified.
    assert change.after is not None and change.after[1].value == "b" * (900 * 1024)


def test_several_values_and_both_images() -> None:
    # REPLICA IDENTITY FULL delete: the old row image holds the big values.
    change = _change(Operation.DELETE, id="1", a="a" * (700 * 1024), b="é" * (400 * 1024), c="c" * (600 * 1024))
    data, truncated = fit_record(change, JSONFormatter().format, "public.docs:1", protected=("id",))
    before = json.loads(data)["before"]
    assert truncated == ["b", "a"]  # b is 800 KiB in UTF-8: largest first, then a; c then fits
    assert before["b"] == truncated_marker(800 * 1024) and before["a"] == truncated_marker(700 * 1024)
    assert before["c"] == "c" * (600 * 1024) and len(data) <= MAX_RECORD_BYTES


def test_any_format_and_a_custom_limit() -> None:
    change = _change(id="1", body="x" * 5000)
    formatter = CSVPayloadFormatter(full_change=True)
    data, truncated = fit_record(change, formatter.format, "p", limit=1000, protected=("id",))
    assert truncated == ["body"] and TRUNCATED_PREFIX.encode() in data and len(data) + 1 <= 1000


def test_what_cannot_fit_still_fails_clearly() -> None:
    change = _change(id="k" * (2 * MiB), body="x")
    with pytest.raises(RecordTooLargeError, match=r"even with every non-key column value truncated \(body\)"):
        fit_record(change, JSONFormatter().format, "p", protected=("id",))


def test_policy_parsing() -> None:
    assert OversizedPolicy.parse("TRUNCATE") is OversizedPolicy.TRUNCATE
    with pytest.raises(ConfigError, match="use fail or truncate"):
        OversizedPolicy.parse("drop")


def test_record_builder_counts_truncated_records() -> None:
    big = _change(id="1", body="x" * (2 * MiB))
    small = _change(id="2", body="y")
    small.index = 1
    txn = Transaction(xid=7, begin_lsn=100, commit_lsn=200, commit_time=None, changes=[big, small])
    lookup = lambda schema, table: ("id",)  # noqa: E731
    builder = RecordBuilder(formatter=JSONFormatter(), key_lookup=lookup, oversized=OversizedPolicy.TRUNCATE)
    records, stats = builder.build([txn])
    assert stats.truncated_records == 1 and stats.published == 2
    assert all(r.size <= MAX_RECORD_BYTES for r in records)
    # "fail" leaves the record as it is: the sink refuses the batch before sending anything.
    records, stats = RecordBuilder(formatter=JSONFormatter(), key_lookup=lookup).build([txn])
    assert stats.truncated_records == 0 and records[0].size > MAX_RECORD_BYTES


@pytest.fixture
def docs_db(pg_database: str, pg_conn) -> str:
    with pg_conn.cursor() as cur:
        cur.execute("CREATE TABLE docs (id int PRIMARY KEY, title text, body text)")
    return pg_database


def _insert_big_row(pg_conn) -> None:
    with pg_conn.cursor() as cur:
        cur.execute("INSERT INTO docs VALUES (1, 'small', 'fine')")
        # Incompressible-ish text, well over 1 MiB once formatted.
        cur.execute("INSERT INTO docs SELECT 2, 'big', string_agg(md5(i::text), '') FROM generate_series(1, 40000) i")
        cur.execute("INSERT INTO docs VALUES (3, 'after', 'fine')")


def test_cli_default_fails_and_leaves_the_slot_then_truncate_publishes(
    pg_server: PostgresServer, docs_db: str, pg_conn, moto_server: MotoServer, kinesis_stream: str, tmp_path: Path
) -> None:
    args = stack_args(pg_server, docs_db, moto_server.endpoint_url, kinesis_stream)
    drain_once([*args, "--create-slot"], tmp_path, "create", pg_server, docs_db)
    _insert_big_row(pg_conn)
    before = confirmed_lsn(pg_server, docs_db)
    assert before is not None

    failed = run_once(args, tmp_path, "fail")
    assert failed.poll() == 1
    assert "is 1280" in failed.stderr and "1 MiB" in failed.stderr, failed.stderr
    assert f"stays at {format_lsn(before)}" in failed.stderr
    assert confirmed_lsn(pg_server, docs_db) == before
    assert read_json(moto_server, kinesis_stream) == []

    ok = run_once([*args, "--oversized", "truncate"], tmp_path, "truncate")
    assert ok.poll() == 0, ok.stderr
    summary = json.loads(ok.stdout.strip().splitlines()[-1])
    assert summary["truncated_records"] == 1 and summary["published"] == 3
    records = {r["pk"]["id"]: r for r in read_json(moto_server, kinesis_stream)}
    assert sorted(records) == ["1", "2", "3"]
    assert records["2"]["after"] == {"id": "2", "title": "big", "body": truncated_marker(40000 * 32)}
    assert records["3"]["after"]["body"] == "fine"
