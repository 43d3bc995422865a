"""What runs the code location for a year: health checks and their schedule, alerts, key refresh, heartbeat.

:func:`build_operating_definitions` turns a replication's configuration (the README's "Operating it" settings)
into the definitions that :func:`pg2kinesis_dagster.defs.build_definitions` adds to the location.
"""
# Dagster inspects these annotations at runtime: no "from __future__ import annotations" here.

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from dagster import (
    AssetChecksDefinition,
    AssetsDefinition,
    AssetSelection,
    DefaultScheduleStatus,
    JobDefinition,
    ScheduleDefinition,
    SensorDefinition,
    define_asset_job,
)
from dagster._core.definitions.unresolved_asset_job_definition import UnresolvedAssetJobDefinition

from pg2kinesis_dagster.core.config import ReplicationConfig
from pg2kinesis_dagster.defs.alerts import ALERT_SENSOR, build_alert_sensor
from pg2kinesis_dagster.defs.assets import build_primary_key_asset, primary_key_metadata
from pg2kinesis_dagster.defs.health import (
    HEALTH_JOB,
    HEALTH_SCHEDULE,
    build_health_checks,
    build_health_job,
    build_health_schedule,
)
from pg2kinesis_dagster.defs.heartbeat import HEARTBEAT_JOB, build_heartbeat_job
from pg2kinesis_dagster.defs.jobs import prefixed

KEY_METADATA_JOB = "refresh_primary_key_metadata"
KEY_METADATA_SCHEDULE = "primary_key_metadata_schedule"
HEARTBEAT_SCHEDULE = "slot_heartbeat_schedule"
# Jobs of this module's schedules: retention (prune_history) deletes their old runs too (a run a minute).
OPERATING_JOBS = (HEALTH_JOB, KEY_METADATA_JOB, HEARTBEAT_JOB)
@dataclass
class OperatingDefinitions:
    asset_checks: list[AssetChecksDefinition] = field(default_factory=list)
    jobs: list[JobDefinition | UnresolvedAssetJobDefinition] = field(default_factory=list)
    schedules: list[ScheduleDefinition] = field(default_factory=list)
    sensors: list[SensorDefinition] = field(default_factory=list)
    assets: list[AssetsDefinition] = field(default_factory=list)


def build_operating_definitions(
    config: ReplicationConfig, replication_jobs: list[str], *, replication_name: str = "",
    resource_keys: Mapping[str, str] | None = None, job_resources: dict[str, Any] | None = None,
) -> OperatingDefinitions:
    """A replication's health checks, key refresh, heartbeat and alerts (names prefixed by ``replication_name``).

    ``resource_keys`` maps "replication"/"postgres" to the keys of this replication's resources;
    ``job_resources`` are bound to its op jobs (a code location with several replications).
    """
    keys = {"replication": "replication", "postgres": "postgres", **(resource_keys or {})}

    def named(name: str) -> str:
        return prefixed(replication_name, name)

    checks = build_health_checks(config.thresholds(), replication_name=replication_name,
                                 resource_key=keys["replication"])
    health_job = build_health_job(checks, config.slot_name, name=named(HEALTH_JOB))
    key_asset = (build_primary_key_asset(replication_name, keys["postgres"]) if replication_name
                 else primary_key_metadata)
    key_job = define_asset_job(
        named(KEY_METADATA_JOB), selection=AssetSelection.assets(key_asset),
        description="Re-reads every table's primary key and replica identity from the catalogs.",
    )
    operating = OperatingDefinitions(asset_checks=[checks], jobs=[health_job, key_job], assets=[key_asset])
    operating.schedules.append(build_health_schedule(
        health_job, config.health_cron, config.health_running, name=named(HEALTH_SCHEDULE)))
    operating.schedules.append(ScheduleDefinition(
        name=named(KEY_METADATA_SCHEDULE), job=key_job, cron_schedule=config.key_metadata_cron,
        default_status=DefaultScheduleStatus.RUNNING if config.key_metadata_running
        else DefaultScheduleStatus.STOPPED,
        description="Refreshes primary_key_metadata (hourly by default); replication itself reads the catalog "
        "at every run and at each schema change it sees in the stream.",
    ))
    heartbeat_job = build_heartbeat_job(named(HEARTBEAT_JOB), job_resources)
    operating.jobs.append(heartbeat_job)
    operating.schedules.append(ScheduleDefinition(
        name=named(HEARTBEAT_SCHEDULE), job=heartbeat_job, cron_schedule=config.heartbeat_cron or "*/5 * * * *",
        default_status=DefaultScheduleStatus.RUNNING if config.heartbeat_cron else DefaultScheduleStatus.STOPPED,
        description="Optional: writes a non-transactional logical message into the replicated database "
        "(PG2K_HEARTBEAT_CRON turns it on), so the slot always has something to move to.",
    ))
    operating.sensors.append(build_alert_sensor(
        config.alert_webhook_url,
        jobs=[*replication_jobs, health_job.name, key_job.name],
        running=config.alerts_running,
        interval_seconds=config.alert_interval_seconds,
        name=named(ALERT_SENSOR),
        resource_key=keys["replication"],
    ))
    return operating
