"""What runs the code location for a year: health checks and their schedule, alerts, key refresh, heartbeat.

:func:`build_operating_definitions` reads the ``PG2K_*`` variables of the README's "Operating it" section
and returns the definitions that :func:`pg2kinesis_dagster.defs.build_definitions` adds to the location.
"""
# Dagster inspects these annotations at runtime: no "from __future__ import annotations" here.

from collections.abc import Mapping
from dataclasses import dataclass, field

from dagster import (
    AssetChecksDefinition,
    AssetSelection,
    DefaultScheduleStatus,
    JobDefinition,
    ScheduleDefinition,
    SensorDefinition,
    define_asset_job,
)
from dagster._core.definitions.unresolved_asset_job_definition import UnresolvedAssetJobDefinition

from pg2kinesis_dagster.core.health import Thresholds
from pg2kinesis_dagster.defs.alerts import build_alert_sensor
from pg2kinesis_dagster.defs.assets import primary_key_metadata
from pg2kinesis_dagster.defs.health import (
    HEALTH_JOB,
    build_health_checks,
    build_health_job,
    build_health_schedule,
)
from pg2kinesis_dagster.defs.heartbeat import HEARTBEAT_JOB, build_heartbeat_job

KEY_METADATA_JOB = "refresh_primary_key_metadata"
KEY_METADATA_SCHEDULE = "primary_key_metadata_schedule"
HEARTBEAT_SCHEDULE = "slot_heartbeat_schedule"
# Jobs of this module's schedules: retention (prune_history) deletes their old runs too (a run a minute).
OPERATING_JOBS = (HEALTH_JOB, KEY_METADATA_JOB, HEARTBEAT_JOB)
_TRUE = {"1", "true", "yes", "on"}


def _flag(env: Mapping[str, str], name: str, default: bool) -> bool:
    value = env.get(name)
    return default if value is None or value.strip() == "" else value.strip().lower() in _TRUE


def _number(env: Mapping[str, str], name: str, default: float) -> float:
    value = env.get(name)
    return default if value is None or value.strip() == "" else float(value)


def thresholds_from_env(env: Mapping[str, str]) -> Thresholds:
    default = Thresholds()
    return Thresholds(
        lag_warn_bytes=int(_number(env, "PG2K_MAX_LAG_BYTES", default.lag_warn_bytes)),
        lag_error_bytes=int(_number(env, "PG2K_LAG_ERROR_BYTES", default.lag_error_bytes)),
        pinned_warn_bytes=int(_number(env, "PG2K_PINNED_WARN_BYTES", default.pinned_warn_bytes)),
        pinned_error_bytes=int(_number(env, "PG2K_PINNED_ERROR_BYTES", default.pinned_error_bytes)),
        safe_wal_warn_fraction=_number(env, "PG2K_SAFE_WAL_WARN_FRACTION", default.safe_wal_warn_fraction),
        safe_wal_error_fraction=_number(env, "PG2K_SAFE_WAL_ERROR_FRACTION", default.safe_wal_error_fraction),
        fresh_warn_minutes=_number(env, "PG2K_FRESHNESS_WARN_MINUTES", default.fresh_warn_minutes),
        fresh_error_minutes=_number(env, "PG2K_FRESHNESS_ERROR_MINUTES", default.fresh_error_minutes),
    )


@dataclass
class OperatingDefinitions:
    asset_checks: list[AssetChecksDefinition] = field(default_factory=list)
    jobs: list[JobDefinition | UnresolvedAssetJobDefinition] = field(default_factory=list)
    schedules: list[ScheduleDefinition] = field(default_factory=list)
    sensors: list[SensorDefinition] = field(default_factory=list)


def build_operating_definitions(
    env: Mapping[str, str], slot_name: str, replication_jobs: list[str]
) -> OperatingDefinitions:
    checks = build_health_checks(thresholds_from_env(env))
    health_job = build_health_job(checks, slot_name)
    key_job = define_asset_job(
        KEY_METADATA_JOB, selection=AssetSelection.assets(primary_key_metadata),
        description="Re-reads every table's primary key and replica identity from the catalogs.",
    )
    operating = OperatingDefinitions(asset_checks=[checks], jobs=[health_job, key_job])
    operating.schedules.append(build_health_schedule(
        health_job, env.get("PG2K_HEALTH_CRON") or "* * * * *", _flag(env, "PG2K_HEALTH_RUNNING", True)))
    operating.schedules.append(ScheduleDefinition(
        name=KEY_METADATA_SCHEDULE, job=key_job, cron_schedule=env.get("PG2K_KEY_METADATA_CRON") or "0 * * * *",
        default_status=DefaultScheduleStatus.RUNNING if _flag(env, "PG2K_KEY_METADATA_RUNNING", True)
        else DefaultScheduleStatus.STOPPED,
        description="Refreshes primary_key_metadata (hourly by default); replication itself reads the catalog "
        "at every run and at each schema change it sees in the stream.",
    ))
    heartbeat_cron = env.get("PG2K_HEARTBEAT_CRON") or ""
    heartbeat_job = build_heartbeat_job()
    operating.jobs.append(heartbeat_job)
    operating.schedules.append(ScheduleDefinition(
        name=HEARTBEAT_SCHEDULE, job=heartbeat_job, cron_schedule=heartbeat_cron or "*/5 * * * *",
        default_status=DefaultScheduleStatus.RUNNING if heartbeat_cron else DefaultScheduleStatus.STOPPED,
        description="Optional: writes a non-transactional logical message into the replicated database "
        "(PG2K_HEARTBEAT_CRON turns it on), so the slot always has something to move to.",
    ))
    operating.sensors.append(build_alert_sensor(
        env.get("PG2K_ALERT_WEBHOOK_URL") or None,
        jobs=[*replication_jobs, HEALTH_JOB, KEY_METADATA_JOB],
        running=_flag(env, "PG2K_ALERTS_RUNNING", True),
        interval_seconds=int(_number(env, "PG2K_ALERT_INTERVAL_SECONDS", 30)),
    ))
    return operating
