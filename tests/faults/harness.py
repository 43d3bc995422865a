"""Moving parts of the fault tests: pg2k processes, a concurrent workload, a slot monitor, the profile.

Every wait is on a condition with a timeout; every loop is bounded by a count and a deadline.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg2

from pg2kinesis_dagster.core.changes import parse_lsn
from pg2kinesis_dagster.devstack.daemon import wait_for
from pg2kinesis_dagster.devstack.postgres import PostgresServer, PostgresServerError
from pg2kinesis_dagster.devstack.workload import LedgerTransaction, run_sample_workload

PG2K = str(Path(sys.executable).with_name("pg2k"))
LONG = os.environ.get("PG2K_FAULTS_PROFILE", "").lower() == "long"


@dataclass(frozen=True)
class Profile:
    """How hard the fault tests push: ``PG2K_FAULTS_PROFILE=long`` (``make faults``) or the default slice."""

    name: str
    crash_kills: int
    crash_seeds: tuple[int, ...]
    throttle_seeds: tuple[int, ...]
    throttle_transactions: int
    throttle_partition_keys: tuple[str, ...]
    outage_seconds: float
    reshard_transactions: int
    restart_rounds: int


PROFILE = (
    Profile("long", crash_kills=60, crash_seeds=(101,), throttle_seeds=(1, 2, 3, 4, 5), throttle_transactions=600,
            throttle_partition_keys=("row", "constant"), outage_seconds=60.0, reshard_transactions=400,
            restart_rounds=6)
    if LONG
    else Profile("short", crash_kills=12, crash_seeds=(7,), throttle_seeds=(1,), throttle_transactions=200,
                 throttle_partition_keys=("row",), outage_seconds=5.0, reshard_transactions=120, restart_rounds=2)
)


def wait_until(condition: Callable[[], Any], timeout: float, what: str, interval: float = 0.02) -> Any:
    """:func:`~pg2kinesis_dagster.devstack.daemon.wait_for` polling every 20 ms, failing the test (AssertionError)."""
    try:
        return wait_for(condition, timeout, what, interval)
    except TimeoutError as exc:
        raise AssertionError(str(exc)) from None


def report_line(name: str, data: dict[str, Any]) -> None:
    """One machine-readable line per test (shown with ``pytest -s``; ``make faults`` passes -s)."""
    print(f"\nFAULTS-REPORT {name} {json.dumps(data, sort_keys=True)}", flush=True)
    target = os.environ.get("PG2K_FAULTS_REPORT")
    if target:
        with open(target, "a") as fh:
            fh.write(json.dumps({"test": name, **data}, sort_keys=True) + "\n")


# -- pg2k ---------------------------------------------------------------------------------------


def stack_args(server: PostgresServer, db: str, endpoint_url: str, stream: str, region: str = "us-east-1",
               user: str = "postgres") -> list[str]:
    return ["--pg-host", server.host, "--pg-port", str(server.port), "--pg-dbname", db, "--pg-user", user,
            "--stream-name", stream, "--endpoint-url", endpoint_url, "--aws-region", region,
            "--message-formatter", "JSON"]


class Pg2k:
    """One ``pg2k`` process; output goes to files (never a pipe that could fill up)."""

    def __init__(self, args: list[str], workdir: Path, name: str, env: dict[str, str] | None = None) -> None:
        self.args = args
        self.out_path = workdir / f"{name}.out"
        self.err_path = workdir / f"{name}.err"
        with open(self.out_path, "wb") as out, open(self.err_path, "wb") as err:
            self.proc = subprocess.Popen([PG2K, *args], stdout=out, stderr=err, stdin=subprocess.DEVNULL,
                                         env={**os.environ, **(env or {})})

    @property
    def pid(self) -> int:
        return self.proc.pid

    def poll(self) -> int | None:
        return self.proc.poll()

    def kill(self) -> None:
        """SIGKILL: no cleanup, no finally, like a crash."""
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=30)

    def terminate(self, timeout: float = 60) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=timeout)

    def wait(self, timeout: float) -> int:
        return self.proc.wait(timeout=timeout)

    @property
    def stderr(self) -> str:
        return self.err_path.read_text(errors="replace")

    @property
    def stdout(self) -> str:
        return self.out_path.read_text(errors="replace")


def run_once(args: list[str], workdir: Path, name: str, timeout: float = 300,
             env: dict[str, str] | None = None) -> Pg2k:
    proc = Pg2k([*args, "--once"], workdir, name, env)
    try:
        proc.wait(timeout)
    finally:
        proc.kill()
    return proc


def drain_once(args: list[str], workdir: Path, name: str, server: PostgresServer, db: str,
               attempts: int = 5) -> Pg2k:
    """``pg2k --once`` until it exits 0; a refusal because a killed process's backend still holds the
    slot is retried (bounded)."""
    for attempt in range(attempts):
        wait_no_pg2k_backends(server, db)
        proc = run_once(args, workdir, f"{name}-{attempt}")
        if proc.poll() == 0:
            return proc
        if not refused_busy(proc.stderr):
            raise AssertionError(f"pg2k --once failed ({proc.poll()}): {proc.stderr[-3000:]}")
    raise AssertionError(f"pg2k --once refused {attempts} times: {proc.stderr[-2000:]}")


def refused_busy(stderr: str) -> bool:
    return "being replicated by another pg2kinesis process" in stderr or "is in use by PostgreSQL backend" in stderr


# -- PostgreSQL probes --------------------------------------------------------------------------


def _one(server: PostgresServer, db: str, query: str, params: tuple[Any, ...] = ()) -> Any:
    conn = server.connect(db)
    try:
        with conn.cursor() as cur:
            cur.execute(query, params)
            row = cur.fetchone()
            return row[0] if row else None
    finally:
        conn.close()


def pg2k_backends(server: PostgresServer, db: str) -> int:
    return int(_one(server, db, "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'pg2kinesis' "
                                "AND datname = current_database()"))


def wait_no_pg2k_backends(server: PostgresServer, db: str, timeout: float = 30) -> None:
    """After a kill, PostgreSQL ends the dead client's sessions (and frees the slot lock) on its own."""
    wait_until(lambda: pg2k_backends(server, db) == 0, timeout, "the killed pg2k's backends to go away")


