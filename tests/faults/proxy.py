"""A fault-injecting HTTP proxy in front of the moto server (loopback only, threaded, bounded).

It models what Kinesis does to a client, faithfully:

* **Partial failure** of ``PutRecords``: a share of the entries "fail" with
  ``ProvisionedThroughputExceededException`` or ``InternalFailure``. Those entries are *removed*
  from the request forwarded to moto (so they are really not written, as in Kinesis) and their
  failures are spliced into moto's response at their original indexes.
* **Whole-request failures**, decided before forwarding (nothing applied): HTTP 500
  ``InternalFailure``, HTTP 503 ``ServiceUnavailable``, HTTP 400
  ``ProvisionedThroughputExceededException`` with a Kinesis-shaped JSON body, or a connection reset.
* **Applied but timed out** (``slow``): the request *is* forwarded and applied, then the proxy
  stalls past the client's read timeout and resets the connection. Only this fault may legitimately
  create duplicates; :attr:`FaultProxy.applied_timed_out_entries` counts the entries concerned.
* **Outage**: for a while every request (any API) is answered by a connection reset.
* **Hooks** for the crash tests: hold the response of the next ``PutRecords`` after moto applied it
  (the client is then killed "mid-publish"), and events for "a PutRecords was answered".

Randomness is seeded. Upstream calls are serialised by default (moto's in-memory streams are not
safe against concurrent writes, e.g. a reshard racing a put).
"""

from __future__ import annotations

import contextlib
import http.client
import json
import random
import socket
import struct
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

PUT_RECORDS = "Kinesis_20131202.PutRecords"
ENTRY_ERRORS = ("ProvisionedThroughputExceededException", "InternalFailure")
REQUEST_FAULTS = ("http500", "http503", "throttle400", "reset", "slow")
_HOP_BY_HOP = {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "te", "trailer", "upgrade",
               "content-length"}
_ACCOUNT = "123456789012"


@dataclass
class Faults:
    """What to inject into PutRecords; the proxy reads it under its lock on every request."""

    entry_failure_rate: float = 0.0
    entry_errors: tuple[str, ...] = ENTRY_ERRORS
    request_failure_rate: float = 0.0
    request_faults: tuple[str, ...] = REQUEST_FAULTS
    # How long a "slow" request stalls after being applied; must exceed the client's read timeout.
    slow_seconds: float = 3.0
    # Faults forced on the first PutRecords requests, in order ("partial" = entry failures only,
    # "partial:0,2" = exactly entries 0 and 2 fail, "ok" = pass through), then the random ones above.
    script: list[str] = field(default_factory=list)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server
    # Idle keep-alive connections end after this long (the proxy also shuts them down on stop()).
    timeout = 10
    # Headers and body go out in separate writes: without this, Nagle + delayed ACK add ~40 ms per request.
    disable_nagle_algorithm = True

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        pass

    def do_POST(self) -> None:
        self.server.proxy._handle(self)

    def do_GET(self) -> None:
        self.server.proxy._handle(self)

    def finish(self) -> None:
        with contextlib.suppress(OSError):
            super().finish()


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    proxy: FaultProxy

    def process_request(self, request: Any, client_address: Any) -> None:
        # Bounded: at most max_handlers connections are served at once; others wait, then are dropped.
        if not self.proxy._slots.acquire(timeout=10):
            self.shutdown_request(request)
            return
        self.proxy._track(request, True)
        try:
            super().process_request(request, client_address)
        except BaseException:
            self.proxy._track(request, False)
            self.proxy._slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.proxy._track(request, False)
            self.proxy._slots.release()

    def handle_error(self, request: Any, client_address: Any) -> None:
        # Broken pipes from killed clients and reset connections are expected; count, do not print.
        self.proxy._count("handler_errors")


