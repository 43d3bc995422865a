"""The Dagster layer through Dagster's public testing APIs, on the real local stack."""

from __future__ import annotations

from pathlib import Path

import pytest
from dagster import (
    AssetKey,
    DagsterInstance,
    DagsterRun,
    DagsterRunStatus,
    Definitions,
    ReexecutionOptions,
    build_sensor_context,
    execute_job,
    instance_for_test,
)

from pg2kinesis_dagster.defs import build_definitions
from pg2kinesis_dagster.defs.resources import SLOT_TAG
from pg2kinesis_dagster.devstack.moto import MotoServer
from pg2kinesis_dagster.devstack.postgres import PostgresServer
from pg2kinesis_dagster.devstack.workload import create_sample_schema, run_sample_workload
from tests.dagster_jobs import FAIL_PUBLISH_FILE, reconstructable_replicate_job
from tests.helpers import assert_matches_ledger, code_location_env, confirmed_flush, read_json

SLOT = "dagster_slot"
QUIET = {"loggers": {"console": {"config": {"log_level": "WARNING"}}}}


@pytest.fixture
def stack_env(
    pg_server: PostgresServer, pg_database: str, pg_conn, moto_server: MotoServer, kinesis_stream: str,
    monkeypatch: pytest.MonkeyPatch,
) -> dict[str, str]:
    create_sample_schema(pg_conn)
    env = code_location_env(pg_server, pg_database, moto_server, kinesis_stream, SLOT, PG2K_MAX_CHANGES="150")
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return env


def test_definitions_load_with_defaults() -> None:
    defs = build_definitions({})
    Definitions.validate_loadable(defs)
    assert defs.get_job_def("replicate").executor_def.name == "in_process"
    sensor = defs.get_sensor_def("replication_sensor")
    assert sensor.default_status.value == "STOPPED"
    assert defs.get_schedule_def("replicate_schedule").default_status.value == "STOPPED"
    running = build_definitions({"PG2K_SENSOR_RUNNING": "1"}).get_sensor_def("replication_sensor")
    assert running.default_status.value == "RUNNING"


def _drain(defs: Definitions, instance: DagsterInstance) -> int:
    job = defs.get_job_def("replicate")
    for runs in range(1, 200):
        result = job.execute_in_process(instance=instance, run_config=QUIET)
        assert result.success
        if not result.output_for_node("peek_batch").limited:
            return runs
    raise AssertionError("not drained")


def test_replicate_job_publishes_and_records_checkpoints(
    stack_env: dict[str, str], pg_server: PostgresServer, pg_conn, moto_server: MotoServer, kinesis_stream: str,
) -> None:
    defs = build_definitions(stack_env)
    with instance_for_test() as instance:
        # The first run creates the slot: changes committed after it are captured.
        assert defs.get_job_def("replicate").execute_in_process(instance=instance, run_config=QUIET).success
        ledger = run_sample_workload(pg_conn, transactions=120, seed=11)
        runs = _drain(defs, instance)
        assert runs >= 2
        assert_matches_ledger(read_json(moto_server, kinesis_stream), ledger)

        events = instance.fetch_materializations(AssetKey("replication_checkpoint"), limit=100).records
        assert len(events) == runs + 1
        metadata = events[0].asset_materialization.metadata
        for field in ("start_lsn", "end_lsn", "transactions", "changes", "record_bytes", "lag_bytes_after_advance",
                      "changes_by_table"):
            assert field in metadata
        total = sum(e.asset_materialization.metadata["changes"].value for e in events)
        assert total == sum(1 for _ in ledger.changes())
        assert metadata["end_lsn"].value == confirmed_flush(pg_server, stack_env["PG2K_PG_DBNAME"], SLOT)


def test_primary_key_metadata_asset(stack_env: dict[str, str]) -> None:
    from dagster import materialize

    defs = build_definitions(stack_env)
    asset = defs.get_assets_def("primary_key_metadata")
    with instance_for_test() as instance:
        result = materialize([asset], resources={"postgres": defs.resources["postgres"]}, instance=instance)
        frame = result.output_for_node("primary_key_metadata")
    rows = {row.table: row for row in frame.itertuples()}
    assert rows["order_items"].key_columns == ["order_id", "line_no"]
    assert rows["customers"].key_types == ["integer"]
    assert rows["audit_log"].no_primary_key and not rows["customers"].no_primary_key
    assert rows["Mixed Case"].key_columns == ["Id"]
    assert rows["customers"].replica_identity == "DEFAULT"


