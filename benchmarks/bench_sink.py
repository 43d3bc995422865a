"""KinesisSink.put() into moto's Kinesis server, with and without KPL aggregation.

    python benchmarks/bench_sink.py --records 100000 --size 200 --shards 4

Starts a throwaway moto server, and for each mode puts ``--records`` changes of about
``--size`` bytes (over ``--keys`` rows, a ``--hot`` share of the changes on 5 hot rows) into a
fresh stream, then reports changes/s, Kinesis records and PutRecords requests, and the
time aggregate() alone takes. With ``--verify`` the stream is read back (and deaggregated)
to check that every change arrived.

moto's server is far slower per request than Kinesis, and has no per-shard limits; against
AWS the difference is larger still, as a shard takes 1,000 records/s but 1 MiB/s. Hot rows
slow the unaggregated mode most: a request carries at most one change per row.
"""

from __future__ import annotations

import argparse
import base64
import random
import time
from collections import Counter

from aws_kinesis_agg.deaggregator import iter_deaggregate_records

from pg2kinesis_dagster.core.batching import Record
from pg2kinesis_dagster.devstack.moto import MotoServer
from pg2kinesis_dagster.kinesis.aggregation import ShardMap, aggregate
from pg2kinesis_dagster.kinesis.sink import KinesisSink, make_kinesis_client


def make_records(n: int, keys: int, size: int, hot: float, seed: int = 1) -> list[Record]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        key = rng.randrange(5) if rng.random() < hot else rng.randrange(keys)
        head = f'{{"id":"0/{i:X}:0","table":"public.orders","pk":{key},"data":"'.encode()
        out.append(Record(head + b"x" * max(0, size - len(head) - 2) + b'"}', f"public.orders:{key}", key, f"c{i}"))
    return out


def read_back(moto: MotoServer, stream: str) -> Counter[bytes]:
    got: Counter[bytes] = Counter()
    for r in moto.read_stream(stream):
        raw = {"Data": r["data"], "PartitionKey": r["partition_key"], "SequenceNumber": r["sequence_number"],
               "ApproximateArrivalTimestamp": 0}
        for user in iter_deaggregate_records([raw], data_format="Boto3"):
            k = user["kinesis"]
            got[base64.b64decode(k["data"]) if k.get("aggregated") else k["data"]] += 1
    return got


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records", type=int, default=100_000)
    parser.add_argument("--size", type=int, default=200, help="bytes of data per change")
    parser.add_argument("--keys", type=int, default=10_000, help="distinct rows (partition keys)")
    parser.add_argument("--hot", type=float, default=1 / 3, help="share of the changes on 5 hot rows")
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--modes", default="on,off", help="aggregation modes to run, in order")
    parser.add_argument("--verify", action="store_true", help="read the stream back and check every change")
    args = parser.parse_args()

    records = make_records(args.records, args.keys, args.size, args.hot)
    megabytes = sum(r.size for r in records) / 1e6
    print(f"{args.records:,} changes, {megabytes:.1f} MB (data + partition keys), {args.keys:,} rows "
          f"({args.hot:.0%} of changes on 5 hot rows), {args.shards} shards")
    with MotoServer() as moto:
        client = make_kinesis_client(region_name=moto.region, endpoint_url=moto.endpoint_url,
                                     aws_access_key_id="testing", aws_secret_access_key="testing")
        for mode in args.modes.split(","):
            on = mode.strip() == "on"
            stream = f"bench-{mode.strip()}"
            moto.create_stream(stream, shards=args.shards)
            if on:
                shard_map = ShardMap.load(client, stream)
                started = time.perf_counter()
                aggregates = aggregate(records, shard_map)
                cpu = time.perf_counter() - started
                print(f"  aggregate() alone: {cpu:.2f}s ({args.records / cpu:,.0f} changes/s) -> "
                      f"{len(aggregates)} aggregated records")
            sink = KinesisSink(client, stream, aggregate=on)
            started = time.perf_counter()
            report = sink.put(records)
            elapsed = time.perf_counter() - started
            print(f"  aggregation {'on ' if on else 'off'}: {elapsed:6.2f}s  "
                  f"{report.user_records / elapsed:>9,.0f} changes/s  "
                  f"{report.records:>7,} Kinesis records  {report.requests:>5,} requests")
            if args.verify:
                got = read_back(moto, stream)
                assert got == Counter(r.data for r in records), "changes missing or duplicated"
                print("    verified: every change read back exactly once")


if __name__ == "__main__":
    main()
