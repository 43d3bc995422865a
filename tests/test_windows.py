"""Windows in chunks on the real stack: huge transactions, checkpoints while publishing, the spool as a cache."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest

from pg2kinesis_dagster import pipeline
from pg2kinesis_dagster.core.changes import parse_lsn
from pg2kinesis_dagster.devstack.moto import MotoServer
from pg2kinesis_dagster.devstack.postgres import PostgresServer
from pg2kinesis_dagster.devstack.workload import create_sample_schema, run_sample_workload
from pg2kinesis_dagster.kinesis.sink import PreparedPut, PutReport
from pg2kinesis_dagster.pipeline import Replicator
from tests.helpers import (
    assert_matches_ledger,
    check_against_ledger,
    confirmed_flush,
    make_replicator,
    read_json,
)


class PutFails(Exception):
    pass


def fail_on_put(replicator: Replicator, number: int) -> list[int]:
    """Make the replicator's ``number``-th put of a chunk raise (after nothing of it was sent); returns put sizes."""
    real_send = replicator.sink.send
    sizes: list[int] = []

    def send(prepared: PreparedPut) -> PutReport:
        if len(sizes) + 1 == number:
            raise PutFails(f"injected failure of put {number}")
        sizes.append(len(prepared.records))
        return real_send(prepared)

    replicator.sink.send = send  # type: ignore[method-assign]
    return sizes


@pytest.fixture
def sample_db(pg_database: str, pg_conn) -> str:
    create_sample_schema(pg_conn)
    return pg_database


def test_one_huge_transaction_is_read_formatted_and_published_in_chunks(
    pg_server: PostgresServer, pg_database: str, pg_conn, moto_server: MotoServer, kinesis_stream: str
) -> None:
    rows = 12_000
    with pg_conn.cursor() as cur:
        cur.execute("CREATE TABLE big (id int PRIMARY KEY, body text)")
    with make_replicator(pg_server, pg_database, moto_server, kinesis_stream, chunk_changes=1000) as r:
        r.prepare()
        before = confirmed_flush(pg_server, pg_database)
        with pg_conn.cursor() as cur:
            cur.execute("INSERT INTO big SELECT i, repeat('x', 50) || i FROM generate_series(1, %s) i", (rows,))
        window = r.peek()
        assert window.transactions == 1 and window.rows == rows + 2  # BEGIN, the rows, COMMIT: one COPY file
        formatted = r.format(window)
        assert formatted.chunk_count >= rows // 1000
        # Only the chunk that ends the transaction may move the slot.
        assert [c.advance_to is not None for c in formatted.chunks].count(True) == 1
        assert formatted.chunks[-1].advance_to == window.last_commit_lsn

        sizes = fail_on_put(r, 5)
        with pytest.raises(PutFails):
            r.publish(formatted)
        assert len(sizes) == 4 and max(sizes) <= 2000
        assert confirmed_flush(pg_server, pg_database) == before, "moved inside a transaction"

    with make_replicator(pg_server, pg_database, moto_server, kinesis_stream, chunk_changes=1000) as r:
        r.drain()
    records = read_json(moto_server, kinesis_stream)
    unique = {rec["id"]: rec for rec in records}
    assert len(unique) == rows
    # The acknowledged part of the open transaction was remembered: nothing was sent twice.
    assert len(records) == rows
    commits = {rec["commit_lsn"] for rec in unique.values()}
    assert len(commits) == 1
    # Ids are the whole transaction's indexes, across chunks and after the rerun.
    assert sorted(int(i.rpartition(":")[2]) for i in unique) == list(range(rows))
    assert sorted(int(rec["pk"]["id"]) for rec in unique.values()) == list(range(1, rows + 1))
    assert parse_lsn(confirmed_flush(pg_server, pg_database) or "0/0") >= parse_lsn(commits.pop())


def test_publishing_checkpoints_the_slot_so_a_failure_resends_only_the_chunk_in_flight(
    pg_server: PostgresServer, sample_db: str, pg_conn, moto_server: MotoServer, kinesis_stream: str
) -> None:
    with make_replicator(pg_server, sample_db, moto_server, kinesis_stream, chunk_changes=100) as r:
        r.prepare()
        before = confirmed_flush(pg_server, sample_db)
        ledger = run_sample_workload(pg_conn, transactions=200, seed=21)
        formatted = r.format(r.peek())
        assert formatted.chunk_count >= 5
        sizes = fail_on_put(r, 4)
        with pytest.raises(PutFails):
            r.publish(formatted)
        after_failure = confirmed_flush(pg_server, sample_db)
        assert after_failure != before, "no checkpoint while publishing"
        # The slot stands at the last commit of the third chunk: everything up to it is acknowledged.
        assert parse_lsn(after_failure or "0/0") == formatted.chunks[2].advance_to
        published_before = len(read_json(moto_server, kinesis_stream))
        assert published_before == sum(sizes)

    with make_replicator(pg_server, sample_db, moto_server, kinesis_stream, chunk_changes=100) as r:
        r.drain()
    records = read_json(moto_server, kinesis_stream)
    report = check_against_ledger(records, ledger)
    # Only the third chunk's transaction tail can be sent twice: records after its last commit.
    assert report.ok and report.unique == report.expected, report.as_dict()
    assert report.duplicates <= formatted.chunks[2].records


