"""Primary-key values, Kinesis partition keys and the per-row ordering key of a change."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Hashable, Sequence
from enum import Enum

from pg2kinesis_dagster.core.changes import Change, Column, LazyChange, Operation
from pg2kinesis_dagster.core.errors import ConfigError

MAX_PARTITION_KEY_CHARS = 256


class PartitionBy(str, Enum):
    """What the Kinesis partition key is made of (and so which changes share a shard)."""

    ROW = "row"  # table + primary-key values: each row's changes stay on one shard, in order
    TABLE = "table"  # one shard per table: a table's changes in commit order
    XID = "xid"  # pg2kinesis's choice: a transaction's changes together
    CONSTANT = "constant"  # one shard for everything: total commit order

    @classmethod
    def parse(cls, value: str | PartitionBy) -> PartitionBy:
        try:
            return cls(value.lower() if isinstance(value, str) else value)
        except ValueError:
            raise ConfigError(
                f"unknown partition key {value!r}: use one of {', '.join(m.value for m in cls)}"
            ) from None


def extract_pk(change: Change, key_columns: Sequence[str]) -> dict[str, str | None] | None:
    """The key values of the row a change is about, from the image that carries them."""
    if not key_columns or change.op is Operation.TRUNCATE:
        return None
    if type(change) is LazyChange:
        pending = change.pending
        if pending is not None:  # images not parsed yet: read only the key from the raw text
            return pending.key(key_columns)
    # The new image names the row after an UPDATE (a key change moves the row to its new key);
    # a DELETE only has the old key.
    image: tuple[Column, ...] | None = change.after if change.after is not None else change.before
    if image is None:
        return None
    values = {c.name: c for c in image}
    pk: dict[str, str | None] = {}
    for name in key_columns:
        column = values.get(name)
        if column is None and change.before is not None:
            column = next((c for c in change.before if c.name == name), None)
        pk[name] = None if column is None or column.unchanged_toast else column.value
    return pk


def ordering_key(change: Change) -> Hashable:
    """The identity whose changes must reach Kinesis in commit order.

    A row of a keyed table is its table and key values; a table without a key (and a TRUNCATE)
    can only be ordered as a whole table.
    """
    if change.pk:
        return (change.schema, change.table, tuple(change.pk.values()))
    return (change.schema, change.table)


def _bounded(key: str) -> str:
    if len(key) <= MAX_PARTITION_KEY_CHARS:
        return key
    # Same row -> same digest -> same shard; the readable prefix helps when debugging.
    digest = hashlib.sha256(key.encode()).hexdigest()
    return f"{key[: MAX_PARTITION_KEY_CHARS - 72]}#sha256:{digest}"


def partition_key(change: Change, by: PartitionBy, constant: str = "pg2kinesis") -> str:
    if by is PartitionBy.ROW:
        if change.pk:
            values = list(change.pk.values())
            text = values[0] if len(values) == 1 and values[0] is not None else json.dumps(values)
            return _bounded(f"{change.qualified_table}:{text}")
        return _bounded(change.qualified_table)
    if by is PartitionBy.TABLE:
        return _bounded(change.qualified_table)
    if by is PartitionBy.XID:
        return str(change.xid)
    return constant
