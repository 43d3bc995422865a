# cython: language_level=3
"""Compiled twins of :mod:`pg2kinesis_dagster.kinesis.aggregation`'s ``aggregate`` and of the sink's record check.

The pure-Python code stays the reference: for the same input this module gives the same aggregates (same bytes,
keys, ids, user records, order) and raises the same errors; tests/test_native_aggregation.py compares them.
What it saves is per-change interpreter work: Record fields are read from their slots, partition keys are hashed
by an embedded MD5 (no hashlib object per key), each aggregate is written once into its final bytes object, and a
row key is hashed once per change instead of twice.

Inputs the fast path does not model exactly (a field of an unexpected type, a ShardMap subclass, sizes beyond
the machine's integers) are handed to the Python reference whole, which is safe because aggregation has no side
effects: the result is the reference's by construction.
"""

cimport cython
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.dict cimport PyDict_GetItem
from cpython.list cimport PyList_GET_ITEM, PyList_GET_SIZE
from cpython.object cimport PyObject, PyObject_Hash
from cpython.tuple cimport PyTuple_GET_ITEM
from libc.stdint cimport int32_t, uint8_t, uint64_t
from libc.limits cimport LLONG_MAX, LLONG_MIN
from libc.stdlib cimport free, realloc
from libc.string cimport memcpy
from pg2kinesis_dagster._gil cimport YIELD_EVERY, yield_gil

import dataclasses
import hashlib

from pg2kinesis_dagster.core.batching import OrderingKeys, Record, SharedKey
from pg2kinesis_dagster.kinesis.aggregation import (
    KPL_MAGIC,
    AggregatedRecord,
    ShardMap,
    aggregate_python,
    too_large,
)

cdef extern from "Python.h":
    ctypedef Py_ssize_t Py_hash_t
    const char *PyUnicode_AsUTF8AndSize(object s, Py_ssize_t *size) except NULL
    Py_ssize_t PyUnicode_GET_LENGTH(object s)
    bint PyUnicode_IS_ASCII(object s)