def test_a_gone_spool_is_read_again_from_the_slot(
    pg_server: PostgresServer, sample_db: str, pg_conn, moto_server: MotoServer, kinesis_stream: str,
    spool_root: str,
) -> None:
    with make_replicator(pg_server, sample_db, moto_server, kinesis_stream, chunk_changes=150) as r:
        r.prepare()
        ledger = run_sample_workload(pg_conn, transactions=120, seed=4)
        window = r.peek()
        # Changes committed after the window was read are not part of it, read again or not.
        later = run_sample_workload(pg_conn, transactions=10, seed=5)
        spool = r.spool.window(r.spool_key, window.window_id)
        assert spool.rows_manifest() is not None
        spool.remove()
        formatted = r.format(window)  # rows gone: read again from the slot, up to the window's last commit
        assert formatted.stats.transactions == window.transactions
        spool.remove()
        published = r.publish(formatted)  # rows and records gone: both rebuilt
        assert published.checkpoint_lsn == window.last_commit_lsn
        r.finish(published)
        assert not spool.exists()
        assert_matches_ledger(read_json(moto_server, kinesis_stream), ledger)
        r.drain()
    records = read_json(moto_server, kinesis_stream)
    report = check_against_ledger(records, list(ledger.transactions) + list(later.transactions))
    assert report.ok and report.duplicates == 0, report.as_dict()
    assert not any(Path(spool_root).glob(f"{r.spool_key}/*")), "a finished window left its spool"


def test_rerunning_publish_after_a_checkpoint_skips_what_the_slot_passed(
    pg_server: PostgresServer, sample_db: str, pg_conn, moto_server: MotoServer, kinesis_stream: str
) -> None:
    with make_replicator(pg_server, sample_db, moto_server, kinesis_stream, chunk_changes=100) as r:
        r.prepare()
        ledger = run_sample_workload(pg_conn, transactions=150, seed=8)
        formatted = r.format(r.peek())
        fail_on_put(r, 3)
        with pytest.raises(PutFails):
            r.publish(formatted)
        sent = len(read_json(moto_server, kinesis_stream))
        r.sink.send = type(r.sink).send.__get__(r.sink)  # type: ignore[method-assign]
        published = r.publish(formatted)  # the same window again, as "re-execute from failure" does
        r.finish(published)
    assert published.put.skipped_records >= sent - formatted.chunks[1].records
    report = check_against_ledger(read_json(moto_server, kinesis_stream), ledger)
    assert report.ok and report.unique == report.expected, report.as_dict()
    assert report.duplicates <= formatted.chunks[1].records


def test_budget_limits_end_a_window_at_a_commit(
    pg_server: PostgresServer, sample_db: str, pg_conn, moto_server: MotoServer, kinesis_stream: str
) -> None:
    with make_replicator(pg_server, sample_db, moto_server, kinesis_stream, max_changes=250, chunk_changes=60) as r:
        r.prepare()
        ledger = run_sample_workload(pg_conn, transactions=150, seed=12)
        first = r.peek()
        assert first.limited and first.rows >= 250
        assert first.advance_to == first.last_commit_lsn
        result = r.drain()
    assert result.windows >= 2
    assert_matches_ledger(read_json(moto_server, kinesis_stream), ledger)


def _format_threads() -> list[str]:
    """The threads that format (and prepare) chunks ahead of the one being sent."""
    return [t.name for t in threading.enumerate() if t.name == pipeline.PREPARE_THREAD_NAME]


