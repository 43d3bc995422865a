"""A proxy in front of moto that plays a stream whose maximum record size was raised (UpdateMaxRecordSize).

moto neither reports ``MaxRecordSizeInKiB`` nor accepts records over 1 MiB. This proxy adds the field to
``DescribeStreamSummary`` answers (or leaves it out: a stream of an API that predates it) and, for
``PutRecords``, checks the request against the raised limits (records up to the stream's size, requests up to
10 MiB), then stands in for each record over 1 MiB a short placeholder that moto stores in the record's
place -- with its real sequence number, in its shard -- while the proxy keeps the original bytes.
"""

from __future__ import annotations

import base64
import hashlib
import http.client
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

MIB = 1024 * 1024
PLACEHOLDER = b"__large_record__:"


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_POST(self) -> None:
        self.server.proxy.handle(self)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    proxy: LargeRecordsProxy


class LargeRecordsProxy:
    def __init__(self, upstream_url: str, max_record_kib: int | None) -> None:
        parts = urlsplit(upstream_url)
        self.upstream = (parts.hostname or "127.0.0.1", parts.port or 80)
        self.max_record_kib = max_record_kib
        self.lock = threading.Lock()
        self.originals: dict[bytes, bytes] = {}  # placeholder -> original data
        self.request_bytes: list[int] = []  # data + partition keys of each PutRecords request
        self.record_bytes: list[int] = []
        self.violations: list[str] = []  # what real Kinesis would have refused
        self._server = _Server(("127.0.0.1", 0), _Handler)
        self._server.proxy = self
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                        daemon=True)

    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def original(self, data: bytes) -> bytes:
        with self.lock:
            return self.originals.get(data, data)

    def handle(self, h: _Handler) -> None:
        body = h.rfile.read(int(h.headers.get("Content-Length", "0")))
        target = h.headers.get("X-Amz-Target", "")
        if target.endswith(".PutRecords"):
            request = json.loads(body)
            sizes = []
            for entry in request["Records"]:
                data = base64.b64decode(entry["Data"])
                size = len(data) + len(entry["PartitionKey"].encode())
                sizes.append(size)
                limit = (self.max_record_kib or 1024) * 1024
                if size > limit:
                    self.violations.append(f"a {size}-byte record sent to a stream that takes {limit}")
                if len(data) > MIB:
                    stand_in = PLACEHOLDER + hashlib.sha256(data).hexdigest().encode()
                    with self.lock:
                        self.originals[stand_in] = data
                    entry["Data"] = base64.b64encode(stand_in).decode()
            with self.lock:
                self.request_bytes.append(sum(sizes))
                self.record_bytes += sizes
            if sum(sizes) > 10 * MIB:
                self.violations.append(f"a {sum(sizes)}-byte PutRecords request")
            body = json.dumps(request).encode()
        status, headers, payload = self._forward(h, body)
        if target.endswith(".DescribeStreamSummary") and status == 200 and self.max_record_kib is not None:
            answer = json.loads(payload)
            answer["StreamDescriptionSummary"]["MaxRecordSizeInKiB"] = self.max_record_kib
            payload = json.dumps(answer).encode()
        h.send_response(status)
        for name, value in headers.items():
            h.send_header(name, value)
        h.send_header("Content-Length", str(len(payload)))
        h.end_headers()
        h.wfile.write(payload)

    def _forward(self, h: _Handler, body: bytes) -> tuple[int, dict[str, str], bytes]:
        conn = http.client.HTTPConnection(*self.upstream, timeout=60)
        try:
            headers = {k: v for k, v in h.headers.items() if k.lower() not in ("content-length", "host",
                                                                              "connection")}
            headers["Content-Length"] = str(len(body))
            conn.request("POST", h.path, body=body, headers=headers)
            response = conn.getresponse()
            payload = response.read()
            kept = {k: v for k, v in response.getheaders()
                    if k.lower() not in ("content-length", "connection", "transfer-encoding", "content-encoding")}
            return response.status, kept, payload
        finally:
            conn.close()

    def __enter__(self) -> LargeRecordsProxy:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=10)