def confirmed_lsn(server: PostgresServer, db: str, slot: str = "pg2kinesis") -> int | None:
    text = _one(server, db, "SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = %s",
                (slot,))
    return parse_lsn(text) if text else None


def wait_caught_up(server: PostgresServer, db: str, timeout: float, slot: str = "pg2kinesis") -> None:
    """Wait until the slot reached the WAL position of now: everything committed so far was published.

    Never peeks (a peek would hold the slot and make pg2k's own peek fail with "slot is active").
    """
    target = parse_lsn(_one(server, db, "SELECT pg_current_wal_flush_lsn()::text"))
    wait_until(lambda: (confirmed_lsn(server, db, slot) or 0) >= target, timeout, "pg2k to catch up", interval=0.05)


def pending_changes(server: PostgresServer, db: str, slot: str = "pg2kinesis") -> int:
    """Peek the whole slot: only while no pg2k runs (a peek holds the slot)."""
    return int(_one(server, db, "SELECT count(*) FROM pg_logical_slot_peek_changes(%s, NULL, NULL)", (slot,)))


class SlotMonitor:
    """Samples the slot's ``confirmed_flush_lsn`` from its own thread and records any move backwards.

    Survives a PostgreSQL restart (reconnects, bounded). ``wait_advanced(after, timeout)`` lets a test
    act right after the slot moved.
    """

    def __init__(self, server: PostgresServer, db: str, slot: str = "pg2kinesis", interval: float = 0.005) -> None:
        self.server, self.db, self.slot, self.interval = server, db, slot, interval
        self.samples = 0
        self.moves = 0
        self.backwards: list[tuple[int, int]] = []
        self.last: int | None = None
        self.reconnects = 0
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="slot-monitor", daemon=True)

    def start(self) -> SlotMonitor:
        """Start sampling; returns once the first position was read, so :meth:`current` is set."""
        self._thread.start()
        with self._cond:
            self._cond.wait_for(lambda: self.last is not None, timeout=30)
        if self.last is None:
            self.stop()
            raise AssertionError(f"slot {self.slot!r} not found: create it before starting the monitor")
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    def __enter__(self) -> SlotMonitor:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _run(self) -> None:
        conn = None
        while not self._stop.is_set():
            try:
                if conn is None or conn.closed:
                    conn = self.server.connect(self.db, connect_timeout=2)
                with conn.cursor() as cur:
                    cur.execute("SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = %s",
                                (self.slot,))
                    row = cur.fetchone()
            except (psycopg2.Error, PostgresServerError):
                # PostgreSQL restarting: try again shortly (bounded by the test's own deadline via stop()).
                with contextlib.suppress(Exception):
                    if conn is not None:
                        conn.close()
                conn = None
                self.reconnects += 1
                self._stop.wait(0.1)
                continue
            if row and row[0]:
                lsn = parse_lsn(row[0])
                with self._cond:
                    self.samples += 1
                    if self.last is not None and lsn < self.last:
                        self.backwards.append((self.last, lsn))
                    if self.last is None or lsn != self.last:
                        self.moves += 1
                        self.last = lsn
                        self._cond.notify_all()
            self._stop.wait(self.interval)
        if conn is not None:
            conn.close()

    def current(self) -> int | None:
        with self._cond:
            return self.last

    def wait_advanced(self, after: int | None, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        with self._cond:
            while self.last is None or (after is not None and self.last <= after):
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)
            return True


