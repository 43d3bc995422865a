"""When the replication jobs run: a sensor that follows the slot, or a fixed schedule.

The sensor keeps one run of the slot working and, while a backlog remains, the next one queued behind it
(the instance's per-slot limit holds it until the first ends, so the next window starts without waiting
for a tick). It also notices a run whose process died without telling Dagster (SIGKILL, out of memory,
a lost machine): such a run stays STARTED forever and would hold the queue, so the sensor marks it
failed once its PostgreSQL session — named after the run — has been gone for a while.
"""


import json
import time
from dataclasses import dataclass
from typing import Any

from dagster import (
    DagsterEventType,
    DagsterRunStatus,
    DefaultScheduleStatus,
    DefaultSensorStatus,
    JobDefinition,
    RunRecord,
    RunRequest,
    RunsFilter,
    ScheduleDefinition,
    SensorDefinition,
    SensorEvaluationContext,
    SensorResult,
    SkipReason,
    sensor,
)

from pg2kinesis_dagster.core.changes import format_lsn
from pg2kinesis_dagster.core.config import ReplicationConfig
from pg2kinesis_dagster.core.decoders import decoder_for
from pg2kinesis_dagster.defs.handles import HANDLE_METADATA_KEY, decode_handle
from pg2kinesis_dagster.defs.jobs import CONTINUOUS_JOB, REPLICATE_JOB
from pg2kinesis_dagster.defs.resources import SLOT_TAG, ReplicationResource, run_application_name
from pg2kinesis_dagster.postgres.slot import ReplicationSlot
from pg2kinesis_dagster.postgres.types import decoder_options

QUEUED = [DagsterRunStatus.QUEUED, DagsterRunStatus.NOT_STARTED]
IN_FLIGHT = [*QUEUED, DagsterRunStatus.STARTING, DagsterRunStatus.STARTED, DagsterRunStatus.CANCELING]
# With no change pending, a run is still worth it once this much WAL waits behind the slot:
# advancing an idle slot lets PostgreSQL recycle WAL written by other databases and checkpoints.
IDLE_LAG_BYTES = 64 * 1024 * 1024
# A STARTED run gets this long to open its session before its absence means anything ...
SESSION_GRACE_SECONDS: float = ReplicationConfig.model_fields["dead_run_grace_seconds"].default
# ... and is declared dead after its session has been missing this long (several ticks).
DEAD_AFTER_SECONDS: float = ReplicationConfig.model_fields["dead_run_after_seconds"].default
# A continuous run this close to its end gets its successor queued.
CONTINUOUS_HANDOVER_SECONDS = 60.0
MODES = ("micro", "continuous")


@dataclass(frozen=True)
class SensorSettings:
    mode: str = "micro"  # which job the sensor keeps running: micro-batch windows or one continuous run
    continuous_max_runtime_seconds: float = 1800.0
    # The replication's jobs (prefixed by its name when the code location has several).
    replicate_job: str = REPLICATE_JOB
    continuous_job: str = CONTINUOUS_JOB
    # A STARTED run whose sessions have been missing this long after this grace is failed (dead_run_* settings).
    session_grace_seconds: float = SESSION_GRACE_SECONDS
    dead_after_seconds: float = DEAD_AFTER_SECONDS


def _cursor(context: SensorEvaluationContext) -> dict[str, float]:
    try:
        data = json.loads(context.cursor) if context.cursor else {}
    except ValueError:
        return {}
    return {str(k): float(v) for k, v in data.get("missing_since", {}).items()}


def _peeked_more(context: SensorEvaluationContext, record: RunRecord) -> bool:
    """Whether the run's window stopped at a budget limit (its peek_batch handle says ``limited``)."""
    events = context.instance.get_records_for_run(
        record.dagster_run.run_id, of_type=DagsterEventType.HANDLED_OUTPUT
    ).records
    for event_record in events:
        event = event_record.event_log_entry.dagster_event
        if event is None or event.step_key != "peek_batch":
            continue
        value = event.event_specific_data.metadata.get(HANDLE_METADATA_KEY)  # type: ignore[union-attr]
        if value is not None:
            return bool(getattr(decode_handle(value.value), "limited", False))
    return False


def fail_dead_runs(
    context: SensorEvaluationContext, slot: ReplicationSlot, records: list[RunRecord], now: float,
    settings: SensorSettings | None = None,
) -> tuple[list[RunRecord], dict[str, float]]:
    """Mark failed the STARTED runs whose PostgreSQL session has been gone too long; return the live ones."""
    settings = settings or SensorSettings()
    missing_since = _cursor(context)
    started = [
        r for r in records
        if r.dagster_run.status == DagsterRunStatus.STARTED
        and r.start_time is not None and now - r.start_time > settings.session_grace_seconds
    ]
    present = slot.sessions_named([run_application_name(r.dagster_run.run_id) for r in started])
    still_missing: dict[str, float] = {}
    dead_ids: set[str] = set()
    for record in started:
        run_id = record.dagster_run.run_id
        if run_application_name(run_id) in present:
            continue
        since = missing_since.get(run_id, now)
        if now - since < settings.dead_after_seconds:
            still_missing[run_id] = since
            continue
        state = slot.state()
        where = format_lsn(state.confirmed_flush_lsn) if state and state.confirmed_flush_lsn else "its position"
        message = (
            f"run {run_id} of slot {slot.name!r} is marked failed by the replication sensor: it was STARTED but "
            f"its PostgreSQL session has been gone for {now - since:.0f}s, so its process died without reporting "
            "(killed, out of memory, or its machine was lost). Nothing is lost: the slot only moves past "
            f"acknowledged records, and the next run resumes from it at {where}."
        )
        context.log.warning(message)
        context.instance.report_run_failed(record.dagster_run, message)
        dead_ids.add(run_id)
    alive = [r for r in records if r.dagster_run.run_id not in dead_ids]
    return alive, still_missing


