"""A local HTTP server that records what alert webhooks receive (loopback, a free port, threaded)."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        pass

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        recorder = self.server.recorder
        with recorder.lock:
            failing = recorder.fail_next > 0
            if failing:
                recorder.fail_next -= 1
                recorder.refused += 1
            else:
                recorder.requests.append({"path": self.path, "headers": dict(self.headers), "body": body})
        self.send_response(500 if failing else 200)
        self.send_header("Content-Type", "text/plain")
        self.end_headers()
        self.wfile.write(b"error" if failing else b"ok")


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    recorder: WebhookRecorder


class WebhookRecorder:
    """``with WebhookRecorder() as hook: ... hook.url ... hook.messages()``; ``fail_next`` answers HTTP 500."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.requests: list[dict[str, Any]] = []
        self.fail_next = 0
        self.refused = 0
        self._server = _Server(("127.0.0.1", 0), _Handler)
        self._server.recorder = self
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                        daemon=True)

    @property
    def url(self) -> str:
        # A Slack-like path with a token in it: the tests check that it never shows up anywhere.
        return f"http://127.0.0.1:{self._server.server_address[1]}/services/T000/B000/secret-webhook-token"

    def messages(self) -> list[str]:
        with self.lock:
            return [json.loads(r["body"])["text"] for r in self.requests]

    def __enter__(self) -> WebhookRecorder:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=10)