cdef extern from *:
    """
    #include <stdint.h>
    #include <string.h>
    #include "structmember.h"

    /* Where a __slots__ member keeps its value inside the instance (-1: not a plain object slot). */
    static Py_ssize_t kpl_slot_offset(PyObject *descr) {
        if (Py_TYPE(descr) != &PyMemberDescr_Type) return -1;
        PyMemberDef *m = ((PyMemberDescrObject *)descr)->d_member;
        if (m->type != T_OBJECT_EX) return -1;
        return m->offset;
    }
    /* The slot's value, borrowed; NULL when unset (the caller then asks getattr, which raises). */
    static inline PyObject *kpl_slot(PyObject *obj, Py_ssize_t offset) {
        return *(PyObject **)((char *)obj + offset);
    }
    /* What object.__setattr__ does to a slot of a frozen dataclass being initialised. */
    static inline void kpl_set_slot(PyObject *obj, Py_ssize_t offset, PyObject *value) {
        PyObject **slot = (PyObject **)((char *)obj + offset);
        PyObject *old = *slot;
        Py_INCREF(value);
        *slot = value;
        Py_XDECREF(old);
    }

    /* One hash per row key and change instead of two (get, then set): Python does not cache a tuple's hash,
       and a row key's costs as much as the dict probe. The private calls exist up to 3.12 at least. */
    #if PY_VERSION_HEX < 0x030D0000
    #define KPL_GET(d, k, h) _PyDict_GetItem_KnownHash((d), (k), (h))
    #define KPL_SET(d, k, v, h) _PyDict_SetItem_KnownHash((d), (k), (v), (h))
    #else
    #define KPL_GET(d, k, h) PyDict_GetItemWithError((d), (k))
    #define KPL_SET(d, k, v, h) PyDict_SetItem((d), (k), (v))
    #endif
    /* 1 and *value (borrowed) if found, 0 if not, -1 with the lookup's exception (a failing __eq__). */
    static int kpl_dict_get(PyObject *d, PyObject *key, Py_hash_t hash, PyObject **value) {
        *value = KPL_GET(d, key, hash);
        if (*value != NULL) return 1;
        return PyErr_Occurred() ? -1 : 0;
    }
    static int kpl_dict_set(PyObject *d, PyObject *key, PyObject *value, Py_hash_t hash) {
        return KPL_SET(d, key, value, hash);
    }
    /* A dict sized for n keys up front: the per-call key dicts otherwise resize a dozen times. */
    static PyObject *kpl_dict_sized(Py_ssize_t n) {
    #if PY_VERSION_HEX < 0x030D0000
        return _PyDict_NewPresized(n);
    #else
        return PyDict_New();
    #endif
    }

    /* batching._valid_hash_key for an exact str: Kinesis's 0|([1-9]\d{0,38}) below 2**128. */
    static int kpl_valid_hash_key(PyObject *s) {
        if (!PyUnicode_CheckExact(s) || !PyUnicode_IS_ASCII(s)) return 0;
        Py_ssize_t n = PyUnicode_GET_LENGTH(s);
        const char *c = (const char *)PyUnicode_DATA(s);
        if (n < 1 || n > 39) return 0;
        for (Py_ssize_t i = 0; i < n; i++)
            if (c[i] < '0' || c[i] > '9') return 0;
        if (n > 1 && c[0] == '0') return 0;
        /* 39 digits: below 2**128 exactly when below its decimal digits, compared as text. */
        if (n == 39 && memcmp(c, "340282366920938463463374607431768211456", 39) >= 0) return 0;
        return 1;
    }

    /* check_record's verdict on a record whose fields are the expected exact types: 1 passes; 0 fails or is
       not a shape judged here (the caller then asks check_record). Fields are borrowed (NULL: unset). */
    static int kpl_record_ok(PyObject *pk, PyObject *ehk, PyObject *size, long long limit,
                             Py_ssize_t min_chars, Py_ssize_t max_chars) {
        if (pk == NULL || ehk == NULL || size == NULL || !PyUnicode_CheckExact(pk)) return 0;
        Py_ssize_t chars = PyUnicode_GET_LENGTH(pk);
        if (chars < min_chars || chars > max_chars) return 0;
        if (ehk != Py_None && !kpl_valid_hash_key(ehk)) return 0;
        if (!PyLong_CheckExact(size)) return 0;
        int overflow = 0;
        long long n = PyLong_AsLongLongAndOverflow(size, &overflow);
        if (overflow) { PyErr_Clear(); return overflow < 0; }
        if (n == -1 && PyErr_Occurred()) { PyErr_Clear(); return 0; }
        return n <= limit;
    }

    /* MD5 (RFC 1321) for partition keys: a few dozen bytes each, where a hashlib object per key costs several
       times the hash itself (measured: benchmarks/bench_aggregate.py --md5). */
    #define KPL_F(x, y, z) ((z) ^ ((x) & ((y) ^ (z))))
    #define KPL_H(x, y, z) ((x) ^ (y) ^ (z))
    #define KPL_I(x, y, z) ((y) ^ ((x) | ~(z)))
    #define KPL_ROT(a, s) (((a) << (s)) | ((a) >> (32 - (s))))
    #define KPL_STEP(f, a, b, c, d, x, t, s) \\
        (a) += f((b), (c), (d)) + (x) + (uint32_t)(t); (a) = KPL_ROT((a), (s)) + (b);
    /* G(b,c,d) = (b & d) | (c & ~d): the two halves never overlap, so they can be added separately and the
       one not needing b (the previous step's result) computed early. */
    #define KPL_GSTEP(a, b, c, d, x, t, s) \\
        (a) += (x) + (uint32_t)(t) + ((c) & ~(d)); (a) += (b) & (d); (a) = KPL_ROT((a), (s)) + (b);
    static void kpl_md5_block(uint32_t st[4], const unsigned char *p) {
        uint32_t x[16];
    #if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
        memcpy(x, p, 64);
    #else
        for (int i = 0; i < 16; i++)
            x[i] = (uint32_t)p[i * 4] | ((uint32_t)p[i * 4 + 1] << 8) | ((uint32_t)p[i * 4 + 2] << 16)
                   | ((uint32_t)p[i * 4 + 3] << 24);
    #endif
        uint32_t a = st[0], b = st[1], c = st[2], d = st[3];
        KPL_STEP(KPL_F, a, b, c, d, x[0], 0xd76aa478, 7)
        KPL_STEP(KPL_F, d, a, b, c, x[1], 0xe8c7b756, 12)
        KPL_STEP(KPL_F, c, d, a, b, x[2], 0x242070db, 17)
        KPL_STEP(KPL_F, b, c, d, a, x[3], 0xc1bdceee, 22)
        KPL_STEP(KPL_F, a, b, c, d, x[4], 0xf57c0faf, 7)
        KPL_STEP(KPL_F, d, a, b, c, x[5], 0x4787c62a, 12)
        KPL_STEP(KPL_F, c, d, a, b, x[6], 0xa8304613, 17)
        KPL_STEP(KPL_F, b, c, d, a, x[7], 0xfd469501, 22)
        KPL_STEP(KPL_F, a, b, c, d, x[8], 0x698098d8, 7)
        KPL_STEP(KPL_F, d, a, b, c, x[9], 0x8b44f7af, 12)
        KPL_STEP(KPL_F, c, d, a, b, x[10], 0xffff5bb1, 17)
        KPL_STEP(KPL_F, b, c, d, a, x[11], 0x895cd7be, 22)
        KPL_STEP(KPL_F, a, b, c, d, x[12], 0x6b901122, 7)
        KPL_STEP(KPL_F, d, a, b, c, x[13], 0xfd987193, 12)
        KPL_STEP(KPL_F, c, d, a, b, x[14], 0xa679438e, 17)
        KPL_STEP(KPL_F, b, c, d, a, x[15], 0x49b40821, 22)
        KPL_GSTEP(a, b, c, d, x[1], 0xf61e2562, 5)
        KPL_GSTEP(d, a, b, c, x[6], 0xc040b340, 9)
        KPL_GSTEP(c, d, a, b, x[11], 0x265e5a51, 14)
        KPL_GSTEP(b, c, d, a, x[0], 0xe9b6c7aa, 20)
        KPL_GSTEP(a, b, c, d, x[5], 0xd62f105d, 5)
        KPL_GSTEP(d, a, b, c, x[10], 0x02441453, 9)
        KPL_GSTEP(c, d, a, b, x[15], 0xd8a1e681, 14)
        KPL_GSTEP(b, c, d, a, x[4], 0xe7d3fbc8, 20)
        KPL_GSTEP(a, b, c, d, x[9], 0x21e1cde6, 5)
        KPL_GSTEP(d, a, b, c, x[14], 0xc33707d6, 9)
        KPL_GSTEP(c, d, a, b, x[3], 0xf4d50d87, 14)
        KPL_GSTEP(b, c, d, a, x[8], 0x455a14ed, 20)
        KPL_GSTEP(a, b, c, d, x[13], 0xa9e3e905, 5)
        KPL_GSTEP(d, a, b, c, x[2], 0xfcefa3f8, 9)
        KPL_GSTEP(c, d, a, b, x[7], 0x676f02d9, 14)
        KPL_GSTEP(b, c, d, a, x[12], 0x8d2a4c8a, 20)
        KPL_STEP(KPL_H, a, b, c, d, x[5], 0xfffa3942, 4)
        KPL_STEP(KPL_H, d, a, b, c, x[8], 0x8771f681, 11)
        KPL_STEP(KPL_H, c, d, a, b, x[11], 0x6d9d6122, 16)
        KPL_STEP(KPL_H, b, c, d, a, x[14], 0xfde5380c, 23)
        KPL_STEP(KPL_H, a, b, c, d, x[1], 0xa4beea44, 4)
        KPL_STEP(KPL_H, d, a, b, c, x[4], 0x4bdecfa9, 11)
        KPL_STEP(KPL_H, c, d, a, b, x[7], 0xf6bb4b60, 16)
        KPL_STEP(KPL_H, b, c, d, a, x[10], 0xbebfbc70, 23)
        KPL_STEP(KPL_H, a, b, c, d, x[13], 0x289b7ec6, 4)
        KPL_STEP(KPL_H, d, a, b, c, x[0], 0xeaa127fa, 11)
        KPL_STEP(KPL_H, c, d, a, b, x[3], 0xd4ef3085, 16)
        KPL_STEP(KPL_H, b, c, d, a, x[6], 0x04881d05, 23)
        KPL_STEP(KPL_H, a, b, c, d, x[9], 0xd9d4d039, 4)
        KPL_STEP(KPL_H, d, a, b, c, x[12], 0xe6db99e5, 11)
        KPL_STEP(KPL_H, c, d, a, b, x[15], 0x1fa27cf8, 16)
        KPL_STEP(KPL_H, b, c, d, a, x[2], 0xc4ac5665, 23)
        KPL_STEP(KPL_I, a, b, c, d, x[0], 0xf4292244, 6)
        KPL_STEP(KPL_I, d, a, b, c, x[7], 0x432aff97, 10)
        KPL_STEP(KPL_I, c, d, a, b, x[14], 0xab9423a7, 15)
        KPL_STEP(KPL_I, b, c, d, a, x[5], 0xfc93a039, 21)
        KPL_STEP(KPL_I, a, b, c, d, x[12], 0x655b59c3, 6)
        KPL_STEP(KPL_I, d, a, b, c, x[3], 0x8f0ccc92, 10)
        KPL_STEP(KPL_I, c, d, a, b, x[10], 0xffeff47d, 15)
        KPL_STEP(KPL_I, b, c, d, a, x[1], 0x85845dd1, 21)
        KPL_STEP(KPL_I, a, b, c, d, x[8], 0x6fa87e4f, 6)
        KPL_STEP(KPL_I, d, a, b, c, x[15], 0xfe2ce6e0, 10)
        KPL_STEP(KPL_I, c, d, a, b, x[6], 0xa3014314, 15)
        KPL_STEP(KPL_I, b, c, d, a, x[13], 0x4e0811a1, 21)
        KPL_STEP(KPL_I, a, b, c, d, x[4], 0xf7537e82, 6)
        KPL_STEP(KPL_I, d, a, b, c, x[11], 0xbd3af235, 10)
        KPL_STEP(KPL_I, c, d, a, b, x[2], 0x2ad7d2bb, 15)
        KPL_STEP(KPL_I, b, c, d, a, x[9], 0xeb86d391, 21)
        st[0] += a; st[1] += b; st[2] += c; st[3] += d;
    }
    static void kpl_md5(const unsigned char *p, size_t n, unsigned char out[16]) {
        uint32_t st[4] = {0x67452301, 0xefcdab89, 0x98badcfe, 0x10325476};
        uint64_t bits = (uint64_t)n * 8;
        while (n >= 64) { kpl_md5_block(st, p); p += 64; n -= 64; }
        unsigned char tail[128];
        memcpy(tail, p, n);
        tail[n] = 0x80;
        size_t end = n < 56 ? 64 : 128;
        memset(tail + n + 1, 0, end - 8 - n - 1);
        for (int i = 0; i < 8; i++) tail[end - 8 + i] = (unsigned char)(bits >> (8 * i));
        kpl_md5_block(st, tail);
        if (end == 128) kpl_md5_block(st, tail + 64);
        for (int i = 0; i < 4; i++) {
            out[i * 4] = (unsigned char)st[i];
            out[i * 4 + 1] = (unsigned char)(st[i] >> 8);
            out[i * 4 + 2] = (unsigned char)(st[i] >> 16);
            out[i * 4 + 3] = (unsigned char)(st[i] >> 24);
        }
    }
    """
    Py_ssize_t kpl_slot_offset(PyObject *descr)
    PyObject *kpl_slot(PyObject *obj, Py_ssize_t offset)
    void kpl_set_slot(PyObject *obj, Py_ssize_t offset, PyObject *value)
    int kpl_dict_get(object d, object key, Py_hash_t h, PyObject **value) except -1
    int kpl_dict_set(object d, object key, object value, Py_hash_t h) except -1
    dict kpl_dict_sized(Py_ssize_t n)
    int kpl_record_ok(PyObject *pk, PyObject *ehk, PyObject *size, long long limit, Py_ssize_t min_chars,
                      Py_ssize_t max_chars) noexcept
    void kpl_md5(const unsigned char *p, size_t n, unsigned char *out) nogil


