"""Exact, streaming parser for the ``test_decoding`` output plugin (PostgreSQL 15).

The grammar is the one printed by ``contrib/test_decoding/test_decoding.c``:

* ``BEGIN [xid]`` and ``COMMIT [xid] [(at <timestamptz>)]``;
* ``table <schema>.<table>: INSERT|UPDATE|DELETE: ...`` where the tuple is a
  sequence of `` name[type]:value`` (see ``tuple_to_stringinfo``) and UPDATE may
  carry `` old-key: <tuple> new-tuple:`` before the new tuple;
* ``table <qn>[, <qn>...]: TRUNCATE: (no-flags)|restart_seqs|cascade|restart_seqs cascade``;
* ``message: transactional: 0|1 prefix: ...`` lines, which carry no row change.

Names are ``quote_identifier`` output (bare ``[a-z_][a-z0-9_]*`` or double-quoted
with ``""``); types are ``format_type_be`` output, kept verbatim; values follow
``print_literal``. Everything is matched by precompiled regular expressions so the
per-character work happens in C; the Python loop runs once per column. A line
that does not fit the grammar raises :class:`DecodeError`: guessing would
publish wrong data.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Sequence

from pg2kinesis_dagster.core.changes import (
    Change,
    Column,
    Image,
    Operation,
    SlotRow,
    Transaction,
    lazy_change,
    new_column,
)
from pg2kinesis_dagster.core.errors import DecodeError
from pg2kinesis_dagster.core.snapshot import message_transaction, snapshot_content

# quote_identifier(): bare when it is [a-z_][a-z0-9_]* (and not a keyword),
# otherwise double-quoted with embedded quotes doubled. The quoted form is
# written "unrolled" so that every quoted token has exactly one way to match
# (no catastrophic backtracking on hostile input).
_QUOTED = r'"[^"]*(?:""[^"]*)*"'
_IDENT = rf"(?:[a-z_][a-z0-9_]*|{_QUOTED})"

# format_type_be(): words, spaces, dots, parentheses, commas, quoted parts
# (which may hold anything, ']' and ':' included) and an array suffix "[]".
# Outside quotes a ']' only appears in "[]", so "]:" ends the type. The (?!")
# makes two adjacent quoted parts impossible, keeping the match unique.
_TYPE = rf'[^"\[\]]*(?:(?:\[\]|{_QUOTED}(?!"))[^"\[\]]*)*'

# print_literal() plus the special words of tuple_to_stringinfo(). As groups:
# quoted literal content ('' for a quote; may span lines), special word,
# unquoted number (int2/4/8, oid, float4/8, numeric), bit string B'0101'.
_VALUE_GROUPS = (
    r"'([^']*(?:''[^']*)*)'"
    r"|(null|true|false|unchanged-toast-datum)"
    r"|(-?(?:[0-9]+(?:\.[0-9]+)?(?:e[+-][0-9]+)?|Infinity)|NaN)"
    r"|(B'[01]*')"
)

# One column: groups (header, name token, type, *value groups, junk). A value
# is always followed by the next column's space or by the end of the tuple. The
# trailing "|([\s\S]+)" alternative swallows the rest of the tuple as soon as a
# column does not match, so one C-level scan both splits and validates a tuple.
_COLUMN_OR_JUNK = re.compile(rf" (({_IDENT})\[({_TYPE})\]):(?:{_VALUE_GROUPS})(?= |\Z)|([\s\S]+)")
# A whole tuple, used where its end must be found (old-key ... new-tuple:).
_TUPLE = re.compile(rf"(?: {_IDENT}\[{_TYPE}\]:(?:{_VALUE_GROUPS})(?= |\Z))*")

_ROW_HEAD = re.compile(rf"table (({_IDENT})\.({_IDENT})): (INSERT|UPDATE|DELETE):")
_TRUNCATE = re.compile(
    rf"table ({_IDENT}\.{_IDENT}(?:, {_IDENT}\.{_IDENT})*): TRUNCATE: "
    r"(\(no-flags\)|restart_seqs cascade|restart_seqs|cascade)"
)
_QUALIFIED = re.compile(rf"({_IDENT})\.({_IDENT})")
_BEGIN = re.compile(r"BEGIN(?: ([0-9]+))?")
_COMMIT = re.compile(r"COMMIT(?: ([0-9]+))?(?: \(at ([^()]+)\))?")

_NO_TUPLE = " (no-tuple-data)"
_OLD_KEY = " old-key:"
_NEW_TUPLE = " new-tuple:"
_MESSAGE = ("message: transactional: 0 prefix: ", "message: transactional: 1 prefix: ")

_OPS = {op.value: op for op in Operation if op is not Operation.SNAPSHOT}  # SNAPSHOT: never printed
_TRUNCATE_FLAGS: dict[str, tuple[str, ...]] = {
    "(no-flags)": (),
    "restart_seqs": ("restart_seqs",),
    "cascade": ("cascade",),
    "restart_seqs cascade": ("restart_seqs", "cascade"),
}

# Caches of unquoted names: column headers and table names repeat on almost
# every line, so unquoting once and sharing the strings saves time and memory.
# Bounded so that a stream of ever-new names cannot grow them without limit.
_CACHE_LIMIT = 10_000
# decode() without a part size: transactions are yielded whole.
_NO_LIMIT = 1 << 62


# Cached per column header: (name, type, prebuilt columns for the special words).
_Header = tuple[str, str, dict[str, Column]]


_column = new_column


def _unquote(token: str) -> str:
    """A quote_identifier() token -> the real name."""
    if token[0] == '"':
        return token[1:-1].replace('""', '"')
    return token


class TestDecodingDecoder:
    """Decoder for slots created with the ``test_decoding`` plugin."""

    __test__ = False  # the name starts with "Test"; it is not a pytest class

    plugin: str = "test_decoding"
    # include-xids/include-timestamp fill Transaction.xid/commit_time;
    # skip-empty-xacts=0 makes empty transactions visible so the slot can be
    # advanced past them (otherwise a quiet table would pin WAL forever).
    slot_options: tuple[str, ...] = (
        "include-xids", "1",
        "include-timestamp", "1",
        "skip-empty-xacts", "0",
    )

    def __init__(self, *, lazy_images: bool = False) -> None:
        """``lazy_images``: validate every row image as it is read, but parse it only when it is used
        (:class:`~pg2kinesis_dagster.core.changes.LazyChange`): a key-only format then costs a fraction of
        the work. Errors are the same, raised at the same place; the parsed images are the same."""
        self._headers: dict[str, _Header] = {}
        self._tables: dict[str, tuple[str, str]] = {}
        self.lazy_images = lazy_images

    @staticmethod
    def is_commit(data: str | bytes) -> bool:
        """Whether a row is a transaction's commit (where a slot may be advanced to)."""
        return isinstance(data, str) and data.startswith("COMMIT")

    @staticmethod
    def commit_time(data: str | bytes) -> str | None:
        """The commit time a commit row carries, as :meth:`decode` stamps it."""
        m = _COMMIT.fullmatch(data) if isinstance(data, str) else None
        if m is None:
            raise DecodeError("malformed COMMIT line", text=data)
        return m.group(2)

    def decode(self, rows: Iterable[SlotRow], part_size: int | None = None, *,
               open_transaction: Transaction | None = None, begin_xid: str | None = None) -> Iterator[Transaction]:
        """Yield each committed transaction of ``rows`` (lsn, xid, data), in order.

        Streams: only the transaction being read is held, and with ``part_size`` at most that
        many of its changes (:meth:`Transaction.split` parts). A trailing transaction without its
        COMMIT is not yielded (it is not complete).

        ``open_transaction`` resumes inside a transaction whose BEGIN (printing ``begin_xid``) was read
        elsewhere (core.copy_window's compiled lane): ``rows`` continue it, its changes are numbered from its
        ``first_index``; parts split off it advance that index, so the caller reads where it stands.
        """
        part_limit = part_size or _NO_LIMIT
        txn: Transaction | None = open_transaction
        changes: list[Change] = txn.changes if txn is not None else []
        for lsn, xid, data in rows:
            if not isinstance(data, str):
                raise DecodeError("test_decoding rows must be text, got bytes", lsn=lsn, text=data)
            if data.startswith("table "):  # the common case first
                if txn is None:
                    raise DecodeError("row change outside a transaction (no BEGIN before it)",
                                      lsn=lsn, text=data)
                txn.size += len(data)
                self._change(data, lsn, txn, changes)
                if len(changes) >= part_limit:
                    yield txn.split()
                    changes = txn.changes
            elif data.startswith("BEGIN"):
                m = _BEGIN.fullmatch(data)
                if m is None:
                    raise DecodeError("malformed BEGIN line", lsn=lsn, text=data)
                if txn is not None:
                    raise DecodeError("BEGIN while the previous transaction has no COMMIT",
                                      lsn=lsn, text=data)
                begin_xid = m.group(1)
                # The row's xid is authoritative; the printed one is a fallback.
                txn_xid = int(xid) if xid else int(begin_xid) if begin_xid else 0
                txn = Transaction(txn_xid, lsn, 0, None, [], len(data))
                changes = txn.changes
            elif data.startswith("COMMIT"):
                m = _COMMIT.fullmatch(data)
                if m is None:
                    raise DecodeError("malformed COMMIT line", lsn=lsn, text=data)
                if txn is None:
                    raise DecodeError("COMMIT without a BEGIN", lsn=lsn, text=data)
                commit_xid = m.group(1)
                if begin_xid and commit_xid and begin_xid != commit_xid:
                    raise DecodeError(f"COMMIT of transaction {commit_xid} inside transaction {begin_xid}",
                                      lsn=lsn, text=data)
                txn.size += len(data)
                txn.commit(lsn, m.group(2))
                yield txn
                txn = None
                changes = []
            elif data.startswith(_MESSAGE):
                # pg_logical_emit_message(): no row change; it still counts
                # towards the transaction's size. A snapshot watermark (outside any
                # transaction) is yielded as a message transaction (core.snapshot).
                if txn is not None:
                    txn.size += len(data)
                elif (content := snapshot_content(self.plugin, data)) is not None:
                    yield message_transaction(lsn, content, len(data))
            else:
                raise DecodeError("unknown test_decoding line", lsn=lsn, text=data)

    # -- row changes -----------------------------------------------------------------

    def _change(self, line: str, lsn: int, txn: Transaction, out: list[Change]) -> None:
        head = _ROW_HEAD.match(line)
        if head is None:
            self._truncate(line, lsn, txn, out)
            return
        qualified = head.group(1)
        names = self._tables.get(qualified)
        if names is None:
            names = self._table_names(qualified, head.group(2), head.group(3))
        op = head.group(4)
        pos = head.end()
        end = len(line)
        if self.lazy_images:
            self._lazy_change(line, lsn, txn, out, names, op, pos, end)
            return
        after: tuple[Column, ...] | None = None
        before: tuple[Column, ...] | None = None
        if op == "INSERT":
            after = self._tuple_or_none(line, pos, end, lsn)
        elif op == "UPDATE":
            if line.startswith(_OLD_KEY, pos):
                # The old key's end is only known by parsing it: a value or a
                # quoted name may itself contain " new-tuple:".
                old_start = pos + len(_OLD_KEY)
                old = _TUPLE.match(line, old_start)
                old_end = old.end() if old is not None else old_start  # "(...)*" always matches
                if not line.startswith(_NEW_TUPLE, old_end):
                    raise DecodeError("UPDATE old-key tuple not followed by new-tuple:", lsn=lsn, text=line)
                before = self._tuple(line, old_start, old_end, lsn)
                pos = old_end + len(_NEW_TUPLE)
            after = self._tuple_or_none(line, pos, end, lsn)
        else:  # DELETE
            before = self._tuple_or_none(line, pos, end, lsn)
        out.append(Change(txn.xid, lsn, txn.first_index + len(out), names[0], names[1], _OPS[op], after, before))

    def _lazy_change(self, line: str, lsn: int, txn: Transaction, out: list[Change], names: tuple[str, str],
                     op: str, pos: int, end: int) -> None:
        """:meth:`_change` with the images checked by one C-level match each, parsed later by _Pending."""
        after: tuple[int, int] | None = None
        before: tuple[int, int] | None = None
        if op == "INSERT":
            after = self._span_or_none(line, pos, end, lsn)
        elif op == "UPDATE":
            if line.startswith(_OLD_KEY, pos):
                old_start = pos + len(_OLD_KEY)
                old = _TUPLE.match(line, old_start)
                old_end = old.end() if old is not None else old_start
                if not line.startswith(_NEW_TUPLE, old_end):
                    raise DecodeError("UPDATE old-key tuple not followed by new-tuple:", lsn=lsn, text=line)
                before = (old_start, old_end)  # matched by _TUPLE: valid
                pos = old_end + len(_NEW_TUPLE)
            after = self._span_or_none(line, pos, end, lsn)
        else:  # DELETE
            before = self._span_or_none(line, pos, end, lsn)
        out.append(lazy_change(txn.xid, lsn, txn.first_index + len(out), names[0], names[1], _OPS[op],
                               _Pending(self, line, lsn, after, before)))

    def _span_or_none(self, line: str, pos: int, end: int, lsn: int) -> tuple[int, int] | None:
        if end - pos == len(_NO_TUPLE) and line.startswith(_NO_TUPLE, pos):
            return None
        if _TUPLE.fullmatch(line, pos, end) is None:
            self._tuple(line, pos, end, lsn)  # raises the precise DecodeError
        return (pos, end)

    def _truncate(self, line: str, lsn: int, txn: Transaction, out: list[Change]) -> None:
        m = _TRUNCATE.fullmatch(line)
        if m is None:
            raise DecodeError("malformed table line (expected INSERT, UPDATE, DELETE or TRUNCATE)",
                              lsn=lsn, text=line)
        flags = _TRUNCATE_FLAGS[m.group(2)]
        # The list matched as "qn(, qn)*" with quote-aware tokens, so finditer
        # walks exactly those names (a quoted name may contain ", " or ".").
        for qualified in _QUALIFIED.finditer(m.group(1)):
            out.append(Change(txn.xid, lsn, txn.first_index + len(out), _unquote(qualified.group(1)),
                              _unquote(qualified.group(2)), Operation.TRUNCATE, truncate_flags=flags))

    def _table_names(self, qualified: str, schema: str, table: str) -> tuple[str, str]:
        if len(self._tables) >= _CACHE_LIMIT:
            self._tables.clear()
        names = self._tables[qualified] = (_unquote(schema), _unquote(table))
        return names

    def _tuple_or_none(self, line: str, pos: int, end: int, lsn: int) -> tuple[Column, ...] | None:
        # " (no-tuple-data)": the plugin had no tuple (e.g. DELETE without a
        # replica identity); an empty tuple (zero printed columns) is () instead.
        if end - pos == len(_NO_TUPLE) and line.startswith(_NO_TUPLE, pos):
            return None
        return self._tuple(line, pos, end, lsn)

    def _tuple(self, line: str, pos: int, end: int, lsn: int) -> tuple[Column, ...]:
        headers = self._headers
        columns: list[Column] = []
        append = columns.append
        for header, name, type_, quoted, word, number, bits, junk in _COLUMN_OR_JUNK.findall(line, pos, end):
            entry = headers.get(header)
            if entry is None:
                # Checked here, off the hot path: junk has an empty header, never cached.
                if junk:
                    raise DecodeError(f"malformed column at character {end - len(junk)}",
                                      lsn=lsn, text=line)
                entry = self._header(header, name, type_)
            if quoted:
                append(_column(entry[0], entry[1], quoted.replace("''", "'")))
            elif word:  # null, true/false, unchanged-toast-datum: prebuilt, immutable
                append(entry[2][word])
            elif number:  # printed as the output function's text, unquoted
                append(_column(entry[0], entry[1], number))
            elif bits:  # B'0101' -> bit_out() text 0101
                append(_column(entry[0], entry[1], bits[2:-1]))
            else:  # the quoted group matched an empty literal: '' is "", not NULL
                append(_column(entry[0], entry[1], ""))
        return tuple(columns)

    def _header(self, header: str, name: str, type_: str) -> _Header:
        if len(self._headers) >= _CACHE_LIMIT:
            self._headers.clear()
        real_name = _unquote(name)
        specials = {
            "null": Column(real_name, type_, None),
            # boolout() prints t/f; keep that text form.
            "true": Column(real_name, type_, "t"),
            "false": Column(real_name, type_, "f"),
            # A TOASTed value the UPDATE did not touch: unknown here, never invent one.
            "unchanged-toast-datum": Column(real_name, type_, None, True),
        }
        entry = self._headers[header] = (real_name, type_, specials)
        return entry


