"""Throughput of the wal2json and pgoutput decoders on realistic pre-built rows (no database).

Usage: .venv/bin/python benchmarks/bench_decoders_other.py [--lines 200000] [--repeat 5]

Builds transactions of INSERT/UPDATE/DELETE rows for the same "orders" table as
benchmarks/bench_decoder.py (int, bigint, text, varchar, numeric, timestamptz, boolean,
nullable text), as wal2json format-version 2 documents and as pgoutput protocol-1
messages, decodes them and prints changes/s per decoder (best of --repeat runs). The
test_decoding figure from bench_decoder.py's rows is printed alongside for comparison.
"""

from __future__ import annotations

import argparse
import json
import random
import struct
import sys
import time
from collections.abc import Callable
from pathlib import Path

from pg2kinesis_dagster.core.changes import SlotRow
from pg2kinesis_dagster.core.decoders import Decoder, decoder_for

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_decoder  # the test_decoding rows, for the comparison line

_NAMES = ["alice", "bob", "carol", "dave", "eve", "O'Brien", "Zoë", "mallory"]
# name, type (format_type_be), type OID
_COLUMNS = [
    ("id", "integer", 23), ("customer_id", "bigint", 20), ("customer_name", "text", 25),
    ("email", "character varying", 1043), ("amount", "numeric", 1700),
    ("created_at", "timestamp with time zone", 1184), ("paid", "boolean", 16), ("note", "text", 25),
]
_RELID = 16_400


def _values(rng: random.Random, row_id: int) -> list[str | bool | None]:
    name = rng.choice(_NAMES)
    return [
        str(row_id),
        str(rng.randrange(10**9)),
        name,
        f"{name.lower()}{row_id}@example.com",
        f"{rng.randrange(10**6) / 100:.2f}",
        f"2026-11-26 05:{rng.randrange(60):02d}:{rng.randrange(60):02d}.{rng.randrange(10**6):06d}+00",
        rng.choice((True, False)),
        None if rng.random() < 0.5 else f"note {rng.randrange(10**6)} with some words",
    ]


def _plan(lines: int, seed: int) -> list[tuple[int, int, str, list[str | bool | None] | None, int | None]]:
    """(lsn, xid, kind, new values, old key) per row: kind B, C, I, U, K (update with old key), D."""
    rng = random.Random(seed)
    plan: list[tuple[int, int, str, list[str | bool | None] | None, int | None]] = []
    lsn, xid = 0x16_0000_0000, 1000
    while len(plan) < lines:
        xid += 1
        plan.append((lsn, xid, "B", None, None))
        for _ in range(rng.randint(1, 20)):
            lsn += rng.randint(40, 400)
            row_id = rng.randrange(10**7)
            kind = rng.random()
            if kind < 0.7:
                plan.append((lsn, xid, "I", _values(rng, row_id), None))
            elif kind < 0.85:
                plan.append((lsn, xid, "U", _values(rng, row_id), None))
            elif kind < 0.9:
                plan.append((lsn, xid, "K", _values(rng, row_id), row_id + 1))
            else:
                plan.append((lsn, xid, "D", None, row_id))
        lsn += 64
        plan.append((lsn, xid, "C", None, None))
        lsn += 64
    return plan


# -- wal2json ---------------------------------------------------------------------------

_TS = "2026-11-26 05:00:00.123456+00"
_WJ_TYPES = {"integer": "integer", "character varying": "character varying(200)", "numeric": "numeric(12,2)"}


def _wj_value(type_: str, value: str | bool | None) -> object:
    if value is None or isinstance(value, bool):
        return value
    if type_ in ("integer", "bigint", "numeric"):
        return json.loads(value)  # printed unquoted by wal2json
    return value


def _wj_columns(values: list[str | bool | None]) -> list[dict[str, object]]:
    return [
        {"name": n, "type": _WJ_TYPES.get(t, t), "typeoid": o, "value": _wj_value(t, v), "position": i}
        for i, ((n, t, o), v) in enumerate(zip(_COLUMNS, values, strict=True), start=1)
    ]


