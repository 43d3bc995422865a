"""The Dagster path under a real ``dagster-daemon``, next to ``pg2k`` on the same data, in one run.

    python benchmarks/bench_dagster.py                  # the default set (about 10-15 minutes)
    python benchmarks/bench_dagster.py --drain --latency --job continuous --latency-seconds 30
    make bench-dagster BENCH_ARGS="--storage-scale"

One throwaway PostgreSQL 15 and one moto Kinesis server on loopback serve every scenario. The code location
runs as a new user runs it: ``dagster-daemon run -w workspace.yaml`` from this repository, the shipped
``dagster.yaml`` copied into a fresh DAGSTER_HOME, configured only through ``PG2K_*`` variables, sensor on
(``PG2K_SENSOR_RUNNING=1``, ``PG2K_SENSOR_INTERVAL_SECONDS``). ``pg2k`` runs with the matching flags.
Every record is JSON (``PG2K_MESSAGE_FORMATTER=JSON`` / ``--message-formatter JSON``) so that it can be read
back and checked by id. Streams have 4 shards. Each contender gets its own slot, created at the same LSN
before the data is written, and its own stream.

Scenarios (flags; none given = the default set: drain, drain-plain, storage, latency, rss, duplicates):

``--drain``, ``--drain-plain``: a backlog (100k changes aggregated, 50k plain by default; transactions of
  1,000 rows, 3/4 INSERTs and 1/4 UPDATEs on a keyed table) drained by sensor-launched runs and by
  ``pg2k --once`` (``--aggregate`` / ``PG2K_AGGREGATE=1`` for ``--drain``, neither for ``--drain-plain``).
  *end LSN*: the LSN of the backlog's last COMMIT, read with one ``pg_logical_slot_peek_changes`` on a third
  slot before the clock starts. *drained at*: the first time (polled every 50 ms from this process) that the
  contender's ``confirmed_flush_lsn >= end LSN``. *Dagster drain time* = drained at - the first run's
  creation time (its run record); also given from the daemon process's start (which includes loading the
  code location and the first sensor tick). *pg2k drain time* = drained at - the moment ``pg2k`` was
  spawned (includes its interpreter start). changes/s = backlog changes / drain time; the ratio is Dagster's
  changes/s over pg2k's. Per run: queued (creation -> start), in run (start -> end), end -> the next run's
  creation (negative when it was queued ahead), idle slot (end -> the next run's start); "prompt" = the next
  run was already queued when the previous ended, or was requested by the sensor's first tick after it.
  Delivery is checked: unique ids read back from the stream = backlog changes.
  ``--max-changes N`` sets both contenders' per-run (per-batch) budget, e.g. to make the backlog take several
  runs; by default each uses the code's own default.
``--storage``: what those drain runs left in their (shared) DAGSTER_HOME (see
  ``pg2kinesis_dagster.devstack.daemon`` for the layout): per run the event-log file
  ``history/runs/<run_id>.db``, its rows in the index shard, its ``storage/<run_id>/`` (IO manager pickles,
  compute logs); totals; and an extrapolation to a day (assumptions printed with it). The event-log file's
  size on disk includes SQLite's fixed overhead (pages for its tables and indexes: an almost empty one is
  over 100 KiB); the serialized size of the run's events is shown next to it.
``--storage-scale`` (not in the default set; ~15 minutes before issue 7's pipeline, a few after): one
  DAGSTER_HOME, aggregated; its size after replicating 100k changes and again after 1M in total.
``--latency``: after a warm-up, one INSERT committed every second for ``--latency-seconds`` (60); latency =
  Kinesis's ``ApproximateArrivalTimestamp`` of the change's record (GetRecords over every shard) - the
  transaction's commit time (the JSON ``commit_ts``, PostgreSQL's commit timestamp; same host clock);
  p50/p95/max over the measured commits. ``--job sensor`` (default micro-batch runs), ``--job continuous``
  (``PG2K_MODE=continuous``; skipped, saying so, when the code location has no ``replicate_continuous``
  job), ``--job both`` (default).
``--rss``: one transaction of 1,000,000 rows (``--rss-rows``) drained by ``pg2k --once --aggregate`` (peak
  RSS: GNU time's maximum resident set size of pg2k, cross-checked by polling ``/proc/<pid>/status`` VmHWM
  every 50 ms; not ``wait4`` from this process, whose ru_maxrss would include this benchmark's own resident
  set inherited across fork and exec) and by sensor-launched aggregated runs (peak RSS: VmHWM of each run
  worker process, polled every 50 ms from its "Started process" event until it exits; the largest run is
  reported).
``--duplicates``: a 200k-change window (``--dup-changes``) drained by ``pg2k --once --aggregate`` with
  default batch sizes (``--dup-plain``: without ``--aggregate``, slow, see below; ``--dup-max-changes`` sets
  ``--max-changes``). One slot per contender, all created at the same LSN before the window is written. An
  undisturbed drain on a twin slot measures the window's drain time T (and must give 0 duplicates, 0 lost).
  Then one trial per fraction f in ``--dup-kill-at`` (0.3,0.4,0.5,0.6,0.7): a ``pg2k`` on its own victim
  slot is SIGKILLed f x T after its spawn, and a new ``pg2k --once`` finishes the window. Every record of the
  victim's stream is read back (deaggregated): duplicates = records - unique ids, as % of the window; lost =
  committed changes (operation and key, from the workload) with no record. Also shown: the changes that had
  reached Kinesis before the kill (by ApproximateArrivalTimestamp) and those the slot's position covered.
  Several trials because the figure depends on where in a batch the kill lands; the f = 0.5 one is
  "half-way".

moto answers in about a millisecond where AWS takes 20-30 ms a request. moto runs behind the devstack's
fixes (``devstack/moto_server.py``), with O(1) sequence numbers (``fast``) unless ``--stock-moto``: stock moto
costs time proportional to the records already in a shard for every plain record, so plain drains slow
down as a stream fills. Absolute figures are for this machine only; compare the columns of one run.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import itertools
import json
import math
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import psycopg2.extensions

from pg2kinesis_dagster.devstack.daemon import (
    FAKE_AWS_ENV,
    IN_FLIGHT,
    DagsterDaemon,
    HomeUsage,
    PeakRssPoller,
    code_location_env,
    code_location_jobs,
    dir_bytes,
    measure_home,
    wait_for,
)
from pg2kinesis_dagster.devstack.moto import MotoServer
from pg2kinesis_dagster.devstack.postgres import PostgresServer

PG2K = str(Path(sys.executable).with_name("pg2k"))
REPLICATE_JOBS = ("replicate", "replicate_continuous")
CONTINUOUS_JOB = "replicate_continuous"
SENSOR = "replication_sensor"
SHARDS = 4
KPL_MAGIC = b"\xf3\x89\x9a\xc2"
DEFAULT_SCENARIOS = ("drain", "drain-plain", "storage", "latency", "rss", "duplicates")
ALL_SCENARIOS = (*DEFAULT_SCENARIOS, "storage-scale")


# -- output ----------------------------------------------------------------------------------------------


def say(text: str = "") -> None:
    print(text, flush=True)


def table(title: str, header: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    cells = [[str(c) for c in header]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    say(f"\n{title}")
    for n, row in enumerate(cells):
        say("  " + "  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                             for i, (c, w) in enumerate(zip(row, widths, strict=True))))
        if n == 0:
            say("  " + "  ".join("-" * w for w in widths))


def mib(n: float | None) -> str:
    return "n/a" if n is None else f"{n / 2**20:,.1f} MiB"


def kib(n: float | None) -> str:
    return "n/a" if n is None else f"{n / 1024:,.1f} KiB"


def secs(n: float | None) -> str:
    return "n/a" if n is None else f"{n:,.2f} s"


def rate(n: float | None) -> str:
    return "n/a" if n is None else f"{n:,.0f}/s"


def ratio(a: float | None, b: float | None) -> str:
    return "n/a" if not a or not b else f"{a / b:.3f}x"


# -- the stack ---------------------------------------------------------------------------------------------


@dataclass
class Stack:
    pg: PostgresServer
    moto: MotoServer
    workdir: Path
    sensor_interval: int
    _n: int = 0

    @property
    def spool_dir(self) -> Path:
        """PG2K_SPOOL_DIR of every contender: this run's own, not the shared default under /tmp."""
        return self.workdir / "spool"

    def database(self, stem: str) -> tuple[str, psycopg2.extensions.connection]:
        self._n += 1
        name = self.pg.create_database(f"{stem}_{self._n}")
        return name, self.pg.connect(name)

    def stream(self, name: str, shards: int = SHARDS) -> str:
        self.moto.create_stream(name, shards=shards)
        return name

    def drop_stream(self, name: str) -> None:
        with contextlib.suppress(Exception):  # frees moto's memory; a failure here changes no figure
            self.moto.client().delete_stream(StreamName=name, EnforceConsumerDeletion=True)

    def env(self, db: str, slot: str, stream: str, **extra: str) -> dict[str, str]:
        return code_location_env(
            self.pg, db, self.moto, slot=slot, stream=stream,
            PG2K_MESSAGE_FORMATTER="JSON", PG2K_SENSOR_RUNNING="1",
            PG2K_SENSOR_INTERVAL_SECONDS=str(self.sensor_interval), PG2K_SPOOL_DIR=str(self.spool_dir), **extra,
        )

    def pg2k_args(self, db: str, slot: str, stream: str, *extra: str) -> list[str]:
        return [PG2K, "--pg-host", self.pg.host, "--pg-port", str(self.pg.port), "--pg-dbname", db,
                "--pg-user", "postgres", "--pg-slot-name", slot, "--stream-name", stream,
                "--endpoint-url", self.moto.endpoint_url, "--aws-region", self.moto.region,
                "--message-formatter", "JSON", *extra]


