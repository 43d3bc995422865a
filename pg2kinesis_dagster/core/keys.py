"""Primary-key values, Kinesis partition keys and the per-row ordering key of a change."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Hashable, Sequence
from enum import Enum

from pg2kinesis_dagster.core.batching import OrderingKeys, SharedKey
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


def old_key(change: Change, key_columns: Sequence[str]) -> tuple[str | None, ...] | None:
    """The key values in an UPDATE's old image (sent on a key change or with REPLICA IDENTITY FULL), else None."""
    if change.op is not Operation.UPDATE or not key_columns:
        return None
    before = change.before
    if before is None:
        return None
    values = {c.name: c for c in before}
    if any(name not in values or values[name].unchanged_toast for name in key_columns):
        return None
    return tuple(values[name].value for name in key_columns)


def _image_key(change: Change, image: tuple[Column, ...]) -> Hashable | None:
    """A keyless row's identity: its whole content (None when a TOASTed value is unknown)."""
    if any(c.unchanged_toast for c in image):
        return None
    return ("image", change.schema, change.table, tuple((c.name, c.value) for c in image))


def ordering_key(change: Change, key_columns: Sequence[str] = ()) -> Hashable:
    """The identity (or identities) whose changes must reach Kinesis in commit order.

    * A row of a keyed table: its table and key values. An UPDATE that changes the key is ordered after the
      old key's changes and before the new key's (both keys, :class:`OrderingKeys`).
    * A table without a key has no row identity but the row's content. An INSERT is ordered with changes of
      rows of the same content (its image); an UPDATE or DELETE that carries the old row (``REPLICA IDENTITY
      FULL``) with the old content and, for an UPDATE, the new. Each of them also takes the table as a
      :class:`SharedKey`, so that it waits for (and holds back) the table-wide changes below, not each other.
    * A keyless change without the old row (an UPDATE or DELETE under the default replica identity), or whose
      new row has an unknown (unchanged TOASTed) value, is ordered against every change of its table.

    TRUNCATE is a barrier against everything (``Record.barrier``), whatever this key.
    """
    if change.pk:
        row = ("row", change.schema, change.table, tuple(change.pk.values()))
        old = old_key(change, key_columns)
        if old is not None and old != row[3]:
            return OrderingKeys((row, ("row", change.schema, change.table, old)))
        return row
    table = ("table", change.schema, change.table)
    op = change.op
    if op is Operation.TRUNCATE:
        return table
    images: list[Hashable | None] = []
    if op is Operation.INSERT or op is Operation.SNAPSHOT:
        images.append(_image_key(change, change.after) if change.after is not None else None)
    else:
        before = change.before
        if before is None:
            return table
        images.append(_image_key(change, before))
        if op is Operation.UPDATE:
            images.append(_image_key(change, change.after) if change.after is not None else None)
    if None in images:
        return table
    return OrderingKeys((SharedKey(table), *images))


def _bounded(key: str) -> str:
    if len(key) <= MAX_PARTITION_KEY_CHARS:
        return key
    # Same row -> same digest -> same shard; the readable prefix helps when debugging.
    digest = hashlib.sha256(key.encode()).hexdigest()
    return f"{key[: MAX_PARTITION_KEY_CHARS - 72]}#sha256:{digest}"


def row_partition_key(qualified: str, values: Sequence[str | None]) -> str:
    """The ROW partition key of a change of ``qualified`` (``schema.table``) whose key values are ``values``."""
    values = list(values)
    text = values[0] if len(values) == 1 and values[0] is not None else json.dumps(values)
    return _bounded(f"{qualified}:{text}")


def partition_key(change: Change, by: PartitionBy, constant: str = "pg2kinesis") -> str:
    if by is PartitionBy.ROW:
        if change.pk:
            return row_partition_key(change.qualified_table, tuple(change.pk.values()))
        return _bounded(change.qualified_table)
    if by is PartitionBy.TABLE:
        return _bounded(change.qualified_table)
    if by is PartitionBy.XID:
        return str(change.xid)
    return constant
