"""Where a window of a text plugin may end, found while its COPY rows are written to the spool.

The peek of a text plugin (test_decoding, wal2json) is one ``COPY (SELECT lsn, xid, data FROM
pg_logical_slot_peek_changes(...)) TO STDOUT`` (:mod:`.copy_text`); psycopg2 hands each row to a file-like's
``write``. :class:`CopyWindowWriter` is that file-like: it writes the rows through to the spool file and applies
the window's rules to each one, the same as ``Replicator._scan`` does for the rows of a binary plugin:

* a *boundary* is a commit row, or a snapshot high watermark (the snapshot merger's word, through
  ``on_message``), while no snapshot chunk is open (``holding``): the window may end and the slot advance there;
* the window ends at the first boundary where a limit is reached (rows, bytes of plugin output, the deadline of
  ``time.monotonic()``): ``limited`` is set and :class:`WindowFull` raised from ``write``, which stops the COPY;
  rows after the last boundary belong to a transaction not read to its end and are cut off by :meth:`finish`.

This module is the reference; ``core/_window_scan.pyx`` is the same writer compiled (tests compare them), picked by
:func:`copy_window_writer` unless ``PG2K_NATIVE=0``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import BinaryIO

from pg2kinesis_dagster.core.changes import parse_lsn
from pg2kinesis_dagster.core.copy_text import unescape
from pg2kinesis_dagster.core.errors import ConfigError, DecodeError
from pg2kinesis_dagster.native import load

# A message row of the plugin that may be a snapshot watermark: the merger's rules decide (on_message).
MESSAGE_HEADS = {
    "test_decoding": b"message: transactional: 0 prefix: ",
    "wal2json": b'{"action":"M",',
}
# Bytes written to the spool file at once.
FLUSH_BYTES = 1 << 20

# (lsn, data) of a message row -> whether it is a boundary candidate (a snapshot high watermark). It may set the
# writer's ``holding`` (a snapshot chunk is open: no boundary until it closes).
MessageHandler = Callable[[int, str], bool]


class WindowFull(Exception):
    """Raised by ``write`` once the window reached a limit at a boundary: stop reading the slot."""


def is_commit(plugin: str, data: bytes) -> bool:
    """The decoders' ``is_commit`` on a row's unescaped data bytes."""
    if plugin == "test_decoding":
        return data.startswith(b"COMMIT")
    return '"action":"C"' in data[:160].decode("utf-8", "ignore")[:40]


class PyCopyWindowWriter:
    """The reference writer (see the module docstring); ``write`` takes any split of the COPY stream."""

    def __init__(
        self,
        out: BinaryIO,
        *,
        plugin: str,
        max_rows: int | None = None,
        max_bytes: int | None = None,
        deadline: float | None = None,
        on_message: MessageHandler | None = None,
    ) -> None:
        if plugin not in MESSAGE_HEADS:
            raise ConfigError(f"COPY rows are read for text plugins only, not {plugin!r}")
        self._out = out
        self._plugin = plugin
        self._head = MESSAGE_HEADS[plugin]
        self._max_rows = max_rows
        self._max_bytes = max_bytes
        self._deadline = deadline
        self._on_message = on_message
        self._pending = bytearray()
        self._buffer = bytearray()
        self._done = False
        self.holding = False
        self.rows = 0
        self.data_bytes = 0
        self.transactions = 0
        self.offset = 0  # bytes of whole rows received
        self.last_commit: int | None = None
        self.committed_rows = 0
        self.committed_bytes = 0
        self.committed_transactions = 0
        self.committed_offset = 0
        self.limited = False

    def write(self, data: bytes) -> int:
        if self._done:
            raise WindowFull()
        self._pending += data
        start = 0
        try:
            while True:
                newline = self._pending.find(b"\n", start)
                if newline < 0:
                    break
                line = bytes(self._pending[start:newline])
                start = newline + 1
                self._row(line)
        finally:
            self._buffer += self._pending[:start]
            del self._pending[:start]
            if len(self._buffer) >= FLUSH_BYTES or self._done:
                self._flush()
        return len(data)

    def _row(self, line: bytes) -> None:
        first = line.find(b"\t")
        second = line.find(b"\t", first + 1)
        if first < 0 or second < 0:
            raise DecodeError("a COPY row without its three fields", text=line[:200])
        data = unescape(line[second + 1:])
        self.rows += 1
        self.data_bytes += len(data)
        self.offset += len(line) + 1
        if is_commit(self._plugin, data):
            self.transactions += 1
        elif data.startswith(self._head) and self._on_message is not None:
            if not self._on_message(parse_lsn(line[:first].decode("ascii")), data.decode("utf-8")):
                return
        else:
            return
        if self.holding:
            return
        self.last_commit = parse_lsn(line[:first].decode("ascii"))
        self.committed_rows, self.committed_bytes = self.rows, self.data_bytes
        self.committed_transactions, self.committed_offset = self.transactions, self.offset
        if (
            (self._max_rows is not None and self.rows >= self._max_rows)
            or (self._max_bytes is not None and self.data_bytes >= self._max_bytes)
            or (self._deadline is not None and time.monotonic() >= self._deadline)
        ):
            self.limited = True
            self._done = True
            raise WindowFull()

    def _flush(self) -> None:
        if self._buffer:
            self._out.write(bytes(self._buffer))
            self._buffer.clear()

    def finish(self) -> None:
        """Write out what is buffered and cut the file after the last boundary (``committed_offset``)."""
        self._flush()
        self._out.flush()
        self._out.truncate(self.committed_offset)


def copy_window_writer(
    out: BinaryIO,
    *,
    plugin: str,
    max_rows: int | None = None,
    max_bytes: int | None = None,
    deadline: float | None = None,
    on_message: MessageHandler | None = None,
) -> PyCopyWindowWriter:
    """The compiled writer when available (``PG2K_NATIVE`` not ``0``), else the reference; same behaviour."""
    native = load("pg2kinesis_dagster.core._window_scan")
    cls = native.CopyWindowWriter if native is not None else PyCopyWindowWriter
    return cls(out, plugin=plugin, max_rows=max_rows, max_bytes=max_bytes, deadline=deadline,
               on_message=on_message)
