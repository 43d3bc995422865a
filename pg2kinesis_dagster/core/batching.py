"""Split records into Kinesis PutRecords requests without breaking per-row order.

Pure planning, no I/O. PutRecords does not guarantee order inside a request: one
entry can fail (throttled) while a later entry of the same request succeeds. So
a request carries at most one record per ordering key, and a later change of a
key is only sent once every earlier change of that key has been acknowledged.
The sink keeps the unacknowledged records "pending" (in input order) and asks
:func:`next_request` what to send next.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TypeVar, overload

from pg2kinesis_dagster.core.errors import RecordTooLargeError, SinkError

# Kinesis Data Streams service limits (PutRecords / PutRecord).
MAX_RECORDS_PER_REQUEST = 500
MAX_REQUEST_BYTES = 5 * 1024 * 1024  # data + UTF-8 partition keys of every entry
MAX_RECORD_BYTES = 1024 * 1024  # data + UTF-8 partition key of one entry (a stream's default)
# A stream may accept records up to 10 MiB (UpdateMaxRecordSize; DescribeStreamSummary's MaxRecordSizeInKiB);
# PutRecords then takes up to 10 MiB a request.
LARGEST_RECORD_BYTES = 10 * 1024 * 1024
MIN_PARTITION_KEY_CHARS = 1
MAX_PARTITION_KEY_CHARS = 256  # Unicode characters, not bytes
MAX_HASH_KEY_EXCLUSIVE = 2**128  # partition key hashes (MD5) and explicit hash keys are 128-bit

_T = TypeVar("_T")


class OrderingKeys(frozenset[Hashable]):
    """Several ordering keys of one record, e.g. an aggregate holding changes of many rows.

    :func:`next_request` treats a record with ``OrderingKeys`` as if it had each
    of them: it waits for any earlier pending record sharing one, and blocks
    every later record sharing one.
    """

    __slots__ = ()


@dataclass(frozen=True, slots=True)
class SharedKey:
    """Inside :class:`OrderingKeys`: ``key`` is only read, not written.

    Records sharing ``key`` this way need no order among themselves; each still waits for an earlier record
    holding ``key`` itself (and holds back a later one). A table's rows share the table; a change that touches
    the whole table holds it.
    """

    key: Hashable


@dataclass(frozen=True, slots=True)
class Record:
    """One Kinesis record, ready to send."""

    data: bytes
    partition_key: str
    # The row identity whose changes must stay in order; may differ from the
    # partition key (e.g. partition by table, order by primary key).
    ordering_key: Hashable
    # The change's stable id, only used in messages.
    record_id: str
    # Overrides the partition key's hash to pick the shard (aggregated records
    # pin their shard with it). Not counted in ``size``: Kinesis's 1 MiB limit
    # is data plus partition key only (PutRecordsRequestEntry docs).
    explicit_hash_key: str | None = None
    # A barrier (a TRUNCATE) is ordered against every record, whatever its key: everything before it is
    # acknowledged before it is sent, and nothing after it is sent before it is acknowledged.
    barrier: bool = False
    # Bytes counted by Kinesis's limits; computed once because planning reads it
    # on every scan.
    size: int = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        key = self.partition_key
        key_bytes = len(key) if key.isascii() else len(key.encode("utf-8"))
        object.__setattr__(self, "size", len(self.data) + key_bytes)


_object_new = object.__new__
_set_data = Record.data.__set__  # type: ignore[attr-defined]
_set_partition_key = Record.partition_key.__set__  # type: ignore[attr-defined]
_set_ordering_key = Record.ordering_key.__set__  # type: ignore[attr-defined]
_set_record_id = Record.record_id.__set__  # type: ignore[attr-defined]
_set_explicit_hash_key = Record.explicit_hash_key.__set__  # type: ignore[attr-defined]
_set_barrier = Record.barrier.__set__  # type: ignore[attr-defined]
_set_size = Record.size.__set__  # type: ignore[attr-defined]
_RECORD_FIELDS = ("data", "partition_key", "ordering_key", "record_id", "explicit_hash_key", "barrier", "size")


def _new_record(data: bytes, partition_key: str, ordering_key: Hashable, record_id: str,
                barrier: bool = False, explicit_hash_key: str | None = None) -> Record:
    """``Record(data, partition_key, ordering_key, record_id, explicit_hash_key, barrier)`` without the frozen
    dataclass's __init__ (each field through object.__setattr__): one is made per change, and again per change
    read back from the spool."""
    record = _object_new(Record)
    _set_data(record, data)
    _set_partition_key(record, partition_key)
    _set_ordering_key(record, ordering_key)
    _set_record_id(record, record_id)
    _set_explicit_hash_key(record, explicit_hash_key)
    _set_barrier(record, barrier)
    _set_size(record, len(data) + (len(partition_key) if partition_key.isascii() else
                                   len(partition_key.encode("utf-8"))))
    return record


def _slow_record(data: bytes, partition_key: str, ordering_key: Hashable, record_id: str,
                 barrier: bool = False, explicit_hash_key: str | None = None) -> Record:
    return Record(data, partition_key, ordering_key, record_id, explicit_hash_key, barrier)


# The fast constructor only while Record has exactly these slots (else the constructor, slower but right).
new_record = _new_record if tuple(Record.__slots__) == _RECORD_FIELDS else _slow_record


HOT_ROW_CHANGES = 10  # changes of one row in one put from which it is reported as hot


def describe_key(key: Hashable) -> str:
    """An ordering key for people: ``schema.table:key values``, ``schema.table`` for a whole table."""
    if isinstance(key, tuple) and len(key) == 4 and key[0] in ("row", "image"):
        values = key[3]
        if key[0] == "image":
            values = tuple(v for _, v in values)
        return f"{key[1]}.{key[2]}:" + ",".join("NULL" if v is None else str(v) for v in values)
    if isinstance(key, tuple) and len(key) == 3 and key[0] == "table":
        return f"{key[1]}.{key[2]}"
    return str(key)


def hot_rows(records: Sequence[Record], limit: int = 5, threshold: int = HOT_ROW_CHANGES) -> list[tuple[str, int]]:
    """The rows (ordering keys held whole) with the most changes among ``records``, at least ``threshold``.

    Without aggregation each such row costs one PutRecords round trip per change, whatever else runs in
    parallel: ``threshold`` changes of a row take at least ``threshold`` round trips.
    """
    counts: dict[Hashable, int] = {}
    get = counts.get
    for record in records:
        key = record.ordering_key
        if type(key) is OrderingKeys:
            for part in key:
                if type(part) is not SharedKey:
                    counts[part] = get(part, 0) + 1
        else:
            counts[key] = get(key, 0) + 1
    hot = sorted(((n, k) for k, n in counts.items() if n >= threshold), key=lambda item: -item[0])[:limit]
    return [(describe_key(k), n) for n, k in hot]


def split_at_barriers(records: Sequence[Record]) -> list[Sequence[Record]]:
    """The runs of records to send one after another: each barrier alone, the rest between barriers."""
    segments: list[Sequence[Record]] = []
    start = 0
    for i, record in enumerate(records):
        if record.barrier:
            if i > start:
                segments.append(records[start:i])
            segments.append(records[i : i + 1])
            start = i + 1
    if start < len(records):
        segments.append(records[start:])
    return segments


def _valid_hash_key(text: str) -> bool:
    # Kinesis's pattern 0|([1-9]\d{0,38}), and the value must fit in 128 bits.
    if not (0 < len(text) <= 39 and text.isascii() and text.isdigit()) or (len(text) > 1 and text[0] == "0"):
        return False
    return int(text) < MAX_HASH_KEY_EXCLUSIVE


def request_bytes_limit(max_record_bytes: int = MAX_RECORD_BYTES) -> int:
    """PutRecords' limit on a whole request for a stream whose records may have ``max_record_bytes``."""
    return max(MAX_REQUEST_BYTES, min(max_record_bytes, LARGEST_RECORD_BYTES))


