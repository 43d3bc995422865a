"""The code location as users see it: a real `dagster dev` on the local stack, queried over GraphQL."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from dagster_graphql import DagsterGraphQLClient

from pg2kinesis_dagster.devstack.daemon import wait_for as devstack_wait_for
from pg2kinesis_dagster.devstack.moto import MotoServer
from pg2kinesis_dagster.devstack.postgres import PostgresServer, free_port
from pg2kinesis_dagster.devstack.workload import create_sample_schema, run_sample_workload
from tests.helpers import assert_matches_ledger, read_json

REPO_ROOT = Path(__file__).resolve().parents[1]
SLOT = "ui_slot"

REPOSITORIES = """
{ repositoriesOrError { ... on RepositoryConnection { nodes {
    name location { name } jobs { name } sensors { name sensorState { status } }
    schedules { name scheduleState { status } } } } } }
"""
CHECKPOINTS = """
{ assetOrError(assetKey: {path: ["replication_checkpoint"]}) { ... on Asset {
    assetMaterializations(limit: 100) { runId metadataEntries { label
        ... on IntMetadataEntry { intValue } ... on TextMetadataEntry { text } } } } } }
"""


def wait_for(condition: Any, timeout: float, what: str, interval: float = 0.5) -> Any:
    """The devstack's bounded wait, polling every 0.5 s, failing the test (AssertionError)."""
    try:
        return devstack_wait_for(condition, timeout, what, interval)
    except TimeoutError as exc:
        raise AssertionError(str(exc)) from None


@pytest.fixture
def dagster_dev(
    pg_server: PostgresServer, pg_database: str, pg_conn, moto_server: MotoServer, kinesis_stream: str,
    tmp_path: Path,
) -> Iterator[tuple[str, int]]:
    create_sample_schema(pg_conn)
    with pg_conn.cursor() as cur:
        cur.execute("SELECT pg_create_logical_replication_slot(%s, 'test_decoding')", (SLOT,))
    home = tmp_path / "dagster_home"
    home.mkdir()
    shutil.copy(REPO_ROOT / "dagster.yaml", home / "dagster.yaml")
    port = free_port()
    env = {
        **os.environ,
        "DAGSTER_HOME": str(home),
        "PG2K_PG_HOST": pg_server.host, "PG2K_PG_PORT": str(pg_server.port), "PG2K_PG_DBNAME": pg_database,
        "PG2K_PG_USER": "postgres", "PG2K_SLOT_NAME": SLOT, "PG2K_STREAM_NAME": kinesis_stream,
        "PG2K_KINESIS_ENDPOINT_URL": moto_server.endpoint_url, "PG2K_MESSAGE_FORMATTER": "JSON",
        "PG2K_SENSOR_RUNNING": "1", "PG2K_SENSOR_INTERVAL_SECONDS": "1",
    }
    proc = subprocess.Popen(
        [str(Path(sys.executable).with_name("dagster")), "dev", "-w", "workspace.yaml", "-h", "127.0.0.1",
         "-p", str(port)],
        cwd=REPO_ROOT, env=env, start_new_session=True, stdout=subprocess.DEVNULL,
        stderr=open(tmp_path / "dagster.log", "w"),  # noqa: SIM115 - lives as long as the process
    )

    def answering() -> bool:
        assert proc.poll() is None, (tmp_path / "dagster.log").read_text()[-3000:]
        try:
            return requests.post(f"http://127.0.0.1:{port}/graphql", json={"query": REPOSITORIES},
                                 timeout=5).ok
        except requests.RequestException:
            return False

    try:
        wait_for(answering, 180, "dagster dev to answer GraphQL")
        yield "127.0.0.1", port
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def graphql(host: str, port: int, query: str) -> dict[str, Any]:
    response = requests.post(f"http://{host}:{port}/graphql", json={"query": query}, timeout=30)
    response.raise_for_status()
    body = response.json()
    assert "errors" not in body, body
    return body["data"]


def test_dagster_dev_shows_the_location_and_the_sensor_replicates(
    dagster_dev: tuple[str, int], pg_conn, moto_server: MotoServer, kinesis_stream: str
) -> None:
    host, port = dagster_dev
    repos = graphql(host, port, REPOSITORIES)["repositoriesOrError"]["nodes"]
    repo = next(r for r in repos if r["location"]["name"] == "pg2kinesis")
    assert {j["name"] for j in repo["jobs"]} >= {"replicate"}
    assert {s["name"]: s["sensorState"]["status"] for s in repo["sensors"]} == {
        "replication_sensor": "RUNNING", "replication_alerts": "RUNNING", "snapshot_tables_sensor": "RUNNING"}
    assert {s["name"]: s["scheduleState"]["status"] for s in repo["schedules"]} == {
        "replicate_schedule": "STOPPED", "prune_history_hourly": "RUNNING", "summarize_replication_daily": "RUNNING",
        "slot_health_schedule": "RUNNING", "primary_key_metadata_schedule": "RUNNING",
        "slot_heartbeat_schedule": "STOPPED"}

    # The running sensor sees the pending changes and launches runs until all arrived.
    ledger = run_sample_workload(pg_conn, transactions=60, seed=21)
    expected = sum(1 for _ in ledger.changes())
    wait_for(lambda: len(moto_server.read_stream(kinesis_stream)) >= expected, 240, "the sensor's runs")
    assert_matches_ledger(read_json(moto_server, kinesis_stream), ledger)

    # A run launched from the UI's API on an empty slot succeeds and records a checkpoint too.
    client = DagsterGraphQLClient(host, port_number=port)
    run_id = client.submit_job_execution("replicate", repository_location_name="pg2kinesis",
                                         repository_name="__repository__")
    wait_for(lambda: client.get_run_status(run_id).value in ("SUCCESS", "FAILURE"), 120, "the launched run")
    assert client.get_run_status(run_id).value == "SUCCESS"
    materializations = graphql(host, port, CHECKPOINTS)["assetOrError"]["assetMaterializations"]
    assert run_id in {m["runId"] for m in materializations}
    changes = sum(
        e["intValue"] for m in materializations for e in m["metadataEntries"] if e["label"] == "changes"
    )
    assert changes == expected
