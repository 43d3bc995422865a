"""Crash at every step: SIGKILL ``pg2k`` (continuous mode) again and again while transactions commit.

Each kill lands at a chosen step, found by watching what the process does from outside:

* ``delay``: a random moment after start (startup, slot checks, first peek ...);
* ``peek``: while PostgreSQL is decoding for it (its peek cursor is active in ``pg_stat_activity``);
* ``mid_publish``: moto applied a ``PutRecords`` and the proxy holds the answer: the records are in the
  stream but pg2k never learns it (must show up as duplicates, never as a loss);
* ``after_publish``: 0-30 ms after a ``PutRecords`` answer (between requests, or published but not advanced);
* ``advance``: while ``pg_replication_slot_advance`` runs;
* ``after_advance``: as soon as the slot moved (lag query, next peek).

Then ``pg2k --once`` drains and everything committed is checked against the ledger: nothing lost,
values exact, per-row order and commit order kept, duplicates only from the killed batches, and the
slot's ``confirmed_flush_lsn`` (sampled every few ms) never moved backwards.
"""

from __future__ import annotations

import random
import time
from collections import Counter
from pathlib import Path

import pytest

from pg2kinesis_dagster.devstack.moto import MotoServer
from pg2kinesis_dagster.devstack.postgres import PostgresServer
from pg2kinesis_dagster.devstack.workload import create_sample_schema
from tests.faults.harness import (
    PROFILE,
    Pg2k,
    SlotMonitor,
    WorkloadThread,
    drain_once,
    refused_busy,
    report_line,
    stack_args,
    wait_no_pg2k_backends,
)
from tests.faults.proxy import FaultProxy
from tests.helpers import assert_no_loss_no_reordering, check_against_ledger, read_json

STRATEGIES = ("mid_publish", "peek", "after_publish", "advance", "after_advance", "delay")
MAX_CHANGES = 25


def _wait_for_query(conn, pattern: str, timeout: float) -> bool:
    """Poll pg_stat_activity (tightly, bounded) until a pg2k backend runs a query matching ``pattern``."""
    deadline = time.monotonic() + timeout
    with conn.cursor() as cur:
        while time.monotonic() < deadline:
            cur.execute(
                "SELECT 1 FROM pg_stat_activity WHERE application_name = 'pg2kinesis' AND state = 'active' "
                "AND datname = current_database() AND query LIKE %s LIMIT 1",
                (pattern,),
            )
            if cur.fetchone():
                return True
    return False


@pytest.mark.parametrize("seed", PROFILE.crash_seeds)
def test_sigkill_at_every_step_loses_nothing(
    seed: int, pg_server: PostgresServer, pg_database: str, pg_conn, moto_server: MotoServer, kinesis_stream: str,
    tmp_path: Path,
) -> None:
    rng = random.Random(seed)
    create_sample_schema(pg_conn)
    started = time.monotonic()
    with FaultProxy(moto_server.endpoint_url, seed=seed) as proxy:
        args = stack_args(pg_server, pg_database, proxy.endpoint_url, kinesis_stream)
        drain_once([*args, "--create-slot"], tmp_path, "create", pg_server, pg_database)
        kills: Counter[str] = Counter()
        hits: Counter[str] = Counter()
        refused = 0
        timings: Counter[str] = Counter()
        watcher = pg_server.connect(pg_database)
        with SlotMonitor(pg_server, pg_database) as monitor:
            workload = WorkloadThread(pg_server, pg_database, seed=seed, chunk=4, pause=0.05).start()
            try:
                workload.wait_for(8, timeout=60)
                timings["setup"] = time.monotonic() - started
                for i in range(PROFILE.crash_kills):
                    cycle_started = time.monotonic()
                    wait_no_pg2k_backends(pg_server, pg_database)
                    timings["wait_backends"] += time.monotonic() - cycle_started
                    strategy = STRATEGIES[i % len(STRATEGIES)]
                    proc = Pg2k([*args, "--max-changes", str(MAX_CHANGES), "--poll-interval", "0.05"], tmp_path,
                                f"run-{i}")
                    # Let it work for a few requests first, so kills also hit a process in its stride.
                    warmup = proxy.puts_answered() + rng.randint(0, 8)
                    while proxy.puts_answered() < warmup and proxy.wait_put_answered(proxy.puts_answered(), 5):
                        pass
                    hold = proxy.hold_next_put() if strategy == "mid_publish" else None
                    answered = proxy.puts_answered()
                    position = monitor.current()
                    if strategy == "mid_publish":
                        assert hold is not None
                        hit = hold[0].wait(15)
                    elif strategy == "peek":
                        hit = _wait_for_query(watcher, "%pg2k_peek%", 15)
                    elif strategy == "after_publish":
                        hit = proxy.wait_put_answered(answered, 15)
                        if hit:
                            # The kill delay itself: lands between requests, or after the batch's last answer
                            # and before (or while) the slot is advanced.
                            time.sleep(rng.uniform(0, 0.03))
                    elif strategy == "advance":
                        hit = _wait_for_query(watcher, "%pg_replication_slot_advance%", 15)
                    elif strategy == "after_advance":
                        hit = monitor.wait_advanced(position, 15)
                    else:
                        time.sleep(rng.uniform(0, 1.5))  # the kill delay itself
                        hit = True
                    timings["to_kill"] += time.monotonic() - cycle_started
                    exited = proc.poll()
                    proc.kill()
                    if hold is not None:
                        proxy.cancel_hold()
                    if exited is not None:
                        if refused_busy(proc.stderr):
                            refused += 1
                            continue
                        raise AssertionError(f"pg2k exited on its own ({exited}) before the kill: {proc.stderr}")
                    kills[strategy] += 1
                    hits[strategy] += bool(hit)
                transactions = workload.stop()
                timings["kill_loop"] = time.monotonic() - started
            finally:
                if workload._thread.is_alive():
                    workload.stop()
            drain_started = time.monotonic()
            drained = drain_once([*args, "--max-changes", "2000"], tmp_path, "drain", pg_server, pg_database)
            assert drained.poll() == 0
            timings["drain"] = time.monotonic() - drain_started
        watcher.close()
        proxy_counts = proxy.snapshot()

    read_started = time.monotonic()
    records = read_json(moto_server, kinesis_stream)
    report = check_against_ledger(records, transactions)
    timings["read_and_check"] = time.monotonic() - read_started
    largest = max(len(t.changes) for t in transactions)
    total_kills = sum(kills.values())
    summary = {
        "seed": seed, "profile": PROFILE.name, "kills": total_kills, "kills_by_step": dict(kills),
        "steps_hit": dict(hits), "refused_restarts": refused, "transactions": len(transactions),
        "slot_samples": monitor.samples, "slot_moves": monitor.moves, "slot_backwards": len(monitor.backwards),
        "put_requests": proxy_counts.get("put_requests", 0), "seconds": round(time.monotonic() - started, 1),
        "timings": {k: round(v, 1) for k, v in timings.items()},
        **report.as_dict(),
    }
    report_line("crash", summary)
    assert not monitor.backwards, f"the slot moved backwards: {monitor.backwards[:5]}"
    # A kill can only cause the batch in flight to be sent again.
    assert_no_loss_no_reordering(report, max_duplicates=total_kills * (MAX_CHANGES + largest))
    assert total_kills >= PROFILE.crash_kills * 0.8, summary
    # The interesting steps were really reached, and a kill mid-publish really left records behind.
    for step in ("mid_publish", "after_publish", "after_advance"):
        assert hits[step] >= 1, summary
    assert report.duplicates >= 1, "a kill after moto applied a request must show up as duplicates"