def _size_text(n: int) -> str:
    return f"{n / 1024 / 1024:g} MiB" if n % (1024 * 1024) == 0 else f"{n / 1024:g} KiB"


def check_record(record: Record, max_record_bytes: int = MAX_RECORD_BYTES) -> None:
    """Raise if Kinesis would reject ``record`` whatever the batching (``max_record_bytes``: the stream's limit)."""
    key_chars = len(record.partition_key)
    if not MIN_PARTITION_KEY_CHARS <= key_chars <= MAX_PARTITION_KEY_CHARS:
        shown = record.partition_key[:40] + ("..." if key_chars > 40 else "")
        raise SinkError(
            f"record {record.record_id}: partition key {shown!r} has {key_chars} characters; Kinesis "
            f"requires {MIN_PARTITION_KEY_CHARS} to {MAX_PARTITION_KEY_CHARS}. Choose partition key "
            "columns whose values are non-empty and short, or a partition key mode that hashes them."
        )
    hash_key = record.explicit_hash_key
    if hash_key is not None and not _valid_hash_key(hash_key):
        raise SinkError(
            f"record {record.record_id}: explicit hash key {hash_key[:50]!r} is not a decimal integer "
            f"from 0 to 2**128 - 1, which Kinesis requires."
        )
    if record.size > max_record_bytes:
        larger = (
            "raise the stream's maximum record size (aws kinesis update-max-record-size, up to 10 MiB), "
            if max_record_bytes < LARGEST_RECORD_BYTES else ""
        )
        raise RecordTooLargeError(
            f"record {record.record_id} is {record.size} bytes (data plus partition key); the stream "
            f"accepts at most {max_record_bytes} bytes ({_size_text(max_record_bytes)}) per record. Nothing was "
            f"sent and the slot was not advanced. Exclude the large column(s) (--exclude-columns), {larger}"
            "use --oversized truncate, or choose a more compact output format."
        )


