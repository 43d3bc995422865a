"""From decoded transactions to Kinesis records: filter, key, format, count.

Pure: the primary-key lookup is passed in, so this runs the same under Dagster, the CLI and tests.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from enum import Enum

from pg2kinesis_dagster.core.batching import Record, new_record
from pg2kinesis_dagster.core.changes import Operation, Transaction, format_lsn
from pg2kinesis_dagster.core.columns import ColumnExclusion
from pg2kinesis_dagster.core.errors import ConfigError
from pg2kinesis_dagster.core.filters import ChangeFilter
from pg2kinesis_dagster.core.formats import Formatter
from pg2kinesis_dagster.core.keys import (
    MAX_PARTITION_KEY_CHARS,
    PartitionBy,
    extract_pk,
    ordering_key,
    partition_key,
)
from pg2kinesis_dagster.core.oversize import DEFAULT_LIMIT, OversizedPolicy, fit_record

# (schema, table) -> primary-key columns; () for a table without a key; None when unknown.
KeyLookup = Callable[[str, str], "tuple[str, ...] | None"]


class NoKeyPolicy(str, Enum):
    """What to do with changes of a table that has no primary key."""

    PUBLISH = "publish"  # publish them, partitioned and ordered by table
    SKIP = "skip"  # pg2kinesis's behaviour: drop them (they are still counted)

    @classmethod
    def parse(cls, value: str | NoKeyPolicy) -> NoKeyPolicy:
        try:
            return cls(value.lower() if isinstance(value, str) else value)
        except ValueError:
            raise ConfigError(f"unknown no-primary-key policy {value!r}: use publish or skip") from None


@dataclass
class BatchStats:
    """What a batch held; every change is counted in exactly one of published/filtered/skipped_no_key."""

    transactions: int = 0
    changes: int = 0
    published: int = 0
    filtered: int = 0
    skipped_no_key: int = 0
    no_key_changes: int = 0
    record_bytes: int = 0
    # Records whose largest values were replaced by a marker to fit Kinesis's limit (policy "truncate").
    truncated_records: int = 0
    by_table_op: Counter[str] = field(default_factory=Counter)
    no_key_tables: set[str] = field(default_factory=set)

    def merge(self, other: BatchStats) -> None:
        self.transactions += other.transactions
        self.changes += other.changes
        self.published += other.published
        self.filtered += other.filtered
        self.skipped_no_key += other.skipped_no_key
        self.no_key_changes += other.no_key_changes
        self.record_bytes += other.record_bytes
        self.truncated_records += other.truncated_records
        self.by_table_op.update(other.by_table_op)
        self.no_key_tables |= other.no_key_tables


@dataclass(frozen=True)
class RecordBuilder:
    formatter: Formatter
    key_lookup: KeyLookup
    change_filter: ChangeFilter = field(default_factory=ChangeFilter)
    partition_by: PartitionBy = PartitionBy.ROW
    partition_constant: str = "pg2kinesis"
    no_key_policy: NoKeyPolicy = NoKeyPolicy.PUBLISH
    # Records over Kinesis's 1 MiB limit: "fail" (the sink rejects the batch) or "truncate" (see core.oversize).
    oversized: OversizedPolicy = OversizedPolicy.FAIL
    max_record_bytes: int = DEFAULT_LIMIT
    # Columns removed from every image before formatting (--exclude-columns); key columns cannot be.
    exclude_columns: ColumnExclusion = field(default_factory=ColumnExclusion)

    def build(self, transactions: Iterable[Transaction]) -> tuple[list[Record], BatchStats]:
        records: list[Record] = []
        stats = BatchStats()
        for txn in transactions:
            self.add(txn, records, stats)
        return records, stats

    def add(self, txn: Transaction, records: list[Record], stats: BatchStats) -> None:
        """Append the records of one transaction, or of one part of it, to ``records``; count into ``stats``.

        A transaction decoded in parts is counted once, with its last part.
        """
        append = records.append
        fmt = self.formatter.format
        change_filter = self.change_filter
        accepts = change_filter.accepts if change_filter != _ACCEPT_ALL else None
        exclude = self.exclude_columns.apply if self.exclude_columns else None
        truncate_oversized = self.oversized is OversizedPolicy.TRUNCATE
        by_row = self.partition_by is PartitionBy.ROW
        # Per table, looked up once per transaction: (key columns or None, "schema.table").
        tables: dict[tuple[str, str], tuple[tuple[str, ...] | None, str]] = {}
        by_table_op: Counter[tuple[str, str]] = Counter()
        commit_lsn, commit_text = -1, ""  # the record ids' commit LSN text, computed once per commit
        record_bytes = 0
        published = len(records)
        truncate = Operation.TRUNCATE
        if not txn.partial:
            stats.transactions += 1
        stats.changes += len(txn.changes)
        for change in txn.changes:
            if accepts is not None and not accepts(change):
                stats.filtered += 1
                continue
            name = (change.schema, change.table)
            table = tables.get(name)
            if table is None:
                table = tables[name] = (self.key_lookup(*name), f"{name[0]}.{name[1]}")
            key_columns, qualified = table
            if exclude is not None:
                exclude(change, key_columns)
            if key_columns:
                pk = change.pk = extract_pk(change, key_columns)
            else:
                pk = None
                stats.no_key_changes += 1
                stats.no_key_tables.add(qualified)
                if self.no_key_policy is NoKeyPolicy.SKIP:
                    stats.skipped_no_key += 1
                    continue
            if by_row and pk and len(pk) == 1 and (value := next(iter(pk.values()))) is not None \
                    and len(qualified) + len(value) < MAX_PARTITION_KEY_CHARS:
                key = f"{qualified}:{value}"  # partition_key()'s result, without its general path
            else:
                key = partition_key(change, self.partition_by, self.partition_constant)
            if truncate_oversized:
                data, truncated = fit_record(change, fmt, key, limit=self.max_record_bytes,
                                             protected=key_columns or ())
                stats.truncated_records += bool(truncated)
            else:
                data = fmt(change)
            if change.commit_lsn != commit_lsn:
                commit_lsn = change.commit_lsn
                commit_text = format_lsn(commit_lsn)
            op = change.op
            # A TRUNCATE empties the whole table: it must stay after and before every row change.
            append(new_record(data, key, ordering_key(change, key_columns or ()),
                              f"{commit_text}:{change.index}", op is truncate))
            record_bytes += len(data)
            by_table_op[(qualified, op.value)] += 1
        stats.published += len(records) - published
        stats.record_bytes += record_bytes
        stats.by_table_op.update({f"{table} {op}": n for (table, op), n in by_table_op.items()})


_ACCEPT_ALL = ChangeFilter()
