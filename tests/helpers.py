"""Shared test helpers: build a Replicator on the throwaway stack and check Kinesis against a ledger."""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from itertools import pairwise
from typing import Any

from pg2kinesis_dagster.devstack.moto import MotoServer
from pg2kinesis_dagster.devstack.postgres import PostgresServer
from pg2kinesis_dagster.devstack.workload import LedgerTransaction, WorkloadLedger
from pg2kinesis_dagster.kinesis.sink import KinesisSink, make_kinesis_client
from pg2kinesis_dagster.pipeline import ReplicationSettings, Replicator
from pg2kinesis_dagster.postgres.connection import PostgresSettings


def merged(*ledgers: WorkloadLedger) -> WorkloadLedger:
    """Several workloads run one after another, as one ledger."""
    return WorkloadLedger(seed=ledgers[0].seed, initial_state=ledgers[0].initial_state,
                          transactions=[t for ledger in ledgers for t in ledger.transactions])


def pg_settings(server: PostgresServer, dbname: str, user: str = "postgres", password: str | None = None
                ) -> PostgresSettings:
    return PostgresSettings(host=server.host, port=server.port, dbname=dbname, user=user, password=password)


def code_location_env(server: PostgresServer, dbname: str, moto: MotoServer, stream: str, slot: str,
                      **extra: str) -> dict[str, str]:
    """The PG2K_* variables that point the code location at the throwaway stack (JSON records)."""
    return {
        "PG2K_PG_HOST": server.host,
        "PG2K_PG_PORT": str(server.port),
        "PG2K_PG_DBNAME": dbname,
        "PG2K_PG_USER": "postgres",
        "PG2K_SLOT_NAME": slot,
        "PG2K_STREAM_NAME": stream,
        "PG2K_KINESIS_ENDPOINT_URL": moto.endpoint_url,
        "PG2K_MESSAGE_FORMATTER": "JSON",
        "PG2K_CREATE_SLOT": "true",
        **extra,
    }


def make_sink(moto: MotoServer, stream: str, **kwargs: Any) -> KinesisSink:
    client = make_kinesis_client(region_name=moto.region, endpoint_url=moto.endpoint_url)
    kwargs.setdefault("max_retry_seconds", 20.0)
    return KinesisSink(client, stream, **kwargs)


def make_replicator(
    server: PostgresServer, dbname: str, moto: MotoServer, stream: str, *,
    user: str = "postgres", password: str | None = None, **settings: Any,
) -> Replicator:
    settings.setdefault("create_slot", True)
    settings.setdefault("message_formatter", "JSON")
    return Replicator(
        pg_settings(server, dbname, user, password), make_sink(moto, stream), ReplicationSettings(**settings)
    )


def confirmed_flush(server: PostgresServer, dbname: str, slot: str = "pg2kinesis") -> str | None:
    conn = server.connect(dbname)
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = %s", (slot,))
            row = cur.fetchone()
            return row[0] if row else None
    finally:
        conn.close()


def read_json(moto: MotoServer, stream: str) -> list[dict[str, Any]]:
    """Every record of the stream as its JSON change, plus shard and sequence number."""
    out = []
    # read_stream yields shards in lineage order (parents first), each in sequence order: the order
    # a consumer reads them in. _pos keeps it, so per-key order can be checked across a reshard.
    for pos, rec in enumerate(moto.read_stream(stream)):
        change = json.loads(rec["data"])
        change["_shard"] = rec["shard_id"]
        change["_seq"] = int(rec["sequence_number"])
        change["_partition_key"] = rec["partition_key"]
        change["_pos"] = pos
        out.append(change)
    return out


def _id_order(change_id: str) -> tuple[int, int]:
    lsn, _, index = change_id.rpartition(":")
    high, _, low = lsn.partition("/")
    return ((int(high, 16) << 32) | int(low, 16), int(index))