def one(conn: psycopg2.extensions.connection, query: str, params: Sequence[Any] = ()) -> Any:
    with conn.cursor() as cur:
        cur.execute(query, tuple(params))
        row = cur.fetchone()
    return row[0] if row else None


def create_slots(conn: psycopg2.extensions.connection, *slots: str) -> None:
    with conn.cursor() as cur:
        for slot in slots:
            cur.execute("SELECT pg_create_logical_replication_slot(%s, 'test_decoding')", (slot,))


def drop_slots(conn: psycopg2.extensions.connection, *slots: str) -> None:
    with conn.cursor() as cur:
        for slot in slots:
            with contextlib.suppress(psycopg2.Error):
                cur.execute("SELECT pg_drop_replication_slot(%s) FROM pg_replication_slots WHERE slot_name = %s "
                            "AND NOT active", (slot, slot))


@dataclass(frozen=True)
class Backlog:
    inserts: range  # ids inserted
    updates: range  # ids updated once
    end_lsn: str  # LSN of the last COMMIT (as pg_logical_slot_peek_changes reports it)

    @property
    def changes(self) -> int:
        return len(self.inserts) + len(self.updates)

    def expected(self) -> set[tuple[str, str]]:
        return {("INSERT", str(i)) for i in self.inserts} | {("UPDATE", str(i)) for i in self.updates}


def generate_backlog(conn: psycopg2.extensions.connection, changes: int, txn_size: int, probe_slot: str,
                     first_id: int = 1) -> Backlog:
    """``changes`` row changes on ``bench``: 3/4 INSERTs of new ids, then 1/4 UPDATEs of the first of them."""
    with conn.cursor() as cur:
        cur.execute("CREATE TABLE IF NOT EXISTS bench (id bigint PRIMARY KEY, qty int, label text, "
                    "updated_at timestamptz)")
        inserts = changes * 3 // 4
        updates = changes - inserts
        for start in range(first_id, first_id + inserts, txn_size):
            end = min(start + txn_size, first_id + inserts) - 1
            cur.execute("INSERT INTO bench SELECT i, i %% 100, 'label ' || i, now() FROM generate_series(%s, %s) i",
                        (start, end))
        for start in range(first_id, first_id + updates, txn_size):
            end = min(start + txn_size, first_id + updates) - 1
            cur.execute("UPDATE bench SET qty = qty + 1 WHERE id BETWEEN %s AND %s", (start, end))
    return Backlog(range(first_id, first_id + inserts), range(first_id, first_id + updates),
                   last_commit(conn, probe_slot))


def last_commit(conn: psycopg2.extensions.connection, probe_slot: str) -> str:
    """The last COMMIT's LSN pending on ``probe_slot``, then the probe slot is advanced past it."""
    lsn = one(conn, "SELECT max(lsn)::text FROM pg_logical_slot_peek_changes(%s, NULL, NULL) "
                    "WHERE data LIKE 'COMMIT%%'", (probe_slot,))
    if lsn is None:
        raise RuntimeError("the backlog has no committed transaction")
    one(conn, "SELECT end_lsn FROM pg_replication_slot_advance(%s, %s::pg_lsn)", (probe_slot, lsn))
    return str(lsn)


def slot_reached(conn: psycopg2.extensions.connection, slot: str, lsn: str) -> bool:
    return bool(one(conn, "SELECT confirmed_flush_lsn >= %s::pg_lsn FROM pg_replication_slots WHERE slot_name = %s",
                    (lsn, slot)))


def confirmed(conn: psycopg2.extensions.connection, slot: str) -> str | None:
    return one(conn, "SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = %s", (slot,))


def lsn_int(text: str) -> int:
    high, _, low = text.partition("/")
    return (int(high, 16) << 32) | int(low, 16)


def wait_slot(conn: psycopg2.extensions.connection, slot: str, lsn: str, timeout: float, what: str,
              alive: Callable[[], None] | None = None) -> float:
    """time.time() of the first poll (every 50 ms) that found the slot at or past ``lsn``."""

    def reached() -> float | None:
        if alive is not None:
            alive()
        return time.time() if slot_reached(conn, slot, lsn) else None

    return wait_for(reached, timeout, what, interval=0.05)


