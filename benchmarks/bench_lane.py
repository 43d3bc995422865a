"""The COPY window driver with and without the compiled test_decoding lane, records only (no Kinesis).

Usage: .venv/bin/python benchmarks/bench_lane.py [--changes 200000] [--per-txn 100] [--repeat 3] [--hold]

A synthetic window like the pipeline benchmark's backlog (2,000 transactions x 100 INSERTs into public.bench)
in COPY text form, turned into record chunks by core.copy_window.record_chunks_from_copy with ``native=False``
(the Python path: decoder, keys, builder) and ``native=True`` (the lane), for CSVPayload and JSON; prints
microseconds per change, best of ``--repeat``, side by side, and checks that both gave the same records. Each
chunk is dropped once made (the format step writes it to the spool and lets it go); ``--hold`` keeps every
record of the window instead, which adds the allocator's cost of 200,000 live records to both.
"""

from __future__ import annotations

import argparse
import gc
import time

from pg2kinesis_dagster.core.changes import format_lsn
from pg2kinesis_dagster.core.copy_text import format_row
from pg2kinesis_dagster.core.copy_window import LaneCounts, load_lane, record_chunks_from_copy
from pg2kinesis_dagster.core.decoders import TestDecodingDecoder
from pg2kinesis_dagster.core.formats import make_formatter, needs_row_images
from pg2kinesis_dagster.core.records import BatchStats, RecordBuilder
from pg2kinesis_dagster.core.schema_keys import SchemaFollowingKeys
from pg2kinesis_dagster.core.snapshot import SnapshotMerger
from pg2kinesis_dagster.core.window import DEFAULT_CHUNK_BYTES, DEFAULT_CHUNK_CHANGES


class _Key:
    key_columns = ("id",)
    changed_by_xid = None


class _Catalog:
    def tables(self) -> dict[tuple[str, str], _Key]:
        return {("public", "bench"): _Key()}

    def reload(self) -> None:
        pass

    def key_columns(self, schema: str, table: str) -> tuple[str, ...] | None:
        return ("id",) if (schema, table) == ("public", "bench") else None


def window(changes: int, per_txn: int) -> bytes:
    lines: list[bytes] = []
    lsn = 0x16_0000_0000
    xid = 1000
    n = 0
    while n < changes:
        xid += 1
        lines.append(format_row(format_lsn(lsn), xid, f"BEGIN {xid}"))
        for _ in range(min(per_txn, changes - n)):
            n += 1
            lsn += 120
            lines.append(format_row(format_lsn(lsn), xid,
                                    f"table public.bench: INSERT: id[bigint]:{n} qty[integer]:{n % 1000} "
                                    f"label[text]:'label {n}' updated_at[timestamp with time zone]:"
                                    "'2026-12-05 10:00:00.123456+00'"))
        lsn += 64
        lines.append(format_row(format_lsn(lsn), xid, f"COMMIT {xid} (at 2026-12-05 10:00:00.123456+00)"))
        lsn += 64
    return b"".join(lines)


def run(buf: bytes, fmt: str, native: bool, keep: bool = False) -> tuple[float, list[object], LaneCounts]:
    """Seconds for the whole window; the records only with ``keep`` (otherwise each chunk is dropped once made,
    as the format step drops it once written to the spool)."""
    formatter = make_formatter(fmt)
    decoder = TestDecodingDecoder(lazy_images=not needs_row_images(formatter))
    keys = SchemaFollowingKeys(_Catalog(), max_age_seconds=None)
    builder = RecordBuilder(formatter=formatter, key_lookup=keys.key_columns)
    counts = LaneCounts()
    records: list[object] = []
    gc.disable()  # as the pipeline's format step (pipeline._gc_paused)
    try:
        started = time.perf_counter()
        for chunk in record_chunks_from_copy(buf, 0, len(buf), decoder=decoder, builder=builder, schema_keys=keys,
                                             merger=SnapshotMerger(), chunk_changes=DEFAULT_CHUNK_CHANGES,
                                             chunk_bytes=DEFAULT_CHUNK_BYTES, stats=BatchStats(), native=native,
                                             counts=counts):
            if keep:
                records.extend(chunk.records)
        seconds = time.perf_counter() - started
    finally:
        gc.enable()
    return seconds, records, counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--changes", type=int, default=200_000)
    parser.add_argument("--per-txn", type=int, default=100)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--hold", action="store_true", help="keep every record until the window ends")
    args = parser.parse_args()
    if load_lane() is None:
        raise SystemExit("the lane (pg2kinesis_dagster.core._td_lane) is not built: reinstall with a C compiler")
    buf = window(args.changes, args.per_txn)
    print(f"{args.changes} changes, {args.per_txn} per transaction, {len(buf) / 1e6:.1f} MB of COPY text; "
          f"best of {args.repeat}{', records held' if args.hold else ''}")
    print(f"{'format':<11} {'python µs/change':>17} {'lane µs/change':>15} {'speed-up':>9}  lane share")
    for fmt in ("CSVPayload", "JSON"):
        _, python_records, _ = run(buf, fmt, False, keep=True)
        _, lane_records, counts = run(buf, fmt, True, keep=True)
        if python_records != lane_records:
            raise SystemExit(f"{fmt}: the lane's records differ from the Python path's")
        share = f"{counts.lane_records}/{len(lane_records)} records"
        del python_records, lane_records
        best: dict[bool, float] = {}
        for _ in range(args.repeat):
            for native in (False, True):
                seconds, _, _ = run(buf, fmt, native, keep=args.hold)
                best[native] = min(best.get(native, seconds), seconds)
        python_us, lane_us = (best[n] / args.changes * 1e6 for n in (False, True))
        print(f"{fmt:<11} {python_us:>17.2f} {lane_us:>15.2f} {python_us / lane_us:>8.1f}x  {share}")


if __name__ == "__main__":
    main()