def test_sensor_requests_runs_only_when_pending_and_idle(stack_env: dict[str, str], pg_conn) -> None:
    defs = build_definitions(stack_env)
    sensor = defs.get_sensor_def("replication_sensor")
    with instance_for_test() as instance:
        assert defs.get_job_def("replicate").execute_in_process(instance=instance, run_config=QUIET).success

        def evaluate() -> object:
            with build_sensor_context(instance=instance, definitions=defs, resources=defs.resources) as context:
                return sensor(context)

        assert not evaluate().run_requests, "nothing pending yet"
        run_sample_workload(pg_conn, transactions=3, seed=2)
        requests = evaluate().run_requests
        assert len(requests) == 1 and requests[0].tags[SLOT_TAG] == SLOT

        # A run of the same slot in flight: no second run.
        instance.add_run(DagsterRun(job_name="replicate", run_id="inflight", status=DagsterRunStatus.STARTED,
                                    tags={SLOT_TAG: SLOT}))
        result = evaluate()
        assert not result.run_requests and "in flight" in str(result.skip_reason)
        instance.delete_run("inflight")

        _drain(defs, instance)
        assert not evaluate().run_requests


def test_reexecute_from_failure_republishes_same_records_and_never_moves_back(
    stack_env: dict[str, str], pg_server: PostgresServer, pg_conn, moto_server: MotoServer, kinesis_stream: str,
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    stack_env["PG2K_MAX_CHANGES"] = "100000"
    monkeypatch.setenv("PG2K_MAX_CHANGES", "100000")
    marker = tmp_path / "fail-publish"
    monkeypatch.setenv(FAIL_PUBLISH_FILE, str(marker))
    db = stack_env["PG2K_PG_DBNAME"]
    with instance_for_test() as instance:
        job = reconstructable_replicate_job()
        with execute_job(job, instance, run_config=QUIET) as first:
            assert first.success
        ledger = run_sample_workload(pg_conn, transactions=40, seed=9)
        before = confirmed_flush(pg_server, db, SLOT)

        marker.touch()
        with execute_job(job, instance, run_config=QUIET) as failed:
            assert not failed.success
            failed_run_id = failed.run_id
        assert confirmed_flush(pg_server, db, SLOT) == before, "slot moved although publish failed"
        assert read_json(moto_server, kinesis_stream) == []

        # New changes after the failed peek are not part of the re-executed batch.
        run_sample_workload(pg_conn, transactions=5, seed=10)
        marker.unlink()
        options = ReexecutionOptions.from_failure(failed_run_id, instance)
        with execute_job(job, instance, run_config=QUIET, reexecution_options=options) as retried:
            assert retried.success
            executed = {e.step_key for e in retried.all_events if e.event_type_value == "STEP_SUCCESS"}
            assert executed == {"publish", "advance_slot"}
            retried_run_id = retried.run_id
        assert_matches_ledger(read_json(moto_server, kinesis_stream), ledger)
        after = confirmed_flush(pg_server, db, SLOT)
        assert after != before

        # Advance once more from the same persisted batch after the slot moved on: a no-op.
        with execute_job(job, instance, run_config=QUIET) as later:
            assert later.success
        moved_on = confirmed_flush(pg_server, db, SLOT)
        options = ReexecutionOptions(parent_run_id=retried_run_id, step_selection=["advance_slot"])
        with execute_job(job, instance, run_config=QUIET, reexecution_options=options) as again:
            assert again.success
        assert confirmed_flush(pg_server, db, SLOT) == moved_on, "advance moved the slot backwards"
        records = read_json(moto_server, kinesis_stream)
        # The failed publish sent nothing, so even around the failure there is no duplicate.
        assert len({r["id"] for r in records}) == len(records)


def test_slot_lag_check(stack_env: dict[str, str], pg_conn) -> None:
    from dagster import AssetSelection, materialize

    def evaluate(max_lag: str) -> tuple[bool, int]:
        defs = build_definitions({**stack_env, "PG2K_MAX_LAG_BYTES": max_lag})
        (check,) = defs.asset_checks
        with instance_for_test() as instance:
            result = materialize([check], resources={"replication": defs.resources["replication"]},
                                 instance=instance, raise_on_error=False,
                                 selection=AssetSelection.all_asset_checks())
        assert result.success, [e.message for e in result.all_events if e.is_failure]
        (evaluation,) = [e for e in result.get_asset_check_evaluations() if e.check_name == "slot_lag_within_limit"]
        return evaluation.passed, evaluation.metadata["lag_bytes"].value

    defs = build_definitions(stack_env)
    with instance_for_test() as instance:  # creates the slot
        assert defs.get_job_def("replicate").execute_in_process(instance=instance, run_config=QUIET).success
    run_sample_workload(pg_conn, transactions=50, seed=1)
    passed, lag = evaluate("0")
    assert not passed and lag > 0
    passed, _ = evaluate(str(1024**3))
    assert passed