def slot_run_request(
    context: SensorEvaluationContext, replication: ReplicationResource, settings: SensorSettings | None = None
) -> SensorResult:
    """Keep the slot's replication going: one run working, the next queued while a backlog remains."""
    settings = settings or SensorSettings()
    slot_name = replication.slot_name
    tags = {SLOT_TAG: replication.slot_tag()}
    now = time.time()
    in_flight = list(context.instance.get_run_records(RunsFilter(tags=tags, statuses=IN_FLIGHT)))
    plugin = replication.output_plugin
    with ReplicationSlot(replication.postgres.settings(), slot_name, plugin) as slot:
        in_flight, missing = fail_dead_runs(context, slot, in_flight, now, settings)
        cursor = json.dumps({"missing_since": missing})
        continuous_job = settings.continuous_job
        job = continuous_job if settings.mode == "continuous" else settings.replicate_job
        queued = [r for r in in_flight if r.dagster_run.status in QUEUED]
        running = [r for r in in_flight if r.dagster_run.status not in QUEUED]
        if queued:
            return SensorResult(skip_reason=SkipReason(f"a run of slot {slot_name!r} is queued"), cursor=cursor)
        if running:
            current = running[0]
            if current.dagster_run.job_name == continuous_job:
                age = now - (current.start_time or now)
                successor = age > settings.continuous_max_runtime_seconds - CONTINUOUS_HANDOVER_SECONDS
            else:
                successor = current.dagster_run.status == DagsterRunStatus.STARTED and _peeked_more(context, current)
            if successor and current.dagster_run.job_name == job:
                # Queued behind the running one (one run per slot): it starts the moment the first ends.
                return SensorResult(run_requests=[RunRequest(job_name=job, tags=tags)], cursor=cursor)
            return SensorResult(
                skip_reason=SkipReason(f"run {current.dagster_run.run_id} of slot {slot_name!r} is in flight"),
                cursor=cursor,
            )
        state = slot.state()
        if state is None and not replication.create_slot:
            return SensorResult(
                skip_reason=SkipReason(
                    f"replication slot {slot_name!r} does not exist: create it or enable create_slot"
                ),
                cursor=cursor,
            )
        if job == continuous_job:
            return SensorResult(run_requests=[RunRequest(job_name=job, tags=tags)], cursor=cursor)
        options = decoder_for(
            plugin, **decoder_options(plugin, replication.postgres.settings(), publication=replication.publication)
        ).slot_options
        pending = state is None or slot.has_pending(options, binary=plugin == "pgoutput")
        lag = slot.lag_bytes() or 0
    if not pending and lag < IDLE_LAG_BYTES:
        return SensorResult(skip_reason=SkipReason(f"no change pending on slot {slot_name!r}"), cursor=cursor)
    return SensorResult(run_requests=[RunRequest(job_name=job, tags=tags)], cursor=cursor)


def build_sensor(
    jobs: list[JobDefinition], default_running: bool, interval_seconds: int, settings: SensorSettings | None = None,
    *, name: str = "replication_sensor", resource_key: str = "replication",
) -> SensorDefinition:
    """The replication sensor; ``resource_key`` names the replication's resource (one per replication)."""
    settings = settings or SensorSettings()

    @sensor(
        name=name,
        jobs=jobs,
        required_resource_keys={resource_key},
        minimum_interval_seconds=interval_seconds,
        default_status=DefaultSensorStatus.RUNNING if default_running else DefaultSensorStatus.STOPPED,
        description=(
            f"Keeps {settings.continuous_job if settings.mode == 'continuous' else settings.replicate_job} running "
            "for the slot: "
            "a run whenever changes are pending, the next one queued while a backlog remains; marks failed a "
            "run whose process died without reporting."
        ),
    )
    def replication_sensor(context: SensorEvaluationContext, **resources: Any) -> SensorResult:
        # Called directly (tests), Dagster passes the required resources as arguments; the daemon does not.
        replication = resources.get(resource_key) or getattr(context.resources, resource_key)
        return slot_run_request(context, replication, settings)

    return replication_sensor


def build_schedule(job: JobDefinition, cron: str, slot_tag: str, name: str = "replicate_schedule"
                   ) -> ScheduleDefinition:
    return ScheduleDefinition(
        name=name,
        job=job,
        cron_schedule=cron,
        default_status=DefaultScheduleStatus.STOPPED,
        tags={SLOT_TAG: slot_tag},
        description=f"Runs {job.name} at fixed intervals, for those who prefer scheduled micro-batches.",
    )
