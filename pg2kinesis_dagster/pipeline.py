"""One micro-batch end to end, in four steps shared by the Dagster ops and the ``pg2k`` CLI.

    peek -> build (decode, filter, key, format) -> publish -> advance

Guarantees, and what makes them hold:

* Nothing committed is lost: :meth:`Replicator.peek` never consumes the slot, and
  :meth:`Replicator.advance` runs only with a :class:`PublishedBatch`, which only exists once
  Kinesis acknowledged every record of the batch. On any error the slot stays where it was.
* Commit order and per-row order: batches are whole transactions in commit order; the sink never
  sends a row's later change while an earlier one is unacknowledged.
* At-least-once: a failure between publish and advance republishes the batch on the next run;
  every record carries its change's stable id (commit LSN + index) for deduplication.
* Bounded memory: a batch holds at most ``max_changes`` rows / ``max_bytes`` of plugin output
  (plus the rest of the transaction that crosses the limit), however large the backlog.

Each step's output is plain picklable data, so Dagster can persist it between ops and
"re-execute from failure" republishes exactly the same records.
"""

from __future__ import annotations

import dataclasses
import gc
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from pg2kinesis_dagster.core.batching import Record
from pg2kinesis_dagster.core.changes import Transaction, format_lsn
from pg2kinesis_dagster.core.columns import ColumnExclusion
from pg2kinesis_dagster.core.decoders import decoder_for
from pg2kinesis_dagster.core.errors import DecodeError, SinkError
from pg2kinesis_dagster.core.filters import ChangeFilter, parse_operations
from pg2kinesis_dagster.core.formats import make_formatter
from pg2kinesis_dagster.core.keys import PartitionBy
from pg2kinesis_dagster.core.oversize import OversizedPolicy
from pg2kinesis_dagster.core.records import BatchStats, NoKeyPolicy, RecordBuilder
from pg2kinesis_dagster.core.schema_keys import SchemaFollowingKeys
from pg2kinesis_dagster.kinesis.sink import KinesisSink, PutReport
from pg2kinesis_dagster.postgres.catalog import TableKey, load_table_keys
from pg2kinesis_dagster.postgres.connection import PostgresSettings
from pg2kinesis_dagster.postgres.plugin_options import WAL2JSON_NUMBERS_AS_STRINGS, plugin_accepts_option
from pg2kinesis_dagster.postgres.slot import AdvanceResult, PeekedRows, ReplicationSlot
from pg2kinesis_dagster.postgres.types import decoder_options

DEFAULT_MAX_CHANGES = 20_000
DEFAULT_MAX_BYTES = 32 * 1024 * 1024


@dataclass(frozen=True)
class ReplicationSettings:
    """What to replicate and how; the CLI flags and the Dagster resource both fill this."""

    slot_name: str = "pg2kinesis"
    output_plugin: str = "test_decoding"
    # pgoutput only: the publication whose tables are replicated (created with the slot when missing).
    publication: str = "pg2kinesis"
    message_formatter: str = "CSVPayload"
    full_change: bool = False
    table_pat: str | None = None
    exclude_table_pat: str | None = None
    operations: str | None = None
    no_primary_key: str = "publish"
    partition_key: str = "row"
    partition_key_constant: str = "pg2kinesis"
    max_changes: int = DEFAULT_MAX_CHANGES
    max_bytes: int = DEFAULT_MAX_BYTES
    create_slot: bool = False
    recreate_slot: bool = False
    # A record over Kinesis's 1 MiB limit: "fail" the batch, or "truncate" its largest values (core.oversize).
    oversized: str = "fail"
    # JSON format only: typed values (numbers, booleans, nested JSON, arrays) instead of PostgreSQL's text.
    typed_json: bool = False
    # Read the catalog's primary keys again at least this often (schema changes in the stream do it at once).
    key_refresh_seconds: float = 3600.0
    # Columns that never leave the database: "schema.table:col,col;..." (core.columns).
    exclude_columns: str | None = None


@contextmanager
def _gc_paused() -> Iterator[None]:
    """Decoding allocates millions of small acyclic objects, freed by reference counting anyway; the cyclic
    collector's passes over them cost more than half of the decoding time, so it waits for the batch."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def _is_commit(plugin: str) -> Callable[[str | bytes], bool]:
    """Recognise a plugin's commit row, so a peek can stop between transactions."""
    if plugin == "test_decoding":
        return lambda data: isinstance(data, str) and data.startswith("COMMIT")
    if plugin == "wal2json":
        return lambda data: isinstance(data, str) and '"action":"C"' in data[:40]
    if plugin == "pgoutput":
        return lambda data: isinstance(data, bytes | bytearray | memoryview) and bytes(data[:1]) == b"C"
    raise ValueError(plugin)


