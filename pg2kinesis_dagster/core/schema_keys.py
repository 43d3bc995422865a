"""Primary keys that follow the schema as the change stream goes: each change keyed as its table was then.

The catalog only tells the keys of *now*, while a batch holds changes written before and after a DDL
(``ALTER TABLE ... ADD PRIMARY KEY``, a key column dropped, a table created). :class:`SchemaFollowingKeys`
sits between the decoder and the record builder and answers ``key_columns(schema, table)`` in stream
order, from the best source there is:

1. The plugin's own word, taken from the historic catalog PostgreSQL decodes with: pgoutput's Relation
   messages flag the replica-identity columns (with ``REPLICA IDENTITY DEFAULT`` those are the primary key,
   or none), and wal2json prints each change's primary key (``include-pk``). A decoder offers it as
   ``relation_key(schema, table)``: the key as of the change it decoded last (None: it does not know).
2. Otherwise the catalog, read again when the stream shows a schema change: a transaction without row
   changes (test_decoding and wal2json print the DDL's BEGIN/COMMIT), or a decoder's ``schema_changes``
   counter moving (pgoutput sends a new Relation message after a DDL). A table whose key the catalog shows
   changed by a transaction that comes *later* in the stream (its ``changed_by_xid`` follows the one being
   read) keeps its old key until that transaction goes by (in this batch or a later one), so several DDL
   each take effect at their own place; a later catalog read at a transaction assigned after it makes the
   switch too (a DDL in a subtransaction, whose xid the stream never shows).
3. And at least every ``max_age_seconds`` the catalog is read again anyway (a long-running ``pg2k``).

Limits: keys of changes read before the first catalog load (a backlog older than the process) are the
catalog's of that moment; a schema change inside a transaction that also changes rows takes effect at that
transaction's commit. Both affect test_decoding only, whose output carries no key.

It relies on the builder pulling transactions from :meth:`follow` one at a time (the decoders and
``RecordBuilder.build`` stream), so a key is looked up right after its transaction was decoded.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Protocol

from pg2kinesis_dagster.core.changes import Transaction

Name = tuple[str, str]
KeyColumns = tuple[str, ...]


class CatalogKey(Protocol):
    key_columns: KeyColumns
    changed_by_xid: int | None


class Catalog(Protocol):
    """What :class:`pipeline.TableKeyCache` offers: the catalog's keys, reloadable."""

    def tables(self) -> Mapping[Name, CatalogKey]: ...

    def reload(self) -> None: ...

    def key_columns(self, schema: str, table: str) -> KeyColumns | None: ...


def xid_precedes(a: int, b: int) -> bool:
    """PostgreSQL's TransactionIdPrecedes for normal 32-bit xids: ``a`` was assigned before ``b``."""
    return ((a - b) & 0xFFFFFFFF) >= 0x80000000