class _Pending:
    """The validated, unparsed row images of one test_decoding line (a LazyChange's ``pending``)."""

    __slots__ = ("after", "before", "decoder", "line", "lsn")

    def __init__(self, decoder: TestDecodingDecoder, line: str, lsn: int, after: tuple[int, int] | None,
                 before: tuple[int, int] | None) -> None:
        self.decoder = decoder
        self.line = line
        self.lsn = lsn
        self.after = after
        self.before = before

    def images(self) -> tuple[Image | None, Image | None]:
        tuple_ = self.decoder._tuple
        after = None if self.after is None else tuple_(self.line, *self.after, self.lsn)
        before = None if self.before is None else tuple_(self.line, *self.before, self.lsn)
        return after, before

    def key(self, key_columns: Sequence[str]) -> dict[str, str | None] | None:
        """extract_pk() on the raw text: the key image's columns are scanned only up to the last key column.

        Column names are unique in a table (pg_attribute's key), so the first column of a name is the one.
        """
        image = self.after if self.after is not None else self.before
        if image is None:
            return None
        found = self._scan(image, key_columns)
        if len(found) < len(key_columns) and self.before is not None and image is not self.before:
            missing = [n for n in key_columns if n not in found]
            found.update(self._scan(self.before, missing))
        return {name: found.get(name) for name in key_columns}

    def _scan(self, span: tuple[int, int], wanted: Sequence[str]) -> dict[str, str | None]:
        """Values of the ``wanted`` columns (None for NULL or an unchanged TOAST value) in the tuple at ``span``."""
        decoder = self.decoder
        headers = decoder._headers
        line = self.line
        pos, end = span
        left = set(wanted)
        found: dict[str, str | None] = {}
        match = _COLUMN_OR_JUNK.match
        while left and pos < end:
            m = match(line, pos, end)
            if m is None:  # pragma: no cover - the span was validated
                break
            header, name, type_, quoted, word, number, bits, junk = m.groups()
            if junk is not None:  # pragma: no cover - the span was validated
                decoder._tuple(line, *span, self.lsn)
            pos = m.end()
            entry = headers.get(header)
            if entry is None:
                entry = decoder._header(header, name, type_)
            column = entry[0]
            if column not in left:
                continue
            left.discard(column)
            if quoted is not None:
                found[column] = quoted.replace("''", "'")
            elif word is not None:
                found[column] = entry[2][word].value
            elif number is not None:
                found[column] = number
            elif bits is not None:
                found[column] = bits[2:-1]
            else:  # pragma: no cover - every column has one of the value groups
                found[column] = ""
        return found
