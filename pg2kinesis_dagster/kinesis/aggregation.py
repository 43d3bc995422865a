"""KPL record aggregation: many changes per Kinesis record, each row's order kept.

Kinesis bills and throttles per record (1,000 records/s per shard), so packing
changes into KPL-aggregated records (the format of the Kinesis Producer
Library, read back by the KCL or the ``aws-kinesis-agg`` deaggregator) cuts
records by orders of magnitude. The encoding is ``aws_kinesis_agg``'s; this
module decides what goes together:

* Only changes bound for the same shard share an aggregate, so every change
  still lands on the shard its own partition key maps to. (The KCL drops
  deaggregated changes whose hash falls outside the shard they were read
  from.) An aggregate pins its shard with ``ExplicitHashKey``.
* An aggregate's ordering key is its shard, so the planner sends at most one
  aggregate per shard per request and a shard's next aggregate only after the
  previous one is acknowledged: the shard receives its changes in input order.
* When a row's changes go to different shards (partition by transaction id),
  the aggregates holding them also share the row's key, so the later one waits
  for the earlier one exactly as single records do.
"""

from __future__ import annotations

import bisect
import hashlib
from collections.abc import Hashable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from pg2kinesis_dagster import native
from pg2kinesis_dagster.core.batching import (
    MAX_HASH_KEY_EXCLUSIVE,
    MAX_RECORD_BYTES,
    OrderingKeys,
    Record,
    SharedKey,
)
from pg2kinesis_dagster.core.errors import RecordTooLargeError, SinkError

# The KPL aggregated record format (github.com/awslabs/amazon-kinesis-producer, aggregation-format.md):
# MAGIC, the protobuf AggregatedRecord, the MD5 digest of the protobuf bytes.
KPL_MAGIC = b"\xf3\x89\x9a\xc2"
_DIGEST_SIZE = 16
_VARINTS = [bytes([n]) if n < 0x80 else bytes([(n & 0x7F) | 0x80, n >> 7]) for n in range(1 << 14)]


def _varint(n: int) -> bytes:
    if n < 1 << 14:
        return _VARINTS[n]
    out = bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _varint_size(n: int) -> int:
    return 1 if n < 0x80 else 2 if n < 1 << 14 else (n.bit_length() + 6) // 7


class KplRecord:
    """One KPL-aggregated record being filled: ``aws_kinesis_agg``'s ``AggRecord`` without its per-record cost.

    The bytes and the "full" decision are exactly ``AggRecord``'s (tests/test_aggregation.py checks both against
    it and against protobuf's own serialisation), but the size is kept as a running total and the protobuf
    message is written once, by concatenation, when the record is complete: AggRecord re-encodes keys and
    builds protobuf objects for every user record. Field order is protobuf's: the partition key table (1), the
    explicit hash key table (2), the records (3), each record its key index (1), hash key index (2), data (3).
    """

    __slots__ = ("_body_size", "_ehk_index", "_ehk_table", "_max_size", "_parts", "_pk_index", "_pk_table", "count")

    def __init__(self, max_size: int) -> None:
        self._max_size = max_size
        self._body_size = 0
        self._pk_index: dict[bytes, int] = {}
        self._ehk_index: dict[bytes, int] = {}
        self._pk_table: list[bytes] = []
        self._ehk_table: list[bytes] = []
        self._parts: list[bytes] = []
        self.count = 0

    def size(self) -> int:
        return len(KPL_MAGIC) + self._body_size + _DIGEST_SIZE

    def add_user_record(self, partition_key: bytes, data: bytes, explicit_hash_key: bytes | None = None) -> bool:
        """Add a user record if it fits: False when the record is full; ValueError if it can never fit."""
        pk_index = self._pk_index.get(partition_key)
        if pk_index is None:
            new_pk = len(self._pk_table)
            size = len(partition_key)
            message_size = 2 + size if size < 0x80 else 1 + _varint_size(size) + size
            inner = 2 if new_pk < 0x80 else 1 + _varint_size(new_pk)
        else:
            message_size = 0
            inner = 2 if pk_index < 0x80 else 1 + _varint_size(pk_index)
        ehk_index = None
        if explicit_hash_key is not None:
            ehk_index = self._ehk_index.get(explicit_hash_key)
            if ehk_index is None:
                new_ehk = len(self._ehk_table)
                message_size += 1 + _varint_size(len(explicit_hash_key)) + len(explicit_hash_key)
            inner += 1 + _varint_size(new_ehk if ehk_index is None else ehk_index)
        data_size = len(data)
        inner += (2 if data_size < 0x80 else 3 if data_size < 0x4000 else 1 + _varint_size(data_size)) + data_size
        message_size += (2 if inner < 0x80 else 3 if inner < 0x4000 else 1 + _varint_size(inner)) + inner
        if message_size > self._max_size:
            raise ValueError(f"user record of {message_size} bytes too big for an aggregated record")
        if 20 + self._body_size + message_size > self._max_size:  # 20: len(KPL_MAGIC) + _DIGEST_SIZE
            return False
        if pk_index is None:
            pk_index = self._pk_index[partition_key] = new_pk
            self._pk_table.append(partition_key)
        parts = self._parts
        if explicit_hash_key is None:
            parts.append(b"\x1a" + _varint(inner) + b"\x08" + _varint(pk_index) + b"\x1a" + _varint(data_size))
        else:
            if ehk_index is None:
                ehk_index = self._ehk_index[explicit_hash_key] = new_ehk
                self._ehk_table.append(explicit_hash_key)
            parts.append(b"\x1a" + _varint(inner) + b"\x08" + _varint(pk_index) + b"\x10" + _varint(ehk_index)
                         + b"\x1a" + _varint(data_size))
        parts.append(data)
        self._body_size += message_size
        self.count += 1
        return True

    def serialize(self) -> bytes:
        body = b"".join([
            *(b"\x0a" + _varint(len(k)) + k for k in self._pk_table),
            *(b"\x12" + _varint(len(k)) + k for k in self._ehk_table),
            *self._parts,
        ])
        return KPL_MAGIC + body + hashlib.md5(body).digest()