def test_a_whole_window_formats_ahead_and_publishes_what_the_steps_publish(
    pg_server: PostgresServer, sample_db: str, pg_conn, moto_server: MotoServer, kinesis_stream: str,
) -> None:
    """run_window (pg2k, the continuous job) formats in a thread while it publishes: same records, same
    per-row order, same checkpoints as peek -> format -> publish one after the other."""
    steps_stream = f"{kinesis_stream}_steps"
    moto_server.create_stream(steps_stream, shards=2)
    with make_replicator(pg_server, sample_db, moto_server, kinesis_stream, chunk_changes=80) as streamed, \
            make_replicator(pg_server, sample_db, moto_server, steps_stream, chunk_changes=80,
                            slot_name="steps") as steps:
        streamed.prepare()
        steps.prepare()
        ledger = run_sample_workload(pg_conn, transactions=150, seed=31)
        with pg_conn.cursor() as cur:  # and one transaction spanning several chunks
            cur.execute('INSERT INTO public."Mixed Case" SELECT i, \'big \' || i '
                        "FROM generate_series(100001, 100500) i")
        result = streamed.run_window()
        stepped = steps.publish(steps.format(steps.peek()))
        steps.finish(stepped)
        assert not _format_threads()
    assert result.published.formatted.chunk_count == stepped.formatted.chunk_count >= 8
    assert result.published.put.checkpoints == stepped.put.checkpoints
    assert result.stats.changes == stepped.formatted.stats.changes
    assert confirmed_flush(pg_server, sample_db) == confirmed_flush(pg_server, sample_db, "steps")
    ours, theirs = read_json(moto_server, kinesis_stream), read_json(moto_server, steps_stream)

    def by_key(records: list[dict]) -> dict[str, list[tuple[str, str]]]:
        keyed: dict[str, list[tuple[str, str]]] = {}
        for rec in records:
            keyed.setdefault(rec["_partition_key"], []).append((rec["id"], json.dumps(rec.get("after"))))
        return keyed

    assert by_key(ours) == by_key(theirs)
    assert len(ours) == len({rec["id"] for rec in ours}) == sum(1 for _ in ledger.changes()) + 500


@pytest.mark.parametrize("failing", ["format", "put"])
def test_a_failure_while_formatting_ahead_leaves_the_slot_at_an_acknowledged_commit(
    pg_server: PostgresServer, sample_db: str, pg_conn, moto_server: MotoServer, kinesis_stream: str, failing: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    with make_replicator(pg_server, sample_db, moto_server, kinesis_stream, chunk_changes=60) as r:
        r.prepare()
        before = confirmed_flush(pg_server, sample_db)
        ledger = run_sample_workload(pg_conn, transactions=150, seed=32)
        if failing == "put":
            fail_on_put(r, 4)
        else:
            # Formatting fails after its 4th chunk: the chunks formatted before it are published first.
            real_chunks = pipeline.record_chunks_from_copy

            def record_chunks_from_copy(*args, **kwargs):  # type: ignore[no-untyped-def]
                for n, chunk in enumerate(real_chunks(*args, **kwargs)):
                    if n == 4:
                        raise PutFails("injected formatting failure")
                    yield chunk

            monkeypatch.setattr(pipeline, "record_chunks_from_copy", record_chunks_from_copy)
        with pytest.raises(PutFails):
            r.run_window()
        assert not _format_threads(), "the formatting thread outlived the failure"
        assert confirmed_flush(pg_server, sample_db) != before, "nothing was checkpointed before the failure"
    monkeypatch.undo()
    with make_replicator(pg_server, sample_db, moto_server, kinesis_stream, chunk_changes=60) as r:
        r.drain()
    # Had the slot passed anything unacknowledged, the rerun would not send it again: it would be lost.
    report = check_against_ledger(read_json(moto_server, kinesis_stream), ledger)
    assert report.ok and report.unique == report.expected, report.as_dict()
    assert report.duplicates <= 2 * 60, report.as_dict()


def test_a_stop_request_ends_a_whole_window_at_a_checkpoint(
    pg_server: PostgresServer, sample_db: str, pg_conn, moto_server: MotoServer, kinesis_stream: str,
) -> None:
    with make_replicator(pg_server, sample_db, moto_server, kinesis_stream, chunk_changes=50) as r:
        r.prepare()
        ledger = run_sample_workload(pg_conn, transactions=150, seed=33)
        asked: list[int] = []

        def stop() -> bool:
            asked.append(1)
            return len(asked) >= 2  # after the second checkpoint

        result = r.run_window(should_stop=stop)
        assert result.published.stopped and not _format_threads()
        assert result.published.put.checkpoints == 2
        stood = parse_lsn(confirmed_flush(pg_server, sample_db) or "0/0")
        assert stood == result.published.checkpoint_lsn and stood < result.window.advance_to
        r.drain()
    report = check_against_ledger(read_json(moto_server, kinesis_stream), ledger)
    assert report.ok and report.duplicates == 0, report.as_dict()
