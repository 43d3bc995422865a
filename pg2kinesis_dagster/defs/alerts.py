"""Alerts: a sensor that watches the replication jobs' runs and the slot health checks, and tells someone.

Every tick it reads what happened since the last one: failed and succeeded runs of ``replicate``,
``slot_health`` and the key refresh, and the latest evaluation of each slot health check. New problems,
problems that got worse, and problems that are over become one message, written to the Dagster log
always and POSTed as JSON (``{"text": ...}``, what a Slack incoming webhook takes) to
``PG2K_ALERT_WEBHOOK_URL`` when it is set. Open incidents are kept in the sensor's cursor, so a failure
that repeats -- a check failing every minute, the replication sensor's runs failing one after another --
is announced once (see :mod:`pg2kinesis_dagster.core.incidents`). A message the webhook did not take is
kept and sent again on the next tick.

This is one sensor instead of Dagster's ``run_failure_sensor`` plus a check sensor because de-duplicating
per incident needs one memory of what is open, across runs and checks.
"""
# Dagster inspects these annotations at runtime: no "from __future__ import annotations" here.

import time
from collections.abc import Sequence
from datetime import datetime, timezone
from typing import Any

from dagster import (
    AssetCheckKey,
    AssetKey,
    DagsterEventType,
    DagsterInstance,
    DagsterRunStatus,
    DefaultSensorStatus,
    RunsFilter,
    SensorDefinition,
    SensorEvaluationContext,
    SkipReason,
    sensor,
)
from dagster._core.storage.asset_check_execution_record import AssetCheckExecutionRecordStatus

from pg2kinesis_dagster.core import health as core_health
from pg2kinesis_dagster.core import incidents
from pg2kinesis_dagster.core.errors import Pg2KinesisError
from pg2kinesis_dagster.defs.jobs import checkpoint_key, unprefixed
from pg2kinesis_dagster.defs.resources import ReplicationResource
from pg2kinesis_dagster.postgres.health import read_slot_health
from pg2kinesis_dagster.webhook import WebhookError, post_message

ALERT_SENSOR = "replication_alerts"
# On the first tick, runs that ended this long ago are not news.
FIRST_TICK_LOOKBACK_SECONDS = 600.0
MAX_UNSENT_MESSAGES = 20
_RUN_LIMIT = 200

RUN_ADVICE = {
    "replicate": (
        "The slot was not advanced past what Kinesis acknowledged, so nothing is lost: fix the cause named in the "
        "error, then the sensor's next run (or Re-execute from failure in the UI) resumes from the slot."
    ),
    "slot_health": "The health checks could not run: their checks say nothing until this is fixed.",
}


def _first_line(text: str) -> str:
    lines = [line.strip() for line in (text or "").strip().splitlines() if line.strip()]
    return lines[0] if lines else ""


def run_failure_signal(instance: DagsterInstance, run_id: str, job_name: str) -> incidents.Signal:
    """What failed in a run: the first failed step and its error (the op's exception, not Dagster's wrapper)."""
    step, kind, reason = "run", "failure", ""
    for entry in instance.all_logs(run_id, of_type={DagsterEventType.STEP_FAILURE, DagsterEventType.RUN_FAILURE}):
        event = entry.dagster_event
        if event is None:
            continue
        error = None
        if event.event_type == DagsterEventType.STEP_FAILURE:
            error = event.step_failure_data.error
            step = event.step_key or step
        elif not reason:
            error = getattr(event.event_specific_data, "error", None)
            reason = _first_line(event.message or "")
        # Dagster wraps the op's exception: take the first error that is not Dagster's (ours, with its fix).
        while error is not None and error.cause is not None and (error.cls_name or "").startswith("Dagster"):
            error = error.cause
        if error is not None:
            kind = error.cls_name or kind
            reason = _first_line(error.message) or reason
        if event.event_type == DagsterEventType.STEP_FAILURE:
            break
    advice = RUN_ADVICE.get(unprefixed(job_name), "Look at the run's logs in the Dagster UI.")
    return incidents.Signal(
        key=f"run:{job_name}:{step}:{kind}",
        level=incidents.ERROR,
        title=f"run of {job_name} failed ({step}: {kind})",
        detail=f"{reason} (run {run_id})" if reason else f"run {run_id}",
        advice=advice,
    )


def _new_runs(
    instance: DagsterInstance, jobs: Sequence[str], state: dict[str, Any], now: float
) -> tuple[list[incidents.Signal], list[str]]:
    """Failures (newest per kind) and the jobs that succeeded since the last tick, in order."""
    after = float(state.get("runs_after", now - FIRST_TICK_LOOKBACK_SECONDS))
    seen = set(state.get("seen_runs", []))
    records = instance.get_run_records(
        RunsFilter(statuses=[DagsterRunStatus.FAILURE, DagsterRunStatus.SUCCESS],
                   updated_after=datetime.fromtimestamp(after - 1.0, tz=timezone.utc)),
        limit=_RUN_LIMIT, order_by="update_timestamp", ascending=True,
    )
    latest: dict[str, tuple[str, str]] = {}  # job -> (status, run id) of its newest run
    newest = after
    fresh_seen: list[str] = []
    for record in records:
        run = record.dagster_run
        stamp = record.update_timestamp.timestamp()
        if run.job_name not in jobs or run.run_id in seen:
            continue
        fresh_seen.append(run.run_id)
        newest = max(newest, stamp)
        latest[run.job_name] = (run.status.value, run.run_id)
    problems: list[incidents.Signal] = []
    succeeded: list[str] = []
    for job, (status, run_id) in latest.items():
        if status == DagsterRunStatus.FAILURE.value:
            problems.append(run_failure_signal(instance, run_id, job))
        else:
            succeeded.append(job)
    state["runs_after"] = newest
    # Runs updated within the second before "after" are queried again: remember them, boundedly.
    state["seen_runs"] = (list(seen) + fresh_seen)[-_RUN_LIMIT:]
    return problems, succeeded


