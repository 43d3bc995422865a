"""Assets: the checkpoint history (materialized by each run's advance_slot) and primary-key metadata."""
# Dagster inspects these annotations at runtime: no "from __future__ import annotations" here.

from typing import TYPE_CHECKING

from dagster import (
    AssetChecksDefinition,
    AssetExecutionContext,
    AssetKey,
    AssetsDefinition,
    AssetSpec,
    MaterializeResult,
    MetadataValue,
    asset,
)

from pg2kinesis_dagster.core.health import Thresholds
from pg2kinesis_dagster.defs.jobs import checkpoint_key
from pg2kinesis_dagster.defs.resources import PostgresResource
from pg2kinesis_dagster.postgres.catalog import TableKey, load_table_keys

PRIMARY_KEY_ASSET = "primary_key_metadata"

if TYPE_CHECKING:
    import pandas as pd

def build_checkpoint_spec(replication_name: str = "") -> AssetSpec:
    return AssetSpec(
        checkpoint_key(replication_name),
        description=(
            "Where the slot stands. Every replicate run (and a continuous run at most once a minute) records a "
            "materialization with its start and end LSN, transactions, changes, bytes, changes per table and "
            "operation, and the lag after advancing: its history is the checkpoint history (pruned with the runs; "
            "replication_daily_summary keeps the long-term history)."
        ),
        group_name=replication_name or "pg2kinesis",
    )


def table_keys_frame(tables: dict[tuple[str, str], TableKey]) -> "pd.DataFrame":
    # Imported here: pandas takes a second to import, and every run worker imports this module.
    import pandas as pd

    rows = [
        {
            "schema": key.schema,
            "table": key.table,
            "key_columns": list(key.key_columns),
            "key_types": list(key.key_types),
            "replica_identity": key.replica_identity,
            "no_primary_key": not key.has_primary_key,
        }
        for key in tables.values()
    ]
    columns = ["schema", "table", "key_columns", "key_types", "replica_identity", "no_primary_key"]
    return pd.DataFrame(rows, columns=columns)


def build_primary_key_asset(replication_name: str = "", resource_key: str = "postgres") -> AssetsDefinition:
    """``primary_key_metadata`` of the replication's database (prefixed by its name when there are several)."""

    @asset(
        key=AssetKey([replication_name, PRIMARY_KEY_ASSET]) if replication_name else AssetKey(PRIMARY_KEY_ASSET),
        group_name=replication_name or "pg2kinesis",
        required_resource_keys={resource_key},
    )
    def primary_key_metadata(context: AssetExecutionContext) -> MaterializeResult:
        """Every user table with its primary-key columns and types, replica identity and a no-key flag,
        read from PostgreSQL's catalogs. Tables without a key are replicated keyed by table (or skipped,
        by the no_primary_key policy)."""
        postgres: PostgresResource = getattr(context.resources, resource_key)
        frame = table_keys_frame(load_table_keys(postgres.settings()))
        no_key = frame.loc[frame["no_primary_key"], "table"].tolist()
        preview = frame.assign(
            key_columns=frame["key_columns"].map(", ".join), key_types=frame["key_types"].map(", ".join)
        )
        return MaterializeResult(
            value=frame,
            metadata={
                "tables": len(frame),
                "tables_without_primary_key": len(no_key),
                "preview": MetadataValue.md(preview.head(50).to_markdown(index=False) if len(frame) else "none"),
            },
        )

    return primary_key_metadata


# The single replication's (PG2K_* variables): the names they always had.
replication_checkpoint = build_checkpoint_spec()
primary_key_metadata = build_primary_key_asset()


def build_lag_check(max_lag_bytes: int) -> AssetChecksDefinition:
    """The slot health checks (``slot_lag_within_limit`` among them) with ``max_lag_bytes`` as the lag warning.

    Kept for callers of the single check that came first; the code location uses
    :func:`pg2kinesis_dagster.defs.health.build_health_checks` with every threshold.
    """
    from pg2kinesis_dagster.defs.health import build_health_checks  # health imports this module's neighbours

    return build_health_checks(Thresholds(lag_warn_bytes=max_lag_bytes))