def md5(data: bytes) -> bytes:
    """The embedded MD5 of ``data`` (routing's; exposed so the tests can compare it with hashlib)."""
    cdef unsigned char out[16]
    kpl_md5(<const unsigned char *>PyBytes_AS_STRING(data), <size_t>PyBytes_GET_SIZE(data), out)
    return PyBytes_FromStringAndSize(<char *>out, 16)


def md5_keys(keys: list, use_hashlib: bool) -> None:
    """Hash each of ``keys`` (bytes) as routing would: with the embedded MD5, or through hashlib as the
    alternative would (``hashlib.md5(key).digest()`` called from C). For benchmarks/bench_aggregate.py --md5."""
    cdef unsigned char out[16]
    cdef bytes key
    md5_of = hashlib.md5
    for key in keys:
        if key is None:  # a bytes variable also takes None
            raise TypeError("md5_keys takes bytes keys")
        if use_hashlib:
            md5_of(key).digest()
        else:
            kpl_md5(<const unsigned char *>PyBytes_AS_STRING(key), <size_t>PyBytes_GET_SIZE(key), out)


# -- Record fields -------------------------------------------------------------------------------------------


cdef Py_ssize_t _offset(str name):
    return kpl_slot_offset(<PyObject *>Record.__dict__[name])

