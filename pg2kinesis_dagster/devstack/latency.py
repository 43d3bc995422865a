"""A proxy in front of the local moto server that answers like Kinesis in an AWS region: 20-30 ms a request.

moto on loopback answers in about a millisecond, which hides what matters against AWS: the round trip of
every request (20-30 ms from inside the region) and the per-shard limits (1,000 records/s and 1 MiB/s of
writes). :class:`LatencyProxy` adds a seeded random delay to every request (requests in flight wait side by
side, as they would on the network) and, with ``shard_limits=True``, fails the ``PutRecords`` entries over a
shard's per-second budget with ``ProvisionedThroughputExceededException`` (not forwarded, so not written, as
in Kinesis). Loopback only; upstream calls are forwarded one at a time (moto's server is not faster with
more, and :mod:`.moto_server` serialises its writes anyway).

    with MotoServer() as moto, LatencyProxy(moto.endpoint_url) as proxy:
        client = make_kinesis_client(endpoint_url=proxy.endpoint_url, ...)
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import http.client
import json
import random
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

PUT_RECORDS = "Kinesis_20131202.PutRecords"
LIST_SHARDS = "Kinesis_20131202.ListShards"
SHARD_RECORDS_PER_SECOND = 1000
SHARD_BYTES_PER_SECOND = 1024 * 1024
_HOP_BY_HOP = {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "te", "trailer", "upgrade",
               "content-length"}


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server
    timeout = 30
    # Headers and body go out in separate writes: without this, Nagle + delayed ACK add ~40 ms per request.
    disable_nagle_algorithm = True

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        pass

    def do_POST(self) -> None:
        self.server.proxy._handle(self)

    def do_GET(self) -> None:
        self.server.proxy._handle(self)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    proxy: LatencyProxy

    def handle_error(self, request: Any, client_address: Any) -> None:  # a client that went away: fine
        pass


class _ShardBudget:
    """One shard's writes in the current one-second window."""

    __slots__ = ("bytes", "records", "window")

    def __init__(self) -> None:
        self.window = 0
        self.records = 0
        self.bytes = 0

    def take(self, size: int, now: float) -> bool:
        window = int(now)
        if window != self.window:
            self.window, self.records, self.bytes = window, 0, 0
        if self.records + 1 > SHARD_RECORDS_PER_SECOND or self.bytes + size > SHARD_BYTES_PER_SECOND:
            return False
        self.records += 1
        self.bytes += size
        return True


