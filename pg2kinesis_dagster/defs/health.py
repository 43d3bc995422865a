"""Slot health as Dagster asset checks on ``replication_checkpoint``, run by their own job and schedule.

The checks run every minute by default (``PG2K_HEALTH_CRON``), whether or not replication runs succeed or
run at all: a stopped or failing replication is seen, not only a slow one. What each check means and decides
is in :mod:`pg2kinesis_dagster.core.health`; here they are read (:mod:`pg2kinesis_dagster.postgres.health`)
and reported, every number as metadata so that the UI shows the trend.
"""
# Dagster inspects these annotations at runtime: no "from __future__ import annotations" here.

import time
from collections.abc import Iterator

from dagster import (
    AssetCheckExecutionContext,
    AssetCheckResult,
    AssetChecksDefinition,
    AssetCheckSeverity,
    AssetCheckSpec,
    AssetKey,
    AssetSelection,
    DagsterInstance,
    DefaultScheduleStatus,
    JobDefinition,
    ScheduleDefinition,
    define_asset_job,
    multi_asset_check,
)
from dagster._core.definitions.unresolved_asset_job_definition import UnresolvedAssetJobDefinition

from pg2kinesis_dagster.core import health as core
from pg2kinesis_dagster.core.decoders import decoder_for
from pg2kinesis_dagster.core.errors import SourceUnavailableError
from pg2kinesis_dagster.defs.jobs import checkpoint_key, prefixed
from pg2kinesis_dagster.defs.resources import ReplicationResource
from pg2kinesis_dagster.postgres.health import read_slot_health

HEALTH_JOB = "slot_health"
HEALTH_SCHEDULE = "slot_health_schedule"
# Health runs say which slot they looked at (not the replication tag: they must not count as replication runs).
HEALTH_SLOT_TAG = "pg2kinesis/health_of_slot"

DESCRIPTIONS = {
    core.LAG_CHECK: (
        "WAL written since the slot's confirmed position, against PG2K_MAX_LAG_BYTES (warn) and "
        "PG2K_LAG_ERROR_BYTES (error): PostgreSQL keeps it on disk until the slot is advanced. Also reports the "
        "decoding spill/stream statistics. Fails (error) when the slot is missing or invalidated."
    ),
    core.WAL_STATUS_CHECK: (
        "wal_status (reserved ok, extended warn, unreserved/lost error) and, with max_slot_wal_keep_size set, "
        "safe_wal_size against PG2K_SAFE_WAL_WARN_FRACTION / PG2K_SAFE_WAL_ERROR_FRACTION of it."
    ),
    core.PINNED_CHECK: (
        "How far restart_lsn trails confirmed_flush_lsn (PG2K_PINNED_WARN_BYTES / PG2K_PINNED_ERROR_BYTES): an "
        "open transaction holding an xid anywhere in the cluster pins it. Names the oldest such sessions and "
        "prepared transactions."
    ),
    core.FRESHNESS_CHECK: (
        "Changes are pending and no checkpoint was recorded for PG2K_FRESHNESS_WARN_MINUTES (warn) / "
        "PG2K_FRESHNESS_ERROR_MINUTES (error): replication is stopped, failing or stuck."
    ),
}


def minutes_since_checkpoint(
    instance: DagsterInstance, now: float | None = None, asset_key: AssetKey | None = None
) -> float | None:
    event = instance.get_latest_materialization_event(asset_key or checkpoint_key())
    if event is None:
        return None
    return max(0.0, ((time.time() if now is None else now) - event.timestamp) / 60.0)


def unreachable_findings(slot_name: str, reason: str) -> list[core.Finding]:
    summary = f"cannot read the health of replication slot {slot_name!r}: {reason}"
    advice = ("PostgreSQL is down or unreachable from Dagster, or the credentials changed: replication cannot run "
              "either. Check the server, the network and PG2K_PG_* settings.")
    return [core.Finding(name, core.Level.ERROR, summary, advice, {"slot": slot_name, "reachable": False})
            for name in core.CHECK_NAMES]


def slot_findings(
    replication: ReplicationResource, thresholds: core.Thresholds, instance: DagsterInstance
) -> list[core.Finding]:
    """Read the slot and evaluate every check (the PostgreSQL side of the asset checks)."""
    plugin = replication.output_plugin
    # Peek with exactly the options replication reads the slot with.
    decoder = decoder_for(plugin, **({"publication": replication.publication} if plugin == "pgoutput" else {}))
    try:
        health = read_slot_health(
            replication.postgres.settings(), replication.slot_name,
            peek_options=decoder.slot_options, binary=plugin == "pgoutput",
        )
    except SourceUnavailableError as exc:
        return unreachable_findings(replication.slot_name, str(exc))
    since = minutes_since_checkpoint(instance, asset_key=checkpoint_key(replication.name))
    return core.evaluate(health, thresholds, minutes_since_checkpoint=since)


def check_result(finding: core.Finding, asset_key: AssetKey | None = None) -> AssetCheckResult:
    metadata: dict[str, object] = dict(finding.metadata)
    metadata["summary"] = finding.summary
    if finding.advice:
        metadata["what_to_do"] = finding.advice
    metadata["level"] = finding.level.value
    return AssetCheckResult(
        check_name=finding.check,
        asset_key=asset_key or checkpoint_key(),
        passed=finding.passed,
        severity=AssetCheckSeverity.WARN if finding.level is core.Level.WARN else AssetCheckSeverity.ERROR,
        description=finding.summary,
        metadata=metadata,
    )


def build_health_checks(
    thresholds: core.Thresholds, *, replication_name: str = "", resource_key: str = "replication"
) -> AssetChecksDefinition:
    asset_key = checkpoint_key(replication_name)

    @multi_asset_check(
        name=prefixed(replication_name, "slot_health_checks"),
        required_resource_keys={resource_key},
        specs=[AssetCheckSpec(name, asset=asset_key, description=DESCRIPTIONS[name])
               for name in core.CHECK_NAMES],
        description="Reads the slot, the WAL position, decoding statistics and open transactions once; one "
        "result per check.",
    )
    def slot_health_checks(context: AssetCheckExecutionContext) -> Iterator[AssetCheckResult]:
        replication = getattr(context.resources, resource_key)
        for finding in slot_findings(replication, thresholds, context.instance):
            if not finding.passed:
                log = context.log.error if finding.level is core.Level.ERROR else context.log.warning
                log(f"{finding.check}: {finding.summary}. {finding.advice}")
            yield check_result(finding, asset_key)

    return slot_health_checks


def build_health_job(
    checks: AssetChecksDefinition, slot_name: str, name: str = HEALTH_JOB
) -> UnresolvedAssetJobDefinition:
    return define_asset_job(
        name,
        selection=AssetSelection.checks(checks),
        description="Evaluates the slot health checks (runs on slot_health_schedule, every minute by default).",
        tags={HEALTH_SLOT_TAG: slot_name},
    )


def build_health_schedule(
    job: UnresolvedAssetJobDefinition | JobDefinition, cron: str, running: bool, name: str = HEALTH_SCHEDULE
) -> ScheduleDefinition:
    return ScheduleDefinition(
        name=name,
        job=job,
        cron_schedule=cron,
        default_status=DefaultScheduleStatus.RUNNING if running else DefaultScheduleStatus.STOPPED,
        description="Runs the slot health checks, whether or not replication runs succeed.",
    )