def dedupe(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Keep each change id's first occurrence in its shard order, as a consumer would."""
    seen: set[str] = set()
    out = []
    for rec in sorted(records, key=lambda r: (r["_shard"], r["_seq"])):
        if rec["id"] not in seen:
            seen.add(rec["id"])
            out.append(rec)
    return out


def assert_matches_ledger(records: list[dict[str, Any]], ledger: WorkloadLedger) -> None:
    """Every committed change arrived once (after dedup), with the source's values, in order."""
    unique = dedupe(records)
    in_commit_order = sorted(unique, key=lambda r: _id_order(r["id"]))
    expected = list(ledger.changes())
    assert len(in_commit_order) == len(expected), (len(in_commit_order), len(expected))
    # Commit order: transactions appear in the ledger's order with the ledger's xids.
    xids = []
    for rec in in_commit_order:
        if not xids or xids[-1] != rec["xid"]:
            xids.append(rec["xid"])
    assert xids == [t.xid for t in ledger.transactions if t.changes]
    for got, want in zip(in_commit_order, expected, strict=True):
        assert got["table"] == want.table, (got, want)
        assert got["op"] == want.op, (got, want)
        assert got["pk"] == want.key, (got, want)
        if want.op in ("INSERT", "UPDATE"):
            assert got["after"] == want.values, (got, want)
        else:
            assert got["after"] is None
    assert_per_key_order(unique)


def assert_per_key_order(unique: list[dict[str, Any]]) -> None:
    """In each shard's sequence order, a row's changes come in commit order."""
    by_key: dict[tuple[str, str], list[tuple[int, tuple[int, int]]]] = defaultdict(list)
    for rec in unique:
        if rec["pk"] is not None:
            key = (rec["table"], json.dumps(rec["pk"], sort_keys=True))
            by_key[key].append((rec["_seq"], _id_order(rec["id"])))
    shards_per_key: dict[tuple[str, str], set[str]] = defaultdict(set)
    for rec in unique:
        if rec["pk"] is not None:
            shards_per_key[(rec["table"], json.dumps(rec["pk"], sort_keys=True))].add(rec["_shard"])
    for key, entries in by_key.items():
        assert len(shards_per_key[key]) == 1, f"row {key} spread over shards {shards_per_key[key]}"
        ordered = [order for _, order in sorted(entries)]
        assert ordered == sorted(ordered), f"row {key} out of commit order"


# -- a checker that counts instead of stopping at the first problem --------------------------------


def _consumer_order(rec: dict[str, Any]) -> tuple[Any, ...]:
    """The order a consumer reads records in: lineage order across shards (``_pos``), else shard + sequence."""
    return (rec["_pos"],) if "_pos" in rec else (rec["_shard"], rec["_seq"])


def _ordering_key(rec: dict[str, Any]) -> tuple[str, str]:
    """A row's identity; changes of keyless tables and TRUNCATEs are keyed per table."""
    return (rec["table"], json.dumps(rec["pk"], sort_keys=True) if rec["pk"] is not None else "*table*")


def _order_groups(rec: dict[str, Any]) -> list[tuple[tuple[str, str], bool]]:
    """The identities a record must keep commit order on, and whether it holds each whole (README, Guarantees).

    Keyed rows: the key (and an UPDATE's old key when it changed). Keyless tables: the row's content (an
    INSERT its new row; an UPDATE or DELETE with the old row its old, and an UPDATE its new, row), plus the
    table shared; without the old row (or for a TRUNCATE) the whole table.
    """
    table = rec["table"]
    if rec["pk"] is not None:
        groups = [((table, json.dumps(rec["pk"], sort_keys=True)), True)]
        before = rec.get("before")
        if rec["op"] == "UPDATE" and before and all(k in before for k in rec["pk"]):
            old = {k: before[k] for k in rec["pk"]}
            if old != rec["pk"]:
                groups.append(((table, json.dumps(old, sort_keys=True)), True))
        return groups
    whole = [((table, "*table*"), True)]
    op, after, before = rec["op"], rec.get("after"), rec.get("before")
    if op == "TRUNCATE" or rec.get("unchanged_toast"):
        return whole
    images = []
    if op == "INSERT":
        images.append(after)
    else:
        if before is None:
            return whole
        images.append(before)
        if op == "UPDATE":
            images.append(after)
    if any(i is None for i in images):
        return whole
    return [((table, "*table*"), False),
            *(((table, "image:" + json.dumps(i, sort_keys=True)), True) for i in images)]


def _order_violations(changes: list[tuple[tuple[int, int], bool]]) -> int:
    """Changes of one identity in consumer order, as (commit order, held whole): those out of commit order.

    Only pairs where one side holds the identity whole must keep order: a whole holder read after a later
    change, or before an earlier one, counts once.
    """
    violations = 0
    top: tuple[int, int] | None = None  # highest commit order read so far
    for order, whole in changes:
        if whole and top is not None and top > order:
            violations += 1
        top = order if top is None or order > top else top
    low: tuple[int, int] | None = None  # lowest commit order read after this one
    for order, whole in reversed(changes):
        if whole and low is not None and low < order:
            violations += 1
        low = order if low is None or order < low else low
    # Shared holders among themselves may be in any order; against whole holders they are checked above,
    # except a shared one read before an earlier whole one: covered by that whole one's second pass.
    return violations


@dataclass
class LedgerReport:
    """What arrived compared with what was committed. ``ok`` means: nothing lost, nothing out of order."""

    expected: int = 0  # committed changes in the ledger
    records: int = 0  # records read from the stream
    unique: int = 0  # after dropping duplicate ids (first occurrence in consumer order kept)
    duplicates: int = 0  # records - unique
    lost: int = 0  # committed changes with no record
    unexpected: int = 0  # unique records that match no committed change (rolled back, invented)
    mismatched: int = 0  # records whose table/op/key/values differ from the committed change
    order_violations: int = 0  # adjacent pairs of a row's changes in consumer order that go back in commit order
    commit_order_violations: int = 0  # adjacent transactions whose commit LSNs go backwards in ledger order
    keys: int = 0
    keys_on_several_shards: int = 0  # fine only across a reshard
    examples: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (self.lost or self.unexpected or self.mismatched or self.order_violations
                    or self.commit_order_violations)

    def as_dict(self) -> dict[str, int]:
        return {k: v for k, v in self.__dict__.items() if k != "examples"}

    def _example(self, text: str) -> None:
        if len(self.examples) < 10:
            self.examples.append(text)


def check_against_ledger(records: list[dict[str, Any]],
                         ledger: WorkloadLedger | Iterable[LedgerTransaction]) -> LedgerReport:
    """Compare JSON records (from :func:`read_json`) with committed transactions, counting every problem.

    Records are matched to the ledger by (xid, index in transaction): a change's id is
    ``<commit LSN>:<index>`` and the JSON carries the xid. Duplicates are dropped by id, keeping the
    first occurrence in consumer order (lineage order across shards, sequence order in a shard).
    """
    transactions = list(ledger.transactions if isinstance(ledger, WorkloadLedger) else ledger)
    report = LedgerReport(records=len(records))
    seen: set[str] = set()
    unique: list[dict[str, Any]] = []
    for rec in sorted(records, key=_consumer_order):
        if rec["id"] not in seen:
            seen.add(rec["id"])
            unique.append(rec)
    report.unique = len(unique)
    report.duplicates = len(records) - len(unique)

    by_xid: dict[int, dict[int, dict[str, Any]]] = defaultdict(dict)
    for rec in unique:
        by_xid[int(rec["xid"])][_id_order(rec["id"])[1]] = rec
    matched: set[str] = set()
    commit_lsns: list[int] = []
    for txn in transactions:
        got = by_xid.get(txn.xid, {})
        lsn = None
        for index, want in enumerate(txn.changes):
            report.expected += 1
            rec = got.get(index)
            if rec is None:
                report.lost += 1
                report._example(f"lost: xid {txn.xid} change {index} {want.table} {want.op} {want.key}")
                continue
            matched.add(rec["id"])
            lsn = _id_order(rec["id"])[0]
            same = rec["table"] == want.table and rec["op"] == want.op and rec["pk"] == want.key
            if want.op in ("INSERT", "UPDATE"):
                same = same and rec["after"] == want.values
            else:
                same = same and rec["after"] is None
            if not same:
                report.mismatched += 1
                report._example(f"mismatch: {rec['id']}: got {rec['table']} {rec['op']} {rec['pk']}, "
                                f"want {want.table} {want.op} {want.key}")
        if lsn is not None:
            commit_lsns.append(lsn)
    report.commit_order_violations = sum(1 for a, b in pairwise(commit_lsns) if b <= a)
    for rec in unique:
        if rec["id"] not in matched:
            report.unexpected += 1
            report._example(f"unexpected: {rec['id']} xid {rec['xid']} {rec['table']} {rec['op']}")

    by_key: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    by_group: dict[tuple[str, str], list[tuple[tuple[int, int], bool]]] = defaultdict(list)
    for rec in unique:  # already in consumer order
        by_key[_ordering_key(rec)].append(rec)
        for group, whole in _order_groups(rec):
            by_group[group].append((_id_order(rec["id"]), whole))
    report.keys = len(by_key)
    for changes in by_key.values():
        if len({r["_shard"] for r in changes}) > 1:
            report.keys_on_several_shards += 1
    for group, ordered in by_group.items():
        found = _order_violations(ordered)
        if found:
            report.order_violations += found
            report._example(f"order: {group}: {found} change(s) out of commit order")
    return report


def assert_no_loss_no_reordering(report: LedgerReport, *, max_duplicates: int | None = None,
                                 allow_several_shards: bool = False) -> None:
    """The guarantees: nothing lost or invented, values exact, per-row and commit order kept."""
    assert report.ok, f"{report.as_dict()} {report.examples}"
    assert report.unique == report.expected, report.as_dict()
    if not allow_several_shards:
        assert report.keys_on_several_shards == 0, report.as_dict()
    if max_duplicates is not None:
        assert report.duplicates <= max_duplicates, (report.duplicates, max_duplicates, report.as_dict())