# -- Kinesis read-back ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class UserRecord:
    shard: str
    sequence: str
    arrival: float  # ApproximateArrivalTimestamp of the Kinesis record (epoch seconds)
    change: dict[str, Any]


def read_changes(moto: MotoServer, stream: str) -> list[UserRecord]:
    """Every change in every shard of the stream (KPL aggregates deaggregated), in shard and sequence order."""
    from aws_kinesis_agg.deaggregator import iter_deaggregate_records

    client = moto.client()
    shards = client.list_shards(StreamName=stream)["Shards"]
    out: list[UserRecord] = []
    for shard in shards:
        shard_id = shard["ShardId"]
        iterator = client.get_shard_iterator(StreamName=stream, ShardId=shard_id,
                                             ShardIteratorType="TRIM_HORIZON")["ShardIterator"]
        while iterator:
            page = client.get_records(ShardIterator=iterator, Limit=10000)
            for rec in page["Records"]:
                data = bytes(rec["Data"])
                arrival = rec["ApproximateArrivalTimestamp"].timestamp()
                if data[:4] == KPL_MAGIC:
                    raw = {"Data": data, "PartitionKey": rec["PartitionKey"], "SequenceNumber": rec["SequenceNumber"],
                           "ApproximateArrivalTimestamp": 0}
                    for user in iter_deaggregate_records([raw], data_format="Boto3"):
                        k = user["kinesis"]
                        payload = base64.b64decode(k["data"]) if k.get("aggregated") else k["data"]
                        out.append(UserRecord(shard_id, rec["SequenceNumber"], arrival, json.loads(payload)))
                else:
                    out.append(UserRecord(shard_id, rec["SequenceNumber"], arrival, json.loads(data)))
            if not page["Records"]:  # moto has everything at once: an empty page is the end
                break
            iterator = page.get("NextShardIterator")
    return out


@dataclass(frozen=True)
class Delivery:
    records: int
    unique: int
    duplicates: int
    lost: int
    unexpected: int


def check_delivery(records: list[UserRecord], backlog: Backlog) -> Delivery:
    ids = {r.change["id"] for r in records}
    got = {(r.change["op"], str((r.change.get("pk") or {}).get("id"))) for r in records}
    expected = backlog.expected()
    return Delivery(records=len(records), unique=len(ids), duplicates=len(records) - len(ids),
                    lost=len(expected - got), unexpected=len(got - expected))


# -- pg2k ------------------------------------------------------------------------------------------------


@dataclass
class Pg2kRun:
    spawned_at: float
    exited_at: float
    returncode: int
    max_rss_kib: int | None  # pg2k's own ru_maxrss, as GNU time reports it (None without /usr/bin/time)
    vmhwm_kib: int | None  # the last VmHWM polled from /proc/<pg2k pid>/status
    stdout: str
    stderr: str
    drained_at: float | None = None

    @property
    def wall(self) -> float:
        return self.exited_at - self.spawned_at

    @property
    def peak_kib(self) -> int | None:
        """GNU time's figure when there is one (the kernel's own, misses nothing), else the polled VmHWM."""
        return self.max_rss_kib if self.max_rss_kib is not None else self.vmhwm_kib

    def summary(self) -> dict[str, Any]:
        lines = self.stdout.strip().splitlines()
        return json.loads(lines[-1]) if lines else {}

    def windows(self) -> Any:
        """How many batches (before issue 7) or windows (after) ``pg2k --once`` says it took."""
        summary = self.summary()
        return summary.get("windows", summary.get("batches", "?"))


GNU_TIME = Path("/usr/bin/time")
_RSS_MARKER = "PG2K_BENCH_MAX_RSS_KB="


def _children(pid: int) -> list[int]:
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except (OSError, ValueError):
        return []


class Pg2kProcess:
    """One ``pg2k``, output to files, under GNU time when there is one.

    Why GNU time and not ``wait4`` on pg2k: the kernel carries a process's pre-``exec`` high-water mark into its
    ``ru_maxrss``, and a child forked (or vforked) from this benchmark starts with the benchmark's own resident
    set, hundreds of MB after a few scenarios; ``time`` is a small process, so pg2k's figure is its own.
    """

    def __init__(self, args: list[str], workdir: Path, name: str) -> None:
        self.out_path = workdir / f"{name}.out"
        self.err_path = workdir / f"{name}.err"
        # The same spool folder as the code location's (PG2K_SPOOL_DIR; the CLI reads it too, where it has one).
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG2K_")}
        env["PG2K_SPOOL_DIR"] = str(workdir / "spool")
        timed = GNU_TIME.exists()
        command = [str(GNU_TIME), "-f", f"{_RSS_MARKER}%M", *args] if timed else args
        with open(self.out_path, "wb") as out, open(self.err_path, "wb") as err:
            self.spawned_at = time.time()
            self.proc = subprocess.Popen(command, stdout=out, stderr=err, stdin=subprocess.DEVNULL, env=env)
        self.pid = self.proc.pid
        self._status: int | None = None
        if timed:
            self.pid = wait_for(lambda: (_children(self.proc.pid) or [None])[0] or (self.exited() and -1), 30,
                                "pg2k to start under GNU time", interval=0.001)
        self.poller = PeakRssPoller(self.pid).start() if self.pid > 0 else None

    def exited(self) -> bool:
        """Whether the process exited (without reaping it, so that wait() still gets its status)."""
        if self._status is not None:
            return True
        info = os.waitid(os.P_PID, self.proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        return info is not None

    def kill(self) -> None:
        """SIGKILL pg2k itself (GNU time then reports and exits)."""
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid if self.pid > 0 else self.proc.pid, signal.SIGKILL)

    def wait(self, timeout: float) -> Pg2kRun:
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            self.proc.wait(30)
            tail = self.err_path.read_text()[-2000:]
            raise TimeoutError(f"pg2k did not exit within {timeout:.0f}s: {tail}") from None
        exited_at = time.time()
        self._status = self.proc.returncode
        stderr = self.err_path.read_text(errors="replace")
        marks = [line for line in stderr.splitlines() if line.startswith(_RSS_MARKER)]
        max_rss = int(marks[-1][len(_RSS_MARKER):]) if marks else None
        stderr = "\n".join(line for line in stderr.splitlines() if not line.startswith(_RSS_MARKER))
        return Pg2kRun(self.spawned_at, exited_at, self.proc.returncode, max_rss,
                       self.poller.stop() if self.poller else None,
                       self.out_path.read_text(errors="replace"), stderr)


def run_pg2k(stack: Stack, args: list[str], name: str, timeout: float, *, conn: psycopg2.extensions.connection
             | None = None, slot: str | None = None, end_lsn: str | None = None) -> Pg2kRun:
    """Run ``pg2k`` to its end; with ``slot``/``end_lsn``, also note when the slot reached the end."""
    proc = Pg2kProcess(args, stack.workdir, name)
    drained_at = None
    if conn is not None and slot is not None and end_lsn is not None:
        def alive() -> None:
            if proc.exited():
                raise RuntimeError(f"pg2k exited before the slot reached the end: {proc.err_path.read_text()[-2000:]}")
        with contextlib.suppress(RuntimeError):
            drained_at = wait_slot(conn, slot, end_lsn, timeout, "pg2k to drain the backlog", alive)
    run = proc.wait(timeout)
    if drained_at is None and conn is not None and slot and end_lsn and slot_reached(conn, slot, end_lsn):
        drained_at = run.exited_at  # reached between two polls, just before the exit
    run.drained_at = drained_at
    if run.returncode != 0:
        raise RuntimeError(f"{name}: pg2k exited {run.returncode}: {run.stderr[-3000:]}")
    return run


