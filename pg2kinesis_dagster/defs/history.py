"""Dagster history that stays small: a daily summary of the checkpoints, and a retention job.

A replicate run every few seconds is tens of thousands of runs a day. The ``prune_history`` job (hourly
by default) deletes finished replication runs older than the retention period, with their events and
any per-run files under the instance's storage folder, and the spools of windows nobody finished. The
checkpoint history outlives it in a compact form: ``replication_daily_summary``, one materialization per
day (changes, records, bytes, windows, lag, changes per table), computed from that day's checkpoints
before they are pruned, so the UI still plots months of history.
"""
# Dagster inspects these annotations at runtime: no "from __future__ import annotations" here.

import shutil
from collections import Counter
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from dagster import (
    AssetExecutionContext,
    AssetKey,
    AssetRecordsFilter,
    Config,
    DagsterRunStatus,
    DailyPartitionsDefinition,
    DefaultScheduleStatus,
    JobDefinition,
    MaterializeResult,
    MetadataValue,
    OpExecutionContext,
    RunsFilter,
    ScheduleDefinition,
    asset,
    build_schedule_from_partitioned_job,
    define_asset_job,
    job,
    op,
)

from pg2kinesis_dagster.defs.jobs import REPLICATION_JOBS, checkpoint_key, prefixed, top_tables
from pg2kinesis_dagster.defs.operating import OPERATING_JOBS
from pg2kinesis_dagster.spool import Spool

SUMMARY_ASSET = "replication_daily_summary"
PRUNE_JOB = "prune_history"
DEFAULT_RETENTION_DAYS = 7
DEFAULT_SPOOL_RETENTION_HOURS = 24
# Runs deleted per prune run: an hourly prune keeps up with a run every second.
MAX_RUNS_PER_PRUNE = 5000
_FINISHED = [DagsterRunStatus.SUCCESS, DagsterRunStatus.FAILURE, DagsterRunStatus.CANCELED]
_NUMBERS = ("windows", "transactions", "changes", "records", "filtered", "skipped_no_primary_key",
            "truncated_records", "record_bytes", "plugin_bytes")


def summarize_checkpoints(metadata: list[dict[str, Any]]) -> dict[str, Any]:
    """One day's checkpoint materializations (their metadata values) summed into the summary's metadata."""
    totals: Counter[str] = Counter()
    by_table: Counter[str] = Counter()
    max_lag = 0
    for entry in metadata:
        for name in _NUMBERS:
            value = entry.get(name)
            if isinstance(value, int | float) and not isinstance(value, bool):
                totals[name] += int(value)
        lag = entry.get("lag_bytes_after_advance")
        if isinstance(lag, int | float):
            max_lag = max(max_lag, int(lag))
        tables = entry.get("changes_by_table")
        if isinstance(tables, dict):
            by_table.update({str(k): int(v) for k, v in tables.items()})
    summary: dict[str, Any] = {name: totals.get(name, 0) for name in _NUMBERS}
    summary["checkpoints"] = len(metadata)
    summary["max_lag_bytes_after_advance"] = max_lag
    summary["changes_by_table"] = MetadataValue.json(top_tables(dict(by_table)))
    return summary


def build_daily_summary(start_date: str, replication_name: str = "") -> Any:
    # end_offset=1: today is a partition too (partial until the day ends; the schedule redoes yesterday).
    partitions = DailyPartitionsDefinition(start_date=start_date, timezone="UTC", end_offset=1)

    checkpoint = checkpoint_key(replication_name)

    @asset(
        key=AssetKey([replication_name, SUMMARY_ASSET]) if replication_name else AssetKey(SUMMARY_ASSET),
        partitions_def=partitions,
        group_name=replication_name or "pg2kinesis",
        description="One day of replication in one materialization, from that day's checkpoints: changes, "
                    "records, bytes, windows, the largest lag, changes per table. It outlives the pruned runs.",
    )
    def replication_daily_summary(context: AssetExecutionContext) -> MaterializeResult:
        window = context.partition_time_window
        metadata: list[dict[str, Any]] = []
        cursor = None
        while True:
            result = context.instance.fetch_materializations(
                AssetRecordsFilter(
                    asset_key=checkpoint,
                    after_timestamp=window.start.timestamp(),
                    before_timestamp=window.end.timestamp(),
                ),
                limit=1000,
                cursor=cursor,
                ascending=True,
            )
            for record in result.records:
                materialization = record.asset_materialization
                if materialization is not None:
                    metadata.append({k: v.value for k, v in materialization.metadata.items()})
            if not result.has_more:
                break
            cursor = result.cursor
        return MaterializeResult(metadata=summarize_checkpoints(metadata))

    return replication_daily_summary


