"""Four replications in one code location (PG2K_CONFIG) under one real dagster-daemon, draining at once."""

from __future__ import annotations

from pathlib import Path

from dagster import AssetKey

from pg2kinesis_dagster.defs.resources import SLOT_TAG
from pg2kinesis_dagster.devstack.daemon import FAKE_AWS_ENV, FINISHED, DagsterDaemon, wait_for
from pg2kinesis_dagster.devstack.moto import MotoServer
from pg2kinesis_dagster.devstack.postgres import PostgresServer
from pg2kinesis_dagster.devstack.replications import (
    drop_replications,
    overlapping,
    peak_overlap,
    prepare_replications,
    run_intervals,
    write_config,
)
from tests.helpers import assert_matches_ledger, dedupe, read_json

REPLICATIONS = 4


def test_four_replications_drain_their_backlogs_side_by_side_under_one_daemon(
    pg_server: PostgresServer, moto_server: MotoServer, tmp_path: Path
) -> None:
    # Small windows: each backlog takes several runs, so each slot has a run queued behind its running one.
    prepared = prepare_replications(pg_server, moto_server, REPLICATIONS, transactions=24, prefix="four", seed=11)
    config = write_config(
        tmp_path / "pg2kinesis.yaml", pg_server, moto_server, prepared,
        message_formatter="JSON", sensor_running=True, sensor_interval_seconds=1, max_changes=40,
        # Only replication here: the minute-by-minute health runs would compete for the two cores.
        health_running=False, key_metadata_running=False, alerts_running=False,
    )
    try:
        with DagsterDaemon({"PG2K_CONFIG": str(config), **FAKE_AWS_ENV}) as daemon:
            try:
                daemon.wait_until_ready(timeout=180)

                def drained() -> bool:
                    return all(len(dedupe(read_json(moto_server, r.stream))) >= r.expected for r in prepared)

                wait_for(drained, 300, "every replication's backlog in its stream", interval=1.0)
                wait_for(lambda: not daemon.in_flight(), 120, "the last runs to end", interval=0.5)

                spans = {}
                for replication in prepared:
                    records = daemon.runs(f"{replication.name}__replicate", tags={SLOT_TAG: replication.slot_tag})
                    assert len(records) >= 2, f"{replication.name}: one window cannot hold the backlog"
                    assert {r.dagster_run.status for r in records} <= set(FINISHED)
                    assert {r.dagster_run.status.value for r in records} == {"SUCCESS"}
                    spans[replication.slot_tag] = run_intervals(daemon.instance(), records)
                    # At most one run per slot at a time (the instance's per-slot tag limit).
                    assert not overlapping(spans[replication.slot_tag]), replication.name
                    checkpoint = AssetKey([replication.name, "replication_checkpoint"])
                    assert daemon.instance().get_latest_materialization_event(checkpoint) is not None
                # No slot waits for another: their runs went on at the same time.
                peak = peak_overlap(spans)
                assert peak >= REPLICATIONS - 1, (peak, spans)
                for slot, own in spans.items():
                    others = [span for other, other_spans in spans.items() if other != slot for span in other_spans]
                    assert any(s < oe and os_ < e for s, e in own for os_, oe in others), slot
            except (AssertionError, TimeoutError) as exc:
                raise AssertionError(f"{exc}\n{daemon.describe()}") from exc
        for replication in prepared:
            assert_matches_ledger(read_json(moto_server, replication.stream), replication.ledger)
    finally:
        drop_replications(pg_server, prepared)