cdef Py_ssize_t OFF_DATA = _offset("data")
cdef Py_ssize_t OFF_PK = _offset("partition_key")
cdef Py_ssize_t OFF_OK = _offset("ordering_key")
cdef Py_ssize_t OFF_EHK = _offset("explicit_hash_key")
cdef Py_ssize_t OFF_SIZE = _offset("size")
# Slots are read in place only while every field Record has is a plain object slot; otherwise through getattr.
cdef bint FAST_SLOTS = OFF_DATA >= 0 and OFF_PK >= 0 and OFF_OK >= 0 and OFF_EHK >= 0 and OFF_SIZE >= 0

cdef inline object _field(object record, bint fast, Py_ssize_t offset, str name):
    """``getattr(record, name)``, read from the slot when ``record`` is exactly a Record (``fast``)."""
    cdef PyObject *value
    if fast:
        value = kpl_slot(<PyObject *>record, offset)
        if value is not NULL:
            return <object>value
    return getattr(record, name)


# -- protobuf sizes and varints ------------------------------------------------------------------------------

cdef inline Py_ssize_t _vsize(Py_ssize_t n) noexcept:
    cdef Py_ssize_t size = 1
    while n >= 0x80:
        n >>= 7
        size += 1
    return size

cdef inline Py_ssize_t _field_size(Py_ssize_t n) noexcept:
    """A field's bytes: tag, varint ``n``, and ``n`` bytes of value (length-delimited) or of sub-fields."""
    return 1 + _vsize(n) + n

cdef inline uint8_t *_put_varint(uint8_t *p, Py_ssize_t n) noexcept:
    while n >= 0x80:
        p[0] = <uint8_t>((n & 0x7F) | 0x80)
        p += 1
        n >>= 7
    p[0] = <uint8_t>n
    return p + 1

cdef inline uint8_t *_put_bytes(uint8_t *p, uint8_t tag, const char *data, Py_ssize_t size) noexcept:
    p[0] = tag
    p = _put_varint(p + 1, size)
    memcpy(p, data, size)
    return p + size


cdef struct Entry:
    int32_t pk  # index in the aggregate's partition key table
    int32_t ehk  # index in its explicit hash key table, -1: none


# The aggregate's digest: OpenSSL's (faster than ours on long input, and it lets other threads run meanwhile),
# but ours below SMALL_BODY bytes, where hashlib's objects cost more than the hash (one change per aggregate).
cdef object _md5_of = hashlib.md5
cdef Py_ssize_t SMALL_BODY = 512


cdef class _Key:
    """A partition key met in this call: its shard (when routed by its own hash) and where it sits in the
    partition key table of the aggregate it last went into.

    One dict probe per change finds both; the reference probes its route cache and then the aggregate's table.
    The table position is right as long as a key only ever goes to one open aggregate at a time, which holds
    when every change is routed by its partition key (one open aggregate per shard id); a call with explicit
    hash keys uses per-aggregate dicts instead (``by_dict``).
    """

    cdef Py_ssize_t shard
    # The aggregate it last went into (its seq, -1: none): a number, not a reference, so that a _Key holds
    # no object and stays out of the garbage collector's way (one is made per new key).
    cdef Py_ssize_t builder
    cdef Py_ssize_t index


