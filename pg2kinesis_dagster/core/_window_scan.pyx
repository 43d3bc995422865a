# cython: language_level=3
"""The compiled twin of ``core.window_scan.PyCopyWindowWriter``: same rules, same attributes, same errors.

psycopg2 calls ``write`` once per COPY row (one CopyData message), so everything per row here is C: finding the
fields, counting the unescaped bytes, recognising commits and message rows. Only message rows (snapshot
watermarks, rare) call back into Python.
"""

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from libc.string cimport memchr, memcmp
from libc.time cimport timespec


from pg2kinesis_dagster.core.changes import parse_lsn
from pg2kinesis_dagster.core.copy_text import unescape
from pg2kinesis_dagster.core.errors import ConfigError, DecodeError
from pg2kinesis_dagster.core.window_scan import FLUSH_BYTES, MESSAGE_HEADS, WindowFull


cdef extern from "<time.h>" nogil:
    int clock_gettime(int clk_id, timespec *tp)
    int CLOCK_MONOTONIC


cdef double _monotonic():
    cdef timespec ts
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return ts.tv_sec + ts.tv_nsec * 1e-9


cdef enum Plugin:
    TEST_DECODING = 0
    WAL2JSON = 1


cdef Py_ssize_t _unescaped_size(const char *p, Py_ssize_t n):
    """Bytes of a COPY text field once unescaped: each backslash pair is one byte."""
    cdef Py_ssize_t size = n
    cdef const char *end = p + n
    cdef const char *q = <const char *>memchr(p, b'\\', n)
    while q != NULL:
        size -= 1
        q += 2  # the escaped character is never a backslash that starts another pair
        if q >= end:
            break
        q = <const char *>memchr(q, b'\\', end - q)
    return size


cdef bint _wal2json_commit(const char *p, Py_ssize_t n):
    """'"action":"C"' within the first 40 characters of the unescaped field (the decoder's is_commit)."""
    cdef char buf[160]
    cdef Py_ssize_t i = 0, k = 0, chars = 0
    cdef unsigned char c
    while i < n and k < 160:
        c = <unsigned char>p[i]
        if c == b'\\' and i + 1 < n:
            c = <unsigned char>p[i + 1]
            if c == b'n':
                c = 10
            elif c == b'r':
                c = 13
            elif c == b't':
                c = 9
            elif c == b'b':
                c = 8
            elif c == b'f':
                c = 12
            elif c == b'v':
                c = 11
            i += 2
        else:
            i += 1
        if (c & 0xC0) != 0x80:  # a character starts here
            if chars == 40:
                break
            chars += 1
        buf[k] = <char>c
        k += 1
    cdef const char *needle = b'"action":"C"'
    cdef Py_ssize_t j
    for j in range(0, k - 12 + 1):
        if memcmp(buf + j, needle, 12) == 0:
            return True
    return False


