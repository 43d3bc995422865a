"""Kinesis fixtures: one moto server per test session, a fresh stream per test.

Loaded from tests/conftest.py through ``pytest_plugins``. Every fixture here
sets fake AWS credentials and points Kinesis (and any other AWS service) at
the moto server, so no test can reach real AWS even through the default
credential chain or ``make_kinesis_client()``.
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from pg2kinesis_dagster.devstack.moto import MotoServer

_FAKE_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_SESSION_TOKEN": "testing",
    "AWS_SECURITY_TOKEN": "testing",
    "AWS_DEFAULT_REGION": MotoServer.region,
    "AWS_REGION": MotoServer.region,
    # No shared config/credentials files, no instance metadata lookups.
    "AWS_CONFIG_FILE": "/nonexistent/pg2kinesis-tests/aws-config",
    "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent/pg2kinesis-tests/aws-credentials",
    "AWS_EC2_METADATA_DISABLED": "true",
}


def _fake_aws_env(mp: pytest.MonkeyPatch, endpoint_url: str | None = None) -> None:
    for name, value in _FAKE_ENV.items():
        mp.setenv(name, value)
    for name in ("AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_ROLE_ARN", "AWS_WEB_IDENTITY_TOKEN_FILE"):
        mp.delenv(name, raising=False)
    if endpoint_url is not None:
        mp.setenv("AWS_ENDPOINT_URL", endpoint_url)
        mp.setenv("AWS_ENDPOINT_URL_KINESIS", endpoint_url)


@pytest.fixture(scope="session")
def moto_server() -> Iterator[MotoServer]:
    """moto's standalone server for the whole session (stopped, process group killed, at the end)."""
    with pytest.MonkeyPatch.context() as mp:
        _fake_aws_env(mp)
        with MotoServer() as server:
            yield server


@pytest.fixture
def aws_fake_env(monkeypatch: pytest.MonkeyPatch, moto_server: MotoServer) -> str:
    """Fake credentials, and AWS endpoints pointing at moto; returns the endpoint URL."""
    _fake_aws_env(monkeypatch, moto_server.endpoint_url)
    return moto_server.endpoint_url


@pytest.fixture
def kinesis_client(moto_server: MotoServer, aws_fake_env: str) -> Any:
    """A boto3 Kinesis client talking to the moto server."""
    return moto_server.client()


@pytest.fixture
def kinesis_stream(moto_server: MotoServer, aws_fake_env: str) -> Iterator[str]:
    """Name of a fresh, ACTIVE, 2-shard stream; deleted after the test."""
    name = f"test-{uuid.uuid4().hex[:16]}"
    moto_server.create_stream(name, shards=2)
    yield name
    # Keep the session-wide server's memory flat; a failure here must not mask
    # the test's own result.
    with contextlib.suppress(Exception):
        moto_server.client().delete_stream(StreamName=name, EnforceConsumerDeletion=True)
