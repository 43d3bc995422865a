"""Typed JSON values: PostgreSQL's text form of a column -> the closest lossless JSON value.

Pure code. Decoders keep every value as PostgreSQL's text (what ``SELECT col::text``
prints); the JSON formatter, when asked for typed values, converts them here by the
column's type name as the decoders give it (``format_type_be`` output such as
``integer``, ``double precision``, ``character varying[]``; typmods and internal names
like ``int4`` are accepted too).

Rule: never lose information. A conversion happens only when the JSON value carries
exactly what the text said; when it would not (or the text is not what the type's output
function prints), the text is kept. See docs/typed_json.md for the mapping.
"""

from __future__ import annotations

import binascii
import json
import math
import re
from collections.abc import Callable
from decimal import Decimal
from typing import Literal

ByteaMode = Literal["base64", "hex"]
BYTEA_MODES: tuple[str, ...] = ("base64", "hex")


class _Keep(Exception):
    """A conversion would lose information (or the text is unexpected): keep the text."""


# -- scalars ---------------------------------------------------------------------------
# Each converter takes the non-NULL text and returns the JSON value or raises _Keep.
Converter = Callable[[str], object]

# float4out/float8out (shortest exact form) and the forms extra_float_digits may give.
_FLOAT = re.compile(r"-?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")
# JSON has no NaN/Infinity: these stay strings, an intentional and documented mapping.
_FLOAT_WORDS = frozenset({"NaN", "Infinity", "-Infinity"})


def _integer(text: str) -> object:
    # int2out/int4out/int8out print canonical decimal integers: the number must print back as
    # the same text (int() alone would also take " 1", "+1", "1_0" or other scripts' digits).
    try:
        value = int(text)
    except ValueError:
        raise _Keep from None
    if str(value) != text:
        raise _Keep
    return value


def _float(text: str) -> object:
    if text in _FLOAT_WORDS:
        return text
    if _FLOAT.fullmatch(text) is None:
        raise _Keep
    value = float(text)
    if not math.isfinite(value):  # beyond a double (cannot come from float4/8, but never emit inf)
        raise _Keep
    # json prints repr(value), the shortest decimal that reads back as the same double. Up to
    # 15 significant digits that is the text's number exactly; longer texts (float8out's
    # shortest exact form has up to 17 digits, the same as repr's) are compared, so that a
    # text with digits a double cannot hold (extra_float_digits = 3) stays text.
    if len(text) > 15 and Decimal(repr(value)) != Decimal(text):
        raise _Keep
    return value


def _boolean(text: str) -> object:
    if text == "t":
        return True
    if text == "f":
        return False
    raise _Keep


def _json_float(literal: str) -> float:
    # A JSON number with a fraction or exponent: a double only when that is the same number.
    value = float(literal)
    if not math.isfinite(value) or Decimal(repr(value)) != Decimal(literal):
        raise _Keep
    return value


def _no_constant(_literal: str) -> object:
    # Python's json reader accepts NaN/Infinity; PostgreSQL's json does not: never expected.
    raise _Keep


def _unique_keys(pairs: list[tuple[str, object]]) -> dict[str, object]:
    # The json type keeps duplicate keys (jsonb keeps the last); a dict cannot: keep the text.
    obj = dict(pairs)
    if len(obj) != len(pairs):
        raise _Keep
    return obj


_JSON = json.JSONDecoder(parse_float=_json_float, parse_constant=_no_constant, object_pairs_hook=_unique_keys)
# \uD800-\uDFFF escapes: json (not jsonb) accepts lone surrogates, which UTF-8 cannot encode.
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89abAB]")
_SURROGATES = re.compile("[\ud800-\udfff]")


# Deeper values stay text: json.dumps of the whole record (a few levels more) must not hit
# Python's recursion limit.
_MAX_JSON_DEPTH = 200


def _json(text: str) -> object:
    try:
        value = _JSON.decode(text)
    except (ValueError, RecursionError):  # not JSON (cannot happen for json/jsonb) or nested too deep
        raise _Keep from None
    if _SURROGATE_ESCAPE.search(text) and _SURROGATES.search(json.dumps(value, ensure_ascii=False)):
        raise _Keep
    if text.count("[") + text.count("{") > _MAX_JSON_DEPTH and _depth(value) > _MAX_JSON_DEPTH:
        raise _Keep
    return value


