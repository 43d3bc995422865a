"""Dagster entry point: `dagster dev` loads `defs` from here (see workspace.yaml and pyproject.toml)."""

from pg2kinesis_dagster.defs import defs

__all__ = ["defs"]
