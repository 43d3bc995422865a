"""Throughput of the JSON format, plain (text values) vs typed (--typed-json), no database.

Usage: .venv/bin/python benchmarks/bench_formats.py [--changes 100000] [--repeat 5]

Two workloads: "orders", the decoded changes of bench_decoder.py's realistic
test_decoding lines (integer, bigint, text, varchar, numeric, timestamptz, boolean); and
"rich", a table with the types typed JSON converts most (float8, jsonb, int[], text[],
bytea). Prints changes/s of each formatter (best of --repeat runs) and the typed/plain ratio.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench_decoder, run as a script

from bench_decoder import generate

from pg2kinesis_dagster.core.changes import Change, Column, Operation
from pg2kinesis_dagster.core.decoders import decoder_for
from pg2kinesis_dagster.core.formats import Formatter, JSONFormatter


def orders(changes: int) -> list[Change]:
    """bench_decoder's lines, decoded: about ``changes`` changes (11 per transaction on average)."""
    out: list[Change] = []
    for txn in decoder_for("test_decoding").decode(generate(int(changes * 1.2))):
        for change in txn.changes:
            source = change.after or change.before or ()
            change.pk = {"id": next((c.value for c in source if c.name == "id"), None)}
            out.append(change)
    return out[:changes]


def rich(changes: int, seed: int = 1) -> list[Change]:
    rng = random.Random(seed)
    out: list[Change] = []
    for i in range(changes):
        tags = ",".join(rng.choice(['a', '"b c"', "NULL", "d\\\\e"]) for _ in range(rng.randint(0, 5)))
        after = (
            Column("id", "integer", str(i)),
            Column("score", "double precision", repr(rng.random() * 1000)),
            Column("doc", "jsonb", f'{{"n": {rng.randrange(10**6)}, "tags": ["x", "y"], "ok": true, "r": 1.5}}'),
            Column("ints", "integer[]", "{" + ",".join(str(rng.randrange(1000)) for _ in range(5)) + "}"),
            Column("tags", "text[]", "{" + tags + "}"),
            Column("blob", "bytea", "\\x" + rng.randbytes(16).hex()),
            Column("amount", "numeric", f"{rng.randrange(10**6) / 100:.2f}"),
            Column("paid", "boolean", rng.choice("tf")),
        )
        out.append(Change(1000 + i // 10, 0x1600000000 + i * 64, i % 10, "public", "rich", Operation.INSERT,
                          after=after, commit_lsn=0x1600000000 + (i // 10 + 1) * 640,
                          commit_time="2026-11-26 05:00:00.123456+00", pk={"id": str(i)}))
    return out


def best_rate(formatter: Formatter, changes: list[Change], repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        started = time.perf_counter()
        for change in changes:
            formatter.format(change)
        best = min(best, time.perf_counter() - started)
    return len(changes) / best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--changes", type=int, default=100_000)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    for name, changes in (("orders", orders(args.changes)), ("rich", rich(args.changes))):
        plain = best_rate(JSONFormatter(), changes, args.repeat)
        typed = best_rate(JSONFormatter(typed=True), changes, args.repeat)
        print(f"{name:6} {len(changes)} changes: JSON plain {plain:,.0f} changes/s, typed {typed:,.0f} changes/s "
              f"({typed / plain:.2f}x)")


if __name__ == "__main__":
    main()
