"""The spool: a window's rows and records as chunk files on local disk, between the steps of a run.

A cache, not the truth. The slot is never advanced past what Kinesis acknowledged, so a window whose
spool is gone (a new pod, a cleaned disk, another machine) is simply read again from the slot. Layout:

    <root>/<slot key>/<window id>/rows.copy (text plugins)    rows.json       written by peek
                                  or rows-000000.pkl ... (pgoutput)
                                  records-000000.pkl ...  records.json    written by format
    <root>/<slot key>/progress.json                                       written by publish

The slot key is the slot's name plus a digest of the server and database: slot names are only unique
per PostgreSQL cluster, and one machine may replicate several.

Each manifest (``rows.json``, ``records.json``) is written last and atomically: chunk files without
their manifest are an interrupted step, written again by whoever needs them. Chunk files are pickles
that only this process family writes and reads (never data from elsewhere). A text plugin's rows are the COPY
text PostgreSQL sent (:mod:`~pg2kinesis_dagster.core.copy_text`), cut after the window's last boundary.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import pickle
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

from pg2kinesis_dagster.core.batching import new_record
from pg2kinesis_dagster.core.changes import SlotRow
from pg2kinesis_dagster.core.copy_text import parse_row
from pg2kinesis_dagster.core.errors import ConfigError
from pg2kinesis_dagster.core.window import RecordChunk, TransactionProgress

ROWS_MANIFEST = "rows.json"
COPY_ROWS = "rows.copy"
# Per slot: how far the records of a transaction larger than a chunk were acknowledged.
PROGRESS_FILE = "progress.json"
RECORDS_MANIFEST = "records.json"
_PROTOCOL = pickle.HIGHEST_PROTOCOL


def default_spool_root() -> Path:
    """Where spools go unless told: ``PG2K_SPOOL_DIR``, else the system's temporary directory (on Kubernetes,
    the pod's ephemeral disk)."""
    configured = os.environ.get("PG2K_SPOOL_DIR")
    return Path(configured) if configured else Path(tempfile.gettempdir()) / "pg2kinesis-spool"


def _write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, ValueError):
        return None


class RowWriter:
    """Appends slot rows, cutting a chunk file every ``chunk_rows`` rows or ``chunk_bytes`` bytes."""

    def __init__(self, directory: Path, chunk_rows: int, chunk_bytes: int) -> None:
        self._dir = directory
        self._chunk_rows = chunk_rows
        self._chunk_bytes = chunk_bytes
        self._rows: list[SlotRow] = []
        self._bytes = 0
        self.chunks = 0

    def add(self, row: SlotRow) -> None:
        self._rows.append(row)
        self._bytes += len(row[2])
        if len(self._rows) >= self._chunk_rows or self._bytes >= self._chunk_bytes:
            self.flush()

    def flush(self) -> None:
        if not self._rows:
            return
        with open(self._dir / f"rows-{self.chunks:06d}.pkl", "wb") as f:
            pickle.dump(self._rows, f, _PROTOCOL)
        self.chunks += 1
        self._rows = []
        self._bytes = 0

    def finish(self, manifest: dict[str, Any]) -> None:
        self.flush()
        _write_json(self._dir / ROWS_MANIFEST, {**manifest, "row_chunks": self.chunks})


class RowReader:
    """Reads a window's rows back in order, and can look ahead for the next commit without losing its place."""

    def __init__(self, directory: Path, chunks: int, rows: int) -> None:
        self._dir = directory
        self._chunks = chunks
        self._rows = rows
        # Position of the next row to be yielded: (chunk, offset in chunk).
        self.chunk = 0
        self.offset = 0

    def _load(self, index: int) -> list[SlotRow]:
        with open(self._dir / f"rows-{index:06d}.pkl", "rb") as f:
            return pickle.load(f)

    def __iter__(self) -> Iterator[SlotRow]:
        left = self._rows
        for index in range(self._chunks):
            rows = self._load(index)
            self.chunk, self.offset = index, 0
            for row in rows:
                if left <= 0:
                    return
                left -= 1
                self.offset += 1
                yield row
        self.chunk, self.offset = self._chunks, 0

    def find_next(self, predicate: Callable[[str | bytes], bool]) -> SlotRow | None:
        """The first row at or after the reading position whose data satisfies ``predicate``."""
        offset = self.offset
        for index in range(self.chunk, self._chunks):
            rows = self._load(index)
            for row in rows[offset:]:
                if predicate(row[2]):
                    return row
            offset = 0
        return None