# -- Dagster runs ---------------------------------------------------------------------------------------


def _ts(value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, datetime):
        return (value if value.tzinfo else value.replace(tzinfo=timezone.utc)).timestamp()
    return float(value)


@dataclass
class RunInfo:
    run_id: str
    job: str
    status: str
    created: float
    started: float | None
    ended: float | None


@dataclass
class Cadence:
    """How the runs followed each other."""

    runs: list[RunInfo]
    # Per run after the first: it was already queued when the previous one ended, or the sensor's first tick
    # after that end requested it.
    prompt: list[bool]
    queued_ahead: int = 0  # of which: created before the previous run ended
    queued: list[float] = field(default_factory=list)  # created -> started
    in_run: list[float] = field(default_factory=list)  # started -> ended
    waiting: list[float] = field(default_factory=list)  # previous ended -> created (negative: queued ahead)
    idle: list[float] = field(default_factory=list)  # previous ended -> started: the slot without a run

    @property
    def all_prompt(self) -> bool | None:
        return all(self.prompt) if self.prompt else None


def run_infos(daemon: DagsterDaemon, since: float) -> list[RunInfo]:
    out = []
    for record in daemon.runs():
        run = record.dagster_run
        created = _ts(record.create_timestamp) or 0.0
        if run.job_name not in REPLICATE_JOBS or created < since - 1:
            continue
        out.append(RunInfo(run.run_id, run.job_name, run.status.value, created, _ts(record.start_time),
                           _ts(record.end_time)))
    return out


def cadence(daemon: DagsterDaemon, runs: list[RunInfo]) -> Cadence:
    ticks = sorted(daemon.sensor_ticks(SENSOR), key=lambda t: t.timestamp)
    result = Cadence(runs=runs, prompt=[])
    for prev, run in itertools.pairwise(runs):
        if prev.ended is None:
            continue
        result.waiting.append(run.created - prev.ended)
        if run.started is not None:
            result.idle.append(run.started - prev.ended)
        ahead = run.created <= prev.ended
        result.queued_ahead += ahead
        first = next((t for t in ticks if t.timestamp >= prev.ended), None)
        result.prompt.append(ahead or (first is not None and run.run_id in (first.run_ids or [])))
    for run in runs:
        if run.started is not None:
            result.queued.append(run.started - run.created)
            if run.ended is not None:
                result.in_run.append(run.ended - run.started)
    return result


def mean(values: Sequence[float]) -> float | None:
    return statistics.fmean(values) if values else None


def wait_no_run_in_flight(daemon: DagsterDaemon, timeout: float = 180) -> None:
    def idle() -> bool:
        daemon.check_alive()
        return not [r for r in daemon.runs(statuses=IN_FLIGHT) if r.dagster_run.job_name in REPLICATE_JOBS]

    wait_for(idle, timeout, "the daemon's runs to finish", interval=0.25)


# -- scenario: drain -------------------------------------------------------------------------------------


@dataclass
class DrainResult:
    label: str
    changes: int
    pg2k: Pg2kRun
    pg2k_delivery: Delivery
    daemon_started: float
    first_run_created: float
    dagster_drained: float
    runs: Cadence
    dagster_delivery: Delivery

    @property
    def pg2k_seconds(self) -> float:
        assert self.pg2k.drained_at is not None
        return self.pg2k.drained_at - self.pg2k.spawned_at

    @property
    def dagster_seconds(self) -> float:
        return self.dagster_drained - self.first_run_created

    @property
    def dagster_seconds_from_start(self) -> float:
        return self.dagster_drained - self.daemon_started


def drain(stack: Stack, label: str, changes: int, aggregate: bool, home: Path, timeout: float,
          window: int | None = None) -> DrainResult:
    tag = "agg" if aggregate else "plain"
    db, conn = stack.database(f"drain_{tag}")
    slots = (f"d_{tag}", f"p_{tag}", f"probe_{tag}")
    streams = (stack.stream(f"bench-dagster-{tag}"), stack.stream(f"bench-pg2k-{tag}"))
    try:
        create_slots(conn, *slots)
        t0 = time.perf_counter()
        backlog = generate_backlog(conn, changes, 1000, probe_slot=slots[2])
        say(f"[{label}] backlog: {backlog.changes:,} changes in transactions of 1,000 rows "
            f"({time.perf_counter() - t0:.1f}s to write), last commit at {backlog.end_lsn}")

        pg2k = run_pg2k(stack, stack.pg2k_args(db, slots[1], streams[1], "--once",
                                               *(["--aggregate"] if aggregate else []),
                                               *(["--max-changes", str(window)] if window else [])),
                        f"drain-{tag}", timeout, conn=conn, slot=slots[1], end_lsn=backlog.end_lsn)
        say(f"[{label}] pg2k --once: slot at the end after {pg2k.drained_at - pg2k.spawned_at:.2f}s "
            f"(process exited after {pg2k.wall:.2f}s)")
        pg2k_delivery = check_delivery(read_changes(stack.moto, streams[1]), backlog)

        env = stack.env(db, slots[0], streams[0], **({"PG2K_AGGREGATE": "1"} if aggregate else {}),
                    **({"PG2K_MAX_CHANGES": str(window)} if window else {}))
        with DagsterDaemon(env, dagster_home=home, log_path=stack.workdir / f"daemon-drain-{tag}.log") as daemon:
            started = daemon.started_at or time.time()
            drained = wait_slot(conn, slots[0], backlog.end_lsn, timeout, "sensor-launched runs to drain the backlog",
                                daemon.check_alive)
            wait_no_run_in_flight(daemon)
            runs = run_infos(daemon, started)
            runs_cadence = cadence(daemon, runs)
        say(f"[{label}] Dagster: slot at the end {drained - runs[0].created:.2f}s after the first run's creation "
            f"({drained - started:.2f}s after the daemon started), {len(runs)} runs")
        dagster_delivery = check_delivery(read_changes(stack.moto, streams[0]), backlog)
        return DrainResult(label, backlog.changes, pg2k, pg2k_delivery, started, runs[0].created, drained,
                           runs_cadence, dagster_delivery)
    finally:
        drop_slots(conn, *slots)
        conn.close()
        for stream in streams:
            stack.drop_stream(stream)