def _depth(value: object) -> int:
    """Nesting depth of a parsed JSON value, without recursion."""
    deepest = 0
    stack: list[tuple[object, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            item = list(item.values())
        if isinstance(item, list):
            deepest = max(deepest, depth)
            stack.extend((child, depth + 1) for child in item)
    return deepest


def _bytea_bytes(text: str) -> bytes:
    # byteaout with bytea_output = hex: "\x" then two hex digits per byte. The escape format
    # (bytea_output = escape) is not decoded: kept as text.
    if not text.startswith("\\x"):
        raise _Keep
    try:
        return binascii.a2b_hex(text[2:])  # strict: an odd length or a non-hex digit raises
    except (binascii.Error, ValueError):
        raise _Keep from None


def _bytea_base64(text: str) -> object:
    return binascii.b2a_base64(_bytea_bytes(text), newline=False).decode("ascii")


def _bytea_hex(text: str) -> object:
    return _bytea_bytes(text).hex()


# oid is not here: to_jsonb() prints it as a string too, and it is an identifier, not a quantity.
_INTEGER_TYPES = ("smallint", "integer", "bigint", "int2", "int4", "int8")
_FLOAT_TYPES = ("real", "double precision", "float4", "float8")
# Internal names (int4, bool, ...) appear for domains when pgoutput runs without the catalog.
_SCALARS: dict[str, Converter] = {
    **dict.fromkeys(_INTEGER_TYPES, _integer),
    **dict.fromkeys(_FLOAT_TYPES, _float),
    "boolean": _boolean,
    "bool": _boolean,
    "json": _json,
    "jsonb": _json,
}

# Array element types whose typdelim is not ',' (box is the only built-in one): their
# arrays are kept as text rather than split at the wrong character.
_OTHER_DELIMITER = frozenset({"box"})


# -- arrays ----------------------------------------------------------------------------

# array_out() tokens: braces, the delimiter, a quoted element (\" and \\ escaped), an
# unquoted element (never holding whitespace, quotes, backslashes, braces or commas).
_ARRAY_TOKEN = re.compile(r'([{}])|(,)|"((?:[^"\\]|\\[\s\S])*)"|([^{}",\\ \t\n\r\v\f]+)')
_UNESCAPE = re.compile(r"\\([\s\S])")
# The characters array_out() quotes an element for (with ',' the delimiter).
_NEEDS_QUOTES = re.compile(r'[{}",\\ \t\n\r\v\f]')
# Anything the plain split of a one-dimensional array cannot handle: quotes, braces (also a
# stray '}'), backslashes, whitespace (array_out never prints it unquoted).
_NEEDS_SLOW_PATH = re.compile(r'[{}"\\ \t\n\r\v\f]')
# Quoted elements may hold ';' legitimately: only unquoted ones hint at another delimiter.
_QUOTED_ELEMENT = re.compile(r'"(?:[^"\\]|\\[\s\S])*"')

ArrayValue = list["ArrayValue | str | None"]


def parse_array(text: str) -> ArrayValue | None:
    """PostgreSQL's array text (``array_out`` with delimiter ','): nested lists of str/None.

    ``None`` when the text is not such an array literal, or carries what a JSON array
    cannot (the ``[2:3]={...}`` bounds decoration of arrays not starting at 1).
    """
    if not text.startswith("{"):
        return None
    if text == "{}":
        return []
    if text.find("{", 1) < 0 and not _NEEDS_SLOW_PATH.search(text, 1, len(text) - 1) and text[-1] == "}":
        # One dimension, no quoted element (the common case): a plain split, done in C.
        items: ArrayValue = []
        for item in text[1:-1].split(","):
            if not item:
                return None  # "{,}" or "{1,}": never printed
            items.append(None if item == "NULL" or item.upper() == "NULL" else item)
        return items
    root: ArrayValue = []
    stack: list[ArrayValue] = []
    # What the previous token allows next: "open" after '{', "sep" after ',', "item" after
    # an element or '}'.
    state = "start"
    # Per open array: None until its first child, then "array" or "scalar" (PostgreSQL's
    # arrays are rectangular: children of one array are all sub-arrays or all elements).
    kinds: list[str | None] = []
    pos = 0
    end = len(text)
    match = _ARRAY_TOKEN.match
    while pos < end:
        m = match(text, pos)
        if m is None:
            return None
        pos = m.end()
        brace, comma, quoted, bare = m.groups()
        if brace == "{":
            if state == "start":
                stack.append(root)
                kinds.append(None)
                state = "open"
                continue
            if state not in ("open", "sep") or kinds[-1] == "scalar":
                return None
            kinds[-1] = "array"
            child: ArrayValue = []
            stack[-1].append(child)
            stack.append(child)
            kinds.append(None)
            state = "open"
        elif brace == "}":
            if state != "item":  # an empty sub-array or a trailing ',' is never printed
                return None
            stack.pop()
            kinds.pop()
            if not stack:
                return root if pos == end else None
        elif comma is not None:
            if state != "item":
                return None
            state = "sep"
        else:
            if state not in ("open", "sep") or kinds[-1] == "array":
                return None
            kinds[-1] = "scalar"
            if quoted is not None:
                stack[-1].append(_UNESCAPE.sub(r"\1", quoted) if "\\" in quoted else quoted)
            elif bare.upper() == "NULL":
                stack[-1].append(None)
            else:
                stack[-1].append(bare)
            state = "item"
    return None  # unbalanced braces


def render_array(value: ArrayValue) -> str:
    """The inverse of :func:`parse_array`: the text ``array_out`` prints for these elements."""
    parts: list[str] = []
    for item in value:
        if item is None:
            parts.append("NULL")
        elif isinstance(item, list):
            parts.append(render_array(item))
        elif item == "" or item.upper() == "NULL" or _NEEDS_QUOTES.search(item):
            parts.append('"' + item.replace("\\", "\\\\").replace('"', '\\"') + '"')
        else:
            parts.append(item)
    return "{" + ",".join(parts) + "}"


def _array_converter(element: str, element_converter: Converter | None) -> Converter:
    def convert(text: str) -> object:
        parsed = parse_array(text)
        if parsed is None:
            raise _Keep
        if element_converter is None:
            # A type not known here might have another delimiter (a domain over box, a C type);
            # an unquoted ';' is then the sign of a wrong split: keep the text.
            if element not in _KNOWN_COMMA_TYPES and ";" in text and ";" in _QUOTED_ELEMENT.sub("", text):
                raise _Keep
            return parsed
        return _map(parsed, element_converter)

    return convert


def _map(items: ArrayValue, convert: Converter) -> list[object]:
    # Any element that cannot be converted keeps the whole array as text: a text element among
    # converted ones could not be told apart from a converted string (e.g. a json string).
    return [None if item is None else _map(item, convert) if isinstance(item, list) else convert(item)
            for item in items]


# Built-in types known to use ',' between array elements (all but box); arrays of other,
# unknown, element types get the unquoted-';' check above.
_KNOWN_COMMA_TYPES = frozenset({
    *_INTEGER_TYPES, *_FLOAT_TYPES, "boolean", "bool", "json", "jsonb", "bytea", "numeric", "text", "character",
    "character varying", "name", '"char"', "uuid", "date", "time without time zone", "time with time zone",
    "timestamp without time zone", "timestamp with time zone", "interval", "inet", "cidr", "macaddr", "macaddr8",
    "money", "bit", "bit varying", "xml", "tsvector", "tsquery", "point", "lseg", "path", "polygon", "line",
    "circle", "int4range", "int8range", "numrange", "tsrange", "tstzrange", "daterange", "pg_lsn", "xid", "xid8",
    "cid", "tid", "oid", "regclass", "regtype", "regproc", "jsonpath", "int4multirange", "int8multirange",
    "nummultirange", "tsmultirange", "tstzmultirange", "datemultirange",
})


# -- by type name ----------------------------------------------------------------------

# A parenthesised typmod: numeric(10,2), character varying(20), timestamp(3) with time zone.
_TYPMOD = re.compile(r"\([0-9, ]*\)")
_CACHE_LIMIT = 10_000
_converters: dict[tuple[str, str], Converter | None] = {}


def _bytea_converter(bytea: str) -> Converter:
    return _bytea_base64 if bytea == "base64" else _bytea_hex


def _resolve(type_name: str, bytea: str) -> Converter | None:
    """The converter for ``type_name``; None when its values stay text."""
    name = type_name
    if "(" in name and '"' not in name:
        name = _TYPMOD.sub("", name).replace(" [", "[").strip()
    if name.endswith("[]"):
        element = name[:-2]
        if element.endswith("[]") or element in _OTHER_DELIMITER:
            return None
        return _array_converter(element, _resolve(element, bytea))
    if name == "bytea":
        return _bytea_converter(bytea)
    return _SCALARS.get(name)


def converter_for(type_name: str, bytea: str = "base64") -> Converter | None:
    """The cached converter of ``type_name``, None when its values stay text.

    The converter raises when a value must stay text: call it through :func:`convert_or_text`.
    """
    key = (type_name, bytea)
    try:
        return _converters[key]
    except KeyError:
        pass
    if bytea not in BYTEA_MODES:
        raise ValueError(f"bytea must be one of {', '.join(BYTEA_MODES)}, not {bytea!r}")
    if len(_converters) >= _CACHE_LIMIT:  # bounded: a stream of ever-new type names
        _converters.clear()
    converter = _converters[key] = _resolve(type_name, bytea)
    return converter


def typed_value(type_name: str, text: str | None, *, bytea: ByteaMode | str = "base64") -> object:
    """PostgreSQL's text form of a value of type ``type_name`` as a JSON-ready value.

    Integers -> int; real/double precision -> float when finite ("NaN", "Infinity",
    "-Infinity" stay strings); numeric -> its text; boolean -> bool; json/jsonb -> the
    parsed JSON; bytea -> base64 (or hex digits with ``bytea="hex"``); arrays -> lists,
    elements converted by the element type; every other type -> its text. ``None``
    (SQL NULL) -> ``None``. Whenever a conversion would not be lossless, the text.
    """
    if text is None:
        return None
    converter = converter_for(type_name, bytea)
    if converter is None:
        return text
    return convert_or_text(converter, text)


def convert_or_text(converter: Converter, text: str) -> object:
    """``converter(text)``, or ``text`` when the conversion would lose information."""
    try:
        return converter(text)
    except Exception:  # _Keep, or anything unforeseen: the text is never wrong
        return text


__all__ = ["BYTEA_MODES", "ByteaMode", "Converter", "convert_or_text", "converter_for", "parse_array", "render_array",
           "typed_value"]
