"""Slot rows in PostgreSQL's COPY text format: how a window of a text plugin is fetched and spooled.

``COPY (SELECT lsn, xid, data FROM pg_logical_slot_peek_changes(...)) TO STDOUT`` sends each row as one line,
``<lsn>\\t<xid>\\t<data>\\n``, where ``data`` has backslash, newline, carriage return, tab, backspace, form
feed and vertical tab written as ``\\\\``, ``\\n``, ``\\r``, ``\\t``, ``\\b``, ``\\f``, ``\\v``
(CopyAttributeOutText); every other byte is itself. So a line never holds a raw newline but its own, and a
raw tab only between fields. Bytes are the connection's encoding, UTF-8.

Pure functions over a buffer (``bytes`` or an ``mmap`` of a spool file), no I/O.
"""

from __future__ import annotations

import mmap
from collections.abc import Iterator
from typing import Any

from pg2kinesis_dagster.core.changes import SlotRow, parse_lsn
from pg2kinesis_dagster.core.errors import DecodeError

_ESCAPES = {
    ord("\\"): b"\\",
    ord("n"): b"\n",
    ord("r"): b"\r",
    ord("t"): b"\t",
    ord("b"): b"\b",
    ord("f"): b"\f",
    ord("v"): b"\v",
}

# Anything with bytes' find() and slicing: bytes, bytearray, mmap.mmap.
Buffer = Any


def unescape(data: bytes) -> bytes:
    """A COPY text field's bytes -> the value's bytes."""
    if b"\\" not in data:
        return data
    out = bytearray()
    pos = 0
    while True:
        slash = data.find(b"\\", pos)
        if slash < 0:
            out += data[pos:]
            return bytes(out)
        out += data[pos:slash]
        if slash + 1 >= len(data) or data[slash + 1] not in _ESCAPES:
            raise DecodeError(f"unexpected escape at byte {slash} of a COPY text field", text=data[:200])
        out += _ESCAPES[data[slash + 1]]
        pos = slash + 2


def parse_row(line: bytes) -> SlotRow:
    """One COPY line of (lsn, xid, data), without its newline -> ``(lsn, xid, data)`` as the slot adapter gives
    it: the LSN as an integer, the xid as an integer, the data as text."""
    first = line.find(b"\t")
    second = line.find(b"\t", first + 1)
    if first < 0 or second < 0:
        raise DecodeError("a COPY row without its three fields", text=line[:200])
    try:
        lsn = parse_lsn(line[:first].decode("ascii"))
        xid = int(line[first + 1:second])
    except ValueError:
        raise DecodeError("a COPY row whose lsn or xid is not a number", text=line[:200]) from None
    return lsn, xid, unescape(line[second + 1:]).decode("utf-8")


def iter_rows(buf: Buffer, start: int = 0, end: int | None = None) -> Iterator[tuple[SlotRow, int]]:
    """Each row of ``buf[start:end]`` (whole lines) with the offset just after its newline."""
    stop = len(buf) if end is None else end
    pos = start
    while pos < stop:
        newline = buf.find(b"\n", pos, stop)
        if newline < 0:
            raise DecodeError(f"a COPY row without its newline at byte {pos}")
        yield parse_row(bytes(buf[pos:newline])), newline + 1
        pos = newline + 1


# find_field's step: how much of the buffer one search touches before its pages are let go.
_FIND_STEP = 8 << 20


def find_field(buf: Buffer, needle: bytes, start: int, end: int) -> int:
    """``buf.find(needle, start, end)``, in steps whose pages leave the process's memory behind it when ``buf`` is
    an mmap (a search across a transaction of a million rows must not map the spool file whole: they stay in the
    page cache, and come back at the cost of a minor fault)."""
    release = isinstance(buf, mmap.mmap) and hasattr(mmap, "MADV_DONTNEED")
    pos = start
    while pos < end:
        stop = min(end, pos + _FIND_STEP)
        at = buf.find(needle, pos, min(end, stop + len(needle) - 1))
        if release:
            first = pos - pos % mmap.PAGESIZE
            buf.madvise(mmap.MADV_DONTNEED, first, stop - first)
        if at >= 0:
            return at
        pos = stop
    return -1


def format_row(lsn: str, xid: int, data: str) -> bytes:
    """The COPY line PostgreSQL sends for one row (tests build windows with it)."""
    escaped = (data.encode("utf-8").replace(b"\\", b"\\\\").replace(b"\n", b"\\n").replace(b"\r", b"\\r")
               .replace(b"\t", b"\\t").replace(b"\b", b"\\b").replace(b"\f", b"\\f").replace(b"\v", b"\\v"))
    return lsn.encode("ascii") + b"\t" + str(xid).encode("ascii") + b"\t" + escaped + b"\n"