class SchemaFollowingKeys:
    def __init__(
        self, catalog: Catalog, *, max_age_seconds: float | None = 3600.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._catalog = catalog
        self._max_age = max_age_seconds
        self._clock = clock
        self._loaded_at = clock()
        # Keys in force at the current point of the stream, per table seen so far.
        self._effective: dict[Name, KeyColumns | None] = {}
        # Switches waiting for a later transaction of the stream: xid -> {table: key}.
        self._deferred: dict[int, dict[Name, KeyColumns]] = {}
        # A catalog read is due before the next lookup: (due, at which transaction's xid or None).
        self._reload_due = False
        self._reload_at: int | None = None
        self._hint: Callable[[str, str], KeyColumns | None] | None = None
        self._schema_changes: Callable[[], int] | None = None
        self._schema_changes_seen = 0
        self.reloads = 0  # catalog reads triggered here (for tests and metadata)
        # Moves whenever the keys in force may have changed (a catalog read, a deferred switch): whoever caches
        # key_columns() answers (core.copy_window's compiled lane) drops them when it moves.
        self.generation = 0
        self._started = False

    # -- the stream ------------------------------------------------------------------------------------

    def start(self, decoder: object) -> None:
        """Get ready to key ``decoder``'s changes (what :meth:`follow` does first; callers that key changes
        they did not pass through :meth:`follow` call it before the first lookup)."""
        if not self._started:
            # The catalog as of the first batch: the keys in force before any DDL the stream will show.
            self._catalog.tables()
            self._loaded_at = self._clock()
            self._started = True
        self._hint = getattr(decoder, "relation_key", None)
        counter = getattr(decoder, "schema_changes", None)
        self._schema_changes = (lambda: int(getattr(decoder, "schema_changes", 0))) if counter is not None else None

    @property
    def reload_due(self) -> bool:
        """Whether the next lookup reads the catalog again (answers cached before then are stale)."""
        return self._reload_due

    def deferred_xids(self) -> frozenset[int]:
        """Transactions whose passing switches some table's key (see :meth:`follow`)."""
        return frozenset(self._deferred)

    def check_age(self) -> None:
        """:meth:`follow`'s periodic re-read, for transactions keyed without passing through it."""
        if self._max_age is not None and self._clock() - self._loaded_at > self._max_age:
            self._reload_due, self._reload_at = True, None

    def follow(self, transactions: Iterable[Transaction], decoder: object) -> Iterator[Transaction]:
        """Yield ``transactions`` unchanged, noting the schema changes they reveal."""
        self.start(decoder)
        for txn in transactions:
            if self._deferred and txn.xid in self._deferred:
                self._effective.update(self._deferred.pop(txn.xid))
                self.generation += 1
            if not txn.changes and txn.message is None and txn.first_index == 0:
                # Only catalog rows changed: a DDL (or ANALYZE, a temporary table). Read the catalog before the
                # next change is keyed. (A transaction decoded in parts may end with an empty last part: its
                # first_index tells it apart.)
                self._reload_due, self._reload_at = True, txn.xid
            elif self._schema_changes is not None and self._schema_changes() != self._schema_changes_seen:
                # A Relation message came with this transaction's changes (pgoutput): read the catalog, and let
                # changes of a DDL assigned after this transaction wait for a later one.
                self._schema_changes_seen = self._schema_changes()
                self._reload_due, self._reload_at = True, txn.xid
            if self._max_age is not None and self._clock() - self._loaded_at > self._max_age:
                self._reload_due, self._reload_at = True, None
            yield txn

    # -- lookups -----------------------------------------------------------------------------------------

    def key_columns(self, schema: str, table: str) -> KeyColumns | None:
        hint = self._hint
        if hint is not None:
            known = hint(schema, table)
            if known is not None:
                return known
        if self._reload_due:
            self._reload()
        name = (schema, table)
        try:
            return self._effective[name]
        except KeyError:
            key = self._catalog.key_columns(schema, table)
            self._effective[name] = key
            return key

    def _reload(self) -> None:
        at = self._reload_at
        self._reload_due, self._reload_at = False, None
        # Tables not looked up yet have the key of the previous read in force, too.
        before = {name: key.key_columns for name, key in self._catalog.tables().items()}
        before.update(self._effective)
        self._catalog.reload()
        self.reloads += 1
        self.generation += 1
        self._loaded_at = self._clock()
        tables = self._catalog.tables()
        for name, current in before.items():
            found = tables.get(name)
            if found is None:
                continue  # dropped since: its remaining changes keep the key they had
            self._effective.setdefault(name, current)
            if found.key_columns == current:
                continue
            changed_by = found.changed_by_xid
            if at is not None and changed_by is not None and changed_by != at and xid_precedes(at, changed_by):
                # Changed by a transaction assigned after the one we are at: most likely still ahead.
                self._deferred.setdefault(changed_by, {})[name] = found.key_columns
            else:
                self._effective[name] = found.key_columns
                for switches in self._deferred.values():
                    switches.pop(name, None)