class PruneConfig(Config):
    retention_days: float = DEFAULT_RETENTION_DAYS
    """Finished replication (and prune) runs older than this are deleted with their events."""
    spool_retention_hours: float = DEFAULT_SPOOL_RETENTION_HOURS
    """Window spools not written for this long (a failed run's, a slot no longer replicated) are deleted."""
    spool_dir: str = ""
    """The spool root to prune (empty: the default, the system's temporary directory)."""
    spool_dirs: list[str] = []
    """More spool roots (a code location with several replications prunes each one's)."""
    job_names: list[str] = []
    """The jobs whose old runs are deleted (empty: the single replication's jobs, as named without a prefix)."""


@op(description="Delete finished replication runs older than the retention period, their events and files, "
                "and stale window spools.")
def prune_old_runs(context: OpExecutionContext, config: PruneConfig) -> None:
    instance = context.instance
    cutoff = datetime.now(timezone.utc) - timedelta(days=config.retention_days)
    storage = Path(instance.storage_directory())
    deleted = 0
    # The health checks, key refresh and heartbeat too: the health checks alone make a run a minute.
    for job_name in (*(config.job_names or (*REPLICATION_JOBS, *OPERATING_JOBS)), PRUNE_JOB):
        records = instance.get_run_records(
            RunsFilter(job_name=job_name, statuses=_FINISHED, updated_before=cutoff),
            limit=MAX_RUNS_PER_PRUNE - deleted,
        )
        for record in records:
            run_id = record.dagster_run.run_id
            if run_id == context.run_id:
                continue
            instance.delete_run(run_id)
            # Compute logs and IO manager files of the run, if any: nothing else deletes them.
            shutil.rmtree(storage / run_id, ignore_errors=True)
            deleted += 1
        if deleted >= MAX_RUNS_PER_PRUNE:
            break
    roots = dict.fromkeys([config.spool_dir, *config.spool_dirs])
    spools = [path for root in roots for path in Spool(root or None).prune(config.spool_retention_hours * 3600)]
    context.log.info(f"deleted {deleted} runs finished before {cutoff:%Y-%m-%d %H:%M} UTC and {len(spools)} spools")
    context.add_output_metadata({"runs_deleted": deleted, "spools_deleted": len(spools),
                                 "cutoff": cutoff.isoformat()})


@job(name=PRUNE_JOB, description="Retention: keeps Dagster's storage from growing with the number of runs.")
def prune_history() -> None:
    prune_old_runs()


def build_summary(
    start_date: str, replication_name: str = ""
) -> tuple[list[Any], list[JobDefinition], list[ScheduleDefinition]]:
    """A replication's daily summary asset, its job and its schedule (on by default)."""
    summary = build_daily_summary(start_date, replication_name)
    summary_job = define_asset_job(prefixed(replication_name, "summarize_replication_day"), selection=[summary.key],
                                   partitions_def=summary.partitions_def)
    summary_schedule = build_schedule_from_partitioned_job(
        summary_job, minute_of_hour=7, hour_of_day=0, default_status=DefaultScheduleStatus.RUNNING,
        name=prefixed(replication_name, "summarize_replication_daily"),
    )
    return [summary], [summary_job], [summary_schedule]


def build_prune(
    *, retention_days: float, spool_dirs: list[str], job_names: list[str] | None = None,
    prune_cron: str = "17 * * * *",
) -> tuple[list[JobDefinition], list[ScheduleDefinition]]:
    """The code location's prune job and its hourly schedule: the runs of ``job_names`` and every spool root."""
    roots = list(dict.fromkeys(spool_dirs))
    prune_schedule = ScheduleDefinition(
        name="prune_history_hourly",
        job=prune_history,
        cron_schedule=prune_cron,
        default_status=DefaultScheduleStatus.RUNNING,
        run_config={"ops": {"prune_old_runs": {"config": {
            "retention_days": retention_days, "spool_dir": roots[0] if roots else "",
            "spool_dirs": roots[1:], "job_names": list(job_names or []),
        }}}},
        description="Deletes finished replication runs older than the retention period (PG2K_RETENTION_DAYS).",
    )
    return [prune_history], [prune_schedule]