class CopyRowReader:
    """A window's COPY rows (``rows.copy``) as slot rows, in order, read line by line (bounded memory). The pipeline
    reads the file itself (mmapped, by the COPY lane); this is for looking at a spool."""

    def __init__(self, path: Path, rows: int) -> None:
        self._path = path
        self._rows = rows

    def __iter__(self) -> Iterator[SlotRow]:
        with open(self._path, "rb") as f:
            for _, line in zip(range(self._rows), f, strict=False):
                yield parse_row(line[:-1])


def _records_to_columns(chunk: RecordChunk) -> dict[str, Any]:
    records = chunk.records
    return {
        "data": [r.data for r in records],
        "partition_key": [r.partition_key for r in records],
        "ordering_key": [r.ordering_key for r in records],
        "record_id": [r.record_id for r in records],
        "explicit_hash_key": [r.explicit_hash_key for r in records],
        "barrier": [r.barrier for r in records],
        "commit_lsns": chunk.commit_lsns,
        "advance_to": chunk.advance_to,
    }


def _records_from_columns(columns: dict[str, Any]) -> RecordChunk:
    records = [
        new_record(data, key, order, rid, barrier, hash_key)  # Record(...) without its slow frozen __init__
        for data, key, order, rid, hash_key, barrier in zip(
            columns["data"], columns["partition_key"], columns["ordering_key"], columns["record_id"],
            columns["explicit_hash_key"], columns["barrier"], strict=True,
        )
    ]
    return RecordChunk(
        records=records,
        commit_lsns=columns["commit_lsns"],
        record_bytes=sum(r.size for r in records),
        advance_to=columns["advance_to"],
    )


class WindowSpool:
    """The files of one window."""

    def __init__(self, directory: Path) -> None:
        self.path = directory

    @property
    def window_id(self) -> str:
        return self.path.name

    def exists(self) -> bool:
        return self.path.is_dir()

    def ensure(self) -> None:
        self.path.mkdir(parents=True, exist_ok=True)

    # -- rows ------------------------------------------------------------------------------
    def _drop_rows(self) -> None:
        self.ensure()
        for old in self.path.glob("rows-*.pkl"):
            old.unlink()
        (self.path / COPY_ROWS).unlink(missing_ok=True)
        (self.path / ROWS_MANIFEST).unlink(missing_ok=True)
        self.drop_records()

    def start_rows(self, chunk_rows: int, chunk_bytes: int) -> RowWriter:
        """A writer for the window's rows; anything written before (an interrupted peek) is dropped."""
        self._drop_rows()
        return RowWriter(self.path, chunk_rows, chunk_bytes)

    def start_copy_rows(self) -> BinaryIO:
        """The file for the window's COPY rows (the caller writes, cuts and closes it, then :meth:`finish_copy_rows`);
        anything written before is dropped."""
        self._drop_rows()
        return open(self.path / COPY_ROWS, "w+b")

    def finish_copy_rows(self, manifest: dict[str, Any]) -> None:
        _write_json(self.path / ROWS_MANIFEST, {**manifest, "format": "copy"})

    def copy_rows(self) -> mmap.mmap | bytes | None:
        """The window's COPY rows as one read-only buffer (an mmap; ``b""`` when empty), or None when its rows
        are not COPY text."""
        manifest = self.rows_manifest()
        if manifest is None or manifest.get("format") != "copy":
            return None
        with open(self.path / COPY_ROWS, "rb") as f:
            if os.fstat(f.fileno()).st_size == 0:
                return b""
            return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)

    def rows_manifest(self) -> dict[str, Any] | None:
        return _read_json(self.path / ROWS_MANIFEST)

    def read_rows(self) -> RowReader | CopyRowReader:
        manifest = self.rows_manifest()
        if manifest is None:
            raise FileNotFoundError(f"spool {self.path} holds no complete rows")
        if manifest.get("format") == "copy":
            return CopyRowReader(self.path / COPY_ROWS, manifest["rows"])
        return RowReader(self.path, manifest["row_chunks"], manifest["rows"])

    # -- records ---------------------------------------------------------------------------
    def drop_records(self) -> None:
        for old in self.path.glob("records-*.pkl"):
            old.unlink()
        (self.path / RECORDS_MANIFEST).unlink(missing_ok=True)

    def write_record_chunk(self, index: int, chunk: RecordChunk) -> None:
        with open(self.path / f"records-{index:06d}.pkl", "wb") as f:
            pickle.dump(_records_to_columns(chunk), f, _PROTOCOL)

    def finish_records(self, manifest: dict[str, Any]) -> None:
        _write_json(self.path / RECORDS_MANIFEST, manifest)

    def records_manifest(self) -> dict[str, Any] | None:
        return _read_json(self.path / RECORDS_MANIFEST)

    def read_record_chunk(self, index: int) -> RecordChunk:
        with open(self.path / f"records-{index:06d}.pkl", "rb") as f:
            return _records_from_columns(pickle.load(f))

    def remove(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)

    def size_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.path.glob("*") if p.is_file()) if self.exists() else 0


