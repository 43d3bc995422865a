"""Throughput of the test_decoding decoder on realistic lines (no database).

Usage: .venv/bin/python benchmarks/bench_decoder.py [--lines 200000] [--repeat 5]

Generates transactions of INSERT/UPDATE/DELETE lines shaped like real
test_decoding output for an "orders" table (int, bigint, text, numeric,
timestamptz, boolean, nullable text), decodes them and prints changes/s
(best of --repeat runs, so a noisy neighbour does not skew the figure).
"""

from __future__ import annotations

import argparse
import random
import time
from collections.abc import Iterator

from pg2kinesis_dagster.core.changes import SlotRow
from pg2kinesis_dagster.core.decoders import decoder_for

_NAMES = ["alice", "bob", "carol", "dave", "eve", "O'Brien", "Zoë", "mallory"]


def _tuple(rng: random.Random, row_id: int) -> str:
    name = rng.choice(_NAMES).replace("'", "''")
    note = "null" if rng.random() < 0.5 else f"'note {rng.randrange(10**6)} with some words'"
    return (
        f" id[integer]:{row_id}"
        f" customer_id[bigint]:{rng.randrange(10**9)}"
        f" customer_name[text]:'{name}'"
        f" email[character varying]:'{name.lower()}{row_id}@example.com'"
        f" amount[numeric]:{rng.randrange(10**6) / 100:.2f}"
        f" created_at[timestamp with time zone]:'2026-11-26 05:{rng.randrange(60):02d}:"
        f"{rng.randrange(60):02d}.{rng.randrange(10**6):06d}+00'"
        f" paid[boolean]:{rng.choice(('true', 'false'))}"
        f" note[text]:{note}"
    )


def generate(lines: int, seed: int = 1) -> list[SlotRow]:
    """About ``lines`` rows: BEGIN, 1-20 changes, COMMIT, repeated."""
    rng = random.Random(seed)
    rows: list[SlotRow] = []
    lsn = 0x16_0000_0000
    xid = 1000
    while len(rows) < lines:
        xid += 1
        rows.append((lsn, xid, f"BEGIN {xid}"))
        for _ in range(rng.randint(1, 20)):
            lsn += rng.randint(40, 400)
            row_id = rng.randrange(10**7)
            kind = rng.random()
            if kind < 0.7:
                data = f"table public.orders: INSERT:{_tuple(rng, row_id)}"
            elif kind < 0.85:
                data = f"table public.orders: UPDATE:{_tuple(rng, row_id)}"
            elif kind < 0.9:
                data = (f"table public.orders: UPDATE: old-key: id[integer]:{row_id + 1}"
                        f" new-tuple:{_tuple(rng, row_id)}")
            else:
                data = f"table public.orders: DELETE: id[integer]:{row_id}"
            rows.append((lsn, xid, data))
        lsn += 64
        rows.append((lsn, xid, f"COMMIT {xid} (at 2026-11-26 05:00:00.123456+00)"))
        lsn += 64
    return rows


def run_once(rows: list[SlotRow]) -> tuple[int, float]:
    decoder = decoder_for("test_decoding")
    started = time.perf_counter()
    changes = 0
    transactions: Iterator = decoder.decode(rows)
    for txn in transactions:
        changes += len(txn.changes)
    return changes, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lines", type=int, default=200_000)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    rows = generate(args.lines)
    megabytes = sum(len(data) for _, _, data in rows) / 1e6
    best = float("inf")
    changes = 0
    for _ in range(args.repeat):
        changes, elapsed = run_once(rows)
        best = min(best, elapsed)
    print(f"{len(rows)} lines ({megabytes:.1f} MB), {changes} changes: "
          f"best {best:.3f}s of {args.repeat} -> {changes / best:,.0f} changes/s, "
          f"{len(rows) / best:,.0f} lines/s")


if __name__ == "__main__":
    main()