class FaultProxy:
    """``with FaultProxy(moto.endpoint_url, seed=1) as proxy: client(endpoint_url=proxy.endpoint_url)``."""

    def __init__(self, upstream_url: str, *, seed: int = 0, faults: Faults | None = None, max_handlers: int = 32,
                 upstream_timeout: float = 30.0, serialize: bool = True) -> None:
        parts = urlsplit(upstream_url)
        if parts.hostname not in ("127.0.0.1", "localhost", "::1"):
            raise ValueError(f"the fault proxy only forwards to loopback, not {upstream_url!r}")
        self.upstream = (parts.hostname, parts.port or 80)
        self.upstream_timeout = upstream_timeout
        self.faults = faults or Faults()
        self.rng = random.Random(seed)
        self.counters: Counter[str] = Counter()
        self.applied_timed_out_entries = 0
        self._lock = threading.Lock()
        self._upstream_lock = threading.Lock() if serialize else None
        self._slots = threading.BoundedSemaphore(max_handlers)
        self._stop = threading.Event()
        self._sockets: set[Any] = set()
        self._outage_until = 0.0
        self._outage_after_puts: tuple[int, float] | None = None
        self._put_requests = 0
        self._hold: tuple[threading.Event, threading.Event] | None = None
        self._answered = threading.Condition(self._lock)
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle -------------------------------------------------------------------
    def start(self) -> FaultProxy:
        server = _Server(("127.0.0.1", 0), _Handler)
        server.proxy = self
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                                        name="fault-proxy", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        with self._lock:
            hold, self._hold = self._hold, None
        if hold is not None:
            hold[1].set()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        with self._lock:
            sockets = list(self._sockets)
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        if self._thread is not None:
            self._thread.join(timeout=10)
        self._server = None

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def endpoint_url(self) -> str:
        assert self._server is not None, "start() the proxy first"
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    # -- control ---------------------------------------------------------------------
    def set_faults(self, **changes: Any) -> None:
        with self._lock:
            for name, value in changes.items():
                setattr(self.faults, name, value)

    def outage(self, seconds: float) -> None:
        """Reset every connection for ``seconds`` from now."""
        with self._lock:
            self._outage_until = time.monotonic() + seconds

    def outage_after_puts(self, puts: int, seconds: float) -> None:
        """Start an outage of ``seconds`` once ``puts`` more PutRecords requests have been answered."""
        with self._lock:
            self._outage_after_puts = (self._put_requests + puts, seconds)

    def end_outage(self) -> None:
        with self._lock:
            self._outage_until = 0.0
            self._outage_after_puts = None

    def in_outage(self) -> bool:
        with self._lock:
            return time.monotonic() < self._outage_until

    def hold_next_put(self) -> tuple[threading.Event, threading.Event]:
        """The next PutRecords is applied by moto, then its response is held until ``release`` is set.

        Returns ``(applied, release)``: ``applied`` is set once moto accepted the request.
        """
        applied, release = threading.Event(), threading.Event()
        with self._lock:
            self._hold = (applied, release)
        return applied, release

    def cancel_hold(self) -> None:
        with self._lock:
            hold, self._hold = self._hold, None
        if hold is not None:
            hold[1].set()

    def puts_answered(self) -> int:
        with self._lock:
            return self.counters["put_answered"]

    def wait_put_answered(self, after: int, timeout: float) -> bool:
        """Wait until more than ``after`` PutRecords requests were answered; False on timeout."""
        deadline = time.monotonic() + timeout
        with self._answered:
            while self.counters["put_answered"] <= after:
                left = deadline - time.monotonic()
                if left <= 0 or self._stop.is_set():
                    return False
                self._answered.wait(left)
            return True

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            out = dict(self.counters)
            out["applied_timed_out_entries"] = self.applied_timed_out_entries
            return out

    # -- internals -------------------------------------------------------------------
    def _count(self, name: str, n: int = 1) -> None:
        with self._lock:
            self.counters[name] += n

    def _track(self, sock: Any, add: bool) -> None:
        with self._lock:
            if add:
                self._sockets.add(sock)
            else:
                self._sockets.discard(sock)

    def _handle(self, h: _Handler) -> None:
        length = int(h.headers.get("Content-Length") or 0)
        body = h.rfile.read(length) if length else b""
        target = h.headers.get("X-Amz-Target", "")
        with self._lock:
            self.counters["requests"] += 1
            now = time.monotonic()
            if now < self._outage_until:
                self.counters["outage_resets"] += 1
                outage = True
            else:
                outage = False
        if outage:
            self._reset(h)
            return
        if target != PUT_RECORDS:
            status, headers, payload = self._forward(h, body)
            self._respond(h, status, headers, payload)
            return
        self._put_records(h, body)

    def _decide(self, entries: int) -> tuple[str, list[int]]:
        """The fault for this PutRecords, and which entry indexes fail (under the lock)."""
        with self._lock:
            self._put_requests += 1
            faults = self.faults
            if faults.script:
                kind = faults.script.pop(0)
            elif self.rng.random() < faults.request_failure_rate:
                kind = self.rng.choice(faults.request_faults)
            else:
                kind = "partial" if faults.entry_failure_rate > 0 else "ok"
            failed = []
            if kind.startswith("partial:"):
                failed = [i for i in map(int, kind.partition(":")[2].split(",")) if i < entries]
                kind = "partial"
            elif kind == "partial":
                rate = faults.entry_failure_rate or 0.3
                failed = [i for i in range(entries) if self.rng.random() < rate]
            self.counters[f"put_{kind}"] += 1
            return kind, failed

    def _put_records(self, h: _Handler, body: bytes) -> None:
        request = json.loads(body)
        entries = request.get("Records", [])
        kind, failed = self._decide(len(entries))
        with self._lock:
            self.counters["put_requests"] += 1
            self.counters["put_entries"] += len(entries)
        if kind in ("http500", "http503", "throttle400"):
            status, code, message = {
                "http500": (500, "InternalFailure", "Internal service failure."),
                "http503": (503, "ServiceUnavailable", "Service Unavailable"),
                "throttle400": (400, "ProvisionedThroughputExceededException",
                                "Rate exceeded for stream under account " + _ACCOUNT + "."),
            }[kind]
            payload = json.dumps({"__type": code, "message": message}).encode()
            self._respond(h, status, {"Content-Type": "application/x-amz-json-1.1", "x-amzn-ErrorType": code},
                          payload)
            self._answered_put()
            return
        if kind == "reset":
            self._reset(h)
            self._answered_put()
            return
        if kind == "slow":
            # Applied, then the client times out: the one fault that may create duplicates.
            status, _, _ = self._forward(h, body)
            if status == 200:
                with self._lock:
                    self.applied_timed_out_entries += len(entries)
            self._stop.wait(self.faults.slow_seconds)  # the injected stall itself
            self._reset(h)
            self._answered_put()
            return
        failed_set = set(failed)
        codes = {}
        with self._lock:
            for i in failed:
                codes[i] = self.rng.choice(self.faults.entry_errors)
                self.counters[f"entry_{codes[i]}"] += 1
        kept = [e for i, e in enumerate(entries) if i not in failed_set]
        if kept:
            forwarded = dict(request, Records=kept) if failed else request
            status, headers, payload = self._forward(h, json.dumps(forwarded).encode() if failed else body)
        else:
            status, headers, payload = 200, {"Content-Type": "application/x-amz-json-1.1"}, b'{"Records": []}'
        if status == 200 and failed:
            answer = json.loads(payload)
            results = iter(answer.get("Records", []))
            merged = []
            for i in range(len(entries)):
                if i in failed_set:
                    code = codes[i]
                    message = ("Rate exceeded for shard in stream under account " + _ACCOUNT + "."
                               if code.startswith("Provisioned") else "Internal service failure.")
                    merged.append({"ErrorCode": code, "ErrorMessage": message})
                else:
                    merged.append(next(results))
            answer["Records"] = merged
            answer["FailedRecordCount"] = int(answer.get("FailedRecordCount", 0)) + len(failed)
            payload = json.dumps(answer).encode()
        hold = None
        with self._lock:
            if self._hold is not None and status == 200:
                hold, self._hold = self._hold, None
        if hold is not None:
            applied, release = hold
            applied.set()
            release.wait(30)  # bounded: released by the test once it killed the client
        self._respond(h, status, headers, payload)
        self._answered_put()

    def _answered_put(self) -> None:
        with self._answered:
            self.counters["put_answered"] += 1
            if self._outage_after_puts is not None and self.counters["put_answered"] >= self._outage_after_puts[0]:
                self._outage_until = time.monotonic() + self._outage_after_puts[1]
                self._outage_after_puts = None
            self._answered.notify_all()

    def _forward(self, h: _Handler, body: bytes) -> tuple[int, dict[str, str], bytes]:
        headers = {k: v for k, v in h.headers.items() if k.lower() not in _HOP_BY_HOP}
        headers["Content-Length"] = str(len(body))
        lock = self._upstream_lock or contextlib.nullcontext()
        with lock:
            conn = http.client.HTTPConnection(*self.upstream, timeout=self.upstream_timeout)
            try:
                conn.request(h.command, h.path, body=body, headers=headers)
                response = conn.getresponse()
                payload = response.read()
                out = {k: v for k, v in response.getheaders() if k.lower() not in _HOP_BY_HOP}
                return response.status, out, payload
            finally:
                conn.close()

    def _respond(self, h: _Handler, status: int, headers: dict[str, str], payload: bytes) -> None:
        try:
            h.send_response(status)
            for name, value in headers.items():
                h.send_header(name, value)
            h.send_header("Content-Length", str(len(payload)))
            h.end_headers()
            h.wfile.write(payload)
            h.wfile.flush()
        except OSError:
            self._count("client_gone")
            h.close_connection = True

    def _reset(self, h: _Handler) -> None:
        """Abort the connection: the client sees a reset (RST), not a response."""
        h.close_connection = True
        with contextlib.suppress(OSError):
            h.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            h.connection.close()


@contextlib.contextmanager
def fault_proxy(upstream_url: str, **kwargs: Any) -> Iterator[FaultProxy]:
    proxy = FaultProxy(upstream_url, **kwargs)
    proxy.start()
    try:
        yield proxy
    finally:
        proxy.stop()
