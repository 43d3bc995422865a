"""The Dagster code location, configured from environment variables (see the README's table).

``definitions.py`` at the repository root exposes :data:`defs` built here.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from dagster import Definitions, EnvVar

from pg2kinesis_dagster.core import window
from pg2kinesis_dagster.core.errors import ConfigError
from pg2kinesis_dagster.defs.assets import primary_key_metadata, replication_checkpoint
from pg2kinesis_dagster.defs.automation import MODES, SensorSettings, build_schedule, build_sensor
from pg2kinesis_dagster.defs.handles import window_handle_io_manager
from pg2kinesis_dagster.defs.history import DEFAULT_RETENTION_DAYS, build_history
from pg2kinesis_dagster.defs.jobs import HANDLES, build_continuous_job, build_replicate_job
from pg2kinesis_dagster.defs.operating import build_operating_definitions
from pg2kinesis_dagster.defs.resources import (
    KinesisResource,
    PostgresResource,
    ReplicationResource,
)
from pg2kinesis_dagster.defs.snapshot import build_snapshot_definitions
from pg2kinesis_dagster.postgres.snapshot import DEFAULT_CHUNK_ROWS as DEFAULT_SNAPSHOT_CHUNK_ROWS

_TRUE = {"1", "true", "yes", "on"}


def _flag(env: Mapping[str, str], name: str, default: bool = False) -> bool:
    value = env.get(name)
    return default if value is None or value == "" else value.strip().lower() in _TRUE


def _opt(env: Mapping[str, str], name: str) -> str | None:
    value = env.get(name)
    return value if value else None


def build_resources(env: Mapping[str, str]) -> dict[str, object]:
    postgres = PostgresResource(
        dsn=env.get("PG2K_PG_DSN", ""),
        host=_opt(env, "PG2K_PG_HOST"),
        port=int(env["PG2K_PG_PORT"]) if env.get("PG2K_PG_PORT") else None,
        dbname=_opt(env, "PG2K_PG_DBNAME"),
        user=_opt(env, "PG2K_PG_USER"),
        # Through EnvVar only: the UI and run config show the variable's name, never the value.
        password=EnvVar("PG2K_PG_PASSWORD") if env.get("PG2K_PG_PASSWORD") else None,
        sslmode=_opt(env, "PG2K_PG_SSLMODE"),
    )
    kinesis = KinesisResource(
        stream_name=env.get("PG2K_STREAM_NAME", "pg2kinesis"),
        region_name=(
            _opt(env, "PG2K_AWS_REGION") or _opt(env, "AWS_REGION") or _opt(env, "AWS_DEFAULT_REGION")
        ),
        endpoint_url=_opt(env, "PG2K_KINESIS_ENDPOINT_URL"),
        profile_name=_opt(env, "PG2K_AWS_PROFILE"),
        max_retry_seconds=float(env.get("PG2K_MAX_RETRY_SECONDS", "300")),
        aggregate=_flag(env, "PG2K_AGGREGATE"),
    )
    replication = ReplicationResource(
        postgres=postgres,
        kinesis=kinesis,
        slot_name=env.get("PG2K_SLOT_NAME", "pg2kinesis"),
        output_plugin=env.get("PG2K_OUTPUT_PLUGIN", "test_decoding"),
        publication=env.get("PG2K_PUBLICATION", "pg2kinesis"),
        message_formatter=env.get("PG2K_MESSAGE_FORMATTER", "CSVPayload"),
        full_change=_flag(env, "PG2K_FULL_CHANGE"),
        typed_json=_flag(env, "PG2K_TYPED_JSON"),
        oversized=env.get("PG2K_OVERSIZED", "fail"),
        table_pat=_opt(env, "PG2K_TABLE_PAT"),
        exclude_table_pat=_opt(env, "PG2K_EXCLUDE_TABLE_PAT"),
        operations=_opt(env, "PG2K_OPERATIONS"),
        no_primary_key=env.get("PG2K_NO_PRIMARY_KEY", "publish"),
        partition_key=env.get("PG2K_PARTITION_KEY", "row"),
        max_changes=int(env.get("PG2K_MAX_CHANGES", window.DEFAULT_MAX_CHANGES)),
        max_bytes=int(env.get("PG2K_MAX_BYTES", window.DEFAULT_MAX_BYTES)),
        max_seconds=float(env.get("PG2K_MAX_SECONDS", window.DEFAULT_MAX_SECONDS)),
        chunk_changes=int(env.get("PG2K_CHUNK_CHANGES", window.DEFAULT_CHUNK_CHANGES)),
        spool_dir=_opt(env, "PG2K_SPOOL_DIR"),
        create_slot=_flag(env, "PG2K_CREATE_SLOT"),
        key_refresh_seconds=float(env.get("PG2K_KEY_REFRESH_SECONDS") or 3600),
        exclude_columns=_opt(env, "PG2K_EXCLUDE_COLUMNS"),
    )
    return {"postgres": postgres, "kinesis": kinesis, "replication": replication, HANDLES: window_handle_io_manager}


def build_definitions(env: Mapping[str, str] | None = None) -> Definitions:
    env = os.environ if env is None else env
    slot_name = env.get("PG2K_SLOT_NAME", "pg2kinesis")
    mode = env.get("PG2K_MODE", "micro").strip().lower() or "micro"
    if mode not in MODES:
        raise ConfigError(f"PG2K_MODE={mode!r}: use micro (a run per window, the default) or continuous")
    continuous_runtime = float(env.get("PG2K_CONTINUOUS_MAX_RUNTIME_SECONDS", "1800"))
    job = build_replicate_job(slot_name)
    continuous = build_continuous_job(slot_name, continuous_runtime)
    history_assets, history_jobs, history_schedules = build_history(
        start_date=env.get("PG2K_SUMMARY_START_DATE", "2026-01-01"),
        retention_days=float(env.get("PG2K_RETENTION_DAYS", str(DEFAULT_RETENTION_DAYS))),
        spool_dir=_opt(env, "PG2K_SPOOL_DIR"),
    )
    # Health checks and their schedule, alerts, key refresh, heartbeat (README: "Operating it").
    operating = build_operating_definitions(env, slot_name, [job.name, continuous.name])
    # Table snapshots, a partition per table (README: "Snapshots and backfills").
    snapshot_assets, snapshot_sensors = build_snapshot_definitions(
        [t.strip() for t in env.get("PG2K_SNAPSHOT_TABLES", "").split(",") if t.strip()] or None,
        chunk_rows=int(env.get("PG2K_SNAPSHOT_CHUNK_ROWS") or DEFAULT_SNAPSHOT_CHUNK_ROWS),
        sync_running=_flag(env, "PG2K_SNAPSHOT_SYNC_RUNNING", True),
    )
    return Definitions(
        assets=[replication_checkpoint, primary_key_metadata, *history_assets, *snapshot_assets],
        asset_checks=operating.asset_checks,
        jobs=[job, continuous, *history_jobs, *operating.jobs],
        sensors=[
            build_sensor(
                [job, continuous],
                default_running=_flag(env, "PG2K_SENSOR_RUNNING"),
                interval_seconds=int(env.get("PG2K_SENSOR_INTERVAL_SECONDS", "5")),
                settings=SensorSettings(mode=mode, continuous_max_runtime_seconds=continuous_runtime),
            ),
            *operating.sensors,
            *snapshot_sensors,
        ],
        schedules=[build_schedule(job, env.get("PG2K_SCHEDULE_CRON", "*/5 * * * *"), slot_name),
                   *history_schedules, *operating.schedules],
        resources=build_resources(env),
    )


defs = build_definitions()