@cython.no_gc  # in no reference cycle (only this module's locals point to builders): nothing for gc to scan
cdef class _Builder:
    """``aggregation._Builder`` and its ``KplRecord`` in one: the aggregate being filled for one shard."""

    cdef Py_ssize_t shard  # index (in the shard map) of the shard it was opened for
    cdef Py_ssize_t slot  # open aggregates are kept per shard id, as the reference's dict is
    cdef Py_ssize_t seq  # when it was opened: the reference's dict order of what is left open
    cdef object partition_key
    cdef list records
    cdef list datas
    cdef set row_keys  # None until the first one, then a set filled as the reference fills its own
    cdef bint closed
    cdef bint plain  # the reference's ``agg is None``: one change sent as it is
    cdef Py_ssize_t max_size
    cdef Py_ssize_t body_size
    # Partition keys as str: the same table as the reference's UTF-8 bytes (encoding is one-to-one).
    cdef list pk_table
    cdef dict pk_index  # only with by_dict; else _Key.index
    cdef dict ehk_index
    cdef list ehk_table
    cdef Entry *entries
    cdef Py_ssize_t capacity

    def __cinit__(self) -> None:
        self.entries = NULL
        self.capacity = 0

    def __dealloc__(self) -> None:
        free(self.entries)

    cdef int add(self, object record, _Key key, object pk, Py_ssize_t pk_len, object data, object ehk) except -1:
        """``_Builder.add`` (through ``KplRecord.add_user_record``): 1 if added, 0 if full or too large for any
        aggregate (the reference's ValueError, which its caller turns into False). ``key``: the partition
        key's entry, None with by_dict."""
        cdef Py_ssize_t pk_i = 0, ehk_i = -1, new_pk = -1, new_ehk = -1, message_size, inner, data_size, count
        cdef PyObject *found
        cdef Entry *grown
        if self.plain or self.closed:
            return 0
        if ehk is not None and not PyUnicode_IS_ASCII(ehk):
            return 0  # the reference's .encode("ascii") raises UnicodeEncodeError, a ValueError
        if key is not None:
            if key.builder == self.seq:
                pk_i = key.index
            else:
                new_pk = PyList_GET_SIZE(self.pk_table)
        else:
            found = PyDict_GetItem(self.pk_index, pk)
            if found is NULL:
                new_pk = PyList_GET_SIZE(self.pk_table)
            else:
                pk_i = <Py_ssize_t><object>found
        if new_pk >= 0:
            message_size = _field_size(pk_len)
            inner = 1 + _vsize(new_pk)
        else:
            message_size = 0
            inner = 1 + _vsize(pk_i)
        if ehk is not None:
            found = NULL if self.ehk_index is None else PyDict_GetItem(self.ehk_index, ehk)
            if found is NULL:
                new_ehk = 0 if self.ehk_table is None else PyList_GET_SIZE(self.ehk_table)
                message_size += _field_size(PyUnicode_GET_LENGTH(ehk))
                inner += 1 + _vsize(new_ehk)
            else:
                ehk_i = <Py_ssize_t><object>found
                inner += 1 + _vsize(ehk_i)
        data_size = PyBytes_GET_SIZE(data)
        inner += _field_size(data_size)
        message_size += _field_size(inner)
        if message_size > self.max_size:
            return 0
        if 20 + self.body_size + message_size > self.max_size:  # 20: the magic and the digest
            return 0
        if new_pk >= 0:
            pk_i = new_pk
            self.pk_table.append(pk)
            if key is not None:
                key.builder = self.seq
                key.index = pk_i
            else:
                self.pk_index[pk] = pk_i
        if new_ehk >= 0:
            ehk_i = new_ehk
            if self.ehk_index is None:
                self.ehk_index = {}
                self.ehk_table = []
            self.ehk_index[ehk] = ehk_i
            self.ehk_table.append(ehk)
        count = PyList_GET_SIZE(self.records)
        if count == self.capacity:
            self.capacity = 16 if self.capacity == 0 else self.capacity * 2
            grown = <Entry *>realloc(self.entries, self.capacity * sizeof(Entry))
            if grown is NULL:
                raise MemoryError()
            self.entries = grown
        self.entries[count].pk = <int32_t>pk_i
        self.entries[count].ehk = <int32_t>ehk_i
        self.records.append(record)
        self.datas.append(data)
        self.body_size += message_size
        return 1

    cdef inline int add_row_key(self, object part) except -1:
        if self.row_keys is None:
            self.row_keys = set()
        self.row_keys.add(part)
        return 0

    cdef bytes serialize(self):
        """``KplRecord.serialize``: magic, the protobuf AggregatedRecord, its MD5, written once in place."""
        cdef Py_ssize_t body = self.body_size, size, inner, i
        cdef const char *text
        cdef Entry entry
        cdef PyObject *data
        cdef bytes out = PyBytes_FromStringAndSize(NULL, 4 + body + 16)
        cdef uint8_t *start = <uint8_t *>PyBytes_AS_STRING(out)
        cdef uint8_t *p = start
        memcpy(p, PyBytes_AS_STRING(KPL_MAGIC), 4)
        p += 4
        for key in self.pk_table:
            text = PyUnicode_AsUTF8AndSize(key, &size)
            p = _put_bytes(p, 0x0A, text, size)
        if self.ehk_table is not None:
            for key in self.ehk_table:
                text = PyUnicode_AsUTF8AndSize(key, &size)
                p = _put_bytes(p, 0x12, text, size)
        for i in range(PyList_GET_SIZE(self.records)):
            entry = self.entries[i]
            data = PyList_GET_ITEM(self.datas, i)  # borrowed: the list holds it, and exact bytes (checked)
            size = PyBytes_GET_SIZE(<object>data)
            inner = 1 + _vsize(entry.pk) + _field_size(size)
            if entry.ehk >= 0:
                inner += 1 + _vsize(entry.ehk)
            p[0] = 0x1A
            p = _put_varint(p + 1, inner)
            p[0] = 0x08
            p = _put_varint(p + 1, entry.pk)
            if entry.ehk >= 0:
                p[0] = 0x10
                p = _put_varint(p + 1, entry.ehk)
            p = _put_bytes(p, 0x1A, PyBytes_AS_STRING(<object>data), size)
        if p - start != 4 + body:  # the running size and the bytes written disagree: a bug, never send it
            raise SystemError(f"KPL record sized {body} bytes, {p - start - 4} written")
        if body < SMALL_BODY:
            kpl_md5(start + 4, <size_t>body, <unsigned char *>p)
        else:
            digest = _md5_of(memoryview(out)[4 : 4 + body]).digest()
            memcpy(p, PyBytes_AS_STRING(digest), 16)
        return out

    cdef object build(self, tuple shards):
        """``_Builder.build``."""
        records = self.records
        shard = shards[self.shard]
        shard_key = ("shard", shard.shard_id)
        if self.row_keys:
            ordering_key = OrderingKeys([shard_key, *[("row", k) for k in self.row_keys]])
        else:
            ordering_key = shard_key
        count = len(records)
        first = records[0]
        last = records[count - 1]
        if self.plain:
            data = first.data
            record_id = first.record_id
        else:
            data = self.serialize()
            record_id = first.record_id if count == 1 else f"{first.record_id}..{last.record_id} ({count} changes)"
        return _aggregated_record(data, self.partition_key, ordering_key, record_id, str(shard.starting_hash_key),
                                  tuple(records), shard.shard_id, not self.plain)