# botocore builds client classes at runtime; there is no importable type.
KinesisClient = Any


class ShardMapError(SinkError):
    """ListShards returned open shards that do not cover the hash key space exactly once."""


def partition_key_hash(partition_key: str) -> int:
    """The 128-bit hash Kinesis routes a partition key by: MD5 of its UTF-8 bytes, big-endian."""
    return int.from_bytes(hashlib.md5(partition_key.encode("utf-8")).digest(), "big")


def record_hash_key(record: Record) -> int:
    """The hash key Kinesis routes ``record`` by: its explicit hash key, else its partition key's hash."""
    if record.explicit_hash_key is not None:
        return int(record.explicit_hash_key)
    return partition_key_hash(record.partition_key)


@dataclass(frozen=True, slots=True)
class Shard:
    """An open shard and its hash key range (both ends inclusive, as Kinesis reports them)."""

    shard_id: str
    starting_hash_key: int
    ending_hash_key: int

    def covers(self, hash_key: int) -> bool:
        return self.starting_hash_key <= hash_key <= self.ending_hash_key


class ShardMap:
    """Which open shard each hash key goes to, as of one ListShards listing."""

    __slots__ = ("_by_id", "_shards", "_starts")

    def __init__(self, shards: Iterable[Shard]) -> None:
        ordered = sorted(shards, key=lambda s: s.starting_hash_key)
        # Open shards tile [0, 2**128 - 1]; anything else is a listing taken
        # mid-resharding, where routing cannot be predicted.
        expected = 0
        for shard in ordered:
            if shard.starting_hash_key != expected or shard.ending_hash_key < shard.starting_hash_key:
                raise ShardMapError(
                    f"the open shards do not cover the hash key space exactly once (at shard "
                    f"{shard.shard_id}, starting hash key {shard.starting_hash_key}, expected {expected}); "
                    "the stream is probably being resharded."
                )
            expected = shard.ending_hash_key + 1
        if expected != MAX_HASH_KEY_EXCLUSIVE:
            raise ShardMapError(
                f"the open shards cover hash keys up to {expected - 1}, not up to 2**128 - 1; the stream "
                "is probably being resharded."
            )
        self._shards = tuple(ordered)
        self._starts = [s.starting_hash_key for s in ordered]
        self._by_id = {s.shard_id: s for s in ordered}

    @classmethod
    def from_list_shards(cls, shards: Iterable[dict[str, Any]]) -> ShardMap:
        """From ListShards' ``Shards`` items; closed shards (with an EndingSequenceNumber) are skipped."""
        return cls(
            Shard(
                shard_id=item["ShardId"],
                starting_hash_key=int(item["HashKeyRange"]["StartingHashKey"]),
                ending_hash_key=int(item["HashKeyRange"]["EndingHashKey"]),
            )
            for item in shards
            if "EndingSequenceNumber" not in item.get("SequenceNumberRange", {})
        )

    @classmethod
    def load(cls, client: KinesisClient, stream_name: str) -> ShardMap:
        """List the stream's shards (every page); botocore errors propagate to the caller."""
        items: list[dict[str, Any]] = []
        kwargs: dict[str, Any] = {"StreamName": stream_name}
        while True:
            page = client.list_shards(**kwargs)
            items.extend(page.get("Shards", []))
            token = page.get("NextToken")
            if not token:
                break
            kwargs = {"NextToken": token}  # Kinesis rejects StreamName together with NextToken
        return cls.from_list_shards(items)

    @property
    def shards(self) -> tuple[Shard, ...]:
        return self._shards

    def __len__(self) -> int:
        return len(self._shards)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ShardMap) and self._shards == other._shards

    def __hash__(self) -> int:
        return hash(self._shards)

    def __repr__(self) -> str:
        return f"ShardMap({[s.shard_id for s in self._shards]})"

    def get(self, shard_id: str) -> Shard | None:
        return self._by_id.get(shard_id)

    def shard_for_hash(self, hash_key: int) -> Shard:
        if not 0 <= hash_key < MAX_HASH_KEY_EXCLUSIVE:
            raise ValueError(f"hash key {hash_key} is outside 0 .. 2**128 - 1")
        return self._shards[bisect.bisect_right(self._starts, hash_key) - 1]

    def shard_for(self, partition_key: str, explicit_hash_key: str | None = None) -> Shard:
        """The shard Kinesis puts a record with this partition key (or explicit hash key) on."""
        if explicit_hash_key is not None:
            return self.shard_for_hash(int(explicit_hash_key))
        return self.shard_for_hash(partition_key_hash(partition_key))


