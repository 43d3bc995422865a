"""Several replications on the local stack, for the multi-replication test and benchmark.

Each replication gets its own database on one throwaway PostgreSQL server (sample schema, a slot, a
backlog of committed transactions) and its own moto stream; :func:`write_config` writes the ``PG2K_CONFIG``
file that lists them all, and :func:`run_intervals` / :func:`peak_overlap` read back from the runs how
they ran side by side.
"""

from __future__ import annotations

import itertools
import secrets
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from dagster import DagsterEventType, DagsterInstance
from dagster._core.storage.dagster_run import RunRecord

from pg2kinesis_dagster.devstack.moto import MotoServer
from pg2kinesis_dagster.devstack.postgres import PostgresServer
from pg2kinesis_dagster.devstack.workload import WorkloadLedger, create_sample_schema, run_sample_workload


@dataclass
class PreparedReplication:
    name: str
    dbname: str
    slot: str
    stream: str
    ledger: WorkloadLedger

    @property
    def expected(self) -> int:
        return sum(1 for _ in self.ledger.changes())

    @property
    def slot_tag(self) -> str:
        """The pg2kinesis/slot tag of its runs (see defs.resources.slot_tag)."""
        return f"{self.name}.{self.slot}"


def prepare_replications(
    pg: PostgresServer, moto: MotoServer, count: int, *, transactions: int, prefix: str = "r", seed: int = 0,
) -> list[PreparedReplication]:
    """``count`` databases, each with the sample schema, a test_decoding slot and a backlog; a stream each."""
    token = secrets.token_hex(3)
    prepared = []
    for index in range(count):
        name = f"{prefix}{index}"
        dbname = pg.create_database(f"t_{name}_{token}")
        stream = f"{name}-{token}"
        moto.create_stream(stream, shards=1)
        conn = pg.connect(dbname)
        try:
            create_sample_schema(conn)
            with conn.cursor() as cur:
                cur.execute("SELECT pg_create_logical_replication_slot(%s, 'test_decoding')", (f"slot_{name}",))
            ledger = run_sample_workload(conn, transactions=transactions, seed=seed + index, truncate_every=None)
        finally:
            conn.close()
        prepared.append(PreparedReplication(name, dbname, f"slot_{name}", stream, ledger))
    return prepared


def drained(pg: PostgresServer, replication: PreparedReplication, target_lsn: str) -> bool:
    """Whether the replication's slot was advanced to ``target_lsn`` (everything before it acknowledged)."""
    conn = pg.connect(replication.dbname)
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT confirmed_flush_lsn >= %s::pg_lsn FROM pg_replication_slots WHERE slot_name = %s",
                        (target_lsn, replication.slot))
            row = cur.fetchone()
            return bool(row and row[0])
    finally:
        conn.close()


def current_lsn(pg: PostgresServer, dbname: str) -> str:
    conn = pg.connect(dbname)
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT pg_current_wal_lsn()::text")
            return str(cur.fetchone()[0])
    finally:
        conn.close()


def drop_replications(pg: PostgresServer, prepared: Iterable[PreparedReplication]) -> None:
    for replication in prepared:
        pg.drop_database(replication.dbname)


def write_config(
    path: Path, pg: PostgresServer, moto: MotoServer, prepared: Sequence[PreparedReplication],
    endpoint_url: str | None = None, **defaults: Any,
) -> Path:
    """The PG2K_CONFIG file of ``prepared``: shared settings under defaults:, one block per replication.

    ``endpoint_url``: where the code location reaches Kinesis (a latency proxy in front of ``moto``).
    """
    document = {
        "defaults": {
            "pg_host": pg.host, "pg_port": pg.port, "pg_user": "postgres",
            "kinesis_endpoint_url": endpoint_url or moto.endpoint_url, "aws_region": moto.region,
            **defaults,
        },
        "replications": {
            r.name: {"pg_dbname": r.dbname, "slot_name": r.slot, "stream_name": r.stream} for r in prepared
        },
    }
    path.write_text(yaml.safe_dump(document, sort_keys=False))
    return path


def run_intervals(instance: DagsterInstance, records: Iterable[RunRecord]) -> list[tuple[float, float]]:
    """(launched, ended) of each finished run: from its leaving the queue (RUN_STARTING) to its end.

    The launch, not the run's own start, opens the interval: a run's process takes seconds to import Dagster,
    and a run held in the queue by another slot's would show as a late launch.
    """
    spans = []
    for record in records:
        if record.end_time is None:
            continue
        events = instance.get_records_for_run(record.dagster_run.run_id, of_type=DagsterEventType.RUN_STARTING)
        launched = events.records[0].timestamp if events.records else record.start_time
        if launched is not None:
            spans.append((launched, record.end_time))
    return spans


def peak_overlap(intervals_by_key: dict[str, list[tuple[float, float]]]) -> int:
    """The most keys (slots) that had a run going at the same moment."""
    events = sorted(
        [(start, 1, key) for key, spans in intervals_by_key.items() for start, _ in spans]
        + [(end, -1, key) for key, spans in intervals_by_key.items() for _, end in spans],
        key=lambda e: (e[0], e[1]),
    )
    active: dict[str, int] = {}
    peak = 0
    for _, delta, key in events:
        active[key] = active.get(key, 0) + delta
        peak = max(peak, sum(1 for n in active.values() if n > 0))
    return peak


def overlapping(spans: Sequence[tuple[float, float]]) -> bool:
    """Whether any two of one key's runs overlapped (the per-slot limit says they must not)."""
    ordered = sorted(spans)
    return any(later[0] < earlier[1] for earlier, later in itertools.pairwise(ordered))