# -- the concurrent workload --------------------------------------------------------------------


@dataclass
class WorkloadThread:
    """Commits seeded sample transactions in small chunks from a thread; ``transactions`` is the ledger.

    Each chunk is :func:`run_sample_workload` with its own seed; chunks follow each other after
    ``pause`` seconds until :meth:`stop` or ``max_transactions``. :meth:`hold` pauses between chunks
    (e.g. around a PostgreSQL restart) so that no chunk is cut in half and the ledger stays exact.
    """

    server: PostgresServer
    db: str
    seed: int
    chunk: int = 4
    pause: float = 0.02
    max_transactions: int = 100_000
    truncate_every: int | None = 3  # the 3rd transaction of every chunk also truncates audit_log
    transactions: list[LedgerTransaction] = field(default_factory=list)
    chunks: int = 0
    error: BaseException | None = None

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._running = threading.Event()
        self._running.set()
        self._idle = threading.Event()
        self._thread = threading.Thread(target=self._run, name="workload", daemon=True)

    def start(self) -> WorkloadThread:
        self._thread.start()
        return self

    def stop(self, timeout: float = 60) -> list[LedgerTransaction]:
        self._stop.set()
        self._running.set()
        self._thread.join(timeout)
        assert not self._thread.is_alive(), "the workload thread did not stop"
        if self.error is not None:
            raise AssertionError(f"the workload failed: {self.error!r}") from self.error
        return self.transactions

    def hold(self, timeout: float = 60) -> None:
        """Pause after the chunk in hand; returns once no transaction is open."""
        self._idle.clear()
        self._running.clear()
        assert self._idle.wait(timeout) or not self._thread.is_alive(), "the workload did not pause"

    def resume(self) -> None:
        self._running.set()

    def wait_for(self, transactions: int, timeout: float) -> None:
        wait_until(lambda: len(self.transactions) >= transactions or self.error is not None, timeout,
                   f"{transactions} workload transactions")

    def _run(self) -> None:
        conn = None
        rng = random.Random(self.seed)
        try:
            while not self._stop.is_set() and len(self.transactions) < self.max_transactions:
                if not self._running.is_set():
                    if conn is not None:
                        conn.close()
                        conn = None
                    self._idle.set()
                    self._running.wait(120)
                    continue
                if conn is None:
                    conn = self.server.connect(self.db)
                ledger = run_sample_workload(conn, transactions=self.chunk, seed=rng.randrange(2**31),
                                             truncate_every=self.truncate_every)
                self.transactions.extend(ledger.transactions)
                self.chunks += 1
                self._stop.wait(self.pause)
        except BaseException as exc:  # reported by stop()
            self.error = exc
        finally:
            self._idle.set()
            if conn is not None:
                conn.close()