def report_drain(result: DrainResult) -> None:
    d, p = result.dagster_seconds, result.pg2k_seconds
    c = result.runs
    rows = [
        ("backlog changes", f"{result.changes:,}", f"{result.changes:,}", ""),
        ("drain time (first run created / pg2k spawned -> slot at end)", secs(d), secs(p), ""),
        ("changes/s", rate(result.changes / d), rate(result.changes / p), ratio(p, d)),
        ("drain time from daemon start", secs(result.dagster_seconds_from_start), "", ""),
        ("changes/s from daemon start", rate(result.changes / result.dagster_seconds_from_start), "",
         ratio(p, result.dagster_seconds_from_start)),
        ("runs / pg2k batches", len(c.runs), result.pg2k.windows(), ""),
        ("pg2k's own drain seconds (its --once summary)", "", secs(result.pg2k.summary().get("seconds")), ""),
        ("run statuses", ",".join(sorted({r.status for r in c.runs})), "", ""),
        ("mean queued (created -> started)", secs(mean(c.queued)), "", ""),
        ("mean in run (started -> ended)", secs(mean(c.in_run)), "", ""),
        ("mean ended -> next created (negative: queued ahead)", secs(mean(c.waiting)), "", ""),
        ("mean idle slot (ended -> next started)", secs(mean(c.idle)), "", ""),
        ("max idle slot (ended -> next started)", secs(max(c.idle) if c.idle else None), "", ""),
        ("next run queued ahead, or requested at the first tick after",
         "n/a" if c.all_prompt is None else f"{sum(c.prompt)}/{len(c.prompt)} ({c.queued_ahead} ahead)", "", ""),
        ("delivered unique ids / duplicates / lost",
         f"{result.dagster_delivery.unique:,} / {result.dagster_delivery.duplicates} / {result.dagster_delivery.lost}",
         f"{result.pg2k_delivery.unique:,} / {result.pg2k_delivery.duplicates} / {result.pg2k_delivery.lost}", ""),
    ]
    table(f"{result.label}: Dagster sensor-launched runs vs pg2k --once (ratio = Dagster changes/s / pg2k changes/s)",
          ("", "Dagster", "pg2k --once", "ratio"), rows)


# -- scenario: storage -----------------------------------------------------------------------------------


def report_storage(home: Path, spool: Path, runs: int, changes: int, interval: int, rate_per_s: float) -> HomeUsage:
    usage = measure_home(home)
    per = list(usage.per_run.values())
    rows = []
    for name, get in (
        ("event log file history/runs/<run_id>.db (on disk)", lambda r: r.event_log_bytes),
        ("  its events, serialized (without SQLite's pages)", lambda r: r.event_content_bytes),
        ("its events in history/runs/index.db", lambda r: r.index_event_bytes),
        ("storage/<run_id>/ IO manager pickles", lambda r: r.io_manager_bytes),
        ("storage/<run_id>/compute_logs/", lambda r: r.compute_log_bytes),
        ("run total (event log + index rows + storage/)", lambda r: r.event_bytes + r.storage_bytes),
    ):
        values = [get(r) for r in per]
        rows.append((name, kib(mean(values)), kib(max(values) if values else None), mib(sum(values))))
    table(f"Dagster storage after {runs} runs ({changes:,} changes replicated), DAGSTER_HOME {home}",
          ("per run", "mean", "max", "sum"), rows)
    events = [r.event_rows for r in per]
    say(f"  events per run: mean {mean(events) or 0:,.0f}, max {max(events, default=0):,}")
    table("DAGSTER_HOME", ("part", "bytes"), [
        ("total", mib(usage.total_bytes)),
        ("storage/ (IO manager pickles + compute logs)", mib(usage.storage_bytes)),
        ("history/ (runs.db + per-run event logs + index.db)", mib(usage.history_bytes)),
        ("  history/runs.db (run storage)", mib(usage.runs_db_bytes)),
        ("  history/runs/index.db (event index shard)", mib(usage.index_db_bytes)),
        ("  history/runs/.db (events of no run)", mib(usage.runless_event_log_bytes)),
        ("schedules/ (sensor ticks)", mib(usage.schedules_bytes)),
        (f"outside DAGSTER_HOME: PG2K_SPOOL_DIR {spool} (all contenders)", mib(dir_bytes(spool))),
    ])
    pickles_per_change = sum(r.io_manager_bytes for r in per) / changes if changes else 0
    event_per_run = mean([r.event_bytes for r in per]) or 0
    runs_per_day = 86400 / max(interval, 5)
    say("\nExtrapolation (assumptions: storage/ grows by the same bytes per change replicated; a steady trickle "
        f"gives one run per sensor evaluation, every max(PG2K_SENSOR_INTERVAL_SECONDS={interval}, the daemon's "
        "5 s sensor loop) seconds; nothing is deleted):")
    say(f"  IO manager pickles: {pickles_per_change:,.0f} bytes per change -> at {rate_per_s:,.0f} changes/s "
        f"{pickles_per_change * rate_per_s * 86400 / 1e9:,.1f} GB a day")
    say(f"  runs: {runs_per_day:,.0f} a day x {event_per_run / 1024:,.1f} KiB of event storage each -> "
        f"{runs_per_day * event_per_run / 1e9:,.2f} GB a day of event log")
    return usage


def storage_scale(stack: Stack, first: int, total: int, timeout: float) -> None:
    db, conn = stack.database("scale")
    slot, probe = "scale", "scale_probe"
    stream = stack.stream("bench-scale")
    home = stack.workdir / "home-scale"
    try:
        create_slots(conn, slot, probe)
        backlog = generate_backlog(conn, first, 1000, probe_slot=probe)
        env = stack.env(db, slot, stream, PG2K_AGGREGATE="1")
        sizes: list[tuple[int, int, HomeUsage]] = []
        with DagsterDaemon(env, dagster_home=home, log_path=stack.workdir / "daemon-scale.log") as daemon:
            started = daemon.started_at or time.time()
            wait_slot(conn, slot, backlog.end_lsn, timeout, "the first 100k", daemon.check_alive)
            wait_no_run_in_flight(daemon)
            sizes.append((backlog.changes, len(run_infos(daemon, started)), measure_home(home)))
            say(f"[storage-scale] {backlog.changes:,} changes replicated: DAGSTER_HOME {mib(sizes[-1][2].total_bytes)}")
            more = generate_backlog(conn, total - first, 1000, probe_slot=probe, first_id=first + 1)
            wait_slot(conn, slot, more.end_lsn, timeout, "the rest of 1M", daemon.check_alive)
            wait_no_run_in_flight(daemon)
            sizes.append((backlog.changes + more.changes, len(run_infos(daemon, started)), measure_home(home)))
        rows = [(f"{n:,}", runs, mib(u.total_bytes), mib(u.storage_bytes), mib(u.history_bytes))
                for n, runs, u in sizes]
        table("storage-scale: DAGSTER_HOME after replicating N changes (aggregated, sensor runs)",
              ("changes replicated", "runs", "DAGSTER_HOME", "storage/", "history/"), rows)
        growth = sizes[1][2].total_bytes / sizes[0][2].total_bytes
        say(f"  DAGSTER_HOME after {sizes[1][0]:,} changes / after {sizes[0][0]:,}: {growth:.2f}x")
    finally:
        drop_slots(conn, slot, probe)
        conn.close()
        stack.drop_stream(stream)