# States of the records of one put (``next_request``'s ``states``).
WAITING, IN_FLIGHT, DONE = 0, 1, 2


def next_request(pending: Sequence[Record], max_request_bytes: int = MAX_REQUEST_BYTES, *,
                 states: Sequence[int] | None = None, start: int = 0) -> list[int]:
    """Indexes (ascending) of the ``pending`` records to send in the next PutRecords call.

    ``pending`` holds the unacknowledged records in input order. A record is
    chosen only if no earlier pending record has the same ordering key (or
    shares one of its :class:`OrderingKeys`; keys taken as :class:`SharedKey`
    conflict only with the same key taken whole), so a
    request never holds two changes of one row, and never a change whose
    predecessor is still unacknowledged. Records are assumed to pass
    :func:`check_record`; the first pending record is then always chosen, so
    every call makes progress. Work is O(len(pending)) at worst and stops as
    soon as the request is full.

    With ``states`` (one per record, from ``start`` on) several requests can be in flight: a ``DONE`` record
    (acknowledged) is ignored, an ``IN_FLIGHT`` one (sent, not yet answered) is not sent again but still
    holds its keys, so nothing of its row goes before it is acknowledged; only ``WAITING`` ones are chosen.
    The result may then be empty (everything sendable is in flight).
    """
    chosen: list[int] = []
    blocked: set[Hashable] = set()  # keys held by an earlier pending record
    shared: set[Hashable] = set()  # keys shared (SharedKey) by an earlier pending record
    total = 0
    for index in range(start, len(pending)):
        state = WAITING if states is None else states[index]
        if state == DONE:
            continue
        record = pending[index]
        key = record.ordering_key
        if type(key) is OrderingKeys:
            # Several keys: wait if any conflicts with an earlier record; either way take them all.
            waits = False
            for part in key:
                if type(part) is SharedKey:
                    waits = waits or part.key in blocked
                    shared.add(part.key)
                else:
                    waits = waits or part in blocked or part in shared
                    blocked.add(part)
            if waits:
                continue
        else:
            if key in blocked:
                continue
            # Whether or not it is sent now, later records of this key must wait for it.
            blocked.add(key)
            if key in shared:  # an earlier record shares it: wait for that one
                continue
        if state == IN_FLIGHT:
            continue
        size = record.size
        if total + size > max_request_bytes:
            # Request full by bytes: stop instead of hunting for smaller records
            # further on, which keeps requests close to input order.
            break
        chosen.append(index)
        total += size
        if len(chosen) == MAX_RECORDS_PER_REQUEST:
            break
    return chosen


class _IndexView(Sequence[Record]):
    """``records`` seen through a list of indexes, without copying."""

    __slots__ = ("_indexes", "_records")

    def __init__(self, records: Sequence[Record], indexes: list[int]) -> None:
        self._records = records
        self._indexes = indexes

    def __len__(self) -> int:
        return len(self._indexes)

    @overload
    def __getitem__(self, i: int) -> Record: ...

    @overload
    def __getitem__(self, i: slice) -> list[Record]: ...

    def __getitem__(self, i: int | slice) -> Record | list[Record]:
        if isinstance(i, slice):
            return [self._records[j] for j in self._indexes[i]]
        return self._records[self._indexes[i]]

    def __iter__(self) -> Iterator[Record]:
        records = self._records
        for j in self._indexes:
            yield records[j]


def plan_batch(records: Sequence[Record]) -> Iterator[list[int]]:
    """Lazily yield the requests (as indexes into ``records``) if every entry succeeds.

    Useful to preview or test batching; the sink uses :func:`next_request`
    directly because failed entries stay pending.
    """
    pending = list(range(len(records)))
    view = _IndexView(records, pending)
    while pending:
        chosen = next_request(view)
        yield [pending[i] for i in chosen]
        remove_acknowledged(pending, chosen)


def remove_acknowledged(pending: list[_T], acknowledged: Sequence[int]) -> None:
    """Delete the ascending ``acknowledged`` indexes from ``pending`` in place.

    Only the prefix up to the last acknowledged index is rebuilt; the tail is
    moved by one C-level slice assignment, so a round costs O(prefix) Python work
    rather than O(len(pending)).
    """
    if not acknowledged:
        return
    last = acknowledged[-1]
    drop = set(acknowledged)
    pending[: last + 1] = [item for i, item in enumerate(pending[: last + 1]) if i not in drop]