# AggregatedRecord's fields, in its dataclass order (Record's, then its own).
_AGG_FIELDS = ("data", "partition_key", "ordering_key", "record_id", "explicit_hash_key", "barrier", "size",
               "user_records", "shard_id", "aggregated")
cdef Py_ssize_t AGG_OFFSETS[10]
cdef object _object_new = object.__new__


cdef bint _fast_aggregated_records() except -1:
    """Whether AggregatedRecord is still the slots dataclass whose __init__ the fast constructor repeats."""
    if tuple(f.name for f in dataclasses.fields(AggregatedRecord)) != _AGG_FIELDS:
        return False
    if AggregatedRecord.__post_init__ is not Record.__post_init__ or AggregatedRecord.__new__ is not object.__new__:
        return False
    for i, name in enumerate(_AGG_FIELDS):
        descriptor = getattr(AggregatedRecord, name)  # a slot's member descriptor, on the class
        AGG_OFFSETS[i] = kpl_slot_offset(<PyObject *>descriptor)
        if AGG_OFFSETS[i] < 0:
            return False
    return True


cdef bint FAST_AGGREGATED = _fast_aggregated_records()


def fast_paths() -> dict:
    """Which in-place slot accesses are on (each turns itself off, to getattr or the class, when Record or
    AggregatedRecord stops being the slots dataclass it was written for; the tests want them on)."""
    return {"record_slots": FAST_SLOTS, "aggregated_record_slots": FAST_AGGREGATED}


cdef object _aggregated_record(object data, object partition_key, object ordering_key, object record_id,
                               object explicit_hash_key, tuple user_records, object shard_id, bint aggregated):
    """``AggregatedRecord(data=..., ...)``: the frozen dataclass's __init__ (object.__setattr__ per field, then
    __post_init__'s size) done on the slots directly, as batching.new_record does for Records. A one-change
    aggregate (a keyless table's, whose shared table key crosses shards) otherwise costs 1.4 us in __init__."""
    cdef Py_ssize_t key_bytes
    cdef object size, flag, barrier = False  # Python objects: they go into the slots
    if not FAST_AGGREGATED or type(data) is not bytes or type(partition_key) is not str:
        return AggregatedRecord(data=data, partition_key=partition_key, ordering_key=ordering_key,
                                record_id=record_id, explicit_hash_key=explicit_hash_key, user_records=user_records,
                                shard_id=shard_id, aggregated=aggregated)
    PyUnicode_AsUTF8AndSize(partition_key, &key_bytes)  # Record.__post_init__'s len(key.encode("utf-8"))
    size = PyBytes_GET_SIZE(data) + key_bytes
    flag = True if aggregated else False
    record = _object_new(AggregatedRecord)
    cdef PyObject *obj = <PyObject *>record
    kpl_set_slot(obj, AGG_OFFSETS[0], <PyObject *>data)
    kpl_set_slot(obj, AGG_OFFSETS[1], <PyObject *>partition_key)
    kpl_set_slot(obj, AGG_OFFSETS[2], <PyObject *>ordering_key)
    kpl_set_slot(obj, AGG_OFFSETS[3], <PyObject *>record_id)
    kpl_set_slot(obj, AGG_OFFSETS[4], <PyObject *>explicit_hash_key)
    kpl_set_slot(obj, AGG_OFFSETS[5], <PyObject *>barrier)
    kpl_set_slot(obj, AGG_OFFSETS[6], <PyObject *>size)
    kpl_set_slot(obj, AGG_OFFSETS[7], <PyObject *>user_records)
    kpl_set_slot(obj, AGG_OFFSETS[8], <PyObject *>shard_id)
    kpl_set_slot(obj, AGG_OFFSETS[9], <PyObject *>flag)
    return record


cdef inline bint _gt(object size, Py_ssize_t limit) except -1:
    """``size > limit`` for an exact int ``size``, however large."""
    try:
        return <Py_ssize_t>size > limit
    except OverflowError:
        return size > limit


cdef object _MASK64 = (1 << 64) - 1
cdef Py_ssize_t _LIMIT = 1 << 62  # sizes beyond this go to the reference (no C overflow to reason about)
cdef object _BY_DICT = object()  # _aggregate's answer: explicit hash keys met, run again with by_dict