# -- scenario: latency -----------------------------------------------------------------------------------


def parse_pg_timestamp(text: str) -> float:
    return datetime.fromisoformat(text).timestamp()


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


def trickle(conn: psycopg2.extensions.connection, count: int, warmup: int) -> tuple[set[int], set[int]]:
    """``warmup`` then ``count`` commits of one INSERT each, one a second on a fixed schedule; their ids."""
    warm, measured = set(), set()
    start = time.monotonic()
    for i in range(warmup + count):
        delay = start + i - time.monotonic()
        if delay > 0:
            time.sleep(delay)  # the trickle's schedule: one commit a second
        row_id = one(conn, "INSERT INTO probe (note) VALUES (%s) RETURNING id", ("warm-up" if i < warmup else "x",))
        (warm if i < warmup else measured).add(int(row_id))
    return warm, measured


@dataclass
class LatencyResult:
    mode: str
    skipped: str | None = None
    samples: list[float] = field(default_factory=list)
    missing: int = 0
    runs: int = 0
    jobs: str = ""


def latency(stack: Stack, mode: str, seconds: int, warmup: int) -> LatencyResult:
    db, conn = stack.database(f"latency_{mode}")
    slot = f"lat_{mode}"
    stream = stack.stream(f"bench-latency-{mode}")
    try:
        with conn.cursor() as cur:
            cur.execute("CREATE TABLE probe (id serial PRIMARY KEY, note text)")
        create_slots(conn, slot)
        extra = {"PG2K_MODE": "continuous"} if mode == "continuous" else {}
        env = stack.env(db, slot, stream, **extra)
        if mode == "continuous":
            jobs = code_location_jobs(env)
            if CONTINUOUS_JOB not in jobs:
                return LatencyResult(mode, skipped=f"the code location (PG2K_MODE=continuous) has no job named "
                                     f"{CONTINUOUS_JOB!r} (jobs: {', '.join(sorted(jobs))})")
        with DagsterDaemon(env, dagster_home=stack.workdir / f"home-latency-{mode}",
                           log_path=stack.workdir / f"daemon-latency-{mode}.log") as daemon:
            started = daemon.started_at or time.time()
            daemon.wait_until_ready()
            warm, measured = trickle(conn, seconds, warmup)
            want = warm | measured

            def arrived() -> list[UserRecord] | None:
                daemon.check_alive()
                records = read_changes(stack.moto, stream)
                got = {int(r.change["pk"]["id"]) for r in records}
                return records if want <= got else None

            try:
                records = wait_for(arrived, 120, "the trickle's records in Kinesis", interval=0.5)
            except TimeoutError:
                records = read_changes(stack.moto, stream)
            runs = run_infos(daemon, started)
        first: dict[int, UserRecord] = {}
        for rec in records:
            row_id = int(rec.change["pk"]["id"])
            if row_id not in first or rec.arrival < first[row_id].arrival:
                first[row_id] = rec
        samples = [first[i].arrival - parse_pg_timestamp(first[i].change["commit_ts"]) for i in measured if i in first]
        return LatencyResult(mode, samples=samples, missing=len(measured - set(first)), runs=len(runs),
                             jobs=",".join(sorted({r.job for r in runs})))
    finally:
        drop_slots(conn, slot)
        conn.close()
        stack.drop_stream(stream)


def report_latency(results: list[LatencyResult], seconds: int, warmup: int, interval: int) -> None:
    rows = []
    for r in results:
        if r.skipped:
            rows.append((r.mode, "skipped", "", "", "", "", ""))
            continue
        s = r.samples
        rows.append((r.mode, len(s), secs(percentile(s, 50)) if s else "n/a", secs(percentile(s, 95)) if s else "n/a",
                     secs(max(s)) if s else "n/a", r.missing, f"{r.runs} ({r.jobs})"))
    table(f"commit -> Kinesis latency (one commit a second for {seconds}s after a {warmup}s warm-up; "
          f"PG2K_SENSOR_INTERVAL_SECONDS={interval})",
          ("mode", "commits", "p50", "p95", "max", "not arrived", "runs (jobs)"), rows)
    for r in results:
        if r.skipped:
            say(f"  {r.mode}: skipped: {r.skipped}")


# -- scenario: rss --------------------------------------------------------------------------------------


@dataclass
class RssResult:
    rows: int
    pg2k: Pg2kRun
    pg2k_seconds: float
    dagster_peaks: list[tuple[str, int | None, float | None]]  # (run_id, VmHWM KiB, run seconds)
    dagster_seconds: float
    home: HomeUsage


def rss(stack: Stack, rows: int, timeout: float) -> RssResult:
    db, conn = stack.database("rss")
    slots = ("rss_d", "rss_p", "rss_probe")
    streams = (stack.stream("bench-rss-dagster"), stack.stream("bench-rss-pg2k"))
    try:
        create_slots(conn, *slots)
        t0 = time.perf_counter()
        with conn.cursor() as cur:
            cur.execute("CREATE TABLE big (id bigint PRIMARY KEY, qty int, label text)")
            cur.execute("INSERT INTO big SELECT i, i %% 100, 'label ' || i FROM generate_series(1, %s) i", (rows,))
        end_lsn = last_commit(conn, slots[2])
        say(f"[rss] one transaction of {rows:,} rows ({time.perf_counter() - t0:.1f}s to write and peek once)")
        pg2k = run_pg2k(stack, stack.pg2k_args(db, slots[1], streams[1], "--once", "--aggregate"), "rss", timeout,
                        conn=conn, slot=slots[1], end_lsn=end_lsn)
        say(f"[rss] pg2k --once --aggregate: peak RSS {mib((pg2k.peak_kib or 0) * 1024)} in {pg2k.wall:.1f}s")

        env = stack.env(db, slots[0], streams[0], PG2K_AGGREGATE="1")
        peaks: list[tuple[str, int | None, float | None]] = []
        with DagsterDaemon(env, dagster_home=stack.workdir / "home-rss",
                           log_path=stack.workdir / "daemon-rss.log") as daemon:
            started = daemon.started_at or time.time()
            pollers: dict[str, PeakRssPoller] = {}

            def watch() -> float | None:
                daemon.check_alive()
                for record in daemon.runs(statuses=IN_FLIGHT):
                    if record.dagster_run.job_name not in REPLICATE_JOBS:
                        continue  # e.g. a health-check run started by a schedule
                    run_id = record.dagster_run.run_id
                    if run_id not in pollers:
                        pid = daemon.run_worker_pid(run_id)
                        if pid is not None:
                            pollers[run_id] = PeakRssPoller(pid).start()
                return time.time() if slot_reached(conn, slots[0], end_lsn) else None

            drained = wait_for(watch, timeout, "the run(s) to publish the transaction", interval=0.05)
            wait_no_run_in_flight(daemon, timeout)
            runs = {r.run_id: r for r in run_infos(daemon, started)}
            for run_id, poller in pollers.items():
                poller.join(60)
                run = runs.get(run_id)
                took = run.ended - run.started if run and run.started and run.ended else None
                peaks.append((run_id, poller.peak_kib, took))
            missed = [r for r in runs if r not in pollers]
            if missed:
                say(f"[rss] not measured: runs {missed}, whose worker exited before its pid could be read (short runs)")
            first_created = min(r.created for r in runs.values())
            home = measure_home(daemon.home)
        return RssResult(rows, pg2k, (pg2k.drained_at or pg2k.exited_at) - pg2k.spawned_at, peaks,
                         drained - first_created, home)
    finally:
        drop_slots(conn, *slots)
        conn.close()
        for stream in streams:
            stack.drop_stream(stream)