def slot_key(slot: str, server: str) -> str:
    """The spool folder of a slot: its name (slot names are safe file names) and a digest of ``server``."""
    return f"{slot}-{hashlib.sha256(server.encode()).hexdigest()[:12]}"


class Spool:
    """Window spools under one root, one folder per slot (see :func:`slot_key`)."""

    def __init__(self, root: str | os.PathLike[str] | None = None) -> None:
        self.root = Path(root) if root else default_spool_root()

    def _slot_dir(self, slot: str) -> Path:
        return self.root / slot

    def window(self, slot: str, window_id: str) -> WindowSpool:
        if not window_id or "/" in window_id or window_id.startswith("."):
            raise ConfigError(f"invalid spool window id {window_id!r}")
        return WindowSpool(self._slot_dir(slot) / window_id)

    def new_window(self, slot: str) -> WindowSpool:
        """A fresh window folder; its id sorts by creation time."""
        window_id = f"{time.time_ns():020d}-{uuid.uuid4().hex[:8]}"
        spool = self.window(slot, window_id)
        try:
            spool.ensure()
        except OSError as exc:
            raise ConfigError(
                f"cannot create the spool folder {spool.path}: {exc.strerror}. Set PG2K_SPOOL_DIR / --spool-dir "
                "to a writable local folder with room for one window."
            ) from None
        return spool

    def windows(self, slot: str) -> list[WindowSpool]:
        folder = self._slot_dir(slot)
        if not folder.is_dir():
            return []
        return [WindowSpool(p) for p in sorted(folder.iterdir()) if p.is_dir()]

    def read_progress(self, slot: str) -> TransactionProgress | None:
        """The slot's open-transaction progress (see :class:`TransactionProgress`), if any."""
        data = _read_json(self._slot_dir(slot) / PROGRESS_FILE)
        try:
            return TransactionProgress.from_dict(data) if data else None
        except (KeyError, TypeError, ValueError):
            return None

    def write_progress(self, slot: str, progress: TransactionProgress | None) -> None:
        """Remember (or, with None, forget) how far an open transaction was acknowledged.

        Written after Kinesis acknowledged those records, so it never claims more than was sent; a
        lost file only means more duplicates, never a loss.
        """
        path = self._slot_dir(slot) / PROGRESS_FILE
        if progress is None:
            path.unlink(missing_ok=True)
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            _write_json(path, progress.to_dict())

    def remove_others(self, slot: str, keep: str) -> int:
        """Remove every window of ``slot`` but ``keep``: a new window starts at the slot's position, so an
        older one (a failed run's) holds nothing that the slot would not give again. Returns the count."""
        removed = 0
        for spool in self.windows(slot):
            if spool.window_id != keep:
                spool.remove()
                removed += 1
        return removed

    def prune(self, older_than_seconds: float, now: float | None = None) -> list[Path]:
        """Remove windows of every slot last written more than ``older_than_seconds`` ago."""
        now = time.time() if now is None else now
        removed: list[Path] = []
        if not self.root.is_dir():
            return removed
        for slot_dir in self.root.iterdir():
            if not slot_dir.is_dir():
                continue
            for window in slot_dir.iterdir():
                try:
                    newest = max((p.stat().st_mtime for p in window.iterdir()), default=window.stat().st_mtime)
                except FileNotFoundError:
                    continue
                if now - newest > older_than_seconds:
                    shutil.rmtree(window, ignore_errors=True)
                    removed.append(window)
        return removed
