"""moto's standalone server with two fixes to its Kinesis backend, applied before it starts.

Run as ``python -m pg2kinesis_dagster.devstack.moto_server [--fast] -H 127.0.0.1 -p PORT`` (the rest are
``moto_server``'s arguments). :class:`~pg2kinesis_dagster.devstack.moto.MotoServer` starts it this way.

* **Always: concurrent writes are serialised.** moto's server answers requests on several threads, but its
  ``Shard.put_record`` numbers a record by reading the shard's last sequence number and then storing under
  the next one ("not safe for concurrency", says its source): two ``PutRecords`` running at once can give two
  records the same number, and one overwrites the other. Kinesis itself takes concurrent writers, and the sink
  keeps several requests in flight, so every backend call that writes or reshards runs under one lock here.
* **With --fast (benchmarks only): a record costs O(1).** ``Shard.get_max_sequence_number`` builds
  ``list(self.records.keys())`` on every ``put_record``, so each record costs time proportional to what the
  shard already holds: plain records slow down as a stream fills (about 2,000 records/s after some 10^5
  records) whatever the client does. ``--fast`` reads the last key with ``next(reversed(...))`` instead; the
  records, their numbers and every answer stay the same. ``benchmarks/bench_compare.py`` measures both.
"""

from __future__ import annotations

import functools
import sys
import threading
from collections.abc import Callable
from typing import Any

# Backend methods that write records or change shards (KinesisBackend); reads need no lock.
_WRITERS = ("put_record", "put_records", "split_shard", "merge_shards", "update_shard_count", "create_stream",
            "delete_stream")


def serialise_writes() -> None:
    """Run moto's Kinesis writes one at a time (one lock for the whole server)."""
    from moto.kinesis import models

    lock = threading.RLock()

    def locked(method: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(method)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            with lock:
                return method(*args, **kwargs)

        return wrapper

    for name in _WRITERS:
        method = getattr(models.KinesisBackend, name, None)
        if method is not None and not getattr(method, "_pg2k_locked", False):
            wrapped = locked(method)
            wrapped._pg2k_locked = True  # type: ignore[attr-defined]
            setattr(models.KinesisBackend, name, wrapped)


def constant_time_sequence_numbers() -> None:
    """``Shard.get_max/min_sequence_number`` without copying every key of the shard."""
    from moto.kinesis import models

    def get_max_sequence_number(self: Any) -> int:
        return next(reversed(self.records)) if self.records else 0

    def get_min_sequence_number(self: Any) -> int:
        return next(iter(self.records)) if self.records else 0

    models.Shard.get_max_sequence_number = get_max_sequence_number
    models.Shard.get_min_sequence_number = get_min_sequence_number


def main(argv: list[str]) -> None:
    fast = "--fast" in argv
    argv = [a for a in argv if a != "--fast"]
    serialise_writes()
    if fast:
        constant_time_sequence_numbers()
    from moto.server import main as moto_main

    moto_main(argv)


if __name__ == "__main__":
    main(sys.argv[1:])
