"""moto's standalone server with Kinesis resharding done the way Kinesis does it (for the resharding test).

Stock moto 5 (checked with 5.2) does not model resharding faithfully:

* after a split or merge it keeps routing new records to the *closed* parent shard (it picks the first
  shard whose hash range contains the key, open or not), so nothing ever reaches the child shards;
* a split moves the parent's records into the children and a merge copies them into the child, so
  history is rewritten and copies appear.

Here: records go to the one *open* shard owning the hash key (bounds inclusive, as in Kinesis); a
split or merge only closes the parents and opens the children; parents keep their records. A consumer
must then read parents before children, which :meth:`MotoServer.read_stream` does.

Run as ``python moto_reshard.py -H 127.0.0.1 -p PORT`` (the arguments of ``moto_server``).
"""

from __future__ import annotations

import sys
from operator import attrgetter


def patch() -> None:
    from moto.kinesis import models
    from moto.kinesis.exceptions import InvalidArgumentError

    def get_shard_for_key(self, partition_key, explicit_hash_key):  # type: ignore[no-untyped-def]
        if not isinstance(partition_key, str) or len(partition_key) > 256:
            raise InvalidArgumentError("partition_key")
        if explicit_hash_key:
            key = int(explicit_hash_key)
            if key >= 2**128:
                raise InvalidArgumentError("explicit_hash_key")
        else:
            key = int(models.md5_hash(partition_key.encode("utf-8")).hexdigest(), 16)
        for shard in self.shards.values():
            if shard.is_open and shard.starting_hash <= key <= shard.ending_hash:
                return shard
        return None

    def split_shard(self, shard_to_split, new_starting_hash_key):  # type: ignore[no-untyped-def]
        new_start = int(new_starting_hash_key)
        shard = self.shards[shard_to_split]
        if not (shard.starting_hash < new_start < shard.ending_hash) or not shard.is_open:
            raise InvalidArgumentError(message=f"cannot split {shard_to_split} at {new_start}")
        last_id = sorted(self.shards.values(), key=attrgetter("_shard_id"))[-1]._shard_id
        first = models.Shard(last_id + 1, shard.starting_hash, new_start - 1, parent=shard.shard_id)
        second = models.Shard(last_id + 2, new_start, shard.ending_hash, parent=shard.shard_id)
        self.shards[first.shard_id] = first
        self.shards[second.shard_id] = second
        shard.is_open = False

    def merge_shards(self, shard_to_merge, adjacent_shard_to_merge):  # type: ignore[no-untyped-def]
        one, two = self.shards[shard_to_merge], self.shards[adjacent_shard_to_merge]
        if one.ending_hash + 1 == two.starting_hash:
            low, high = one, two
        elif two.ending_hash + 1 == one.starting_hash:
            low, high = two, one
        else:
            raise InvalidArgumentError(adjacent_shard_to_merge)
        last_id = sorted(self.shards.values(), key=attrgetter("_shard_id"))[-1]._shard_id
        child = models.Shard(last_id + 1, low.starting_hash, high.ending_hash, parent=one.shard_id,
                             adjacent_parent=two.shard_id)
        self.shards[child.shard_id] = child
        one.is_open = False
        two.is_open = False

    models.Stream.get_shard_for_key = get_shard_for_key
    models.Stream.split_shard = split_shard
    models.Stream.merge_shards = merge_shards


if __name__ == "__main__":
    from pg2kinesis_dagster.devstack.moto_server import serialise_writes

    patch()
    serialise_writes()  # as every devstack moto server: concurrent PutRecords cannot overwrite each other
    from moto.server import main

    main(sys.argv[1:])
