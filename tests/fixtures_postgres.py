"""PostgreSQL fixtures: one throwaway server per test session, a fresh database per test.

Loaded from tests/conftest.py through ``pytest_plugins``. Tests that need a
server with other settings (``wal_level=replica``) or that restart/kill it start
their own :class:`PostgresServer` instead of disturbing the shared one.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Iterator

import psycopg2.extensions
import pytest

from pg2kinesis_dagster.devstack.postgres import PostgresServer


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PostgresServer]:
    """A started server (wal_level=logical), stopped and deleted at session end."""
    with PostgresServer() as server:
        yield server


@pytest.fixture
def pg_database(pg_server: PostgresServer, request: pytest.FixtureRequest) -> Iterator[str]:
    """A new empty database per test, dropped afterwards together with its replication slots."""
    # The test's name makes leftovers easy to trace; the random suffix keeps names unique
    # across parametrised tests and reruns. 63 bytes is PostgreSQL's identifier limit.
    stem = re.sub(r"[^a-z0-9]+", "_", request.node.name.lower()).strip("_")[:40]
    name = pg_server.create_database(f"t_{stem}_{secrets.token_hex(4)}")
    yield name
    pg_server.drop_database(name)


@pytest.fixture
def pg_conn(pg_server: PostgresServer, pg_database: str) -> Iterator[psycopg2.extensions.connection]:
    """An autocommit superuser connection to ``pg_database``, closed after the test."""
    conn = pg_server.connect(pg_database)
    try:
        yield conn
    finally:
        conn.close()
