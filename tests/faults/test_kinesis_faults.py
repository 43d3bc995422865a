"""Kinesis misbehaving: throttling, partial failures, 5xx, resets, timeouts, outages, a deleted stream, resharding.

Everything goes through :class:`tests.faults.proxy.FaultProxy` in front of the moto server, so the
records in the stream are exactly what a real Kinesis would hold after the same faults.
"""

from __future__ import annotations

import re
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pg2kinesis_dagster.core.changes import format_lsn
from pg2kinesis_dagster.devstack import moto as devstack_moto
from pg2kinesis_dagster.devstack.moto import MotoServer
from pg2kinesis_dagster.devstack.postgres import PostgresServer
from pg2kinesis_dagster.devstack.workload import create_sample_schema, run_sample_workload
from pg2kinesis_dagster.kinesis.sink import KinesisSink, make_kinesis_client
from pg2kinesis_dagster.pipeline import ReplicationSettings, Replicator
from tests.faults.harness import (
    PROFILE,
    Pg2k,
    SlotMonitor,
    WorkloadThread,
    confirmed_lsn,
    drain_once,
    pending_changes,
    report_line,
    run_once,
    stack_args,
    wait_caught_up,
    wait_until,
)
from tests.faults.proxy import FaultProxy, Faults
from tests.helpers import assert_no_loss_no_reordering, check_against_ledger, pg_settings, read_json

READ_TIMEOUT = 1.0


