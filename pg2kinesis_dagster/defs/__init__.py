"""The Dagster code location: one set of definitions per replication of the configuration.

The configuration is the model of :mod:`pg2kinesis_dagster.core.config`: the YAML file named by
``PG2K_CONFIG`` (several replications), or else the ``PG2K_*`` variables (one replication, whose
definitions keep the names they always had). Each replication gets its jobs, sensor, schedules, assets,
checks and alerts from :data:`REPLICATION_BUILDERS`, each builder a function of the replication's
:class:`ReplicationScope`; the location adds what its replications share (the handle IO manager, the
prune job). ``definitions.py`` at the repository root exposes :data:`defs` built here.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from dagster import Definitions

from pg2kinesis_dagster.core.config import Location, Replication, ReplicationConfig, from_env
from pg2kinesis_dagster.core.errors import ConfigError
from pg2kinesis_dagster.defs.assets import build_checkpoint_spec
from pg2kinesis_dagster.defs.automation import SensorSettings, build_schedule, build_sensor
from pg2kinesis_dagster.defs.handles import window_handle_io_manager
from pg2kinesis_dagster.defs.history import build_prune, build_summary
from pg2kinesis_dagster.defs.jobs import (
    CONTINUOUS_JOB,
    HANDLES,
    REPLICATE_JOB,
    build_continuous_job,
    build_replicate_job,
    prefixed,
)
from pg2kinesis_dagster.defs.operating import build_operating_definitions
from pg2kinesis_dagster.defs.resources import build_replication_resources, slot_tag
from pg2kinesis_dagster.defs.snapshot import build_snapshot_definitions
from pg2kinesis_dagster.postgres.slot import validate_slot_name


@dataclass(frozen=True)
class ReplicationScope:
    """One replication as its builders see it: its configuration, resources and how its definitions are named.

    The replication named "" (the PG2K_* variables) keeps today's names: ``replicate``, ``replication`` ...
    A named one prefixes them: job ``orders_db__replicate``, resource ``orders_db__replication``, asset key
    ``["orders_db", "replication_checkpoint"]``; its op jobs bind their own ``replication`` resource.
    """

    name: str
    config: ReplicationConfig
    resources: Mapping[str, Any]

    def named(self, base: str) -> str:
        return prefixed(self.name, base)

    def resource_key(self, base: str) -> str:
        return prefixed(self.name, base)

    @property
    def slot_tag(self) -> str:
        return slot_tag(self.name, self.config.slot_name)

    @property
    def job_resources(self) -> dict[str, Any] | None:
        """What the op jobs bind themselves (their ops take the ``replication`` resource by that name)."""
        if not self.name:
            return None
        return {"replication": self.resources["replication"], HANDLES: window_handle_io_manager}

    def top_level_resources(self) -> dict[str, Any]:
        return {self.resource_key(key): value for key, value in self.resources.items()}

    @property
    def replication_jobs(self) -> list[str]:
        return [self.named(REPLICATE_JOB), self.named(CONTINUOUS_JOB)]


def build_replication(scope: ReplicationScope) -> Definitions:
    """The replicate and continuous jobs, the sensor that keeps them going, the schedule, the checkpoint asset."""
    config = scope.config
    job = build_replicate_job(scope.slot_tag, config.replicate_max_runtime_seconds, name=scope.named(REPLICATE_JOB),
                              resource_defs=scope.job_resources)
    continuous = build_continuous_job(scope.slot_tag, config.continuous_max_runtime_seconds,
                                      name=scope.named(CONTINUOUS_JOB), resource_defs=scope.job_resources)
    settings = SensorSettings(mode=config.mode, continuous_max_runtime_seconds=config.continuous_max_runtime_seconds,
                              replicate_job=job.name, continuous_job=continuous.name,
                              session_grace_seconds=config.dead_run_grace_seconds,
                              dead_after_seconds=config.dead_run_after_seconds)
    sensor = build_sensor([job, continuous], default_running=config.sensor_running,
                          interval_seconds=config.sensor_interval_seconds, settings=settings,
                          name=scope.named("replication_sensor"), resource_key=scope.resource_key("replication"))
    schedule = build_schedule(job, config.schedule_cron, scope.slot_tag, name=scope.named("replicate_schedule"))
    return Definitions(assets=[build_checkpoint_spec(scope.name)], jobs=[job, continuous], sensors=[sensor],
                       schedules=[schedule])


def build_history(scope: ReplicationScope) -> Definitions:
    """The daily summary of the replication's checkpoints."""
    assets, jobs, schedules = build_summary(scope.config.summary_start_date.isoformat(), scope.name)
    return Definitions(assets=assets, jobs=jobs, schedules=schedules)


