# cython: language_level=3, boundscheck=False, wraparound=False, initializedcheck=False, cdivision=True
"""The compiled fast lane of core.copy_window: test_decoding rows in COPY text form -> Kinesis records.

It reads the rows of a COPY buffer (``<lsn>\\t<xid>\\t<data>\\n``, data escaped) and appends the Records that the
Python path (TestDecodingDecoder -> RecordBuilder) makes from them, for the subset it implements: INSERT,
UPDATE without old key and DELETE rows with a row image, of tables the driver registered, in the CSV,
CSVPayload (key only) and untyped JSON formats. Every other row (TRUNCATE, old-key, no-tuple-data,
unchanged TOAST values, quoted type names, NULL or missing key values, duplicate column names, an oversized
record to truncate, malformed text of any kind, rows outside a transaction, empty transactions) it hands back
to the driver untouched (SLOW), which runs the Python path on it: the lane never guesses and never raises a
DecodeError itself. The Python modules stay the reference; tests/test_native_lane.py compares both.

Structure is parsed on the raw COPY bytes: COPY escapes (a backslash and one of \\ n r t b f v) never produce
or contain a quote, bracket, colon or space, so the grammar's tokens are the same before and after unescaping;
each row's data is checked first (valid escapes, valid UTF-8) so that the Python path would read it too.
"""

from cpython.buffer cimport PyBUF_SIMPLE, PyBuffer_Release, PyObject_GetBuffer
from cpython.bytes cimport PyBytes_FromStringAndSize
from cpython.list cimport PyList_Append
from libc.stdint cimport uint8_t, uint64_t
from libc.stdlib cimport free, malloc, realloc
from libc.string cimport memchr, memcmp, memcpy
from pg2kinesis_dagster._gil cimport YIELD_EVERY, yield_gil

import orjson

from pg2kinesis_dagster.core.batching import OrderingKeys, Record, SharedKey
from pg2kinesis_dagster.core.copy_text import unescape
from pg2kinesis_dagster.core.decoders.test_decoding import _unquote
from pg2kinesis_dagster.core.formats import _json_string
from pg2kinesis_dagster.core.keys import _bounded, row_partition_key


cdef extern from "Python.h":
    int PyObject_GenericSetAttr(object o, object name, object value) except -1
    object PyUnicode_DecodeUTF8(const char* s, Py_ssize_t size, const char* errors)
    object PyUnicode_DecodeASCII(const char* s, Py_ssize_t size, const char* errors)
    Py_ssize_t PyUnicode_GET_LENGTH(object o)
    Py_ssize_t PyList_GET_SIZE(object o)

cdef extern from "string.h":
    void* memmem(const void* haystack, size_t hlen, const void* needle, size_t nlen)

# run() statuses (copy_window mirrors them).
END = 0
CHUNK_FULL = 1
NEED_TABLE = 2
SLOW = 3
NEED_COMMIT = 4
# How far ahead of a BEGIN the lane looks for its COMMIT itself; further, the driver finds it (set_commit_hint),
# releasing the spool file's pages as it goes: a transaction of a million rows is never mapped in memory whole.
COMMIT_LOOKAHEAD = 8 << 20
cdef enum:
    _END = 0
    _CHUNK_FULL = 1
    _NEED = 2
    _SLOW = 3
    _NEED_COMMIT = 4
    _OK = -1
    F_CSV = 0
    F_PAYLOAD = 1
    F_JSON = 2
    P_ROW = 0
    P_TABLE = 1
    P_XID = 2
    P_CONSTANT = 3
    K_NULL = 0
    K_TRUE = 1
    K_FALSE = 2
    K_QUOTED = 3
    K_NUMBER = 4
    K_BITS = 5
    MAX_PARTITION_KEY_CHARS = 256
    CACHE_LIMIT = 10000

_OP_NAMES = ("INSERT", "UPDATE", "DELETE")
_RECORD_FIELDS = ("data", "partition_key", "ordering_key", "record_id", "explicit_hash_key", "barrier", "size")
cdef bytes _MESSAGE_0 = b"message: transactional: 0 prefix: "
cdef bytes _MESSAGE_1 = b"message: transactional: 1 prefix: "

cdef object _new_object = object.__new__
cdef object _Record = Record
cdef object _OrderingKeys = OrderingKeys
cdef str _S_DATA = "data"
cdef str _S_KEY = "partition_key"
cdef str _S_ORDER = "ordering_key"
cdef str _S_ID = "record_id"
cdef str _S_HASH = "explicit_hash_key"
cdef str _S_BARRIER = "barrier"
cdef str _S_SIZE = "size"
cdef str _S_ROW = "row"
cdef str _S_IMAGE = "image"
cdef str _S_T = "t"
cdef str _S_F = "f"

cdef const char* HEX = b"0123456789ABCDEF"
cdef const char* LHEX = b"0123456789abcdef"


# -- a growable byte buffer ------------------------------------------------------------------------------

cdef struct Out:
    char* p
    Py_ssize_t n
    Py_ssize_t cap


cdef int out_grow(Out* o, Py_ssize_t extra) except -1:
    cdef Py_ssize_t cap = o.cap * 2
    if cap < o.n + extra + 256:
        cap = o.n + extra + 256
    cdef char* q = <char*>realloc(o.p, cap)
    if q == NULL:
        raise MemoryError()
    o.p = q
    o.cap = cap
    return 0


cdef inline int out_put(Out* o, const char* s, Py_ssize_t k) except -1:
    if o.n + k > o.cap:
        out_grow(o, k)
    memcpy(o.p + o.n, s, k)
    o.n += k
    return 0


cdef inline int out_bytes(Out* o, bytes s) except -1:
    return out_put(o, <const char*>s, len(s))


cdef inline int out_byte(Out* o, char c) except -1:
    if o.n + 1 > o.cap:
        out_grow(o, 1)
    o.p[o.n] = c
    o.n += 1
    return 0


cdef int out_u64(Out* o, uint64_t v) except -1:
    cdef char tmp[24]
    cdef int i = 24
    if v == 0:
        return out_byte(o, b'0')
    while v:
        i -= 1
        tmp[i] = <char>(48 + v % 10)
        v //= 10
    return out_put(o, tmp + i, 24 - i)


cdef int out_hex(Out* o, uint64_t v) except -1:
    cdef char tmp[24]
    cdef int i = 24
    cdef const char* digits = HEX
    if v == 0:
        return out_byte(o, b'0')
    while v:
        i -= 1
        tmp[i] = digits[v & 15]
        v >>= 4
    return out_put(o, tmp + i, 24 - i)