@dataclass
class PeekedBatch(PeekedRows):
    """What the slot gave, labelled with the slot and plugin it came from (the peek_batch op's output)."""

    slot: str
    plugin: str


@dataclass
class FormattedBatch:
    slot: str
    records: list[Record]
    stats: BatchStats
    start_lsn: int
    advance_to: int | None
    limited: bool
    data_bytes: int


@dataclass
class PublishedBatch:
    """Proof that every record of a batch was acknowledged: only this may advance the slot."""

    slot: str
    advance_to: int | None
    stats: BatchStats
    start_lsn: int
    limited: bool
    data_bytes: int
    put: PutReport | None


@dataclass
class BatchResult:
    published: PublishedBatch
    advance: AdvanceResult | None
    lag_bytes: int | None
    seconds: float

    @property
    def limited(self) -> bool:
        return self.published.limited

    def summary(self) -> dict[str, object]:
        stats = self.published.stats
        return {
            "slot": self.published.slot,
            "start_lsn": format_lsn(self.published.start_lsn),
            "end_lsn": format_lsn(self.advance.after or self.advance.target)
            if self.advance and (self.advance.after or self.advance.target)
            else None,
            "transactions": stats.transactions,
            "changes": stats.changes,
            "published": stats.published,
            "filtered": stats.filtered,
            "skipped_no_primary_key": stats.skipped_no_key,
            "record_bytes": stats.record_bytes,
            "truncated_records": stats.truncated_records,
            "plugin_bytes": self.published.data_bytes,
            "lag_bytes": self.lag_bytes,
            "seconds": round(self.seconds, 3),
        }


@dataclass
class DrainResult:
    batches: int = 0
    stats: BatchStats = field(default_factory=BatchStats)
    seconds: float = 0.0
    last: BatchResult | None = None


class TableKeyCache:
    """The catalog's primary keys, reloaded when a change names a table we have not seen."""

    def __init__(self, load: Callable[[], dict[tuple[str, str], TableKey]]) -> None:
        self._load = load
        self._tables: dict[tuple[str, str], TableKey] | None = None
        self._missing: set[tuple[str, str]] = set()

    def tables(self) -> dict[tuple[str, str], TableKey]:
        if self._tables is None:
            self.reload()
        assert self._tables is not None
        return self._tables

    def reload(self) -> None:
        self._tables = self._load()
        self._missing.clear()

    def key_columns(self, schema: str, table: str) -> tuple[str, ...] | None:
        name = (schema, table)
        found = self.tables().get(name)
        if found is None and name not in self._missing:
            self.reload()
            found = self.tables().get(name)
            if found is None:
                # Dropped since the change was committed: remember, so we reload once, not per change.
                self._missing.add(name)
        return found.key_columns if found is not None else None


