"""Run pg2kinesis 0.7.0 on a backlog of known size and exit once it has put every change (bench_compare.py).

    .bench/pg2kinesis-0.7.0/bin/python benchmarks/pg2kinesis_runner.py --expect N -- <pg2kinesis flags>

pg2kinesis streams forever, and it only sends a partly filled aggregate when the next change arrives 13 s
after its last put. This wrapper counts the messages pg2kinesis formats; after the N-th one it sends the
aggregate in hand (what pg2kinesis would do 13 s later) and exits, printing a JSON line with the count and the
seconds since start. Nothing else of pg2kinesis is changed (its start_replication call is patched to
decode=True by scripts/install-pg2kinesis-0.7.0, which Python 3 needs).
"""

from __future__ import annotations

import json
import os
import sys
import time

STARTED = time.perf_counter()


def main() -> None:
    args = sys.argv[1:]
    expect = int(args[args.index("--expect") + 1])
    flags = args[args.index("--") + 1:]

    from pg2kinesis import __main__ as cli
    from pg2kinesis import stream

    seen = {"messages": 0}
    original = stream.StreamWriter.put_message

    def put_message(self, fmt_msg):  # type: ignore[no-untyped-def]
        did_put = original(self, fmt_msg)
        if fmt_msg:
            seen["messages"] += 1
            if seen["messages"] >= expect:
                self._send_agg_record(self._record_agg.clear_and_get())
                print(json.dumps({"changes": seen["messages"], "seconds": time.perf_counter() - STARTED}),
                      flush=True)
                os._exit(0)  # pg2kinesis would keep streaming; the backlog is done
        return did_put

    stream.StreamWriter.put_message = put_message
    cli.main(flags, standalone_mode=True)


if __name__ == "__main__":
    main()
