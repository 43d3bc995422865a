"""The change model: what every decoder produces and every formatter consumes.

Pure data, no I/O. Decoders (one per output plugin) turn slot rows into
:class:`Transaction` objects holding :class:`Change` objects; formatters turn a
change into bytes; the sink never looks inside.

Values keep PostgreSQL's text form (``None`` is SQL NULL) so that nothing is
lost or reinterpreted on the way; typing them is a formatter's job.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Protocol


class Operation(str, Enum):
    INSERT = "INSERT"
    UPDATE = "UPDATE"
    DELETE = "DELETE"
    TRUNCATE = "TRUNCATE"
    # A row as a table snapshot read it (core.snapshot): apply it as an upsert of its key.
    SNAPSHOT = "SNAPSHOT"


def parse_lsn(text: str) -> int:
    """``'16/B374D848'`` -> the LSN as a 64-bit integer."""
    high, _, low = text.partition("/")
    if not low:
        raise ValueError(f"not an LSN: {text!r} (expected 'X/Y' in hexadecimal)")
    return (int(high, 16) << 32) | int(low, 16)


def format_lsn(lsn: int) -> str:
    """The 64-bit integer -> PostgreSQL's ``'X/Y'`` text form."""
    return f"{lsn >> 32:X}/{lsn & 0xFFFFFFFF:X}"


@dataclass(frozen=True, slots=True)
class Column:
    """One column of a row image, as the plugin printed it."""

    name: str
    type: str
    value: str | None
    # test_decoding prints "unchanged-toast-datum" for a TOASTed value that an
    # UPDATE did not touch: the value is unknown here, never invent one.
    unchanged_toast: bool = False


def _new_column(name: str, type_: str, value: str | None) -> Column:
    """Column(name, type_, value) without the frozen dataclass's __init__.

    A frozen dataclass sets each field through object.__setattr__, which made building
    columns the largest cost of decoding; the slot descriptors do the same work directly.
    """
    column = _object_new(Column)
    _set_name(column, name)
    _set_type(column, type_)
    _set_value(column, value)
    _set_unchanged_toast(column, False)
    return column


_object_new = object.__new__
if (
    tuple(f.name for f in dataclasses.fields(Column)) == ("name", "type", "value", "unchanged_toast")
    and "__slots__" in vars(Column)
    and not hasattr(Column, "__post_init__")
):
    _set_name = Column.name.__set__  # type: ignore[attr-defined]
    _set_type = Column.type.__set__  # type: ignore[attr-defined]
    _set_value = Column.value.__set__  # type: ignore[attr-defined]
    _set_unchanged_toast = Column.unchanged_toast.__set__  # type: ignore[attr-defined]
    # The decoders' hot path: a Column with unchanged_toast=False.
    new_column: Callable[[str, str, str | None], Column] = _new_column
else:  # Column changed shape: its constructor, slower but always right
    new_column = Column


@dataclass(slots=True)
class Change:
    """One row change (or one truncated table) inside a committed transaction."""

    xid: int
    lsn: int  # LSN of this change's WAL record
    index: int  # position inside its transaction, from 0; with commit_lsn it makes the id
    schema: str
    table: str
    op: Operation
    # New row image (INSERT, UPDATE) or None.
    after: tuple[Column, ...] | None = None
    # Old row image or old key (UPDATE with a key change or REPLICA IDENTITY FULL,
    # DELETE) or None when the plugin did not print it.
    before: tuple[Column, ...] | None = None
    # TRUNCATE options as printed (e.g. ("restart_seqs", "cascade")).
    truncate_flags: tuple[str, ...] = ()
    # Filled when the transaction is complete.
    commit_lsn: int = 0
    commit_time: str | None = None
    # Filled by the pipeline from the catalog: primary-key column -> value,
    # or None when the table has no primary key.
    pk: dict[str, str | None] | None = None

    @property
    def qualified_table(self) -> str:
        return f"{self.schema}.{self.table}"

    @property
    def id(self) -> str:
        """Unique and stable per change: a rerun of the same batch yields the same ids."""
        return f"{format_lsn(self.commit_lsn)}:{self.index}"


# -- lazily decoded row images ---------------------------------------------------------------------

Image = tuple[Column, ...]


class PendingImages(Protocol):
    """What a decoder keeps of a change whose row images it has validated but not parsed yet."""

    def images(self) -> tuple[Image | None, Image | None]:
        """``(after, before)`` exactly as the decoder would have built them."""
        ...

    def key(self, key_columns: Sequence[str]) -> dict[str, str | None] | None:
        """The key values by :func:`~pg2kinesis_dagster.core.keys.extract_pk`'s rules (None without any image),
        parsing no more than needed."""
        ...


_after_slot = Change.after  # the dataclass's slot descriptors, storage for LazyChange's properties
_before_slot = Change.before