cdef int out_lsn(Out* o, uint64_t lsn) except -1:
    """format_lsn(): upper-case hexadecimal halves without leading zeros."""
    out_hex(o, lsn >> 32)
    out_byte(o, b'/')
    return out_hex(o, lsn & 0xFFFFFFFF)


# -- text checks -----------------------------------------------------------------------------------------

cdef inline bint _is_escape(uint8_t c) nogil:
    return c == 92 or c == 110 or c == 114 or c == 116 or c == 98 or c == 102 or c == 118  # \ n r t b f v


cdef Py_ssize_t _utf8_len(const uint8_t* b, Py_ssize_t i, Py_ssize_t e) nogil:
    """Length of the UTF-8 sequence at i (a non-ASCII lead byte), 0 when invalid (as Python's strict decoder)."""
    cdef uint8_t c = b[i]
    cdef uint8_t c1
    if c < 0xC2:
        return 0
    if c < 0xE0:
        if i + 1 >= e or (b[i + 1] & 0xC0) != 0x80:
            return 0
        return 2
    if c < 0xF0:
        if i + 2 >= e:
            return 0
        c1 = b[i + 1]
        if (c1 & 0xC0) != 0x80 or (b[i + 2] & 0xC0) != 0x80:
            return 0
        if c == 0xE0 and c1 < 0xA0:
            return 0
        if c == 0xED and c1 >= 0xA0:  # surrogates
            return 0
        return 3
    if c < 0xF5:
        if i + 3 >= e:
            return 0
        c1 = b[i + 1]
        if (c1 & 0xC0) != 0x80 or (b[i + 2] & 0xC0) != 0x80 or (b[i + 3] & 0xC0) != 0x80:
            return 0
        if c == 0xF0 and c1 < 0x90:
            return 0
        if c == 0xF4 and c1 >= 0x90:
            return 0
        return 4
    return 0


cdef Py_ssize_t _row_fields(const uint8_t* b, Py_ssize_t start, Py_ssize_t e, uint64_t* lsn, uint64_t* xid) nogil:
    """The row b[start:e] as ``lsn<TAB>xid<TAB>data``: parses the LSN and the xid; returns the position of the tab
    before the data, or -1 when the row is not of that form."""
    cdef Py_ssize_t t1 = start, t2
    while t1 < e and b[t1] != 9:
        t1 += 1
    t2 = t1 + 1
    while t2 < e and b[t2] != 9:
        t2 += 1
    if t2 >= e or not _parse_lsn(b, start, t1, lsn) or not _parse_uint(b, t1 + 1, t2, xid):
        return -1
    return t2


cdef bint _text_ok(const uint8_t* b, Py_ssize_t i, Py_ssize_t e) nogil:
    """Whether copy_text.unescape(b[i:e]).decode("utf-8") succeeds: escapes known, bytes valid UTF-8."""
    cdef uint64_t w, x
    cdef uint8_t c
    cdef Py_ssize_t n
    while i < e:
        while i + 8 <= e:
            memcpy(&w, b + i, 8)
            x = w ^ 0x5C5C5C5C5C5C5C5CULL
            if (w & 0x8080808080808080ULL) or ((x - 0x0101010101010101ULL) & ~x & 0x8080808080808080ULL):
                break
            i += 8
        if i >= e:
            break
        c = b[i]
        if c == 92:
            if i + 1 >= e or not _is_escape(b[i + 1]):
                return False
            i += 2
        elif c >= 0x80:
            n = _utf8_len(b, i, e)
            if n == 0:
                return False
            i += n
        else:
            i += 1
    return True


cdef inline char _unescaped(uint8_t c) nogil:
    if c == 110:
        return b'\n'
    if c == 114:
        return b'\r'
    if c == 116:
        return b'\t'
    if c == 98:
        return b'\b'
    if c == 102:
        return b'\f'
    if c == 118:
        return b'\v'
    return b'\\'


cdef int _put_unescaped(Out* o, const uint8_t* b, Py_ssize_t i, Py_ssize_t e, bint sql) except -1:
    """The value's bytes: COPY escapes undone and, for a quoted literal (``sql``), '' made '."""
    cdef Py_ssize_t run
    cdef uint8_t c
    if o.n + (e - i) > o.cap:
        out_grow(o, e - i)
    while i < e:
        run = i
        while run < e and b[run] != 92 and not (sql and b[run] == 39):
            run += 1
        if run > i:
            memcpy(o.p + o.n, b + i, run - i)
            o.n += run - i
            i = run
        if i >= e:
            break
        c = b[i]
        if c == 92:
            o.p[o.n] = _unescaped(b[i + 1])
        else:  # '' -> '
            o.p[o.n] = b"'"
        o.n += 1
        i += 2
    return 0


cdef int _put_json_text(Out* o, const char* s, Py_ssize_t n) except -1:
    """A JSON string's content as orjson (and json.dumps(ensure_ascii=False)) writes it."""
    cdef Py_ssize_t i = 0, run
    cdef uint8_t c
    cdef const char* hexd = LHEX
    while i < n:
        run = i
        while run < n:
            c = <uint8_t>s[run]
            if c < 0x20 or c == 34 or c == 92:
                break
            run += 1
        if run > i:
            out_put(o, s + i, run - i)
            i = run
        if i >= n:
            break
        c = <uint8_t>s[i]
        i += 1
        if c == 34:
            out_put(o, b'\\"', 2)
        elif c == 92:
            out_put(o, b'\\\\', 2)
        elif c == 10:
            out_put(o, b'\\n', 2)
        elif c == 13:
            out_put(o, b'\\r', 2)
        elif c == 9:
            out_put(o, b'\\t', 2)
        elif c == 8:
            out_put(o, b'\\b', 2)
        elif c == 12:
            out_put(o, b'\\f', 2)
        else:
            out_put(o, b'\\u00', 4)
            out_byte(o, hexd[c >> 4])
            out_byte(o, hexd[c & 15])
    return 0


cdef inline bint _digit(uint8_t c) nogil:
    return 48 <= c <= 57


cdef inline bint _bare_start(uint8_t c) nogil:
    return (97 <= c <= 122) or c == 95


cdef inline bint _bare_char(uint8_t c) nogil:
    return (97 <= c <= 122) or c == 95 or (48 <= c <= 57)