class LatencyProxy:
    """``with LatencyProxy(moto.endpoint_url, delay=(0.020, 0.030)) as proxy: ... proxy.endpoint_url``."""

    def __init__(self, upstream_url: str, *, delay: tuple[float, float] = (0.020, 0.030), seed: int = 0,
                 shard_limits: bool = False) -> None:
        parts = urlsplit(upstream_url)
        if parts.hostname not in ("127.0.0.1", "localhost", "::1"):
            raise ValueError(f"the latency proxy only forwards to loopback, not {upstream_url!r}")
        self.upstream = (parts.hostname, parts.port or 80)
        self.delay = delay
        self.shard_limits = shard_limits
        self.counters: Counter[str] = Counter()
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self._upstream_lock = threading.Lock()
        self._upstream_conn: http.client.HTTPConnection | None = None
        # stream name -> [(starting hash, ending hash, shard id)] of its open shards, and their budgets.
        self._shards: dict[str, list[tuple[int, int, str]]] = {}
        self._budgets: dict[tuple[str, str], _ShardBudget] = {}
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle -------------------------------------------------------------------
    def start(self) -> LatencyProxy:
        server = _Server(("127.0.0.1", 0), _Handler)
        server.proxy = self
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                                        name="latency-proxy", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=10)
        self._server = None
        if self._upstream_conn is not None:
            self._upstream_conn.close()

    def __enter__(self) -> LatencyProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def endpoint_url(self) -> str:
        assert self._server is not None, "start() the proxy first"
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return dict(self.counters)

    # -- internals -------------------------------------------------------------------
    def _handle(self, h: _Handler) -> None:
        answer_at = time.monotonic() + self._next_delay()
        length = int(h.headers.get("Content-Length") or 0)
        body = h.rfile.read(length) if length else b""
        target = h.headers.get("X-Amz-Target", "")
        if target == PUT_RECORDS and self.shard_limits:
            status, headers, payload = self._limited_put_records(h, body)
        else:
            status, headers, payload = self._forward(h, body)
        with self._lock:
            self.counters["requests"] += 1
        # The round trip: requests in flight wait concurrently, each in its own handler thread.
        time.sleep(max(0.0, answer_at - time.monotonic()))
        try:
            h.send_response(status)
            for name, value in headers.items():
                h.send_header(name, value)
            h.send_header("Content-Length", str(len(payload)))
            h.end_headers()
            h.wfile.write(payload)
            h.wfile.flush()
        except OSError:
            h.close_connection = True

    def _next_delay(self) -> float:
        with self._lock:
            return self._rng.uniform(*self.delay)

    def _forward(self, h: _Handler, body: bytes, headers: dict[str, str] | None = None,
                 ) -> tuple[int, dict[str, str], bytes]:
        sent = headers or {k: v for k, v in h.headers.items() if k.lower() not in _HOP_BY_HOP}
        sent["Content-Length"] = str(len(body))
        with self._upstream_lock:
            for attempt in (1, 2):  # a kept-alive upstream connection may have been closed meanwhile
                if self._upstream_conn is None:
                    self._upstream_conn = http.client.HTTPConnection(*self.upstream, timeout=60)
                try:
                    self._upstream_conn.request(h.command, h.path, body=body, headers=sent)
                    response = self._upstream_conn.getresponse()
                    payload = response.read()
                    out = {k: v for k, v in response.getheaders() if k.lower() not in _HOP_BY_HOP}
                    return response.status, out, payload
                except (OSError, http.client.HTTPException):
                    self._upstream_conn.close()
                    self._upstream_conn = None
                    if attempt == 2:
                        raise
        raise AssertionError("unreachable")

    def _open_shards(self, h: _Handler, stream: str) -> list[tuple[int, int, str]]:
        shards = self._shards.get(stream)
        if shards is None:
            headers = {k: v for k, v in h.headers.items() if k.lower() not in _HOP_BY_HOP}
            headers["X-Amz-Target"] = LIST_SHARDS
            # moto does not check signatures, so the client's headers serve for this request of our own.
            _, _, payload = self._forward(h, json.dumps({"StreamName": stream}).encode(), headers)
            shards = [
                (int(s["HashKeyRange"]["StartingHashKey"]), int(s["HashKeyRange"]["EndingHashKey"]), s["ShardId"])
                for s in json.loads(payload).get("Shards", [])
                if "EndingSequenceNumber" not in s.get("SequenceNumberRange", {})
            ]
            self._shards[stream] = shards
        return shards

    def _limited_put_records(self, h: _Handler, body: bytes) -> tuple[int, dict[str, str], bytes]:
        request = json.loads(body)
        stream = request.get("StreamName") or request.get("StreamARN", "").rpartition("/")[2]
        entries = request.get("Records", [])
        shards = self._open_shards(h, stream)
        now = time.time()
        failed: set[int] = set()
        with self._lock:
            for i, entry in enumerate(entries):
                key = entry.get("ExplicitHashKey")
                hash_key = int(key) if key else int.from_bytes(
                    hashlib.md5(entry["PartitionKey"].encode("utf-8")).digest(), "big")
                shard = next((sid for lo, hi, sid in shards if lo <= hash_key <= hi), "?")
                size = len(base64.b64decode(entry.get("Data", ""))) + len(entry["PartitionKey"].encode("utf-8"))
                budget = self._budgets.setdefault((stream, shard), _ShardBudget())
                if not budget.take(size, now):
                    failed.add(i)
            self.counters["throttled_entries"] += len(failed)
        if not failed:
            return self._forward(h, body)
        kept = [e for i, e in enumerate(entries) if i not in failed]
        if kept:
            status, headers, payload = self._forward(h, json.dumps(dict(request, Records=kept)).encode())
            if status != 200:
                return status, headers, payload
            results = iter(json.loads(payload).get("Records", []))
        else:
            status, headers, results = 200, {"Content-Type": "application/x-amz-json-1.1"}, iter(())
        merged = [
            {"ErrorCode": "ProvisionedThroughputExceededException",
             "ErrorMessage": "Rate exceeded for shard in stream under account 123456789012."}
            if i in failed else next(results)
            for i in range(len(entries))
        ]
        answer = {"FailedRecordCount": sum(1 for r in merged if "ErrorCode" in r), "Records": merged}
        return status, headers, json.dumps(answer).encode()


@contextlib.contextmanager
def latency_proxy(upstream_url: str, **kwargs: Any) -> Any:
    proxy = LatencyProxy(upstream_url, **kwargs)
    proxy.start()
    try:
        yield proxy
    finally:
        proxy.stop()