cdef class _Run:
    """One call's state: the reference's ``out``, ``open_by_shard`` (per shard id slot) and what opens next."""

    cdef list out
    cdef list open_slots
    cdef Py_ssize_t seq
    cdef Py_ssize_t max_bytes

    cdef inline int close(self, _Builder b) except -1:
        b.closed = True
        self.open_slots[b.slot] = None
        self.out.append(b)
        return 0

    cdef _Builder place(self, Py_ssize_t shard, Py_ssize_t slot, object record, _Key key, object pk,
                        Py_ssize_t pk_len, object data, object ehk):
        """The reference's "add to the shard's open aggregate, else close it and open another"."""
        cdef _Builder b = <_Builder>self.open_slots[slot]
        if b is not None and b.add(record, key, pk, pk_len, data, ehk):
            return b
        if b is not None:
            self.close(b)
        b = _Builder.__new__(_Builder)
        b.shard = shard
        b.slot = slot
        b.seq = self.seq
        self.seq += 1
        b.partition_key = pk
        b.records = []
        b.datas = []
        b.row_keys = None
        b.closed = False
        b.plain = False
        # Kinesis counts the outer partition key against the record limit too; the KPL record gets the rest.
        b.max_size = self.max_bytes - pk_len
        b.body_size = 0
        b.pk_table = []
        b.pk_index = None if key is not None else {}
        b.ehk_index = None  # made by the first explicit hash key
        b.ehk_table = None
        if not b.add(record, key, pk, pk_len, data, ehk):
            b.plain = True  # does not fit in an envelope: sent as a plain record
            b.records.append(record)
            b.closed = True
            self.out.append(b)
        else:
            self.open_slots[slot] = b
        return b


def aggregate(records: object, shard_map: object, max_bytes: object, max_record_bytes: object) -> list:
    """``aggregation.aggregate_python``'s result for the same arguments, computed in C where it can be."""
    if type(records) is not list and type(records) is not tuple:
        # Indexed in place below: exactly a list or a tuple; and an iterator must survive a hand-over to the
        # reference.
        records = list(records)
    if (type(shard_map) is not ShardMap or type(max_bytes) is not int
            or (max_record_bytes is not None and type(max_record_bytes) is not int)):
        return aggregate_python(records, shard_map, max_bytes, max_record_bytes)
    record_limit = max_bytes if max_record_bytes is None else max(max_bytes, max_record_bytes)
    if not (-_LIMIT < max_bytes < _LIMIT and -_LIMIT < record_limit < _LIMIT):
        return aggregate_python(records, shard_map, max_bytes, max_record_bytes)
    result = _aggregate(records, shard_map, max_bytes, record_limit, False)
    if result is _BY_DICT:
        result = _aggregate(records, shard_map, max_bytes, record_limit, True)
    if result is None:  # a shape only the reference handles
        return aggregate_python(records, shard_map, max_bytes, max_record_bytes)
    return result