def wal2json_rows(lines: int, seed: int = 1) -> list[SlotRow]:
    rows: list[SlotRow] = []
    for lsn, xid, kind, values, old in _plan(lines, seed):
        doc: dict[str, object] = {"action": kind if kind != "K" else "U", "xid": xid, "timestamp": _TS}
        if kind in "IUDK":
            doc.update(schema="public", table="orders")
        if values is not None:
            doc["columns"] = _wj_columns(values)
        if kind == "U":
            doc["identity"] = [{"name": "id", "type": "integer", "typeoid": 23, "value": int(values[0])}]  # type: ignore[index, arg-type]
        elif kind in "KD":
            doc["identity"] = [{"name": "id", "type": "integer", "typeoid": 23, "value": old}]
        rows.append((lsn, xid, json.dumps(doc, ensure_ascii=False, separators=(",", ":"))))
    return rows


# -- pgoutput ---------------------------------------------------------------------------


def _pg_tuple(values: list[str | bool | None]) -> bytes:
    out = [struct.pack("!H", len(values))]
    for v in values:
        if v is None:
            out.append(b"n")
        else:
            text = ("t" if v else "f") if isinstance(v, bool) else v
            data = text.encode()
            out.append(b"t" + struct.pack("!I", len(data)) + data)
    return b"".join(out)


def _relation() -> bytes:
    cols = b"".join(struct.pack("!B", 1 if n == "id" else 0) + n.encode() + b"\0" + struct.pack("!Ii", o, -1)
                    for n, _, o in _COLUMNS)
    return b"R" + struct.pack("!I", _RELID) + b"public\0orders\0d" + struct.pack("!H", len(_COLUMNS)) + cols


def pgoutput_rows(lines: int, seed: int = 1) -> list[SlotRow]:
    rows: list[SlotRow] = []
    rel = struct.pack("!I", _RELID)
    key_only: Callable[[int], list[str | bool | None]] = lambda k: [str(k)] + [None] * (len(_COLUMNS) - 1)  # noqa: E731
    first = True
    for lsn, xid, kind, values, old in _plan(lines, seed):
        if kind == "B":
            data = b"B" + struct.pack("!QqI", lsn, 848_984_858_286_272, xid)
        elif kind == "C":
            data = b"C" + struct.pack("!BQQq", 0, lsn - 8, lsn, 848_984_858_286_272)
        else:
            if first:  # pgoutput sends the Relation message before the table's first change
                rows.append((lsn, xid, _relation()))
                first = False
            if kind == "I":
                data = b"I" + rel + b"N" + _pg_tuple(values)  # type: ignore[arg-type]
            elif kind == "U":
                data = b"U" + rel + b"N" + _pg_tuple(values)  # type: ignore[arg-type]
            elif kind == "K":
                data = b"U" + rel + b"K" + _pg_tuple(key_only(old)) + b"N" + _pg_tuple(values)  # type: ignore[arg-type]
            else:
                data = b"D" + rel + b"K" + _pg_tuple(key_only(old))  # type: ignore[arg-type]
        rows.append((lsn, xid, data))
    return rows


# -- measuring --------------------------------------------------------------------------


def run_once(make: Callable[[], Decoder], rows: list[SlotRow]) -> tuple[int, float]:
    decoder = make()
    started = time.perf_counter()
    changes = 0
    for txn in decoder.decode(rows):
        changes += len(txn.changes)
    return changes, time.perf_counter() - started


def measure(label: str, make: Callable[[], Decoder], rows: list[SlotRow], repeat: int) -> None:
    megabytes = sum(len(data) for _, _, data in rows) / 1e6
    best = float("inf")
    changes = 0
    for _ in range(repeat):
        changes, elapsed = run_once(make, rows)
        best = min(best, elapsed)
    print(f"{label:14} {len(rows)} rows ({megabytes:.1f} MB), {changes} changes: best {best:.3f}s of {repeat} "
          f"-> {changes / best:,.0f} changes/s, {len(rows) / best:,.0f} rows/s")


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--lines", type=int, default=200_000)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    measure("test_decoding", lambda: decoder_for("test_decoding"), bench_decoder.generate(args.lines), args.repeat)
    measure("wal2json", lambda: decoder_for("wal2json"), wal2json_rows(args.lines), args.repeat)
    measure("pgoutput", lambda: decoder_for("pgoutput"), pgoutput_rows(args.lines), args.repeat)


if __name__ == "__main__":
    main()