class Replicator:
    """Drives one slot into one stream. The Dagster ops call the steps; the CLI calls :meth:`drain`."""

    def __init__(self, pg: PostgresSettings, sink: KinesisSink, settings: ReplicationSettings) -> None:
        self.pg = pg
        self.sink = sink
        self.settings = settings
        self.decoder = decoder_for(
            settings.output_plugin, **decoder_options(settings.output_plugin, pg, publication=settings.publication)
        )
        self.is_commit = _is_commit(settings.output_plugin)
        self.slot = ReplicationSlot(
            pg, settings.slot_name, settings.output_plugin,
            publication=settings.publication if settings.output_plugin == "pgoutput" else None,
        )
        self.keys = TableKeyCache(lambda: load_table_keys(pg))
        # Keys as the stream goes: the plugin's own word, or the catalog re-read at each schema change.
        self.schema_keys = SchemaFollowingKeys(self.keys, max_age_seconds=settings.key_refresh_seconds)
        self.builder = RecordBuilder(
            formatter=make_formatter(
                settings.message_formatter, full_change=settings.full_change, typed=settings.typed_json
            ),
            key_lookup=self.schema_keys.key_columns,
            change_filter=ChangeFilter(
                table_pat=settings.table_pat,
                exclude_table_pat=settings.exclude_table_pat,
                operations=parse_operations(settings.operations),
            ),
            partition_by=PartitionBy.parse(settings.partition_key),
            partition_constant=settings.partition_key_constant,
            no_key_policy=NoKeyPolicy.parse(settings.no_primary_key),
            oversized=OversizedPolicy.parse(settings.oversized),
            exclude_columns=ColumnExclusion.parse(settings.exclude_columns),
        )
        self._prepared = False

    def close(self) -> None:
        self.slot.close()

    def __enter__(self) -> Replicator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- the four steps ------------------------------------------------------------------
    def prepare(self) -> None:
        """Check (or create) the slot and the stream before reading anything."""
        if not self._prepared:
            self.slot.ensure(create=self.settings.create_slot, recreate=self.settings.recreate_slot)
            if self.settings.output_plugin == "wal2json" and plugin_accepts_option(
                    self.slot, self.decoder.slot_options, WAL2JSON_NUMBERS_AS_STRINGS):
                # wal2json >= 2.6: numbers as strings keep NaN/Infinity apart from NULL.
                self.decoder = decoder_for("wal2json", numbers_as_strings=True,
                                           **decoder_options("wal2json", self.pg))
            self.sink.check_stream()
            if self.builder.exclude_columns:  # a key column named there is refused before anything is read
                self.builder.exclude_columns.check_catalog(
                    {name: key.key_columns for name, key in self.keys.tables().items()})
            # Oversized records are judged (and truncated) against the stream's own limit: 1 MiB unless raised.
            self.builder = dataclasses.replace(self.builder, max_record_bytes=self.sink.max_record_bytes)
            self._prepared = True

    def peek(self, upto_lsn: int | None = None) -> PeekedBatch:
        self.prepare()
        peeked = self.slot.peek(
            options=self.decoder.slot_options,
            max_changes=self.settings.max_changes,
            max_bytes=self.settings.max_bytes,
            is_commit=self.is_commit,
            upto_lsn=upto_lsn,
            binary=self.settings.output_plugin == "pgoutput",
        )
        return PeekedBatch(**vars(peeked), slot=self.slot.name, plugin=self.settings.output_plugin)

    def decode(self, peeked: PeekedBatch) -> Iterator[Transaction]:
        try:
            yield from self.schema_keys.follow(self.decoder.decode(peeked.rows), self.decoder)
        except DecodeError as exc:
            raise exc.with_slot(peeked.slot) from None

    def build(self, peeked: PeekedBatch) -> FormattedBatch:
        with _gc_paused():
            records, stats = self.builder.build(self.decode(peeked))
        return FormattedBatch(
            slot=peeked.slot,
            records=records,
            stats=stats,
            start_lsn=peeked.start_lsn,
            advance_to=peeked.advance_to,
            limited=peeked.limited,
            data_bytes=peeked.data_bytes,
        )

    def publish(self, formatted: FormattedBatch) -> PublishedBatch:
        try:
            report = self.sink.put(formatted.records) if formatted.records else None
        except SinkError as exc:
            raise self._with_slot_position(exc, formatted) from exc
        return PublishedBatch(
            slot=formatted.slot,
            advance_to=formatted.advance_to,
            stats=formatted.stats,
            start_lsn=formatted.start_lsn,
            limited=formatted.limited,
            data_bytes=formatted.data_bytes,
            put=report,
        )

    def _with_slot_position(self, exc: SinkError, formatted: FormattedBatch) -> SinkError:
        """The sink's error plus where the slot stands, so the operator knows what the next run resends."""
        try:
            state = self.slot.state()
            position = state.confirmed_flush_lsn if state is not None else None
        except Exception:  # PostgreSQL unreachable as well: say where the slot stood when the batch was read
            position = formatted.start_lsn
        where = format_lsn(position) if position is not None else "(unknown)"
        target = ""
        if formatted.advance_to is not None:
            target = f"; this batch would have moved it to {format_lsn(formatted.advance_to)}"
        message = (f"{exc} Replication slot {formatted.slot!r} stays at {where} (not advanced{target}); the next "
                   "run starts from there.")
        try:
            wrapped = type(exc)(message)
        except TypeError:  # a subclass with another constructor: keep the message, lose the subtype
            wrapped = SinkError(message)
        wrapped.__dict__.update(exc.__dict__)
        return wrapped

    def advance(self, published: PublishedBatch) -> AdvanceResult | None:
        if published.advance_to is None:
            return None
        return self.slot.advance(published.advance_to)

    # -- whole batches -------------------------------------------------------------------
    def run_batch(self, upto_lsn: int | None = None) -> BatchResult:
        started = time.perf_counter()
        published = self.publish(self.build(self.peek(upto_lsn)))
        advanced = self.advance(published)
        return BatchResult(
            published=published,
            advance=advanced,
            lag_bytes=self.slot.lag_bytes(),
            seconds=time.perf_counter() - started,
        )

    def drain(
        self,
        *,
        upto_lsn: int | None = None,
        max_batches: int | None = None,
        on_batch: Callable[[BatchResult], None] | None = None,
    ) -> DrainResult:
        """Publish everything committed before ``upto_lsn`` (default: the WAL position now)."""
        self.prepare()
        if upto_lsn is None:
            upto_lsn = self.slot.current_wal_lsn()
        result = DrainResult()
        started = time.perf_counter()
        while max_batches is None or result.batches < max_batches:
            batch = self.run_batch(upto_lsn)
            result.batches += 1
            result.stats.merge(batch.published.stats)
            result.last = batch
            if on_batch is not None:
                on_batch(batch)
            if not batch.limited:
                break
        result.seconds = time.perf_counter() - started
        return result
