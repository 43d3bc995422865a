"""From decoded transactions to Kinesis records: filter, key, format, count.

Pure: the primary-key lookup is passed in, so this runs the same under Dagster, the CLI and tests.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from enum import Enum

from pg2kinesis_dagster.core.batching import Record
from pg2kinesis_dagster.core.changes import Operation, Transaction
from pg2kinesis_dagster.core.columns import ColumnExclusion
from pg2kinesis_dagster.core.errors import ConfigError
from pg2kinesis_dagster.core.filters import ChangeFilter
from pg2kinesis_dagster.core.formats import Formatter
from pg2kinesis_dagster.core.keys import PartitionBy, extract_pk, ordering_key, partition_key
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
        fmt = self.formatter.format
        exclude = self.exclude_columns.apply if self.exclude_columns else None
        if not txn.partial:
            stats.transactions += 1
        for change in txn.changes:
            stats.changes += 1
            if not self.change_filter.accepts(change):
                stats.filtered += 1
                continue
            key_columns = self.key_lookup(change.schema, change.table)
            if exclude is not None:
                exclude(change, key_columns)
            if key_columns:
                change.pk = extract_pk(change, key_columns)
            else:
                stats.no_key_changes += 1
                stats.no_key_tables.add(change.qualified_table)
                if self.no_key_policy is NoKeyPolicy.SKIP:
                    stats.skipped_no_key += 1
                    continue
            key = partition_key(change, self.partition_by, self.partition_constant)
            if self.oversized is OversizedPolicy.TRUNCATE:
                data, truncated = fit_record(change, fmt, key, limit=self.max_record_bytes,
                                             protected=key_columns or ())
                stats.truncated_records += bool(truncated)
            else:
                data = fmt(change)
            records.append(
                Record(
                    data=data,
                    partition_key=key,
                    ordering_key=ordering_key(change),
                    record_id=change.id,
                    # A TRUNCATE empties the whole table: it must stay after and before every row change.
                    barrier=change.op is Operation.TRUNCATE,
                )
            )
            stats.published += 1
            stats.record_bytes += len(data)
            stats.by_table_op[f"{change.qualified_table} {change.op.value}"] += 1