cdef object _aggregate(object records, object shard_map, Py_ssize_t max_bytes, Py_ssize_t record_limit,
                       bint by_dict):
    """The result, None for a record shape to leave to the reference, or _BY_DICT (see _Key)."""
    cdef tuple shards = shard_map.shards
    cdef Py_ssize_t n_shards = len(shards), n = len(records), i, j, lo_i, hi_i, mid, shard, slot, pk_len
    cdef uint64_t *starts = <uint64_t *>realloc(NULL, 2 * n_shards * sizeof(uint64_t) + 1)
    cdef Py_ssize_t *slots = <Py_ssize_t *>realloc(NULL, n_shards * sizeof(Py_ssize_t) + 1)
    cdef uint64_t hi, lo
    cdef unsigned char digest[16]
    cdef const char *pk_ptr
    cdef Py_hash_t key_hash
    cdef PyObject *found
    cdef _Builder b, previous
    cdef _Key entry
    cdef bint is_list = type(records) is list, fast
    cdef dict last_builder = kpl_dict_sized(n)  # where each row's latest change went
    cdef dict routes = kpl_dict_sized(n)  # partition key -> _Key
    cdef dict slot_of_id = {}
    cdef object shard_pos = None
    cdef _Run run = _Run.__new__(_Run)
    if starts is NULL or slots is NULL:
        free(starts)
        free(slots)
        raise MemoryError()
    try:
        for i in range(n_shards):
            s = shards[i]
            start_key = s.starting_hash_key
            starts[2 * i] = <uint64_t>(start_key >> 64)
            starts[2 * i + 1] = <uint64_t>(start_key & _MASK64)
            slots[i] = slot_of_id.setdefault(s.shard_id, len(slot_of_id))
        run.out = []
        run.open_slots = [None] * len(slot_of_id)
        run.seq = 0
        run.max_bytes = max_bytes

        i = 0
        # The length is read each time, as a list iterator does: a key's __eq__ could shorten the list.
        while i < (PyList_GET_SIZE(records) if is_list else n):
            record = <object>(PyList_GET_ITEM(records, i) if is_list else PyTuple_GET_ITEM(records, i))
            i += 1
            if (i & (YIELD_EVERY - 1)) == 0:
                yield_gil()
            fast = FAST_SLOTS and type(record) is Record
            size = _field(record, fast, OFF_SIZE, "size")
            if type(size) is not int:
                return None
            if _gt(size, record_limit):
                raise too_large(record, record_limit)
            pk = _field(record, fast, OFF_PK, "partition_key")
            ehk = _field(record, fast, OFF_EHK, "explicit_hash_key")
            data = _field(record, fast, OFF_DATA, "data")
            if type(pk) is not str or type(data) is not bytes or (ehk is not None and type(ehk) is not str):
                return None
            if ehk is None:
                found = PyDict_GetItem(routes, pk)
                # UTF-8 of an ASCII str is its own text; otherwise str caches it: no copy either way. A key
                # that cannot be encoded raises here the reference's UnicodeEncodeError.
                pk_ptr = PyUnicode_AsUTF8AndSize(pk, &pk_len)
                if found is not NULL:
                    entry = <_Key>found
                else:
                    kpl_md5(<const unsigned char *>pk_ptr, <size_t>pk_len, digest)
                    hi = 0
                    lo = 0
                    for j in range(8):
                        hi = (hi << 8) | digest[j]
                        lo = (lo << 8) | digest[8 + j]
                    # bisect_right over the starting hash keys, minus one (the first starts at 0).
                    lo_i = 0
                    hi_i = n_shards
                    while lo_i < hi_i:
                        mid = (lo_i + hi_i) >> 1
                        if hi < starts[2 * mid] or (hi == starts[2 * mid] and lo < starts[2 * mid + 1]):
                            hi_i = mid
                        else:
                            lo_i = mid + 1
                    entry = _Key.__new__(_Key)
                    entry.shard = lo_i - 1
                    entry.builder = -1
                    routes[pk] = entry
                shard = entry.shard
                if by_dict:
                    entry = None
            else:
                if not by_dict:
                    return _BY_DICT
                # Rare (the sink's own user records have none): the reference's routing, errors and all.
                routed = shard_map.shard_for(pk, ehk)
                if shard_pos is None:
                    shard_pos = {id(s): j for j, s in enumerate(shards)}
                shard = shard_pos[id(routed)]
                pk_ptr = PyUnicode_AsUTF8AndSize(pk, &pk_len)
                entry = None
            slot = slots[shard]

            key = _field(record, fast, OFF_OK, "ordering_key")
            if type(key) is not OrderingKeys:
                # One identity: hashed once for the lookup here and the update below.
                key_hash = PyObject_Hash(key)
                crossing = False
                if kpl_dict_get(last_builder, key, key_hash, &found):
                    previous = <_Builder>found
                    if previous.shard != shard:
                        # The aggregate taking this change must wait for the one holding the row's previous
                        # change: close that one now, so it comes first in the output.
                        if not previous.closed:
                            run.close(previous)
                        previous.add_row_key(key)
                        crossing = True
                b = run.place(shard, slot, record, entry, pk, pk_len, data, ehk)
                if crossing:
                    b.add_row_key(key)
                kpl_dict_set(last_builder, key, b, key_hash)
            else:
                # Each identity of the change, shared ones whole (see the reference).
                parts = [p.key if type(p) is SharedKey else p for p in key]
                crossing_parts = None
                for part in parts:
                    prev_obj = last_builder.get(part)
                    if prev_obj is not None and (<_Builder>prev_obj).shard != shard:
                        previous = <_Builder>prev_obj
                        if not previous.closed:
                            run.close(previous)
                        previous.add_row_key(part)
                        if crossing_parts is None:
                            crossing_parts = []
                        crossing_parts.append(part)
                b = run.place(shard, slot, record, entry, pk, pk_len, data, ehk)
                if crossing_parts is not None:
                    for part in crossing_parts:
                        b.add_row_key(part)
                for part in parts:
                    last_builder[part] = b
    finally:
        free(starts)
        free(slots)

    # Still open: in the order they were opened (the reference's dict order).
    out = run.out
    out.extend(sorted([b for b in run.open_slots if b is not None], key=_seq_of))
    return [(<_Builder>b).build(shards) for b in out]


def _seq_of(b: _Builder) -> int:
    return b.seq


# -- the sink's validation -----------------------------------------------------------------------------------

from pg2kinesis_dagster.core.batching import MAX_PARTITION_KEY_CHARS, MIN_PARTITION_KEY_CHARS

cdef Py_ssize_t _MIN_CHARS = MIN_PARTITION_KEY_CHARS
cdef Py_ssize_t _MAX_CHARS = MAX_PARTITION_KEY_CHARS


def first_invalid(records: object, max_record_bytes: int, start: int = 0) -> int:
    """The index of the first record from ``start`` on that ``check_record(record, max_record_bytes)`` rejects,
    or -1 when none does.

    Exact for Records whose fields have their declared types; a record of any other shape is reported too (as
    if it failed), so the caller's ``check_record`` on it decides and the caller goes on after it.
    """
    cdef Py_ssize_t i, n, begin = start
    cdef long long limit
    cdef PyObject *item
    if type(records) is not list and type(records) is not tuple:
        records = list(records)  # indexed in place below: exactly a list or a tuple
    cdef bint is_list = type(records) is list
    n = len(records)
    try:
        limit = max_record_bytes
    except OverflowError:
        limit = LLONG_MAX if max_record_bytes > 0 else LLONG_MIN
    i = max(begin, 0)
    while i < (PyList_GET_SIZE(records) if is_list else n):  # getattr on an odd record may run any code
        item = PyList_GET_ITEM(records, i) if is_list else PyTuple_GET_ITEM(records, i)
        if FAST_SLOTS and type(<object>item) is Record:
            if not kpl_record_ok(kpl_slot(item, OFF_PK), kpl_slot(item, OFF_EHK), kpl_slot(item, OFF_SIZE),
                                 limit, _MIN_CHARS, _MAX_CHARS):
                return i
        else:
            record = <object>item
            pk = getattr(record, "partition_key")
            ehk = getattr(record, "explicit_hash_key")
            size = getattr(record, "size")
            if not kpl_record_ok(<PyObject *>pk, <PyObject *>ehk, <PyObject *>size, limit, _MIN_CHARS,
                                 _MAX_CHARS):
                return i
        i += 1
    return -1
