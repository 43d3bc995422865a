"""KPL aggregation and the sink's record check, pure Python against the compiled twins (kinesis/_kpl.pyx).

    python benchmarks/bench_aggregate.py [--records 200000] [--chunk 10000] [--shards 8] [--repeat 5] [--md5]

A backlog of one-row INSERTs (``--records`` changes, 100 per transaction, CSVPayload-like data of about 85 bytes,
partition key ``public.bench:<id>``, ordering key the row) is aggregated for ``--shards`` equal shards, one
``aggregate()`` call per ``--chunk`` records, as the sink would; then every record is checked as ``KinesisSink.put``
does first (its Python loop, ``check_record`` per record, or one ``first_invalid`` call). Each measurement is repeated
``--repeat`` times, Python and native alternating; the best run is shown (the least disturbed by other work on the
machine) with the median beside it. Both give the same aggregates (checked on the first chunk).

``--md5`` also times the partition key hash, which routing needs per new key: the embedded MD5 against hashlib's,
both called from C over the same keys.
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import time
from collections.abc import Callable

from pg2kinesis_dagster import native
from pg2kinesis_dagster.core.batching import MAX_RECORD_BYTES, Record, new_record
from pg2kinesis_dagster.kinesis.aggregation import Shard, ShardMap, aggregate_python
from pg2kinesis_dagster.kinesis.sink import KinesisSink

H = 2**128


def make_records(n: int) -> list[Record]:
    out = []
    for i in range(n):
        pkey = str(i).encode()
        xid = str(1234 + i // 100).encode()  # 100 inserts per transaction
        data = (b'0,CDC,{"xid": "' + xid + b'", "table": "public.bench", "operation": "INSERT", "pkey": "' + pkey
                + b'"}')
        out.append(new_record(data, f"public.bench:{i}", ("row", "public", "bench", (i,)), f"public.bench:{i}"))
    return out


def equal_shards(n: int) -> ShardMap:
    return ShardMap(Shard(f"shardId-{i:012d}", i * H // n, (i + 1) * H // n - 1) for i in range(n))


def timed(f: Callable[[], object]) -> float:
    gc.collect()  # start each run from the same heap state; collections during the run still count
    started = time.perf_counter()
    f()
    return time.perf_counter() - started


def compare(label: str, n: int, repeat: int, python: Callable[[], object], compiled: Callable[[], object] | None,
            ) -> None:
    py_runs: list[float] = []
    c_runs: list[float] = []
    for _ in range(repeat):
        py_runs.append(timed(python))
        if compiled is not None:
            c_runs.append(timed(compiled))

    def us(runs: list[float]) -> str:
        return f"{min(runs) / n * 1e6:7.3f} ({statistics.median(runs) / n * 1e6:.3f})"

    native_text = us(c_runs) if c_runs else "    not built"
    speedup = f"{min(py_runs) / min(c_runs):6.1f}x" if c_runs else ""
    print(f"{label:<34} {us(py_runs):>20} {native_text:>20} {speedup:>8}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records", type=int, default=200_000)
    parser.add_argument("--chunk", type=int, default=10_000, help="records per aggregate() call")
    parser.add_argument("--shards", type=int, default=8)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--md5", action="store_true", help="also time routing's MD5: embedded against hashlib")
    args = parser.parse_args()

    kpl = native.load("pg2kinesis_dagster.kinesis._kpl")
    records = make_records(args.records)
    shard_map = equal_shards(args.shards)
    chunks = [records[i : i + args.chunk] for i in range(0, len(records), args.chunk)]
    n = len(records)
    mean_size = sum(r.size for r in records) / n
    print(f"{n:,} records (mean {mean_size:.0f} bytes with the key), {len(chunks)} aggregate() calls of "
          f"{args.chunk:,}, {args.shards} shards, best of {args.repeat} (median)")
    if kpl is not None:
        want = [(a.data, a.ordering_key, a.record_id, a.shard_id) for a in aggregate_python(chunks[0], shard_map)]
        got = [(a.data, a.ordering_key, a.record_id, a.shard_id)
               for a in kpl.aggregate(chunks[0], shard_map, MAX_RECORD_BYTES, None)]
        assert got == want, "the native aggregates differ from the reference's"
    print(f"{'µs per record':<34} {'python':>20} {'native':>20} {'speedup':>8}")

    def python_aggregate() -> None:
        for chunk in chunks:
            aggregate_python(chunk, shard_map, MAX_RECORD_BYTES, None)

    def native_aggregate() -> None:
        for chunk in chunks:
            kpl.aggregate(chunk, shard_map, MAX_RECORD_BYTES, None)

    compare("aggregate (incl. MD5 routing)", n, args.repeat, python_aggregate,
            native_aggregate if kpl is not None else None)

    # What KinesisSink.put does before sending: its Python loop (check_record per record), or first_invalid.
    sink = KinesisSink(None, "bench")

    def check(native_switch: str) -> Callable[[], None]:
        def run() -> None:
            os.environ["PG2K_NATIVE"] = native_switch
            try:
                sink._check_records(records)
            finally:
                os.environ.pop("PG2K_NATIVE")
        return run

    compare("check records (put's validation)", n, args.repeat, check("0"), check("1") if kpl is not None else None)

    if args.md5 and kpl is not None:
        keys = [r.partition_key.encode() for r in records]
        print(f"{'µs per partition key':<34} {'hashlib from C':>20} {'embedded MD5':>20}")
        compare("MD5 of the key (routing)", n, args.repeat, lambda: kpl.md5_keys(keys, True),
                lambda: kpl.md5_keys(keys, False))


if __name__ == "__main__":
    main()