def _sink(endpoint_url: str, stream: str, **kwargs: object) -> KinesisSink:
    client = make_kinesis_client(region_name=MotoServer.region, endpoint_url=endpoint_url, connect_timeout=1,
                                 read_timeout=READ_TIMEOUT, max_attempts=1)  # the sink retries, not botocore
    kwargs.setdefault("max_retry_seconds", 60.0)
    kwargs.setdefault("base_backoff", 0.01)
    kwargs.setdefault("max_backoff", 0.2)
    return KinesisSink(client, stream, **kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize("partition_key", PROFILE.throttle_partition_keys)
@pytest.mark.parametrize("seed", PROFILE.throttle_seeds)
def test_throttling_partial_failures_and_timeouts_keep_order_and_completeness(
    seed: int, partition_key: str, pg_server: PostgresServer, pg_database: str, pg_conn, moto_server: MotoServer,
    kinesis_stream: str,
) -> None:
    create_sample_schema(pg_conn)
    faults = Faults(
        entry_failure_rate=0.3, request_failure_rate=0.15, slow_seconds=READ_TIMEOUT + 1.5,
        # Every kind at least once, whatever the seed; then random.
        script=["partial", "slow", "http500", "partial", "http503", "throttle400", "reset", "partial"],
    )
    with FaultProxy(moto_server.endpoint_url, seed=seed, faults=faults) as proxy:
        settings = ReplicationSettings(create_slot=True, message_formatter="JSON", max_changes=150,
                                       partition_key=partition_key)
        with Replicator(pg_settings(pg_server, pg_database), _sink(proxy.endpoint_url, kinesis_stream),
                        settings) as replicator:
            replicator.prepare()
            monitor = SlotMonitor(pg_server, pg_database).start()
            ledger = run_sample_workload(pg_conn, transactions=PROFILE.throttle_transactions, seed=seed)
            try:
                result = replicator.drain()
            finally:
                monitor.stop()
        counts = proxy.snapshot()
    records = read_json(moto_server, kinesis_stream)
    report = check_against_ledger(records, ledger)
    report_line("throttling", {"seed": seed, "partition_key": partition_key, "windows": result.windows,
                               "proxy": counts, **report.as_dict()})
    assert counts["put_partial"] >= 3 and counts["put_slow"] >= 1 and counts["put_reset"] >= 1
    assert counts.get("entry_ProvisionedThroughputExceededException", 0) + counts.get("entry_InternalFailure", 0) > 0
    assert not monitor.backwards
    # Duplicates only where a request was applied and the client timed out.
    assert_no_loss_no_reordering(report, max_duplicates=counts["applied_timed_out_entries"])
    assert counts["applied_timed_out_entries"] > 0


def test_kinesis_unavailable_mid_drain_is_waited_out(
    pg_server: PostgresServer, pg_database: str, pg_conn, moto_server: MotoServer, kinesis_stream: str,
    tmp_path: Path,
) -> None:
    """Every connection reset for ``outage_seconds`` (60 s in ``make faults``): pg2k --once retries and succeeds."""
    create_sample_schema(pg_conn)
    outage = PROFILE.outage_seconds
    with FaultProxy(moto_server.endpoint_url) as proxy:
        args = stack_args(pg_server, pg_database, proxy.endpoint_url, kinesis_stream)
        drain_once([*args, "--create-slot"], tmp_path, "create", pg_server, pg_database)
        ledger = run_sample_workload(pg_conn, transactions=150, seed=21)
        proxy.outage_after_puts(3, outage)
        started = time.monotonic()
        proc = run_once([*args, "--max-changes", "40", "--max-retry-seconds", str(outage + 60)], tmp_path, "drain",
                        timeout=outage + 240)
        seconds = time.monotonic() - started
        counts = proxy.snapshot()
    assert proc.poll() == 0, proc.stderr
    report = check_against_ledger(read_json(moto_server, kinesis_stream), ledger)
    report_line("outage", {"outage_seconds": outage, "drain_seconds": round(seconds, 1), "proxy": counts,
                           **report.as_dict()})
    assert counts["outage_resets"] >= 2 and seconds >= outage
    # Nothing was applied during the outage: no duplicates at all.
    assert_no_loss_no_reordering(report, max_duplicates=0)


def test_retries_exhausted_say_what_was_acknowledged_and_where_the_slot_stands(
    pg_server: PostgresServer, pg_database: str, pg_conn, moto_server: MotoServer, kinesis_stream: str,
    tmp_path: Path,
) -> None:
    create_sample_schema(pg_conn)
    with FaultProxy(moto_server.endpoint_url) as proxy:
        args = stack_args(pg_server, pg_database, proxy.endpoint_url, kinesis_stream)
        drain_once([*args, "--create-slot"], tmp_path, "create", pg_server, pg_database)
        ledger = run_sample_workload(pg_conn, transactions=120, seed=22)
        before = confirmed_lsn(pg_server, pg_database)
        assert before is not None
        # One request gets through, then Kinesis is gone for longer than pg2k keeps trying.
        proxy.outage_after_puts(1, 120)
        failed = run_once([*args, "--max-retry-seconds", "2"], tmp_path, "fail", timeout=120)
        assert failed.poll() == 1, failed.stderr
        message = failed.stderr
        assert "Traceback" not in message
        acknowledged = re.search(r"(\d+) of (\d+) records were acknowledged", message)
        assert acknowledged and 0 < int(acknowledged.group(1)) < int(acknowledged.group(2)), message
        assert "gave up" in message and kinesis_stream in message
        # Where the slot stands, and that it did not move.
        assert f"stays at {format_lsn(before)}" in message, message
        assert confirmed_lsn(pg_server, pg_database) == before
        proxy.end_outage()
        drain_once(args, tmp_path, "retry", pg_server, pg_database)
    report = check_against_ledger(read_json(moto_server, kinesis_stream), ledger)
    report_line("retries_exhausted", {"acknowledged_before_failure": int(acknowledged.group(1)),
                                      **report.as_dict()})
    # The acknowledged part of the failed batch is sent again: exactly those are duplicates.
    assert_no_loss_no_reordering(report)
    assert report.duplicates == int(acknowledged.group(1))


def test_stream_deleted_while_running_fails_clearly_and_leaves_the_slot(
    pg_server: PostgresServer, pg_database: str, pg_conn, moto_server: MotoServer, kinesis_stream: str,
    tmp_path: Path,
) -> None:
    create_sample_schema(pg_conn)
    args = stack_args(pg_server, pg_database, moto_server.endpoint_url, kinesis_stream)
    drain_once([*args, "--create-slot"], tmp_path, "create", pg_server, pg_database)
    proc = Pg2k([*args, "--poll-interval", "0.05"], tmp_path, "run")
    try:
        first = run_sample_workload(pg_conn, transactions=20, seed=31)
        expected = sum(len(t.changes) for t in first.transactions)
        wait_caught_up(pg_server, pg_database, 60)
        wait_until(lambda: len(read_json(moto_server, kinesis_stream)) >= expected, 30, "the records")
        assert check_against_ledger(read_json(moto_server, kinesis_stream), first).ok
        moto_server.client().delete_stream(StreamName=kinesis_stream, EnforceConsumerDeletion=True)
        before = confirmed_lsn(pg_server, pg_database)
        second = run_sample_workload(pg_conn, transactions=20, seed=32)
        code = proc.wait(60)
    finally:
        proc.kill()
    assert code == 1, proc.stderr
    assert f"pg2k: error: Kinesis stream {kinesis_stream!r} does not exist" in proc.stderr, proc.stderr
    assert "slot will not be advanced" in proc.stderr and "Traceback" not in proc.stderr
    assert confirmed_lsn(pg_server, pg_database) == before, "the slot moved although nothing was published"
    assert pending_changes(pg_server, pg_database) > 0
    # Recreated, the stream gets exactly what was committed meanwhile.
    moto_server.create_stream(kinesis_stream, shards=2)
    drain_once(args, tmp_path, "drain", pg_server, pg_database)
    assert_no_loss_no_reordering(check_against_ledger(read_json(moto_server, kinesis_stream), second),
                                 max_duplicates=0)


@pytest.fixture
def resharding_moto(aws_fake_env: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[MotoServer]:
    """A moto server whose resharding behaves like Kinesis's (see tests/faults/moto_reshard.py)."""
    script = str(Path(__file__).with_name("moto_reshard.py"))
    with monkeypatch.context() as mp:
        mp.setattr(devstack_moto, "_server_command",
                   lambda host, port: [sys.executable, script, "-H", host, "-p", str(port)])
        server = MotoServer().start()
    try:
        yield server
    finally:
        server.stop()


def test_resharding_while_running_keeps_every_change_and_per_row_order(
    pg_server: PostgresServer, pg_database: str, pg_conn, resharding_moto: MotoServer, tmp_path: Path,
) -> None:
    """Split, merge and update_shard_count while pg2k publishes; read every shard, closed ones too,
    in lineage order (parents before children), as a consumer must."""
    create_sample_schema(pg_conn)
    moto_server, kinesis_stream = resharding_moto, "resharded"
    moto_server.create_stream(kinesis_stream, shards=2)
    with FaultProxy(moto_server.endpoint_url) as proxy:  # serialises moto calls: reshards never race puts
        args = stack_args(pg_server, pg_database, proxy.endpoint_url, kinesis_stream)
        drain_once([*args, "--create-slot"], tmp_path, "create", pg_server, pg_database)
        admin = make_kinesis_client(region_name=MotoServer.region, endpoint_url=proxy.endpoint_url)
        proc = Pg2k([*args, "--max-changes", "30", "--poll-interval", "0.05"], tmp_path, "run")
        workload = WorkloadThread(pg_server, pg_database, seed=41, chunk=5, pause=0.05,
                                  max_transactions=PROFILE.reshard_transactions).start()
        steps = []
        try:
            step_every = PROFILE.reshard_transactions // 5
            for n, action in enumerate(("split", "merge", "scale_up", "scale_down")):
                workload.wait_for(step_every * (n + 1), timeout=120)
                answered = proxy.puts_answered()
                assert proxy.wait_put_answered(answered, 30), "pg2k is not publishing"
                shards = [s for s in admin.list_shards(StreamName=kinesis_stream)["Shards"]
                          if "EndingSequenceNumber" not in s["SequenceNumberRange"]]
                shards.sort(key=lambda s: int(s["HashKeyRange"]["StartingHashKey"]))
                if action == "split":
                    shard = shards[0]
                    low, high = (int(shard["HashKeyRange"][k]) for k in ("StartingHashKey", "EndingHashKey"))
                    admin.split_shard(StreamName=kinesis_stream, ShardToSplit=shard["ShardId"],
                                      NewStartingHashKey=str((low + high) // 2))
                elif action == "merge":
                    admin.merge_shards(StreamName=kinesis_stream, ShardToMerge=shards[0]["ShardId"],
                                       AdjacentShardToMerge=shards[1]["ShardId"])
                else:
                    target = len(shards) * 2 if action == "scale_up" else max(1, len(shards) // 2)
                    admin.update_shard_count(StreamName=kinesis_stream, TargetShardCount=target,
                                             ScalingType="UNIFORM_SCALING")
                steps.append(action)
            transactions = workload.stop()
            wait_caught_up(pg_server, pg_database, 120)
            assert proc.poll() is None, proc.stderr
            assert proc.terminate() == 0, proc.stderr
        finally:
            if workload._thread.is_alive():
                workload.stop()
            proc.kill()
        shards = admin.list_shards(StreamName=kinesis_stream)["Shards"]
    records = read_json(moto_server, kinesis_stream)
    report = check_against_ledger(records, transactions)
    report_line("resharding", {"steps": steps, "shards": len(shards), **report.as_dict()})
    assert len(shards) > 2
    assert_no_loss_no_reordering(report, allow_several_shards=True, max_duplicates=0)
    assert report.keys_on_several_shards > 0, "the reshards moved rows to new shards"
    children = {s["ShardId"] for s in shards if "ParentShardId" in s}
    assert len(children & {r["_shard"] for r in records}) >= 2, "records were written to shards made by resharding"


def test_truncate_of_a_keyed_table_stays_after_the_row_changes_before_it(
    pg_server: PostgresServer, pg_database: str, pg_conn, moto_server: MotoServer, kinesis_stream: str,
) -> None:
    with pg_conn.cursor() as cur:
        cur.execute("CREATE TABLE items (id int PRIMARY KEY, body text)")
    # One shard for the table (partition key "table"), so the stream's order is the consumer's order.
    with FaultProxy(moto_server.endpoint_url, faults=Faults(script=["partial:0"])) as proxy:
        settings = ReplicationSettings(create_slot=True, message_formatter="JSON", partition_key="table")
        with Replicator(pg_settings(pg_server, pg_database), _sink(proxy.endpoint_url, kinesis_stream),
                        settings) as replicator:
            replicator.prepare()
            with pg_conn.cursor() as cur:
                cur.execute("INSERT INTO items VALUES (2, 'gone after the truncate')")
                cur.execute("TRUNCATE items")
            replicator.drain()
        assert proxy.snapshot()["put_partial"] == 1
    ops = [r["op"] for r in read_json(moto_server, kinesis_stream)]
    # A consumer applying the stream must end with an empty table.
    assert ops == ["INSERT", "TRUNCATE"], ops
