"""When ``replicate`` runs: a sensor that follows the slot, or a fixed schedule."""


from dagster import (
    DagsterRunStatus,
    DefaultScheduleStatus,
    DefaultSensorStatus,
    JobDefinition,
    RunRequest,
    RunsFilter,
    ScheduleDefinition,
    SensorDefinition,
    SensorEvaluationContext,
    SensorResult,
    SkipReason,
    sensor,
)

from pg2kinesis_dagster.defs.resources import SLOT_TAG, ReplicationResource
from pg2kinesis_dagster.postgres.slot import ReplicationSlot

IN_FLIGHT = [
    DagsterRunStatus.QUEUED,
    DagsterRunStatus.NOT_STARTED,
    DagsterRunStatus.STARTING,
    DagsterRunStatus.STARTED,
    DagsterRunStatus.CANCELING,
]
# With no change pending, a run is still worth it once this much WAL waits behind the slot:
# advancing an idle slot lets PostgreSQL recycle WAL written by other databases and checkpoints.
IDLE_LAG_BYTES = 64 * 1024 * 1024


def slot_run_request(context: SensorEvaluationContext, replication: ReplicationResource) -> SensorResult:
    """Request a run when the slot has work and no run of the same slot is in flight."""
    slot_name = replication.slot_name
    in_flight = context.instance.get_run_records(
        RunsFilter(tags={SLOT_TAG: slot_name}, statuses=IN_FLIGHT), limit=1
    )
    if in_flight:
        return SensorResult(skip_reason=SkipReason(f"a run of slot {slot_name!r} is in flight"))
    with ReplicationSlot(
        replication.postgres.settings(), slot_name, replication.output_plugin
    ) as slot:
        if slot.state() is None and not replication.create_slot:
            return SensorResult(
                skip_reason=SkipReason(
                    f"replication slot {slot_name!r} does not exist: create it or enable create_slot"
                )
            )
        pending = slot.state() is None or slot.has_pending()
        lag = slot.lag_bytes() or 0
    if not pending and lag < IDLE_LAG_BYTES:
        return SensorResult(skip_reason=SkipReason(f"no change pending on slot {slot_name!r}"))
    return SensorResult(run_requests=[RunRequest(tags={SLOT_TAG: slot_name})])


def build_sensor(job: JobDefinition, default_running: bool, interval_seconds: int) -> SensorDefinition:
    @sensor(
        job=job,
        minimum_interval_seconds=interval_seconds,
        default_status=DefaultSensorStatus.RUNNING if default_running else DefaultSensorStatus.STOPPED,
        description="Requests a replicate run whenever the slot has pending changes and none is in flight.",
    )
    def replication_sensor(
        context: SensorEvaluationContext, replication: ReplicationResource
    ) -> SensorResult:
        return slot_run_request(context, replication)

    return replication_sensor


def build_schedule(job: JobDefinition, cron: str, slot_name: str) -> ScheduleDefinition:
    return ScheduleDefinition(
        name="replicate_schedule",
        job=job,
        cron_schedule=cron,
        default_status=DefaultScheduleStatus.STOPPED,
        tags={SLOT_TAG: slot_name},
        description="Runs replicate at fixed intervals, for those who prefer scheduled micro-batches.",
    )
