"""A throwaway Kinesis endpoint: moto's standalone server in a subprocess.

Real HTTP, so the code under test goes through botocore exactly as against AWS
(serialisation, error parsing, endpoint resolution); only the service is fake.
Credentials are fake ("testing"): nothing here can reach real AWS.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import TracebackType
from typing import Any

import boto3
from botocore.config import Config

FAKE_CREDENTIALS = {"aws_access_key_id": "testing", "aws_secret_access_key": "testing"}


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _server_command(host: str, port: int, fast: bool = False) -> list[str]:
    # moto's server behind our two backend fixes (devstack.moto_server): concurrent PutRecords serialised
    # (always), O(1) sequence numbers (``fast``, benchmarks only).
    return [sys.executable, "-m", "pg2kinesis_dagster.devstack.moto_server", *(["--fast"] if fast else []),
            "-H", host, "-p", str(port)]


class MotoServer:
    """moto's server on 127.0.0.1 and a free port; use as a context manager or start()/stop().

    Its Kinesis writes are serialised (moto numbers records unsafely under concurrent requests; see
    :mod:`.moto_server`). ``fast=True`` (benchmarks) also makes each record O(1) instead of O(shard size).
    """

    region = "us-east-1"

    def __init__(self, host: str = "127.0.0.1", start_timeout: float = 30.0, *, fast: bool = False) -> None:
        self.host = host
        self.fast = fast
        self.start_timeout = start_timeout
        self.port: int | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._log_dir: str | None = None

    # -- lifecycle ---------------------------------------------------------------

    @property
    def endpoint_url(self) -> str:
        if self.port is None:
            raise RuntimeError("MotoServer is not started")
        return f"http://{self.host}:{self.port}"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self) -> MotoServer:
        if self.running:
            return self
        self._log_dir = tempfile.mkdtemp(prefix="moto-server-")
        # The port is probed then released, so another process may grab it
        # first; try a few ports before giving up.
        last_error = ""
        for _ in range(3):
            self.port = _free_port(self.host)
            log_path = Path(self._log_dir) / f"moto-{self.port}.log"
            env = {**os.environ, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}
            with open(log_path, "wb") as log:
                # Own session = own process group, so stop() can kill it with
                # any children and nothing outlives the tests.
                self._proc = subprocess.Popen(
                    _server_command(self.host, self.port, self.fast) if self.fast
                    else _server_command(self.host, self.port),
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    env=env,
                    start_new_session=True,
                )
            if self._wait_until_answering():
                return self
            last_error = log_path.read_text(errors="replace")[-2000:]
            self._kill()
        self.stop()
        raise RuntimeError(f"moto server did not start within {self.start_timeout}s:\n{last_error}")

    def _wait_until_answering(self) -> bool:
        deadline = time.monotonic() + self.start_timeout
        delay = 0.02
        while time.monotonic() < deadline:
            if self._proc is None or self._proc.poll() is not None:
                return False
            try:
                with urllib.request.urlopen(f"{self.endpoint_url}/moto-api/data.json", timeout=2):
                    return True
            except urllib.error.HTTPError:
                return True  # any HTTP answer means the server is serving
            except OSError:
                pass
            time.sleep(delay)  # polling interval of a bounded wait
            delay = min(delay * 2, 0.25)
        return False

    def _kill(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
        # Children left in the group after the leader exited.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)

    def stop(self) -> None:
        self._kill()
        if self._log_dir is not None:
            shutil.rmtree(self._log_dir, ignore_errors=True)
            self._log_dir = None

    def __enter__(self) -> MotoServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def reset(self) -> None:
        """Forget every resource (all streams) in the server."""
        request = urllib.request.Request(f"{self.endpoint_url}/moto-api/reset", method="POST")
        with urllib.request.urlopen(request, timeout=10):
            pass

    # -- Kinesis helpers --------------------------------------------------------

    def client(self) -> Any:
        """A boto3 Kinesis client for this server, with fake credentials."""
        session = boto3.session.Session(region_name=self.region, **FAKE_CREDENTIALS)
        config = Config(connect_timeout=5, read_timeout=30, retries={"max_attempts": 2, "mode": "standard"})
        return session.client("kinesis", endpoint_url=self.endpoint_url, config=config)

    def create_stream(self, name: str, shards: int = 1, timeout: float = 30.0) -> None:
        """Create a provisioned stream and wait until it is ACTIVE."""
        client = self.client()
        client.create_stream(StreamName=name, ShardCount=shards)
        deadline = time.monotonic() + timeout
        delay = 0.02
        while True:
            status = client.describe_stream_summary(StreamName=name)["StreamDescriptionSummary"][
                "StreamStatus"
            ]
            if status == "ACTIVE":
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"stream {name!r} still {status} after {timeout}s")
            time.sleep(delay)  # polling interval of a bounded wait
            delay = min(delay * 2, 0.25)

    def read_stream(self, name: str) -> list[dict[str, Any]]:
        """Every record of every shard (open and closed), oldest first.

        Shards come parents before children (lineage order), each shard's records
        ordered by sequence number. Each item: shard_id, sequence_number,
        partition_key, data (bytes).
        """
        client = self.client()
        shards: list[dict[str, Any]] = []
        kwargs: dict[str, Any] = {"StreamName": name}
        while True:
            page = client.list_shards(**kwargs)
            shards.extend(page["Shards"])
            token = page.get("NextToken")
            if not token:
                break
            kwargs = {"NextToken": token}  # Kinesis rejects StreamName together with NextToken

        out: list[dict[str, Any]] = []
        for shard in _lineage_order(shards):
            shard_id = shard["ShardId"]
            iterator = client.get_shard_iterator(
                StreamName=name, ShardId=shard_id, ShardIteratorType="TRIM_HORIZON"
            )["ShardIterator"]
            records: list[dict[str, Any]] = []
            while iterator:
                page = client.get_records(ShardIterator=iterator, Limit=10000)
                for r in page["Records"]:
                    records.append(
                        {
                            "shard_id": shard_id,
                            "sequence_number": r["SequenceNumber"],
                            "partition_key": r["PartitionKey"],
                            "data": bytes(r["Data"]),
                        }
                    )
                # An open shard hands out iterators forever; moto has everything
                # available at once, so an empty page means we reached the end.
                if not page["Records"]:
                    break
                iterator = page.get("NextShardIterator")
            records.sort(key=lambda r: int(r["sequence_number"]))
            out.extend(records)
        return out


def _lineage_order(shards: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Shards sorted so each comes after its parent(s); ties by shard id."""
    by_id = {s["ShardId"]: s for s in shards}
    done: set[str] = set()
    ordered: list[dict[str, Any]] = []

    def visit(shard_id: str) -> None:
        if shard_id in done or shard_id not in by_id:
            return
        done.add(shard_id)
        shard = by_id[shard_id]
        for parent in (shard.get("ParentShardId"), shard.get("AdjacentParentShardId")):
            if parent:
                visit(parent)
        ordered.append(shard)

    for shard_id in sorted(by_id):
        visit(shard_id)
    return ordered