@dataclass(frozen=True, slots=True)
class AggregatedRecord(Record):
    """A Kinesis record carrying ``user_records`` for shard ``shard_id``.

    ``data`` is KPL-aggregated, or, when ``aggregated`` is false, the single user
    record's own data (a change too large to fit in an aggregate's envelope is
    sent as is; deaggregators pass non-aggregated records through).
    """

    user_records: tuple[Record, ...] = ()
    shard_id: str = ""
    aggregated: bool = True


class _Builder:
    """The aggregate being filled for one shard."""

    __slots__ = ("agg", "closed", "first", "partition_key", "records", "row_keys", "shard")

    def __init__(self, shard: Shard, first: Record, max_bytes: int, first_key: bytes | None = None) -> None:
        self.shard = shard
        self.partition_key = first.partition_key
        first_key = first.partition_key.encode("utf-8") if first_key is None else first_key
        # Kinesis counts the outer partition key against the record limit too;
        # the KPL record only counts its serialised bytes, so give it the rest.
        self.agg: KplRecord | None = KplRecord(max_bytes - len(first_key))
        self.first = first
        self.records: list[Record] = []
        # Rows that also have changes in another shard's aggregates.
        self.row_keys: set[Hashable] = set()
        self.closed = False
        if not self.add(first, first_key):
            self.agg = None  # does not fit in an envelope: sent as a plain record
            self.records.append(first)
            self.closed = True

    def add(self, record: Record, partition_key: bytes | None = None) -> bool:
        """Add ``record`` (``partition_key``: its key's UTF-8 bytes) if the aggregate stays within the limit;
        False if it is full."""
        if self.agg is None or self.closed:
            return False
        # Keys as UTF-8 bytes, as the protobuf carries them.
        hash_key = record.explicit_hash_key
        try:
            added = self.agg.add_user_record(
                record.partition_key.encode("utf-8") if partition_key is None else partition_key,
                record.data,
                hash_key.encode("ascii") if hash_key is not None else None,
            )
        except ValueError:  # too large for any aggregate of this envelope
            return False
        if added:
            self.records.append(record)
        return bool(added)

    def build(self) -> AggregatedRecord:
        records = self.records
        first, last = records[0], records[-1]
        shard_key = ("shard", self.shard.shard_id)
        ordering_key: Hashable = (
            OrderingKeys([shard_key, *(("row", k) for k in self.row_keys)]) if self.row_keys else shard_key
        )
        if self.agg is None:
            data, record_id = first.data, first.record_id
        else:
            data = self.agg.serialize()
            record_id = first.record_id if len(records) == 1 else (
                f"{first.record_id}..{last.record_id} ({len(records)} changes)"
            )
        return AggregatedRecord(
            data=data,
            partition_key=self.partition_key,
            ordering_key=ordering_key,
            record_id=record_id,
            # The shard's first hash key routes the aggregate to that shard, whatever
            # its partition key, which is only the first change's.
            explicit_hash_key=str(self.shard.starting_hash_key),
            user_records=tuple(records),
            shard_id=self.shard.shard_id,
            aggregated=self.agg is not None,
        )