cdef Py_ssize_t _ident(const uint8_t* b, Py_ssize_t i, Py_ssize_t e) nogil:
    """End of the quote_identifier() token at i, or -1."""
    cdef const uint8_t* q
    if i >= e:
        return -1
    if b[i] == 34:
        i += 1
        while True:
            q = <const uint8_t*>memchr(b + i, 34, e - i)
            if q == NULL:
                return -1
            i = q - b + 1
            if i < e and b[i] == 34:
                i += 1
                continue
            return i
    if not _bare_start(b[i]):
        return -1
    i += 1
    while i < e and _bare_char(b[i]):
        i += 1
    return i


cdef bint _parse_lsn(const uint8_t* b, Py_ssize_t i, Py_ssize_t e, uint64_t* out) nogil:
    """``X/Y`` (1-8 hex digits each); anything else is left to parse_lsn()."""
    cdef uint64_t hi = 0, lo = 0
    cdef int n = 0
    cdef uint8_t c
    cdef bint second = False
    while i < e:
        c = b[i]
        i += 1
        if c == 47 and not second:
            if n == 0:
                return False
            second = True
            n = 0
            continue
        if 48 <= c <= 57:
            c -= 48
        elif 65 <= c <= 70:
            c -= 55
        elif 97 <= c <= 102:
            c -= 87
        else:
            return False
        n += 1
        if n > 8:
            return False
        if second:
            lo = lo * 16 + c
        else:
            hi = hi * 16 + c
    if not second or n == 0:
        return False
    out[0] = (hi << 32) | lo
    return True


cdef bint _parse_uint(const uint8_t* b, Py_ssize_t i, Py_ssize_t e, uint64_t* out) nogil:
    """Plain decimal digits, at most 18 of them."""
    cdef uint64_t v = 0
    if i >= e or e - i > 18:
        return False
    while i < e:
        if not _digit(b[i]):
            return False
        v = v * 10 + (b[i] - 48)
        i += 1
    out[0] = v
    return True


# -- one column of a tuple -------------------------------------------------------------------------------

cdef struct Col:
    Py_ssize_t h0      # header name[type]: [h0, h1)
    Py_ssize_t h1
    Py_ssize_t n1      # the name token is [h0, n1)
    Py_ssize_t v0      # the value's text: [v0, v1) (a quoted literal without its quotes, bits without B'')
    Py_ssize_t v1
    int kind
    bint plain         # a quoted literal without escapes or '' pairs


cdef Py_ssize_t _value(const uint8_t* b, Py_ssize_t i, Py_ssize_t e, Col* col) nogil:
    """Parse the value at i into col; the position after it (a space or e), or -1."""
    cdef const uint8_t* q
    cdef Py_ssize_t j
    cdef uint8_t c
    if i >= e:
        return -1
    c = b[i]
    if c == 39:  # 'literal' with '' for a quote
        col.kind = K_QUOTED
        col.plain = True
        col.v0 = i + 1
        j = i + 1
        while True:
            q = <const uint8_t*>memchr(b + j, 39, e - j)
            if q == NULL:
                return -1
            j = q - b
            if j + 1 < e and b[j + 1] == 39:
                col.plain = False
                j += 2
                continue
            break
        col.v1 = j
        j += 1
        if col.plain and memchr(b + col.v0, 92, col.v1 - col.v0) != NULL:
            col.plain = False
    elif c == 110:
        if e - i < 4 or memcmp(b + i, b"null", 4) != 0:
            return -1
        col.kind = K_NULL
        j = i + 4
    elif c == 116:
        if e - i < 4 or memcmp(b + i, b"true", 4) != 0:
            return -1
        col.kind = K_TRUE
        j = i + 4
    elif c == 102:
        if e - i < 5 or memcmp(b + i, b"false", 5) != 0:
            return -1
        col.kind = K_FALSE
        j = i + 5
    elif c == 66:  # B'0101'
        if i + 1 >= e or b[i + 1] != 39:
            return -1
        j = i + 2
        while j < e and (b[j] == 48 or b[j] == 49):
            j += 1
        if j >= e or b[j] != 39:
            return -1
        col.kind = K_BITS
        col.v0 = i + 2
        col.v1 = j
        j += 1
    else:  # -?(digits(.digits)?(e[+-]digits)?|Infinity)|NaN
        j = i
        if c == 78:
            if e - i < 3 or memcmp(b + i, b"NaN", 3) != 0:
                return -1
            j = i + 3
        else:
            if c == 45:
                j += 1
            if j < e and b[j] == 73:
                if e - j < 8 or memcmp(b + j, b"Infinity", 8) != 0:
                    return -1
                j += 8
            elif j < e and _digit(b[j]):
                while j < e and _digit(b[j]):
                    j += 1
                if j + 1 < e and b[j] == 46 and _digit(b[j + 1]):
                    j += 1
                    while j < e and _digit(b[j]):
                        j += 1
                if j + 2 < e and b[j] == 101 and (b[j + 1] == 43 or b[j + 1] == 45) and _digit(b[j + 2]):
                    j += 2
                    while j < e and _digit(b[j]):
                        j += 1
            else:
                return -1
        col.kind = K_NUMBER
        col.v0 = i
        col.v1 = j
    if j < e and b[j] != 32:
        return -1
    return j


# -- registered tables -----------------------------------------------------------------------------------


cdef class _Layout:
    """The column headers of a tuple as last seen for a table and operation, with what they resolve to."""

    cdef int ncols
    cdef bytes blob
    cdef Py_ssize_t* off
    cdef list names
    cdef list json_names
    cdef int* keypos
    cdef bint dups

    def __dealloc__(self):
        free(self.off)
        free(self.keypos)


cdef class _Table:
    cdef bytes raw
    cdef object schema, table, qualified
    cdef bint ok
    cdef bint accept[3]
    cdef bint keys_known, keyed
    cdef int nkeys
    cdef tuple key_columns
    cdef list key_json
    cdef list mids
    cdef object table_pkey
    cdef Py_ssize_t table_pkey_bytes
    cdef object row_prefix
    cdef Py_ssize_t qchars, qbytes
    cdef tuple table_okey
    cdef object shared
    cdef list layouts
    cdef dict headers
    cdef long counts[3]
    cdef bint no_key_seen
    cdef bint dirty


cdef inline bint _same(const uint8_t* b, Py_ssize_t a, Py_ssize_t e, bytes raw):
    cdef Py_ssize_t n = len(raw)
    return n == e - a and memcmp(b + a, <const char*>raw, n) == 0


