"""The Dagster layer at scale: small handles, re-execution without the spool, the continuous job, retention,
and the sensor's queued successor and dead-run detection (through Dagster's public testing APIs)."""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from dagster import (
    AssetKey,
    DagsterEvent,
    DagsterEventType,
    DagsterRun,
    DagsterRunStatus,
    ReexecutionOptions,
    build_sensor_context,
    execute_job,
    instance_for_test,
    materialize,
)
from dagster._serdes import serialize_value

from pg2kinesis_dagster.defs import build_definitions
from pg2kinesis_dagster.defs.automation import DEAD_AFTER_SECONDS, SESSION_GRACE_SECONDS
from pg2kinesis_dagster.defs.history import SUMMARY_ASSET
from pg2kinesis_dagster.defs.resources import SLOT_TAG
from pg2kinesis_dagster.devstack.moto import MotoServer
from pg2kinesis_dagster.devstack.postgres import PostgresServer
from pg2kinesis_dagster.devstack.workload import create_sample_schema, run_sample_workload
from tests.dagster_jobs import FAIL_PUT_NUMBER, reconstructable_replicate_job
from tests.helpers import (
    assert_matches_ledger,
    check_against_ledger,
    code_location_env,
    confirmed_flush,
    merged,
    read_json,
)

SLOT = "dagster_windows"
QUIET = {"loggers": {"console": {"config": {"log_level": "WARNING"}}}}
# What Dagster may store for one replicate run (events, handles, metadata), whatever the window's size.
MAX_EVENT_BYTES_PER_RUN = 50_000


@pytest.fixture
def stack_env(
    pg_server: PostgresServer, pg_database: str, pg_conn, moto_server: MotoServer, kinesis_stream: str,
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
) -> dict[str, str]:
    create_sample_schema(pg_conn)
    env = code_location_env(pg_server, pg_database, moto_server, kinesis_stream, SLOT,
                            PG2K_CHUNK_CHANGES="100", PG2K_SPOOL_DIR=str(tmp_path / "spool"))
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return env


def event_bytes(instance, run_id: str) -> int:  # type: ignore[no-untyped-def]
    return sum(len(serialize_value(r.event_log_entry)) for r in instance.get_records_for_run(run_id).records)


def test_a_run_stores_small_handles_and_no_data_whatever_the_window(
    stack_env: dict[str, str], pg_conn, moto_server: MotoServer, kinesis_stream: str
) -> None:
    defs = build_definitions(stack_env)
    job = defs.get_job_def("replicate")
    with instance_for_test() as instance:
        assert job.execute_in_process(instance=instance, run_config=QUIET).success  # creates the slot
        sizes = []
        for transactions in (20, 400):
            ledger = run_sample_workload(pg_conn, transactions=transactions, seed=transactions)
            result = job.execute_in_process(instance=instance, run_config=QUIET)
            assert result.success
            assert result.output_for_node("decode_and_format").stats.changes == sum(1 for _ in ledger.changes())
            sizes.append(event_bytes(instance, result.run_id))
        storage = Path(instance.storage_directory())
        # Compute logs (captured stdout/stderr, per run and step, not per change) aside; the shipped
        # dagster.yaml turns them off.
        stored = [p for p in storage.rglob("*") if p.is_file() and "compute_logs" not in p.parts]
    # 20x more changes, about the same storage: per-table counts and handles, not rows.
    assert max(sizes) <= MAX_EVENT_BYTES_PER_RUN, sizes
    assert sizes[1] < sizes[0] * 1.5, sizes
    assert not stored, f"op outputs were written to Dagster's storage: {stored[:5]}"
    assert not any(Path(stack_env["PG2K_SPOOL_DIR"]).rglob("*.pkl")), "a finished run left its spool behind"