def build_operating(scope: ReplicationScope) -> Definitions:
    """Health checks and their schedule, key refresh, heartbeat, alerts (README: "Operating it")."""
    operating = build_operating_definitions(
        scope.config, scope.replication_jobs, replication_name=scope.name,
        resource_keys={"replication": scope.resource_key("replication"), "postgres": scope.resource_key("postgres")},
        job_resources=scope.job_resources,
    )
    return Definitions(assets=operating.assets, asset_checks=operating.asset_checks, jobs=operating.jobs,
                       schedules=operating.schedules, sensors=operating.sensors)


def build_snapshots(scope: ReplicationScope) -> Definitions:
    """Table snapshots, a partition per table (README: "Snapshots and backfills")."""
    assets, sensors = build_snapshot_definitions(
        scope.config, replication_name=scope.name, replication_key=scope.resource_key("replication"),
        postgres_key=scope.resource_key("postgres"),
    )
    return Definitions(assets=assets, sensors=sensors)


ReplicationBuilder = Callable[[ReplicationScope], Definitions]
# Everything a replication gets; a feature that is per replication adds its builder here.
REPLICATION_BUILDERS: list[ReplicationBuilder] = [build_replication, build_history, build_operating, build_snapshots]


def replication_scope(replication: Replication) -> ReplicationScope:
    resources = build_replication_resources(replication.name, replication.config)
    return ReplicationScope(name=replication.name, config=replication.config, resources=resources)


def build_resources(env: Mapping[str, str]) -> dict[str, object]:
    """The single replication's resources from the PG2K_* variables (what tests and scripts bind)."""
    location = from_env({k: v for k, v in env.items() if k != "PG2K_CONFIG"})
    scope = replication_scope(location.replications[0])
    return {**scope.top_level_resources(), HANDLES: window_handle_io_manager}


def location_definitions(location: Location) -> Definitions:
    for replication in location.replications:
        try:
            validate_slot_name(replication.config.slot_name)
        except ConfigError as exc:
            where = f"replication {replication.name!r}" if replication.name else "PG2K_SLOT_NAME"
            raise ConfigError(f"{where}: slot_name: {exc}") from None
    scopes = [replication_scope(replication) for replication in location.replications]
    parts = [builder(scope) for scope in scopes for builder in REPLICATION_BUILDERS]
    all_jobs = [job.name for part in parts for job in (part.jobs or [])]
    spool_dirs = [scope.config.spool_dir or "" for scope in scopes]
    named = any(scope.name for scope in scopes)
    prune_jobs, prune_schedules = build_prune(
        retention_days=location.settings.retention_days, spool_dirs=spool_dirs,
        # The single replication prunes the jobs it always did; several prune every job of theirs.
        job_names=all_jobs if named else None,
    )
    resources: dict[str, Any] = {HANDLES: window_handle_io_manager}
    for scope in scopes:
        resources.update(scope.top_level_resources())
    shared = Definitions(jobs=prune_jobs, schedules=prune_schedules, resources=resources)
    return Definitions.merge(*parts, shared)


def build_definitions(env: Mapping[str, str] | None = None) -> Definitions:
    """The code location of ``env`` (default: the process's environment); bad configuration fails here."""
    return location_definitions(from_env(os.environ if env is None else env))


defs = build_definitions()
