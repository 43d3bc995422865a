"""Shared fixtures: the throwaway PostgreSQL and moto servers, and a spool folder per test session."""

import os

import pytest

pytest_plugins = ["tests.fixtures_postgres", "tests.fixtures_kinesis"]


@pytest.fixture(autouse=True, scope="session")
def spool_root(tmp_path_factory: pytest.TempPathFactory) -> str:
    """Windows spool into the test session's own folder (the CLI and code location read PG2K_SPOOL_DIR)."""
    root = str(tmp_path_factory.mktemp("spool"))
    os.environ["PG2K_SPOOL_DIR"] = root
    return root