def report_rss(result: RssResult) -> None:
    peak = max((p for _, p, _ in result.dagster_peaks if p is not None), default=None)
    rows = [
        ("peak RSS (run worker: VmHWM polled; pg2k: GNU time's max RSS)", mib(peak * 1024 if peak else None),
         mib((result.pg2k.peak_kib or 0) * 1024), ratio(peak, result.pg2k.peak_kib)),
        ("cross-check: pg2k's VmHWM polled", "", mib((result.pg2k.vmhwm_kib or 0) * 1024), ""),
        ("runs / batches", len(result.dagster_peaks), result.pg2k.windows(), ""),
        ("time to publish (first run created / spawned -> slot at end)", secs(result.dagster_seconds),
         secs(result.pg2k_seconds), ""),
    ]
    table(f"peak RSS draining one transaction of {result.rows:,} rows (aggregated): Dagster run worker vs pg2k",
          ("", "Dagster run worker", "pg2k --once", "ratio"), rows)
    for run_id, p, took in result.dagster_peaks:
        say(f"  run {run_id}: VmHWM {mib(p * 1024 if p else None)}, {secs(took)} in run")
    say(f"  DAGSTER_HOME after it: {mib(result.home.total_bytes)}, of which storage/ {mib(result.home.storage_bytes)}")


# -- scenario: duplicates --------------------------------------------------------------------------------


@dataclass
class KillTrial:
    """One victim slot: pg2k SIGKILLed at ``fraction`` x the twin's drain time, then a new pg2k finished it."""

    fraction: float
    killed: bool  # False: pg2k had already finished the window when the kill was due
    kill_after: float  # seconds from the victim's spawn to the SIGKILL
    arrived_before_kill: int  # changes whose Kinesis arrival timestamp is at or before the kill
    checkpointed_at_kill: int  # unique changes at or before the slot's position after the kill
    delivery: Delivery


@dataclass
class DuplicatesResult:
    window: int
    twin_seconds: float
    twin: Delivery
    trials: list[KillTrial]


def duplicates(stack: Stack, changes: int, timeout: float, extra: Sequence[str],
               fractions: Sequence[float]) -> DuplicatesResult:
    db, conn = stack.database("dups")
    victims = [f"dup_victim_{i}" for i in range(len(fractions))]
    slots = ("dup_twin", "dup_probe", *victims)
    twin_stream = stack.stream("bench-dup-twin")
    try:
        create_slots(conn, *slots)  # all at the same LSN: every contender gets the very same window
        backlog = generate_backlog(conn, changes, 1000, probe_slot="dup_probe")
        say(f"[duplicates] window: {backlog.changes:,} changes, last commit at {backlog.end_lsn}")
        twin = run_pg2k(stack, stack.pg2k_args(db, "dup_twin", twin_stream, "--once", *extra), "dup-twin",
                        timeout, conn=conn, slot="dup_twin", end_lsn=backlog.end_lsn)
        twin_delivery = check_delivery(read_changes(stack.moto, twin_stream), backlog)
        stack.drop_stream(twin_stream)
        say(f"[duplicates] undisturbed twin: {twin.wall:.2f}s, {twin_delivery.duplicates} duplicates, "
            f"{twin_delivery.lost} lost")
        trials = []
        for n, (fraction, slot) in enumerate(zip(fractions, victims, strict=True)):
            stream = stack.stream(f"bench-dup-victim-{n}")
            try:
                trials.append(kill_trial(stack, conn, db, slot, stream, backlog, twin.wall, fraction, timeout, extra))
            finally:
                stack.drop_stream(stream)
            t = trials[-1]
            say(f"[duplicates] SIGKILL at {fraction:.0%} of the twin's time ({t.kill_after:.2f}s): "
                f"{t.delivery.duplicates:,} duplicates, {t.delivery.lost} lost")
        return DuplicatesResult(backlog.changes, twin.wall, twin_delivery, trials)
    finally:
        drop_slots(conn, *slots)
        conn.close()


def kill_trial(stack: Stack, conn: psycopg2.extensions.connection, db: str, slot: str, stream: str,
               backlog: Backlog, twin_seconds: float, fraction: float, timeout: float,
               extra: Sequence[str]) -> KillTrial:
    victim = Pg2kProcess(stack.pg2k_args(db, slot, stream, "--once", *extra), stack.workdir, f"{slot}-killed")
    kill_time = victim.spawned_at + twin_seconds * fraction
    wait_for(lambda: time.time() >= kill_time or victim.exited(), twin_seconds + 60,
             f"{fraction:.0%} of the twin's drain time", interval=0.005)
    killed = not victim.exited()
    victim.kill()
    killed_at = time.time()
    victim.wait(60)
    at_kill = confirmed(conn, slot)
    # PostgreSQL ends the dead client's backend (and frees the slot) on its own; then finish the window.
    wait_for(lambda: not one(conn, "SELECT active FROM pg_replication_slots WHERE slot_name = %s", (slot,)),
             60, "the killed pg2k's backend to release the slot", interval=0.05)
    run_pg2k(stack, stack.pg2k_args(db, slot, stream, "--once", *extra), f"{slot}-finish", timeout)
    records = read_changes(stack.moto, stream)
    unique = {r.change["id"]: r for r in records}.values()
    checkpointed = sum(1 for r in unique if at_kill and lsn_int(r.change["id"].rpartition(":")[0]) <= lsn_int(at_kill))
    before_kill = sum(1 for r in records if r.arrival <= killed_at)
    return KillTrial(fraction, killed, killed_at - victim.spawned_at, before_kill, checkpointed,
                     check_delivery(records, backlog))


def report_duplicates(r: DuplicatesResult, extra: Sequence[str]) -> None:
    rows = [("undisturbed twin", "-", "-", "-", f"{r.twin.records:,}", f"{r.twin.duplicates:,}", "-", r.twin.lost)]
    for t in r.trials:
        label = f"SIGKILL at {t.fraction:.0%} of the twin's time" + ("" if t.killed else " (had already exited)")
        rows.append((label, secs(t.kill_after),
                     f"{t.arrived_before_kill:,}", f"{t.checkpointed_at_kill:,}", f"{t.delivery.records:,}",
                     f"{t.delivery.duplicates:,}", f"{100 * t.delivery.duplicates / r.window:.1f}%", t.delivery.lost))
    table(f"duplicates after one SIGKILL of pg2k --once {' '.join(extra)} in a {r.window:,}-change window "
          f"(twin drained it in {r.twin_seconds:.2f}s; each trial on its own slot, same window, then a new "
          "pg2k --once finished it)",
          ("", "killed after", "in Kinesis at kill", "slot covered", "records", "duplicates", "% of window", "lost"),
          rows)
    half = [t for t in r.trials if abs(t.fraction - 0.5) < 1e-9]
    if half:
        say(f"  half-way: {half[0].delivery.duplicates:,} duplicates = "
            f"{100 * half[0].delivery.duplicates / r.window:.1f}% of the window")
    if r.trials:
        worst = max(r.trials, key=lambda t: t.delivery.duplicates)
        say(f"  worst trial: {worst.delivery.duplicates:,} = {100 * worst.delivery.duplicates / r.window:.1f}% "
            f"(at {worst.fraction:.0%}); lost in all trials: {sum(t.delivery.lost for t in r.trials)}")