cdef class TestDecodingLane:
    """Rows of a COPY buffer -> Records, for the subset described in the module's docstring.

    ``fmt``: "CSV", "CSVPayload" (key only) or "JSON" (untyped); ``partition_by``: row, table, xid or constant;
    ``max_record_bytes``: records (data plus partition key) above it are left to the Python path (whose
    oversized policy truncates them), -1 for no check.
    """

    __test__ = False

    cdef int fmt, part
    cdef object constant
    cdef Py_ssize_t constant_bytes
    cdef bint skip_no_key
    cdef Py_ssize_t max_record_bytes
    cdef dict tables
    cdef _Table cur
    cdef object deferred
    cdef list dirty
    # what run() tells its caller
    cdef public Py_ssize_t pos
    cdef public Py_ssize_t record_bytes
    cdef public object advance_to
    cdef public object need
    # NEED_COMMIT: where the search for the COMMIT starts (the row after the BEGIN); the driver's answer
    cdef public Py_ssize_t need_commit_from
    cdef Py_ssize_t hint_from, hint_at
    # the transaction being read
    cdef public bint in_txn
    cdef uint64_t t_xid, t_begin_lsn, t_commit_lsn
    cdef object t_xid_obj, t_xid_str, t_begin_xid, t_commit_obj, t_commit_time
    cdef bytes t_xid_dec, t_commit_text, t_json_txn
    cdef Py_ssize_t t_commit_row, t_commit_end
    cdef long t_index
    # records and bytes of the transaction being read since it began or was last split by a full chunk
    cdef Py_ssize_t t_part_records, t_part_bytes
    cdef Py_ssize_t since_yield  # changes since yield_gil
    # counters not yet added to a BatchStats
    cdef long n_transactions, n_changes, n_published, n_filtered, n_skipped, n_no_key
    cdef long long n_record_bytes
    # scratch
    cdef Out out, tmp, tmp2
    cdef Col* cols
    cdef Py_ssize_t cols_cap

    def __cinit__(self):
        self.out.p = NULL
        self.out.n = self.out.cap = 0
        self.tmp.p = NULL
        self.tmp.n = self.tmp.cap = 0
        self.tmp2.p = NULL
        self.tmp2.n = self.tmp2.cap = 0
        self.cols = NULL
        self.cols_cap = 0

    def __dealloc__(self):
        free(self.out.p)
        free(self.tmp.p)
        free(self.tmp2.p)
        free(self.cols)

    def __init__(self, *, fmt: str, partition_by: str, constant: str, skip_no_key: bool, max_record_bytes: int):
        if tuple(Record.__slots__) != _RECORD_FIELDS:  # pragma: no cover - a reminder, as batching.new_record's
            raise TypeError("Record changed shape: update _td_lane")
        self.fmt = {"CSV": F_CSV, "CSVPayload": F_PAYLOAD, "JSON": F_JSON}[fmt]
        self.part = {"row": P_ROW, "table": P_TABLE, "xid": P_XID, "constant": P_CONSTANT}[partition_by]
        self.constant = constant
        self.constant_bytes = len(constant.encode())
        self.skip_no_key = skip_no_key
        self.max_record_bytes = max_record_bytes
        self.tables = {}
        self.cur = None
        self.deferred = frozenset()
        self.dirty = []
        self.pos = 0
        self.record_bytes = 0
        self.advance_to = None
        self.need = None
        self.in_txn = False
        self.need_commit_from = self.hint_from = self.hint_at = -1

    # -- the registry --------------------------------------------------------------------------------------

    def has_table(self, bytes raw) -> bool:
        return raw in self.tables

    def table_names(self, bytes raw) -> tuple:
        cdef _Table t = self.tables[raw]
        return t.schema, t.table

    def add_table(self, bytes raw, info) -> None:
        """Register the table printed as ``raw``: None (the Python path takes its rows) or
        (schema, table, (INSERT, UPDATE, DELETE accepted by the filter))."""
        cdef _Table t = _Table()
        cdef int i
        if len(self.tables) >= CACHE_LIMIT:
            self._drop_tables()
        t.raw = raw
        t.ok = info is not None
        self.tables[raw] = t
        if not t.ok:
            return
        schema, table, accepts = info
        t.schema, t.table = schema, table
        qualified = f"{schema}.{table}"
        t.qualified = qualified
        for i in range(3):
            t.accept[i] = bool(accepts[i])
            t.counts[i] = 0
        t.keys_known = not any(accepts)  # nothing published: no lookup, as the builder does none
        t.keyed = False
        t.nkeys = 0
        t.key_columns = ()
        t.key_json = []
        q = qualified.encode()
        t.qbytes = len(q)
        t.qchars = len(qualified)
        t.row_prefix = qualified + ":"
        t.table_pkey = _bounded(qualified)
        t.table_pkey_bytes = len(t.table_pkey.encode())
        t.table_okey = ("table", schema, table)
        t.shared = SharedKey(t.table_okey)
        t.layouts = [None, None, None]
        t.headers = {}
        t.no_key_seen = False
        t.dirty = False
        mids = []
        jq = _json_string(qualified)
        for op in _OP_NAMES:
            if self.fmt == F_CSV:
                mids.append(b"," + q + b"," + op.encode() + b",")
            elif self.fmt == F_PAYLOAD:
                mids.append(b'", "table": ' + jq + b', "operation": ' + _json_string(op) + b', "pkey": ')
            else:
                mids.append(b',"table":' + jq + b',"op":"' + op.encode() + b'","pk":')
        t.mids = mids

    def set_keys(self, bytes raw, key_columns) -> None:
        """The table's key columns as the builder's key lookup gives them (None or (): no key)."""
        cdef _Table t = self.tables[raw]
        t.keys_known = True
        t.key_columns = tuple(key_columns or ())
        if len(set(t.key_columns)) != len(t.key_columns):
            t.ok = False  # the builder's pk dict would merge them: the Python path's case
        t.keyed = bool(t.key_columns)
        t.nkeys = len(t.key_columns)
        t.key_json = [orjson.dumps(name) + b":" for name in t.key_columns]
        t.layouts = [None, None, None]

    def set_deferred(self, xids) -> None:
        """Transactions the Python path must read (passing them switches keys)."""
        self.deferred = frozenset(xids)

    def clear_tables(self, stats) -> None:
        """Forget every table (keys may have moved); their counts go to ``stats`` first."""
        self.flush_stats(stats)
        self._drop_tables()

    cdef _drop_tables(self):
        # Counts of dropped tables must survive: keep them on the dirty list until flushed.
        self.tables = {}
        self.cur = None

    # -- statistics ----------------------------------------------------------------------------------------

    def flush_stats(self, stats) -> None:
        """Add what was counted since the last flush to ``stats`` (a BatchStats)."""
        cdef _Table t
        cdef int i
        stats.transactions += self.n_transactions
        stats.changes += self.n_changes
        stats.published += self.n_published
        stats.filtered += self.n_filtered
        stats.skipped_no_key += self.n_skipped
        stats.no_key_changes += self.n_no_key
        stats.record_bytes += self.n_record_bytes
        self.n_transactions = self.n_changes = self.n_published = self.n_filtered = 0
        self.n_skipped = self.n_no_key = 0
        self.n_record_bytes = 0
        if self.dirty:
            by_table_op = stats.by_table_op
            for t in self.dirty:
                for i in range(3):
                    if t.counts[i]:
                        name = f"{t.qualified} {_OP_NAMES[i]}"
                        by_table_op[name] = by_table_op.get(name, 0) + t.counts[i]
                        t.counts[i] = 0
                if t.no_key_seen:
                    stats.no_key_tables.add(t.qualified)
                    t.no_key_seen = False
                t.dirty = False
            self.dirty = []

    # -- the transaction being read ------------------------------------------------------------------------

    def set_commit_hint(self, Py_ssize_t start, Py_ssize_t at) -> None:
        """NEED_COMMIT's answer: the first ``\\tCOMMIT`` at or after ``start`` is at ``at`` (-1: none)."""
        self.hint_from = start
        self.hint_at = at

    def transaction(self) -> tuple:
        """(xid, begin LSN, next change index, BEGIN's printed xid or None, commit LSN, commit time)."""
        return (self.t_xid_obj, self.t_begin_lsn, self.t_index, self.t_begin_xid, self.t_commit_obj,
                self.t_commit_time)

    def resume(self, long next_index, Py_ssize_t pos) -> None:
        """The Python path read the row handed back; go on at ``pos`` with change index ``next_index``."""
        self.t_index = next_index
        self.pos = pos

    def end_transaction(self, Py_ssize_t pos) -> None:
        """The Python path read the rest of the transaction, its commit included (and counted it); go on at
        ``pos``, outside any transaction."""
        self.in_txn = False
        self.pos = pos

    # -- reading -------------------------------------------------------------------------------------------

    def run(self, buf, Py_ssize_t pos, Py_ssize_t end, list records, list commit_lsns, Py_ssize_t record_bytes,
            Py_ssize_t max_records, Py_ssize_t max_bytes) -> int:
        """Read rows of ``buf`` from ``pos`` (before ``end``), appending records and their commit LSNs.

        Returns END (every row read, no transaction open), CHUNK_FULL (a transaction ended with ``records`` at
        ``max_records`` or more, or the chunk's bytes, starting from ``record_bytes``, at ``max_bytes``; or, in a
        transaction larger than that, its part read since it began or was last split reached either: the chunks
        the decoder's ``part_size`` makes), NEED_COMMIT (a BEGIN whose COMMIT is further than COMMIT_LOOKAHEAD: find it
        from ``need_commit_from``, tell set_commit_hint, run again), NEED_TABLE (register
        ``need``, then run again) or SLOW (the row at ``pos`` is the Python path's; ``in_txn`` tells whether it
        is inside the transaction this lane is reading). ``pos``, ``record_bytes`` and ``advance_to`` (the
        last transaction completed in this call, or None) say where it stopped.
        """
        cdef Py_buffer view
        PyObject_GetBuffer(buf, &view, PyBUF_SIMPLE)
        try:
            if end > view.len:
                raise ValueError("end beyond the buffer")
            self.record_bytes = record_bytes
            self.advance_to = None
            return self._run(<const uint8_t*>view.buf, pos, end, records, commit_lsns, max_records, max_bytes)
        finally:
            PyBuffer_Release(&view)

    cdef int _run(self, const uint8_t* b, Py_ssize_t pos, Py_ssize_t end, list records, list commit_lsns,
                  Py_ssize_t max_records, Py_ssize_t max_bytes) except -2:
        cdef const uint8_t* nl
        cdef Py_ssize_t e, t2, d
        cdef uint64_t lsn, xid
        cdef int status
        while True:
            self.pos = pos
            if pos >= end:
                return _END if not self.in_txn else _SLOW
            if self.in_txn and pos == self.t_commit_row:
                self.n_transactions += 1
                self.in_txn = False
                self.advance_to = self.t_commit_obj
                pos = self.t_commit_end
                if PyList_GET_SIZE(records) >= max_records or self.record_bytes >= max_bytes:
                    # Chunks end with a whole transaction where they can: a checkpoint, a place to stop.
                    self.pos = pos
                    return _CHUNK_FULL
                continue
            nl = <const uint8_t*>memchr(b + pos, 10, end - pos)
            if nl == NULL:
                return _SLOW
            e = nl - b
            t2 = _row_fields(b, pos, e, &lsn, &xid)
            if t2 < 0:
                return _SLOW
            d = t2 + 1
            if not self.in_txn:
                status = self._begin(b, d, e, end, lsn, xid)
                if status != _OK:
                    return status
                pos = e + 1
                continue
            if e - d >= 6 and memcmp(b + d, b"table ", 6) == 0:
                if not _text_ok(b, d, e):
                    return _SLOW
                status = self._change(b, d, e, lsn, records, commit_lsns)
                if status != _OK:
                    return status
                pos = e + 1
                self.since_yield += 1
                if self.since_yield >= YIELD_EVERY:
                    self.since_yield = 0
                    yield_gil()
                if self.t_part_records >= max_records or self.t_part_bytes >= max_bytes:
                    # A transaction larger than a chunk is split, as the decoder's part_size splits it.
                    if pos == self.t_commit_row:  # the transaction ends here: let the chunk carry its end
                        self.n_transactions += 1
                        self.in_txn = False
                        self.advance_to = self.t_commit_obj
                        pos = self.t_commit_end
                    self.t_part_records = self.t_part_bytes = 0
                    self.pos = pos
                    return _CHUNK_FULL
                continue
            if e - d >= 34 and (memcmp(b + d, <const char*>_MESSAGE_0, 34) == 0
                                or memcmp(b + d, <const char*>_MESSAGE_1, 34) == 0):
                if not _text_ok(b, d, e):
                    return _SLOW
                pos = e + 1  # a message inside a transaction: no change (the decoder counts its size only)
                continue
            return _SLOW

    cdef int _begin(self, const uint8_t* b, Py_ssize_t d, Py_ssize_t e, Py_ssize_t end, uint64_t lsn,
                    uint64_t row_xid) except -2:
        """A BEGIN row (else SLOW): find its COMMIT ahead, check the pair as the decoder would, open it."""
        cdef uint64_t printed = 0, txid, commit_lsn, commit_row_xid
        cdef bint has_printed = False, has_commit_xid = False
        cdef Py_ssize_t cs, ce, k, t1, t2, cd, p, pd0 = 0, pd1 = 0, cx0 = 0, cx1 = 0, ts0 = -1, ts1 = -1
        cdef Py_ssize_t n0, n1, nt1, nt2
        cdef const uint8_t* hit
        cdef const uint8_t* nl
        if e - d < 5 or memcmp(b + d, b"BEGIN", 5) != 0:
            return _SLOW
        if e - d > 5:
            if b[d + 5] != 32 or not _parse_uint(b, d + 6, e, &printed):
                return _SLOW
            has_printed = True
            pd0, pd1 = d + 6, e
        txid = row_xid if row_xid else printed
        if self.deferred and txid in self.deferred:
            return _SLOW
        # The commit: the first row whose data field starts with COMMIT.
        if self.hint_from == e + 1:
            hit = b + self.hint_at if 0 <= self.hint_at < end else NULL
        else:
            hit = <const uint8_t*>memmem(b + e + 1, min(end - (e + 1), COMMIT_LOOKAHEAD), b"\tCOMMIT", 7)
            if hit == NULL and end - (e + 1) > COMMIT_LOOKAHEAD:
                self.need_commit_from = e + 1
                return _NEED_COMMIT
        if hit == NULL:
            return _SLOW
        k = hit - b
        cs = k
        while cs > e + 1 and b[cs - 1] != 10:
            cs -= 1
        nl = <const uint8_t*>memchr(b + k, 10, end - k)
        if nl == NULL:
            return _SLOW
        ce = nl - b
        if _row_fields(b, cs, ce, &commit_lsn, &commit_row_xid) != k:
            return _SLOW
        cd = k + 1
        if not _text_ok(b, cd, ce):
            return _SLOW
        # COMMIT(?: ([0-9]+))?(?: \(at ([^()]+)\))?, whole
        p = cd + 6
        if p < ce and b[p] == 32 and p + 1 < ce and _digit(b[p + 1]):
            cx0 = p + 1
            p += 1
            while p < ce and _digit(b[p]):
                p += 1
            cx1 = p
            has_commit_xid = True
        if p < ce:
            if ce - p < 6 or memcmp(b + p, b" (at ", 5) != 0 or b[ce - 1] != 41:
                return _SLOW
            ts0, ts1 = p + 5, ce - 1
            if ts1 <= ts0 or memchr(b + ts0, 40, ts1 - ts0) != NULL or memchr(b + ts0, 41, ts1 - ts0) != NULL:
                return _SLOW
        if has_printed and has_commit_xid and (pd1 - pd0 != cx1 - cx0 or memcmp(b + pd0, b + cx0, pd1 - pd0) != 0):
            return _SLOW  # the decoder raises at the COMMIT
        # An empty transaction (a DDL: the keys may change) and one starting with anything but a row change
        # go to the Python path whole.
        n0 = e + 1
        if n0 >= cs:
            return _SLOW
        nl = <const uint8_t*>memchr(b + n0, 10, cs - n0)
        if nl == NULL:
            return _SLOW
        n1 = nl - b
        nt1 = n0
        while nt1 < n1 and b[nt1] != 9:
            nt1 += 1
        nt2 = nt1 + 1
        while nt2 < n1 and b[nt2] != 9:
            nt2 += 1
        if nt2 >= n1 or n1 - (nt2 + 1) < 6 or memcmp(b + nt2 + 1, b"table ", 6) != 0:
            return _SLOW
        # Open it.
        self.in_txn = True
        self.t_xid = txid
        self.t_xid_obj = txid
        self.t_xid_dec = str(txid).encode()
        self.t_xid_str = str(txid)
        self.t_begin_lsn = lsn
        self.t_begin_xid = (<bytes>b[pd0:pd1]).decode() if has_printed else None
        self.t_commit_lsn = commit_lsn
        self.t_commit_obj = commit_lsn
        self.t_commit_time = unescape(<bytes>b[ts0:ts1]).decode() if ts0 >= 0 else None
        self.tmp.n = 0
        out_lsn(&self.tmp, commit_lsn)
        self.t_commit_text = PyBytes_FromStringAndSize(self.tmp.p, self.tmp.n)
        if self.fmt == F_JSON:
            self.t_json_txn = (b'","commit_lsn":"' + self.t_commit_text + b'","xid":' + self.t_xid_dec
                               + b',"commit_ts":' + orjson.dumps(self.t_commit_time))
        self.t_commit_row = cs
        self.t_commit_end = ce + 1
        self.t_index = 0
        self.t_part_records = self.t_part_bytes = 0
        return _OK

    cdef Py_ssize_t _tuple(self, const uint8_t* b, Py_ssize_t i, Py_ssize_t e) except -2:
        """Parse `` name[type]:value`` columns up to e into self.cols: their count, or -1 (not in the subset)."""
        cdef Py_ssize_t n = 0, j
        cdef Col* col
        cdef uint8_t c
        while i < e:
            if b[i] != 32:
                return -1
            i += 1
            if n >= self.cols_cap:
                self._grow_cols()
            col = &self.cols[n]
            col.h0 = i
            j = _ident(b, i, e)
            if j < 0 or j >= e or b[j] != 91:
                return -1
            col.n1 = j
            j += 1
            while j < e:  # the type: no quoted parts here, "[]" pairs only
                c = b[j]
                if c == 93:
                    break
                if c == 34:
                    return -1
                if c == 91:
                    if j + 1 < e and b[j + 1] == 93:
                        j += 2
                        continue
                    return -1
                j += 1
            if j + 1 >= e or b[j + 1] != 58:
                return -1
            col.h1 = j + 1
            i = _value(b, j + 2, e, col)
            if i < 0:
                return -1
            n += 1
        return n

    cdef _grow_cols(self):
        cdef Py_ssize_t cap = self.cols_cap * 2 + 16
        cdef Col* q = <Col*>realloc(self.cols, cap * sizeof(Col))
        if q == NULL:
            raise MemoryError()
        self.cols = q
        self.cols_cap = cap

    cdef _Layout _layout(self, const uint8_t* b, _Table t, int op, Py_ssize_t n):
        """The table's layout for this operation if the row's headers are the same, else a new one."""
        cdef _Layout lay = <_Layout>t.layouts[op]
        cdef Py_ssize_t i, k
        cdef Col* col
        cdef const char* blob
        if lay is not None and lay.ncols == n:
            blob = <const char*>lay.blob
            for i in range(n):
                col = &self.cols[i]
                k = lay.off[i + 1] - lay.off[i]
                if k != col.h1 - col.h0 or memcmp(b + col.h0, blob + lay.off[i], k) != 0:
                    break
            else:
                return lay
        return self._new_layout(b, t, op, n)

    cdef _Layout _new_layout(self, const uint8_t* b, _Table t, int op, Py_ssize_t n):
        cdef _Layout lay = _Layout()
        cdef Py_ssize_t i, total = 0
        cdef Col* col
        lay.ncols = n
        lay.off = <Py_ssize_t*>malloc((n + 1) * sizeof(Py_ssize_t))
        lay.keypos = <int*>malloc((t.nkeys + 1) * sizeof(int))
        if lay.off == NULL or lay.keypos == NULL:
            raise MemoryError()
        parts = []
        names = []
        json_names = []
        headers = t.headers
        if len(headers) >= CACHE_LIMIT:
            headers.clear()
        for i in range(n):
            col = &self.cols[i]
            lay.off[i] = total
            header = <bytes>b[col.h0:col.h1]
            total += col.h1 - col.h0
            parts.append(header)
            entry = headers.get(header)
            if entry is None:
                name = _unquote(unescape(<bytes>b[col.h0:col.n1]).decode())
                entry = headers[header] = (name, orjson.dumps(name) + b":")
            names.append(entry[0])
            json_names.append(entry[1])
        lay.off[n] = total
        lay.blob = b"".join(parts)
        lay.names = names
        lay.json_names = json_names
        lay.dups = len(set(names)) != n
        for i in range(t.nkeys):
            name = t.key_columns[i]
            lay.keypos[i] = names.index(name) if name in names else -1
        t.layouts[op] = lay
        return lay

    cdef object _str(self, const uint8_t* b, Col* col, Py_ssize_t* nbytes):
        """The column's value as the decoder gives it (str, or None for NULL); its UTF-8 length in nbytes."""
        cdef int kind = col.kind
        if kind == K_NULL:
            nbytes[0] = 0
            return None
        if kind == K_TRUE:
            nbytes[0] = 1
            return _S_T
        if kind == K_FALSE:
            nbytes[0] = 1
            return _S_F
        if kind != K_QUOTED or col.plain:
            nbytes[0] = col.v1 - col.v0
            return PyUnicode_DecodeUTF8(<const char*>b + col.v0, col.v1 - col.v0, NULL)
        self.tmp.n = 0
        _put_unescaped(&self.tmp, b, col.v0, col.v1, True)
        nbytes[0] = self.tmp.n
        return PyUnicode_DecodeUTF8(self.tmp.p, self.tmp.n, NULL)

    cdef int _json_value(self, Out* o, const uint8_t* b, Col* col) except -1:
        """The column's value as a JSON string (or null)."""
        cdef int kind = col.kind
        if kind == K_NULL:
            return out_put(o, b"null", 4)
        if kind == K_TRUE:
            return out_put(o, b'"t"', 3)
        if kind == K_FALSE:
            return out_put(o, b'"f"', 3)
        out_byte(o, b'"')
        if kind != K_QUOTED:  # digits, signs, letters: nothing to escape
            out_put(o, <const char*>b + col.v0, col.v1 - col.v0)
        elif col.plain:
            _put_json_text(o, <const char*>b + col.v0, col.v1 - col.v0)
        else:
            self.tmp.n = 0
            _put_unescaped(&self.tmp, b, col.v0, col.v1, True)
            _put_json_text(o, self.tmp.p, self.tmp.n)
        return out_byte(o, b'"')

    cdef int _raw_value(self, Out* o, const uint8_t* b, Col* col) except -1:
        """The column's value text (not NULL), unescaped."""
        cdef int kind = col.kind
        if kind == K_TRUE:
            return out_byte(o, b't')
        if kind == K_FALSE:
            return out_byte(o, b'f')
        if kind == K_QUOTED and not col.plain:
            return _put_unescaped(o, b, col.v0, col.v1, True)
        return out_put(o, <const char*>b + col.v0, col.v1 - col.v0)

    cdef int _pkey_text(self, Out* o, const uint8_t* b, _Table t, _Layout lay) except -1:
        """formats.pkey_text() of a keyed change whose key values are all present and not NULL."""
        cdef int i
        if t.nkeys == 1:
            return self._raw_value(o, b, &self.cols[lay.keypos[0]])
        out_byte(o, b'[')  # json.dumps(values, ensure_ascii=False): ", " between items
        for i in range(t.nkeys):
            if i:
                out_put(o, b", ", 2)
            self._json_value(o, b, &self.cols[lay.keypos[i]])
        return out_byte(o, b']')

    cdef int _image_json(self, Out* o, const uint8_t* b, _Layout lay, Py_ssize_t n) except -1:
        cdef Py_ssize_t i
        out_byte(o, b'{')
        for i in range(n):
            if i:
                out_byte(o, b',')
            out_bytes(o, <bytes>lay.json_names[i])
            self._json_value(o, b, &self.cols[i])
        return out_byte(o, b'}')

    cdef int _change(self, const uint8_t* b, Py_ssize_t d, Py_ssize_t e, uint64_t lsn, list records,
                     list commit_lsns) except -2:
        cdef Py_ssize_t q0, q, qn_end, n, i, nbytes, vbytes, key_bytes, size
        cdef int op
        cdef _Table t
        cdef _Layout lay
        cdef Out* o
        cdef Col* col
        cdef bint keyless
        cdef char idbuf[32]
        cdef int idn
        cdef uint64_t index
        # table <schema>.<table>: INSERT|UPDATE|DELETE:
        q0 = d + 6
        q = _ident(b, q0, e)
        if q < 0 or q >= e or b[q] != 46:
            return _SLOW
        q = _ident(b, q + 1, e)
        if q < 0:
            return _SLOW
        qn_end = q
        if e - q < 9 or b[q] != 58 or b[q + 1] != 32 or b[q + 8] != 58:
            return _SLOW
        q += 2
        if memcmp(b + q, b"INSERT", 6) == 0:
            op = 0
        elif memcmp(b + q, b"UPDATE", 6) == 0:
            op = 1
        elif memcmp(b + q, b"DELETE", 6) == 0:
            op = 2
        else:
            return _SLOW
        q += 7
        t = self.cur
        if t is None or not _same(b, q0, qn_end, t.raw):
            raw = PyBytes_FromStringAndSize(<const char*>b + q0, qn_end - q0)
            t = self.tables.get(raw)
            if t is None:
                self.need = raw
                return _NEED
            self.cur = t
        if not t.ok:
            return _SLOW
        if t.accept[op] and not t.keys_known:
            self.need = t.raw
            return _NEED
        # The image: INSERT's new row, UPDATE's new row (no old key here), DELETE's old row.
        n = self._tuple(b, q, e)
        if n < 0:
            return _SLOW
        if not t.accept[op]:
            self.n_changes += 1
            self.n_filtered += 1
            self.t_index += 1
            return _OK
        keyless = not t.keyed
        if keyless and self.skip_no_key:
            self.n_changes += 1
            self.n_no_key += 1
            self.n_skipped += 1
            self._touch(t)
            t.no_key_seen = True
            self.t_index += 1
            return _OK
        lay = self._layout(b, t, op, n)
        if lay.dups:
            return _SLOW  # which of two same-named columns counts differs between the decoder's paths
        if not keyless:
            for i in range(t.nkeys):
                if lay.keypos[i] < 0 or self.cols[lay.keypos[i]].kind == K_NULL:
                    return _SLOW
        index = self.t_index
        # -- data
        o = &self.out
        o.n = 0
        if self.fmt == F_JSON:
            out_put(o, b'{"id":"', 7)
            out_bytes(o, self.t_commit_text)
            out_byte(o, b':')
            out_u64(o, index)
            out_put(o, b'","lsn":"', 9)
            out_lsn(o, lsn)
            out_bytes(o, self.t_json_txn)
            out_bytes(o, <bytes>t.mids[op])
            if keyless:
                out_put(o, b"null", 4)
            else:
                out_byte(o, b'{')
                for i in range(t.nkeys):
                    if i:
                        out_byte(o, b',')
                    out_bytes(o, <bytes>t.key_json[i])
                    self._json_value(o, b, &self.cols[lay.keypos[i]])
                out_byte(o, b'}')
            out_put(o, b',"after":', 9)
            if op == 2:
                out_put(o, b"null", 4)
            else:
                self._image_json(o, b, lay, n)
            out_put(o, b',"before":', 10)
            if op == 2:
                self._image_json(o, b, lay, n)
            else:
                out_put(o, b"null", 4)
            out_byte(o, b'}')
        elif self.fmt == F_PAYLOAD:
            out_put(o, b'0,CDC,{"xid": "', 15)
            out_bytes(o, self.t_xid_dec)
            out_bytes(o, <bytes>t.mids[op])
            out_byte(o, b'"')
            if not keyless:
                if t.nkeys == 1:
                    self._json_value_inner(o, b, &self.cols[lay.keypos[0]])
                else:
                    self.tmp2.n = 0
                    self._pkey_text(&self.tmp2, b, t, lay)
                    _put_json_text(o, self.tmp2.p, self.tmp2.n)
            out_put(o, b'"}', 2)
        else:
            out_put(o, b"0,CDC,", 6)
            out_bytes(o, self.t_xid_dec)
            out_bytes(o, <bytes>t.mids[op])
            if not keyless:
                self._pkey_text(o, b, t, lay)
        # -- keys
        if keyless:
            if op == 1:
                order = t.table_okey
            else:
                image = tuple([(lay.names[i], self._str(b, &self.cols[i], &vbytes)) for i in range(n)])
                order = _OrderingKeys((t.shared, (_S_IMAGE, t.schema, t.table, image)))
            values = None
        else:
            if t.nkeys == 1:
                value = self._str(b, &self.cols[lay.keypos[0]], &vbytes)
                values = (value,)
            else:
                values = tuple([self._str(b, &self.cols[lay.keypos[i]], &vbytes) for i in range(t.nkeys)])
            order = (_S_ROW, t.schema, t.table, values)
        part = self.part
        if part == P_ROW:
            if keyless:
                key = t.table_pkey
                key_bytes = t.table_pkey_bytes
            elif t.nkeys == 1 and t.qchars + PyUnicode_GET_LENGTH(value) < MAX_PARTITION_KEY_CHARS:
                key = t.row_prefix + value
                key_bytes = t.qbytes + 1 + vbytes
            else:
                key = row_partition_key(t.qualified, values)
                key_bytes = len(key) if key.isascii() else len(key.encode())
        elif part == P_TABLE:
            key = t.table_pkey
            key_bytes = t.table_pkey_bytes
        elif part == P_XID:
            key = self.t_xid_str
            key_bytes = len(key)
        else:
            key = self.constant
            key_bytes = self.constant_bytes
        size = o.n + key_bytes
        if self.max_record_bytes >= 0 and size > self.max_record_bytes:
            return _SLOW  # the oversized policy (truncate) is the Python path's
        data = PyBytes_FromStringAndSize(o.p, o.n)
        # -- the record
        self.tmp.n = 0
        out_bytes(&self.tmp, self.t_commit_text)
        out_byte(&self.tmp, b':')
        out_u64(&self.tmp, index)
        record_id = PyUnicode_DecodeASCII(self.tmp.p, self.tmp.n, NULL)
        record = _new_object(_Record)
        PyObject_GenericSetAttr(record, _S_DATA, data)
        PyObject_GenericSetAttr(record, _S_KEY, key)
        PyObject_GenericSetAttr(record, _S_ORDER, order)
        PyObject_GenericSetAttr(record, _S_ID, record_id)
        PyObject_GenericSetAttr(record, _S_HASH, None)
        PyObject_GenericSetAttr(record, _S_BARRIER, False)
        PyObject_GenericSetAttr(record, _S_SIZE, size)
        PyList_Append(records, record)
        PyList_Append(commit_lsns, self.t_commit_obj)
        self.record_bytes += size
        self.t_part_records += 1
        self.t_part_bytes += size
        self.n_changes += 1
        self.n_published += 1
        self.n_record_bytes += o.n
        self._touch(t)
        t.counts[op] += 1
        if keyless:
            self.n_no_key += 1
            t.no_key_seen = True
        self.t_index += 1
        return _OK

    cdef int _json_value_inner(self, Out* o, const uint8_t* b, Col* col) except -1:
        """A (non-NULL) key value's JSON string content, without the quotes."""
        cdef int kind = col.kind
        if kind == K_TRUE:
            return out_byte(o, b't')
        if kind == K_FALSE:
            return out_byte(o, b'f')
        if kind != K_QUOTED:
            return out_put(o, <const char*>b + col.v0, col.v1 - col.v0)
        if col.plain:
            return _put_json_text(o, <const char*>b + col.v0, col.v1 - col.v0)
        self.tmp.n = 0
        _put_unescaped(&self.tmp, b, col.v0, col.v1, True)
        return _put_json_text(o, self.tmp.p, self.tmp.n)

    cdef inline void _touch(self, _Table t):
        if not t.dirty:
            t.dirty = True
            self.dirty.append(t)