def _check_signals(
    instance: DagsterInstance, state: dict[str, Any], asset_key: AssetKey
) -> tuple[list[incidents.Signal], list[str]]:
    """Failing checks and passing checks, from each health check's newest evaluation since the last tick."""
    seen: dict[str, int] = dict(state.get("check_ids", {}))
    problems: list[incidents.Signal] = []
    passed: list[str] = []
    for name in core_health.CHECK_NAMES:
        key = AssetCheckKey(asset_key, name)
        record = instance.get_latest_asset_check_evaluation_record(key)
        if record is None or record.id <= seen.get(name, 0) or record.event is None:
            continue
        if record.status == AssetCheckExecutionRecordStatus.PLANNED:
            continue
        seen[name] = record.id
        evaluation = record.event.dagster_event.event_specific_data  # type: ignore[union-attr]
        if evaluation.passed:
            passed.append(f"check:{name}")
            continue
        metadata = {k: getattr(v, "value", v) for k, v in evaluation.metadata.items()}
        level = incidents.WARN if evaluation.severity.value == "WARN" else incidents.ERROR
        problems.append(incidents.Signal(
            key=f"check:{name}", level=level, title=f"check {name}",
            detail=str(metadata.get("summary") or evaluation.description or "failed"),
            advice=str(metadata.get("what_to_do") or ""),
        ))
    state["check_ids"] = seen
    return problems, passed


def slot_position(replication: ReplicationResource) -> tuple[str, str]:
    """(where the database is, where the slot stands) for a message; never raises."""
    settings = replication.postgres.settings()
    where = settings.describe()
    try:
        health = read_slot_health(settings, replication.slot_name, peek_options=None)
    except (Pg2KinesisError, Exception) as exc:  # the alert must go out even when PostgreSQL is down
        return where, f"unknown ({_first_line(str(exc)) or type(exc).__name__})"
    return where, health.position()


def evaluate_alerts(
    context: SensorEvaluationContext, replication: ReplicationResource, webhook_url: str | None,
    jobs: Sequence[str], now: float | None = None,
) -> str:
    """One tick: update the cursor, log and send what changed; returns what happened, for the skip reason."""
    now = time.time() if now is None else now
    state = incidents.loads(context.cursor)
    book = incidents.IncidentBook.from_json(state.get("incidents"))
    run_problems, succeeded = _new_runs(context.instance, jobs, state, now)
    check_problems, passed = _check_signals(context.instance, state, checkpoint_key(replication.name))
    cleared = [f"run:{job}:" for job in succeeded] + passed
    changes = book.update(run_problems + check_problems, cleared, now)
    unsent: list[str] = list(state.get("unsent", []))
    if changes:
        where, position = slot_position(replication)
        message = incidents.render(replication.slot_name, where, position, changes, now)
        log = context.log.error if any(p.level == incidents.ERROR for p in changes.opened + changes.escalated) \
            else (context.log.warning if changes.opened or changes.escalated else context.log.info)
        log(message)
        if webhook_url:
            unsent.append(message)
    sent = 0
    if webhook_url and unsent:
        while unsent:
            try:
                post_message(webhook_url, unsent[0])
            except WebhookError as exc:
                context.log.warning(f"alert not delivered, kept for the next tick ({len(unsent)} waiting): {exc}")
                break
            unsent.pop(0)
            sent += 1
    if len(unsent) > MAX_UNSENT_MESSAGES:
        dropped = len(unsent) - MAX_UNSENT_MESSAGES
        unsent = unsent[dropped:]
        context.log.error(f"dropped the {dropped} oldest undelivered alerts (the webhook keeps failing)")
    state["incidents"] = book.to_json()
    state["unsent"] = unsent
    context.update_cursor(incidents.dumps(state))
    summary = (f"{len(changes.opened)} new, {len(changes.escalated)} worse, {len(changes.resolved)} resolved; "
               f"{len(book.open)} open; {sent} message(s) sent")
    return summary


def build_alert_sensor(
    webhook_url: str | None, *, jobs: Sequence[str], running: bool, interval_seconds: int,
    name: str = ALERT_SENSOR, resource_key: str = "replication",
) -> SensorDefinition:
    @sensor(
        name=name,
        required_resource_keys={resource_key},
        minimum_interval_seconds=interval_seconds,
        default_status=DefaultSensorStatus.RUNNING if running else DefaultSensorStatus.STOPPED,
        description=(
            "Announces failed replication runs and failing slot health checks once per incident: in the Dagster "
            "log, and to PG2K_ALERT_WEBHOOK_URL (a Slack-compatible JSON POST) when set."
        ),
    )
    def replication_alerts(context: SensorEvaluationContext, **resources: Any) -> SkipReason:
        # Called directly (tests), Dagster passes the required resources as arguments; the daemon does not.
        replication = resources.get(resource_key) or getattr(context.resources, resource_key)
        return SkipReason(evaluate_alerts(context, replication, webhook_url, jobs))

    return replication_alerts