def main(argv: Sequence[str] | None = None) -> int:
    # A killed benchmark must still stop its servers and daemons (every `with` unwinds).
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(1))
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for name in ALL_SCENARIOS:
        parser.add_argument(f"--{name}", action="store_true", help=f"run the {name} scenario")
    parser.add_argument("--changes", type=int, default=100_000, help="aggregated drain backlog")
    parser.add_argument("--plain-changes", type=int, default=50_000, help="plain drain backlog")
    parser.add_argument("--max-changes", type=int, default=None,
                        help="drains: PG2K_MAX_CHANGES and pg2k --max-changes (default: the code's own), e.g. to "
                        "make a backlog take several runs and see whether the next one follows at once")
    parser.add_argument("--scale-first", type=int, default=100_000, help="storage-scale: first measurement")
    parser.add_argument("--scale-total", type=int, default=1_000_000, help="storage-scale: second measurement")
    parser.add_argument("--job", choices=("sensor", "continuous", "both"), default="both", help="latency modes")
    parser.add_argument("--latency-seconds", type=int, default=60, help="measured commits (one a second)")
    parser.add_argument("--latency-warmup", type=int, default=10, help="commits before the measured ones")
    parser.add_argument("--rss-rows", type=int, default=1_000_000)
    parser.add_argument("--dup-changes", type=int, default=200_000)
    parser.add_argument("--dup-max-changes", type=int, default=None, help="pg2k --max-changes for duplicates")
    parser.add_argument("--dup-kill-at", default="0.3,0.4,0.5,0.6,0.7",
                        help="one trial per fraction of the undisturbed twin's drain time at which to SIGKILL")
    parser.add_argument("--dup-plain", action="store_true",
                        help="duplicates without --aggregate (slow with --stock-moto)")
    parser.add_argument("--sensor-interval", type=int, default=5, help="PG2K_SENSOR_INTERVAL_SECONDS")
    parser.add_argument("--extrapolate-rate", type=float, default=1000, help="changes/s for the extrapolation")
    parser.add_argument("--timeout", type=float, default=900, help="per drain, seconds")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    parser.add_argument("--stock-moto", action="store_true",
                        help="moto without the O(1) sequence-number fix (plain records then cost O(shard size))")
    args = parser.parse_args(argv)
    chosen = [s for s in ALL_SCENARIOS if getattr(args, s.replace("-", "_"))] or list(DEFAULT_SCENARIOS)
    if "storage" in chosen and "drain" not in chosen and "drain-plain" not in chosen:
        chosen = ["drain", "drain-plain", *chosen]
    os.environ.update(FAKE_AWS_ENV)
    figures: dict[str, Any] = {"scenarios": chosen}
    wall = time.perf_counter()
    say(f"bench_dagster: {', '.join(chosen)}  (PostgreSQL 15 and moto on loopback, {os.cpu_count()} CPUs, "
        f"{SHARDS}-shard streams, JSON records, {'stock' if args.stock_moto else 'fast'} moto)")

    moto_server = MotoServer() if args.stock_moto else MotoServer(fast=True)
    with tempfile.TemporaryDirectory(prefix="bench-dagster-") as tmp, PostgresServer() as pg, moto_server as moto:
        stack = Stack(pg, moto, Path(tmp), args.sensor_interval)
        drains: list[DrainResult] = []
        drain_home = stack.workdir / "home-drain"
        budget = f", PG2K_MAX_CHANGES / --max-changes {args.max_changes:,}" if args.max_changes else ""
        if "drain" in chosen:
            drains.append(drain(stack, f"drain, aggregated (PG2K_AGGREGATE=1 / --aggregate){budget}", args.changes,
                                True, drain_home, args.timeout, args.max_changes))
            report_drain(drains[-1])
        if "drain-plain" in chosen:
            drains.append(drain(stack, f"drain, plain records{budget}", args.plain_changes, False, drain_home,
                                args.timeout, args.max_changes))
            report_drain(drains[-1])
        for d in drains:
            figures[d.label] = {"changes": d.changes, "dagster_seconds": d.dagster_seconds,
                                "dagster_seconds_from_daemon_start": d.dagster_seconds_from_start,
                                "pg2k_seconds": d.pg2k_seconds, "runs": len(d.runs.runs),
                                "ratio": d.pg2k_seconds / d.dagster_seconds,
                                "prompt": d.runs.prompt, "waiting": d.runs.waiting, "idle": d.runs.idle}
        if "storage" in chosen and drains:
            usage = report_storage(drain_home, stack.spool_dir, sum(len(d.runs.runs) for d in drains),
                                   sum(d.changes for d in drains), args.sensor_interval, args.extrapolate_rate)
            figures["storage"] = {"total_bytes": usage.total_bytes, "storage_bytes": usage.storage_bytes,
                                  "per_run": {k: vars(v) for k, v in usage.per_run.items()}}
        if "storage-scale" in chosen:
            storage_scale(stack, args.scale_first, args.scale_total, args.timeout)
        if "latency" in chosen:
            modes = ["sensor", "continuous"] if args.job == "both" else [args.job]
            results = [latency(stack, mode, args.latency_seconds, args.latency_warmup) for mode in modes]
            report_latency(results, args.latency_seconds, args.latency_warmup, args.sensor_interval)
            figures["latency"] = [vars(r) for r in results]
        if "rss" in chosen:
            result = rss(stack, args.rss_rows, args.timeout)
            report_rss(result)
            figures["rss"] = {"pg2k_kib": result.pg2k.peak_kib, "pg2k_vmhwm_kib": result.pg2k.vmhwm_kib,
                              "dagster": result.dagster_peaks}
        if "duplicates" in chosen:
            extra = ([] if args.dup_plain else ["--aggregate"]) + (
                ["--max-changes", str(args.dup_max_changes)] if args.dup_max_changes else [])
            fractions = [float(f) for f in args.dup_kill_at.split(",")]
            result_d = duplicates(stack, args.dup_changes, args.timeout, extra, fractions)
            report_duplicates(result_d, extra)
            figures["duplicates"] = {"window": result_d.window, "twin": vars(result_d.twin),
                                     "trials": [{**vars(t), "delivery": vars(t.delivery)} for t in result_d.trials]}
    say(f"\nbench_dagster done in {time.perf_counter() - wall:.0f}s")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