def too_large(record: Record, record_limit: int) -> RecordTooLargeError:
    """The error for a change larger than any record the stream takes (shared with the compiled twin)."""
    return RecordTooLargeError(
        f"record {record.record_id} is {record.size} bytes (data plus partition key); Kinesis "
        f"accepts at most {record_limit} bytes per record. Nothing was sent and the slot was not "
        "advanced. Exclude or trim the large column(s) for this table, or choose a more compact "
        "output format."
    )


def aggregate(
    records: Sequence[Record], shard_map: ShardMap, max_bytes: int = MAX_RECORD_BYTES,
    max_record_bytes: int | None = None,
) -> list[AggregatedRecord]:
    """Pack ``records`` (in input order) into aggregated records, per shard of ``shard_map``.

    Each shard's changes are appended to its open aggregate until the next one
    would take the aggregated record (KPL bytes plus its partition key) over
    ``max_bytes``. The result is ordered so that :func:`~pg2kinesis_dagster.core.batching.next_request`
    keeps every row's changes in input order. A change too large for an aggregate goes as a plain record
    if it fits ``max_record_bytes`` (the stream's limit, default ``max_bytes``); otherwise
    :class:`RecordTooLargeError` names it.

    The compiled twin (``_kpl.aggregate``) gives the same result when it is built and enabled
    (:mod:`pg2kinesis_dagster.native`); :func:`aggregate_python` is the reference.
    """
    kpl = native.load("pg2kinesis_dagster.kinesis._kpl")
    if kpl is not None:
        result: list[AggregatedRecord] = kpl.aggregate(records, shard_map, max_bytes, max_record_bytes)
        return result
    return aggregate_python(records, shard_map, max_bytes, max_record_bytes)


def aggregate_python(
    records: Sequence[Record], shard_map: ShardMap, max_bytes: int = MAX_RECORD_BYTES,
    max_record_bytes: int | None = None,
) -> list[AggregatedRecord]:
    """:func:`aggregate` in pure Python: the reference the compiled twin must match, and its fallback."""
    out: list[_Builder] = []  # closed aggregates, in closing order
    open_by_shard: dict[str, _Builder] = {}
    last_builder: dict[Hashable, _Builder] = {}  # where each row's latest change went
    routes: dict[str, tuple[Shard, bytes]] = {}  # partition key -> its shard and UTF-8 bytes: keys repeat

    def close(builder: _Builder) -> None:
        builder.closed = True
        del open_by_shard[builder.shard.shard_id]
        out.append(builder)

    # A change larger than an aggregate may still go as a plain record when the stream takes larger records.
    record_limit = max_bytes if max_record_bytes is None else max(max_bytes, max_record_bytes)
    for record in records:
        if record.size > record_limit:
            raise too_large(record, record_limit)
        pk = record.partition_key
        if record.explicit_hash_key is not None:
            shard, pk_bytes = shard_map.shard_for(pk, record.explicit_hash_key), pk.encode("utf-8")
        else:
            route = routes.get(pk)
            if route is None:
                route = routes[pk] = (shard_map.shard_for(pk), pk.encode("utf-8"))
            shard, pk_bytes = route
        key = record.ordering_key
        crossing: list[Hashable] | None = None
        if type(key) is OrderingKeys:
            # Each identity of the change (a key change or a keyless row has several; shared ones are
            # counted as whole here: at worst two aggregates wait for each other when they need not).
            parts: Sequence[Hashable] = [p.key if type(p) is SharedKey else p for p in key]
        else:
            parts = (key,)
        for part in parts:
            previous = last_builder.get(part)
            if previous is not None and previous.shard is not shard:
                # The aggregate taking this change must wait for the one holding the
                # row's previous change: close that one now, so it comes first in the
                # output and no later change can make the two wait for each other.
                if not previous.closed:
                    close(previous)
                previous.row_keys.add(part)
                if crossing is None:
                    crossing = []
                crossing.append(part)

        builder = open_by_shard.get(shard.shard_id)
        if builder is None or not builder.add(record, pk_bytes):
            if builder is not None:
                close(builder)
            builder = _Builder(shard, record, max_bytes, pk_bytes)
            if builder.closed:  # a plain record: nothing else goes with it
                out.append(builder)
            else:
                open_by_shard[shard.shard_id] = builder
        if crossing is not None:
            builder.row_keys.update(crossing)
        for part in parts:
            last_builder[part] = builder

    # What is still open depends only on closed aggregates: any order is safe;
    # first-change order keeps the output close to the input.
    out.extend(open_by_shard.values())
    return [b.build() for b in out]