def test_reexecution_after_the_spool_is_gone_reads_the_window_again(
    stack_env: dict[str, str], pg_server: PostgresServer, pg_conn, moto_server: MotoServer, kinesis_stream: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    db = stack_env["PG2K_PG_DBNAME"]
    with instance_for_test() as instance:
        job = reconstructable_replicate_job()
        with execute_job(job, instance, run_config=QUIET) as first:
            assert first.success
        ledger = run_sample_workload(pg_conn, transactions=120, seed=31)
        before = confirmed_flush(pg_server, db, SLOT)

        monkeypatch.setenv(FAIL_PUT_NUMBER, "3")  # two chunks acknowledged, then publish fails
        with execute_job(job, instance, run_config=QUIET) as failed:
            assert not failed.success
            failed_run_id = failed.run_id
        checkpoint = confirmed_flush(pg_server, db, SLOT)
        assert checkpoint != before, "publishing did not checkpoint the acknowledged chunks"
        sent = len(read_json(moto_server, kinesis_stream))
        assert sent > 0

        # A new machine: no spool at all. More changes arrive that are not part of the failed window.
        shutil.rmtree(stack_env["PG2K_SPOOL_DIR"])
        later = run_sample_workload(pg_conn, transactions=10, seed=32)
        monkeypatch.delenv(FAIL_PUT_NUMBER)
        options = ReexecutionOptions.from_failure(failed_run_id, instance)
        with execute_job(job, instance, run_config=QUIET, reexecution_options=options) as retried:
            assert retried.success
            executed = {e.step_key for e in retried.all_events if e.event_type_value == "STEP_SUCCESS"}
            assert executed == {"publish", "advance_slot"}
        records = read_json(moto_server, kinesis_stream)
        report = check_against_ledger(records, ledger)
        assert report.lost == 0 and report.ok, report.as_dict()
        # Only the chunk in flight at the failure is sent twice, not the whole window.
        assert report.duplicates <= 200, report.as_dict()
        # The re-execution took the failed window only: the later changes wait for the next run.
        assert not {r["xid"] for r in records} & {t.xid for t in later.transactions}
        with execute_job(job, instance, run_config=QUIET) as next_run:
            assert next_run.success
    assert_matches_ledger(read_json(moto_server, kinesis_stream), merged(ledger, later))


def test_continuous_job_loops_windows_and_throttles_checkpoints(
    stack_env: dict[str, str], pg_conn, moto_server: MotoServer, kinesis_stream: str
) -> None:
    defs = build_definitions(stack_env)
    job = defs.get_job_def("replicate_continuous")
    with instance_for_test() as instance:
        assert defs.get_job_def("replicate").execute_in_process(instance=instance, run_config=QUIET).success
        ledgers = []

        def write() -> None:
            for seed in range(6):
                ledgers.append(run_sample_workload(pg_conn, transactions=15, seed=100 + seed))
                time.sleep(0.4)

        writer = threading.Thread(target=write)
        config = {"ops": {"replicate_continuously": {"config": {
            "max_runtime_seconds": 5.0, "poll_interval_seconds": 0.05, "checkpoint_interval_seconds": 2.0}}},
            **QUIET}
        started = time.monotonic()
        writer.start()
        result = job.execute_in_process(instance=instance, run_config=config)
        writer.join()
        took = time.monotonic() - started
        assert result.success
        assert 5.0 <= took < 30
        checkpoints = instance.fetch_materializations(AssetKey("replication_checkpoint"), limit=100).records
        ours = [c for c in checkpoints if c.run_id == result.run_id]
        assert 1 <= len(ours) <= 4, len(ours)  # one per 2 s at most, plus the last
        assert sum(c.asset_materialization.metadata["windows"].value for c in ours) > len(ours)
        # Everything the writer committed during the run arrived; later runs would pick up the rest.
        defs.get_job_def("replicate").execute_in_process(instance=instance, run_config=QUIET)
    assert_matches_ledger(read_json(moto_server, kinesis_stream), merged(*ledgers))


def test_prune_job_deletes_old_runs_and_the_daily_summary_keeps_their_totals(
    stack_env: dict[str, str], pg_conn, tmp_path: Path
) -> None:
    defs = build_definitions(stack_env)
    job = defs.get_job_def("replicate")
    with instance_for_test() as instance:
        run_ids = [job.execute_in_process(instance=instance, run_config=QUIET).run_id]  # creates the slot
        total = 0
        for seed in range(3):
            ledger = run_sample_workload(pg_conn, transactions=10, seed=seed)
            total += sum(1 for _ in ledger.changes())
            result = job.execute_in_process(instance=instance, run_config=QUIET)
            run_ids.append(result.run_id)
        # A file under the instance's storage for one run (as compute logs would be): pruned with it.
        stray = Path(instance.storage_directory()) / run_ids[0] / "compute_logs"
        stray.mkdir(parents=True, exist_ok=True)
        (stray / "out.txt").write_text("x")
        # A window spool nobody finished, last written long ago.
        spool = tmp_path / "spool" / "someslot-abc" / "0001"
        spool.mkdir(parents=True)
        (spool / "rows-000000.pkl").write_bytes(b"x")
        old = time.time() - 3 * 86400
        os.utime(spool / "rows-000000.pkl", (old, old))

        today = datetime.now(timezone.utc).strftime("%Y-%m-%d")
        summary = defs.get_assets_def(SUMMARY_ASSET)
        assert materialize([summary], instance=instance, partition_key=today).success
        (event,) = instance.fetch_materializations(AssetKey(SUMMARY_ASSET), limit=10).records
        assert event.asset_materialization.metadata["changes"].value == total
        assert event.asset_materialization.metadata["checkpoints"].value == 4

        prune = defs.get_job_def("prune_history")
        config = {"ops": {"prune_old_runs": {"config": {"retention_days": 0, "spool_retention_hours": 1,
                                                        "spool_dir": str(tmp_path / "spool")}}}}
        result = prune.execute_in_process(instance=instance, run_config={**config, **QUIET})
        assert result.success
        left = {r.dagster_run.run_id for r in instance.get_run_records()}
        assert not left & set(run_ids), "old replicate runs survived"
        assert result.run_id in left
        assert not stray.exists() and not spool.exists()
        # The summary is still there after its runs are gone.
        assert instance.fetch_materializations(AssetKey(SUMMARY_ASSET), limit=10).records


def _started_run(instance, run_id: str, job_name: str, started_seconds_ago: float) -> None:  # type: ignore[no-untyped-def]
    instance.add_run(DagsterRun(job_name=job_name, run_id=run_id, status=DagsterRunStatus.STARTING,
                                tags={SLOT_TAG: SLOT}))
    instance.run_storage.handle_run_event(
        run_id, DagsterEvent(DagsterEventType.PIPELINE_START.value, job_name=job_name),
        update_timestamp=datetime.now(timezone.utc) - timedelta(seconds=started_seconds_ago),
    )


def test_sensor_fails_a_run_whose_process_is_gone_and_starts_the_next(stack_env: dict[str, str], pg_conn) -> None:
    defs = build_definitions(stack_env)
    sensor = defs.get_sensor_def("replication_sensor")
    with instance_for_test() as instance:
        assert defs.get_job_def("replicate").execute_in_process(instance=instance, run_config=QUIET).success
        run_sample_workload(pg_conn, transactions=3, seed=2)

        def evaluate(cursor: str | None = None):  # type: ignore[no-untyped-def]
            with build_sensor_context(instance=instance, definitions=defs, resources=defs.resources,
                                      cursor=cursor) as context:
                return sensor(context)

        # A young STARTED run without a session yet: in flight, not dead.
        _started_run(instance, "young", "replicate", started_seconds_ago=1)
        result = evaluate()
        assert not result.run_requests and "in flight" in str(result.skip_reason)
        assert instance.get_run_by_id("young").status == DagsterRunStatus.STARTED
        instance.delete_run("young")

        # An old STARTED run whose session is gone: first seen missing (not yet failed), then failed.
        _started_run(instance, "killed", "replicate", started_seconds_ago=SESSION_GRACE_SECONDS + 60)
        first = evaluate()
        assert not first.run_requests
        assert instance.get_run_by_id("killed").status == DagsterRunStatus.STARTED
        missing = json.loads(first.cursor)["missing_since"]
        assert "killed" in missing
        earlier = json.dumps({"missing_since": {"killed": missing["killed"] - DEAD_AFTER_SECONDS - 1}})
        second = evaluate(earlier)
        run = instance.get_run_by_id("killed")
        assert run.status == DagsterRunStatus.FAILURE
        failure = instance.all_logs("killed", of_type=DagsterEventType.PIPELINE_FAILURE)
        assert failure and "PostgreSQL session has been gone" in failure[-1].dagster_event.message
        assert len(second.run_requests) == 1 and second.run_requests[0].tags[SLOT_TAG] == SLOT


def test_sensor_queues_the_next_run_while_a_limited_window_is_published(stack_env: dict[str, str], pg_conn) -> None:
    env = {**stack_env, "PG2K_MAX_CHANGES": "50"}
    defs = build_definitions(env)
    sensor = defs.get_sensor_def("replication_sensor")
    with instance_for_test() as instance:
        assert defs.get_job_def("replicate").execute_in_process(instance=instance, run_config=QUIET).success
        run_sample_workload(pg_conn, transactions=60, seed=3)
        # A finished run whose peek stopped at the budget stands in for the one being published now.
        result = defs.get_job_def("replicate").execute_in_process(instance=instance, run_config=QUIET)
        assert result.output_for_node("peek_batch").limited
        instance.run_storage.handle_run_event(
            result.run_id, DagsterEvent(DagsterEventType.PIPELINE_START.value, job_name="replicate"))
        with build_sensor_context(instance=instance, definitions=defs, resources=defs.resources) as context:
            requests = sensor(context).run_requests
        assert len(requests) == 1, "no successor queued behind a limited window"
        instance.add_run(DagsterRun(job_name="replicate", run_id="queued", status=DagsterRunStatus.NOT_STARTED,
                                    tags={SLOT_TAG: SLOT}))
        with build_sensor_context(instance=instance, definitions=defs, resources=defs.resources) as context:
            again = sensor(context)
        assert not again.run_requests and "queued" in str(again.skip_reason)