cdef class CopyWindowWriter:
    cdef object _out
    cdef object _on_message
    cdef int _plugin
    cdef bytes _head
    cdef Py_ssize_t _max_rows, _max_bytes
    cdef double _deadline
    cdef bint _has_rows_limit, _has_bytes_limit, _has_deadline, _done
    cdef Py_ssize_t _taken
    cdef bytearray _pending
    cdef bytearray _buffer
    cdef public bint holding
    cdef readonly Py_ssize_t rows, data_bytes, transactions, offset
    cdef readonly object last_commit
    cdef readonly Py_ssize_t committed_rows, committed_bytes, committed_transactions, committed_offset
    cdef readonly bint limited

    def __init__(self, out, *, str plugin, max_rows=None, max_bytes=None, deadline=None, on_message=None):
        if plugin not in MESSAGE_HEADS:
            raise ConfigError(f"COPY rows are read for text plugins only, not {plugin!r}")
        self._out = out
        self._plugin = TEST_DECODING if plugin == "test_decoding" else WAL2JSON
        self._head = MESSAGE_HEADS[plugin]
        self._has_rows_limit = max_rows is not None
        self._max_rows = max_rows if max_rows is not None else 0
        self._has_bytes_limit = max_bytes is not None
        self._max_bytes = max_bytes if max_bytes is not None else 0
        self._has_deadline = deadline is not None
        self._deadline = deadline if deadline is not None else 0.0
        self._on_message = on_message
        self._pending = bytearray()
        self._buffer = bytearray()
        self._done = False
        self.holding = False
        self.rows = self.data_bytes = self.transactions = self.offset = 0
        self.last_commit = None
        self.committed_rows = self.committed_bytes = self.committed_transactions = self.committed_offset = 0
        self.limited = False

    def write(self, data):
        if self._done:
            raise WindowFull()
        cdef bytes chunk = bytes(data) if type(data) is not bytes else data
        cdef Py_ssize_t size = PyBytes_GET_SIZE(chunk), taken
        if len(self._pending):  # a row split across calls: joined first
            self._pending += chunk
            chunk = bytes(self._pending)
            del self._pending[:]
        self._taken = 0
        try:
            self._rows(chunk)
        finally:
            taken = self._taken
            if taken < PyBytes_GET_SIZE(chunk):
                self._buffer += chunk[:taken]
                self._pending += chunk[taken:]
            else:
                self._buffer += chunk
            if len(self._buffer) >= FLUSH_BYTES or self._done:
                self._flush()
        return size

    cdef int _rows(self, bytes chunk) except -1:
        """Each whole row of ``chunk`` (usually exactly one: psycopg2 writes a row per call). ``_taken`` counts the
        bytes of the rows taken: as in the reference, a row is taken whatever _row raises for it."""
        cdef const char *p = PyBytes_AS_STRING(chunk)
        cdef Py_ssize_t n = PyBytes_GET_SIZE(chunk), start, newline
        cdef const char *nl
        while self._taken < n:
            start = self._taken
            nl = <const char *>memchr(p + start, b'\n', n - start)
            if nl == NULL:
                break
            newline = nl - p
            self._taken = newline + 1
            self._row(p + start, newline - start, chunk)
        return 0

    cdef int _row(self, const char *line, Py_ssize_t size, bytes owner) except -1:
        cdef const char *first = <const char *>memchr(line, b'\t', size)
        cdef const char *second = NULL
        if first != NULL:
            second = <const char *>memchr(first + 1, b'\t', size - (first + 1 - line))
        if first == NULL or second == NULL:
            raise DecodeError("a COPY row without its three fields", text=PyBytes_FromStringAndSize(line, min(size, 200)))
        cdef const char *data = second + 1
        cdef Py_ssize_t data_size = size - (data - line)
        cdef Py_ssize_t head_size = PyBytes_GET_SIZE(self._head)
        self.rows += 1
        self.data_bytes += _unescaped_size(data, data_size)
        self.offset += size + 1
        cdef bint commit
        if self._plugin == TEST_DECODING:
            commit = data_size >= 6 and memcmp(data, b"COMMIT", 6) == 0
        else:
            commit = _wal2json_commit(data, data_size)
        if commit:
            self.transactions += 1
        elif (self._on_message is not None and data_size >= head_size
              and memcmp(data, PyBytes_AS_STRING(self._head), head_size) == 0):
            if not self._on_message(self._lsn(line, first - line),
                                    unescape(PyBytes_FromStringAndSize(data, data_size)).decode("utf-8")):
                return 0
        else:
            return 0
        if self.holding:
            return 0
        self.last_commit = self._lsn(line, first - line)
        self.committed_rows = self.rows
        self.committed_bytes = self.data_bytes
        self.committed_transactions = self.transactions
        self.committed_offset = self.offset
        if ((self._has_rows_limit and self.rows >= self._max_rows)
                or (self._has_bytes_limit and self.data_bytes >= self._max_bytes)
                or (self._has_deadline and _monotonic() >= self._deadline)):
            self.limited = True
            self._done = True
            raise WindowFull()
        return 0

    cdef object _lsn(self, const char *p, Py_ssize_t n):
        """'16/B374D848' -> int, as changes.parse_lsn (which raises the same errors for a malformed one)."""
        cdef unsigned long long high = 0, low = 0
        cdef Py_ssize_t i = 0
        cdef char c
        cdef int digits = 0
        cdef unsigned long long *part = &high
        for i in range(n):
            c = p[i]
            if c == b'/' and part == &high and digits:
                part = &low
                digits = 0
                continue
            if b'0' <= c <= b'9':
                part[0] = part[0] * 16 + <unsigned long long>(c - 48)
            elif b'A' <= c <= b'F':
                part[0] = part[0] * 16 + <unsigned long long>(c - 55)
            else:
                return parse_lsn(PyBytes_FromStringAndSize(p, n).decode("ascii"))
            digits += 1
            if digits > 8:
                return parse_lsn(PyBytes_FromStringAndSize(p, n).decode("ascii"))
        if part != &low or not digits:
            return parse_lsn(PyBytes_FromStringAndSize(p, n).decode("ascii"))
        return (high << 32) | low

    cdef _flush(self):
        if len(self._buffer):
            self._out.write(bytes(self._buffer))
            del self._buffer[:]

    def finish(self):
        """Write out what is buffered and cut the file after the last boundary (``committed_offset``)."""
        self._flush()
        self._out.flush()
        self._out.truncate(self.committed_offset)