class LazyChange(Change):
    """A :class:`Change` whose ``after``/``before`` are parsed on first access (decoders' ``lazy_images`` mode).

    A key-only format (CSV, CSVPayload without full change) then never pays for the row's other columns: the
    key comes from :meth:`PendingImages.key`. Reading ``after`` or ``before`` gives exactly the tuples the eager
    decoder builds; equality, ``dataclasses.replace`` and pickling see those parsed images.
    """

    __slots__ = ("_pending",)

    def _parse(self) -> None:
        pending = self._pending
        self._pending = None
        after, before = pending.images()
        _after_slot.__set__(self, after)
        _before_slot.__set__(self, before)

    @property  # type: ignore[override]
    def after(self) -> Image | None:
        if self._pending is not None:
            self._parse()
        return _after_slot.__get__(self)

    @after.setter
    def after(self, value: Image | None) -> None:
        if getattr(self, "_pending", None) is not None:
            self._parse()
        else:
            self._pending = None
        _after_slot.__set__(self, value)

    @property  # type: ignore[override]
    def before(self) -> Image | None:
        if self._pending is not None:
            self._parse()
        return _before_slot.__get__(self)

    @before.setter
    def before(self, value: Image | None) -> None:
        if getattr(self, "_pending", None) is not None:
            self._parse()
        else:
            self._pending = None
        _before_slot.__set__(self, value)

    @property
    def pending(self) -> PendingImages | None:
        """The unparsed images, or None once parsed."""
        return self._pending

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Change):
            return NotImplemented
        return all(getattr(self, f.name) == getattr(other, f.name) for f in dataclasses.fields(Change))

    __hash__ = None  # type: ignore[assignment]  # as the dataclass: mutable, unhashable

    def __reduce__(self) -> tuple[type[Change], tuple[object, ...]]:
        # Pickled as a plain Change with its images parsed (the pending state holds the decoder).
        return Change, tuple(getattr(self, f.name) for f in dataclasses.fields(Change))


_set_xid = Change.xid.__set__  # type: ignore[attr-defined]
_set_lsn = Change.lsn.__set__  # type: ignore[attr-defined]
_set_index = Change.index.__set__  # type: ignore[attr-defined]
_set_schema = Change.schema.__set__  # type: ignore[attr-defined]
_set_table = Change.table.__set__  # type: ignore[attr-defined]
_set_op = Change.op.__set__  # type: ignore[attr-defined]
_set_flags = Change.truncate_flags.__set__  # type: ignore[attr-defined]
_set_commit_lsn = Change.commit_lsn.__set__  # type: ignore[attr-defined]
_set_commit_time = Change.commit_time.__set__  # type: ignore[attr-defined]
_set_pk = Change.pk.__set__  # type: ignore[attr-defined]
_set_pending = LazyChange._pending.__set__  # type: ignore[attr-defined]
if tuple(f.name for f in dataclasses.fields(Change)) != (
    "xid", "lsn", "index", "schema", "table", "op", "after", "before", "truncate_flags", "commit_lsn",
    "commit_time", "pk",
):  # pragma: no cover - a reminder, checked at import
    raise ImportError("Change changed shape: update lazy_change()")


def lazy_change(xid: int, lsn: int, index: int, schema: str, table: str, op: Operation,
                pending: PendingImages) -> LazyChange:
    """A row change whose images ``pending`` will parse when first read (without the dataclass __init__)."""
    change = _object_new(LazyChange)
    _set_xid(change, xid)
    _set_lsn(change, lsn)
    _set_index(change, index)
    _set_schema(change, schema)
    _set_table(change, table)
    _set_op(change, op)
    _after_slot.__set__(change, None)
    _before_slot.__set__(change, None)
    _set_flags(change, ())
    _set_commit_lsn(change, 0)
    _set_commit_time(change, None)
    _set_pk(change, None)
    _set_pending(change, pending)
    return change


@dataclass(slots=True)
class Transaction:
    """A committed transaction: changes are only ever published whole."""

    xid: int
    begin_lsn: int
    commit_lsn: int  # LSN the slot is advanced to once this transaction is published
    commit_time: str | None
    changes: list[Change] = field(default_factory=list)
    # Bytes of plugin output this transaction took, for batch accounting.
    size: int = 0
    # Index in the whole transaction of ``changes[0]``: above 0 for the later parts of a
    # transaction decoded in parts (see :meth:`split`).
    first_index: int = 0
    # A part that is not the transaction's last: its commit comes later, so ``commit_lsn`` is 0
    # and the changes are unstamped until the caller stamps them with :meth:`commit`.
    partial: bool = False
    # A table snapshot's watermark (core.snapshot): the content of a non-transactional logical message with
    # the snapshot prefix, yielded as a transaction without changes at the message's LSN (``commit_lsn``).
    message: str | None = None

    def split(self) -> Transaction:
        """Hand the changes decoded so far over as a partial part, keeping the transaction open.

        A transaction of millions of rows is then decoded in parts of bounded size; the decoder
        goes on with the next change's index, and the caller stamps each part with the commit it
        learns from the plugin's commit row (which only comes at the end).
        """
        part = Transaction(self.xid, self.begin_lsn, 0, None, self.changes, self.size, self.first_index, True)
        self.first_index += len(self.changes)
        self.changes = []
        self.size = 0
        return part

    def commit(self, commit_lsn: int, commit_time: str | None) -> None:
        """Stamp the transaction and each of its changes with the commit that makes them final."""
        self.commit_lsn = commit_lsn
        self.commit_time = commit_time
        for change in self.changes:
            change.commit_lsn = commit_lsn
            change.commit_time = commit_time


# One row of pg_logical_slot_peek_changes: (lsn, xid, data). The slot adapter
# converts the LSN to an int; data is text for text plugins, bytes for pgoutput.
SlotRow = tuple[int, int, "str | bytes"]
