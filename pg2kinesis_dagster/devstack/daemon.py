"""The code location under a real ``dagster-daemon run``, as a new user runs it, for tests and benchmarks.

:class:`DagsterDaemon` copies the shipped ``dagster.yaml`` into a fresh ``DAGSTER_HOME``, starts
``dagster-daemon run -w workspace.yaml`` from the repository in its own process group, with the code
location configured only through the environment (``PG2K_*`` variables, plus whatever AWS credentials a
user would have), and stops the whole group on exit: the daemon, the code server it spawned and any run
worker the code server started.

Example::

    env = code_location_env(pg, "app", moto, slot="s", stream="events", PG2K_SENSOR_RUNNING="1")
    with DagsterDaemon(env) as daemon:
        daemon.wait_until_ready()
        run = wait_for(lambda: daemon.runs(statuses=FINISHED), 120, "a finished run")[0]
        print(measure_home(daemon.home).total_bytes)

What Dagster 1.13 keeps in a ``DAGSTER_HOME`` with the default (SQLite) storage, which
:func:`measure_home` reports piece by piece:

* ``history/runs.db``: run storage (one row per run, plus the job snapshots, deduplicated);
* ``history/runs/<run_id>.db``: that run's event log, one SQLite file per run;
* ``history/runs/index.db``: the event-log index shard: asset materializations and other indexed events
  (copied from the run's own file) and the asset key table;
* ``schedules/schedules.db``: sensor and schedule state and ticks;
* ``storage/<run_id>/``: the default IO manager's pickled op outputs, and the run's captured compute logs
  under ``storage/<run_id>/compute_logs/``.

Run workers: the default run launcher asks the code server (``dagster api grpc``, a child of the daemon) to
start the run; it spawns a ``multiprocessing`` child that executes the run and reports an engine event
"Started process for run (pid: N)" with the pid as metadata. :meth:`DagsterDaemon.run_worker_pid` reads it
(launchers that start ``dagster api execute_run`` report the same event).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

import sqlalchemy.exc
from dagster import DagsterEventType, DagsterInstance, DagsterRunStatus, RunsFilter
from dagster._core.instance.ref import InstanceRef
from dagster._core.storage.dagster_run import RunRecord

REPO_ROOT = Path(__file__).resolve().parents[2]
FAKE_AWS_ENV = {
    # moto accepts any credentials; these fake ones keep boto3 away from real AWS.
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_EC2_METADATA_DISABLED": "true",
}
IN_FLIGHT = (
    DagsterRunStatus.QUEUED,
    DagsterRunStatus.NOT_STARTED,
    DagsterRunStatus.STARTING,
    DagsterRunStatus.STARTED,
    DagsterRunStatus.CANCELING,
)
FINISHED = (DagsterRunStatus.SUCCESS, DagsterRunStatus.FAILURE, DagsterRunStatus.CANCELED)
_LOG_TAIL_CHARS = 4000

T = TypeVar("T")


def wait_for(condition: Callable[[], T], timeout: float, what: str, interval: float = 0.1) -> T:
    """Poll ``condition`` until it returns something truthy and return that; TimeoutError after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)  # polling interval of a bounded wait


def _sqlite_retrying(action: Callable[[], T], attempts: int = 50) -> T:
    """``action()``, retried briefly when it races the daemon or a run worker over SQLite storage.

    Dagster's SQLite storages create their tables (and a run's event-log file) on first use, from whichever
    process comes first; a second process doing the same at the same moment fails with "table ... already
    exists", and concurrent writers may see "database is locked". Both pass on a retry.
    """
    for attempt in range(attempts):
        try:
            return action()
        except (sqlite3.OperationalError, sqlalchemy.exc.OperationalError) as exc:
            transient = "already exists" in str(exc) or "database is locked" in str(exc)
            if not transient or attempt == attempts - 1:
                raise
            time.sleep(0.1)  # let the other process finish creating the table
    raise AssertionError("unreachable")


def code_location_env(
    pg: Any, dbname: str, moto: Any, *, slot: str, stream: str, **extra: str
) -> dict[str, str]:
    """The environment a user sets to point the code location at a PostgreSQL and a Kinesis endpoint.

    ``pg`` is a :class:`~pg2kinesis_dagster.devstack.postgres.PostgresServer` (superuser ``postgres``
    over loopback), ``moto`` a :class:`~pg2kinesis_dagster.devstack.moto.MotoServer`; ``extra`` adds or
    overrides variables (``PG2K_AGGREGATE="1"``, ``PG2K_SENSOR_RUNNING="1"``, ...).
    """
    return {
        "PG2K_PG_HOST": pg.host,
        "PG2K_PG_PORT": str(pg.port),
        "PG2K_PG_DBNAME": dbname,
        "PG2K_PG_USER": "postgres",
        "PG2K_SLOT_NAME": slot,
        "PG2K_STREAM_NAME": stream,
        "PG2K_KINESIS_ENDPOINT_URL": moto.endpoint_url,
        "PG2K_AWS_REGION": moto.region,
        **FAKE_AWS_ENV,
        **extra,
    }


# -- processes -----------------------------------------------------------------------------------------


def _proc_status(pid: int) -> dict[str, str]:
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return {}
    out = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        out[key] = value.strip()
    return out


def vm_hwm_kib(pid: int) -> int | None:
    """The process's peak resident set size so far (``VmHWM`` in ``/proc/<pid>/status``), in KiB.

    None once the process is gone (or a zombie: the kernel drops its memory figures).
    """
    value = _proc_status(pid).get("VmHWM")
    return int(value.split()[0]) if value else None


def process_alive(pid: int) -> bool:
    """Running (not a zombie waiting to be reaped)."""
    state = _proc_status(pid).get("State", "")
    return bool(state) and not state.startswith(("Z", "X"))


def process_cmdline(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return []
    return [part.decode(errors="replace") for part in raw.split(b"\0") if part]


def group_pids(pgid: int) -> list[int]:
    """Every live process whose process group is ``pgid``."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        pid = int(entry.name)
        with contextlib.suppress(ProcessLookupError, PermissionError, OSError):
            if os.getpgid(pid) == pgid and process_alive(pid):
                pids.append(pid)
    return sorted(pids)


class PeakRssPoller:
    """Polls a process's ``VmHWM`` in a thread until the process exits; :attr:`peak_kib` is the last reading.

    VmHWM is the kernel's own high-water mark, so any reading taken after the peak already holds it; only a
    peak inside the last polling interval before the exit can be missed.
    """

    def __init__(self, pid: int, interval: float = 0.05) -> None:
        self.pid = pid
        self.interval = interval
        self.peak_kib: int | None = None
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, name=f"vmhwm-{pid}", daemon=True)

    def start(self) -> PeakRssPoller:
        self._thread.start()
        return self

    def _poll(self) -> None:
        while not self._stop.is_set():
            hwm = vm_hwm_kib(self.pid)
            if hwm is None:
                return
            self.samples += 1
            self.peak_kib = max(hwm, self.peak_kib or 0)
            self._stop.wait(self.interval)

    def join(self, timeout: float | None = None) -> int | None:
        """Wait for the process to exit (or ``timeout``); returns the peak in KiB."""
        self._thread.join(timeout)
        return self.peak_kib

    def stop(self) -> int | None:
        self._stop.set()
        self._thread.join(5)
        return self.peak_kib


# -- storage -------------------------------------------------------------------------------------------


def dir_bytes(path: Path) -> int:
    """Apparent size of every regular file under ``path`` (0 when it does not exist)."""
    total = 0
    if not path.exists():
        return 0
    for root, _, files in os.walk(path):
        for name in files:
            with contextlib.suppress(FileNotFoundError):
                total += os.lstat(os.path.join(root, name)).st_size
    return total


def _sqlite_bytes(path: Path) -> int:
    """A SQLite database with its write-ahead log and shared-memory files, if any."""
    return sum(
        p.stat().st_size for p in (path, Path(f"{path}-wal"), Path(f"{path}-shm"), Path(f"{path}-journal"))
        if p.exists()
    )


@dataclass(frozen=True)
class RunUsage:
    """What one run left in the DAGSTER_HOME."""

    run_id: str
    event_log_bytes: int  # history/runs/<run_id>.db (+ -wal/-shm): what the disk holds
    event_rows: int  # events in that file
    event_content_bytes: int  # their serialized size: what the run wrote, without SQLite's page overhead
    index_event_bytes: int  # bytes of this run's serialized events copied into history/runs/index.db
    index_events: int  # how many of its events the index shard holds
    storage_bytes: int  # storage/<run_id>/ in all
    compute_log_bytes: int  # of which storage/<run_id>/compute_logs/

    @property
    def io_manager_bytes(self) -> int:
        """storage/<run_id>/ without the compute logs: the IO manager's pickled op outputs."""
        return self.storage_bytes - self.compute_log_bytes

    @property
    def event_bytes(self) -> int:
        """Event storage attributable to the run: its own file plus its rows in the index shard."""
        return self.event_log_bytes + self.index_event_bytes


@dataclass(frozen=True)
class HomeUsage:
    """A DAGSTER_HOME's size, broken down (see the module docstring for the layout)."""

    total_bytes: int
    storage_bytes: int
    history_bytes: int
    runs_db_bytes: int
    index_db_bytes: int
    schedules_bytes: int
    # history/runs/.db: the event-log shard of events that belong to no run (daemon and sensor events).
    runless_event_log_bytes: int = 0
    per_run: dict[str, RunUsage] = field(default_factory=dict)

    @property
    def event_log_bytes(self) -> int:
        """Sum of the per-run event-log files."""
        return sum(r.event_log_bytes for r in self.per_run.values())


def _shard_rows(shard: Path) -> tuple[int, int]:
    """(events, bytes of serialized events) in a run's own event-log file."""
    rows = _index_rows(shard)
    return (sum(n for n, _ in rows.values()), sum(size for _, size in rows.values()))


def _index_rows(index_db: Path) -> dict[str, tuple[int, int]]:
    """run_id -> (events, bytes of serialized events) in an event-log SQLite file (the index shard, or a run's)."""
    if not index_db.exists():
        return {}
    # Read-only and immutable=0: the daemon may still write; we only read committed pages.
    conn = sqlite3.connect(f"file:{index_db}?mode=ro", uri=True, timeout=30)
    try:
        rows = conn.execute(
            "SELECT run_id, count(*), coalesce(sum(length(event)), 0) FROM event_logs GROUP BY run_id"
        ).fetchall()
    except sqlite3.Error:
        return {}
    finally:
        conn.close()
    return {str(run_id): (int(n), int(size)) for run_id, n, size in rows if run_id}


def measure_home(home: Path | str) -> HomeUsage:
    """Bytes of a DAGSTER_HOME: total, ``storage/``, ``history/`` (run storage, per-run event logs, the
    index shard), ``schedules/``, and per run (see :class:`RunUsage`)."""
    home = Path(home)
    history = home / "history"
    shards = history / "runs"
    index_db = shards / "index.db"
    indexed = _index_rows(index_db)
    run_ids: set[str] = {run_id for run_id in indexed if run_id}
    if shards.exists():
        run_ids |= {p.name[: -len(".db")] for p in shards.glob("*.db") if p.name not in ("index.db", ".db")}
    storage = home / "storage"
    if storage.exists():
        run_ids |= {p.name for p in storage.iterdir() if p.is_dir() and len(p.name) == 36}
    per_run = {}
    for run_id in sorted(run_ids):
        shard = shards / f"{run_id}.db"
        n, size = indexed.get(run_id, (0, 0))
        rows, content = _shard_rows(shard)
        per_run[run_id] = RunUsage(
            run_id=run_id,
            event_log_bytes=_sqlite_bytes(shard) if shard.exists() else 0,
            event_rows=rows,
            event_content_bytes=content,
            index_event_bytes=size,
            index_events=n,
            storage_bytes=dir_bytes(storage / run_id),
            compute_log_bytes=dir_bytes(storage / run_id / "compute_logs"),
        )
    return HomeUsage(
        total_bytes=dir_bytes(home),
        storage_bytes=dir_bytes(storage),
        history_bytes=dir_bytes(history),
        runs_db_bytes=_sqlite_bytes(history / "runs.db"),
        index_db_bytes=_sqlite_bytes(index_db),
        schedules_bytes=dir_bytes(home / "schedules"),
        runless_event_log_bytes=_sqlite_bytes(shards / ".db") if (shards / ".db").exists() else 0,
        per_run=per_run,
    )


def code_location_jobs(env: Mapping[str, str], repo_root: Path = REPO_ROOT, timeout: float = 180) -> set[str]:
    """The job names the code location defines under ``env``, as ``dagster job list -w workspace.yaml`` says."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("PG2K_") and k != "DAGSTER_HOME"}
    with tempfile.TemporaryDirectory(prefix="pg2k-dagster-joblist-") as home:
        out = subprocess.run(
            [str(Path(sys.executable).with_name("dagster")), "job", "list", "-w", "workspace.yaml"],
            cwd=repo_root, env={**base, **env, "DAGSTER_HOME": home}, capture_output=True, text=True,
            timeout=timeout, check=False,
        )
    if out.returncode != 0:
        raise DaemonError(f"dagster job list failed ({out.returncode}): {out.stderr[-_LOG_TAIL_CHARS:]}")
    return {line.split(":", 1)[1].strip() for line in out.stdout.splitlines() if line.startswith("Job:")}


# -- the daemon ----------------------------------------------------------------------------------------


def _storage_kind(dagster_yaml: Path) -> str:
    """The top-level storage of an instance's settings: "sqlite" (the default) or "postgres"."""
    import yaml

    settings = yaml.safe_load(dagster_yaml.read_text()) or {}
    storage = settings.get("storage") or {}
    return next(iter(storage), "sqlite") if isinstance(storage, dict) else "sqlite"


@contextlib.contextmanager
def _environment(values: Mapping[str, str]) -> Any:
    saved = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


class DaemonError(RuntimeError):
    """The daemon could not start, or died."""


class DagsterDaemon:
    """``dagster-daemon run`` on the repository's ``workspace.yaml`` with a fresh DAGSTER_HOME.

    Args:
        env: the code location's configuration (``PG2K_*``, AWS credentials); added to this process's
            environment, from which every ``PG2K_*`` variable is dropped first so that nothing leaks in.
        dagster_home: the DAGSTER_HOME to use (created; ``dagster.yaml`` copied into it unless one is
            there). Default: a temporary folder, deleted on :meth:`stop`. A given folder is kept.
        repo_root: where ``workspace.yaml`` and ``dagster.yaml`` are (the daemon's working directory).
        dagster_yaml: the instance settings to copy; default the repository's shipped ``dagster.yaml``.
            With PostgreSQL storage (``deploy/dagster.yaml``), ``env`` carries its ``DAGSTER_PG_*`` values; the
            harness creates Dagster's tables before the daemon starts (see :meth:`start`).
    """

    def __init__(
        self,
        env: Mapping[str, str],
        dagster_home: Path | str | None = None,
        *,
        repo_root: Path = REPO_ROOT,
        workspace: str = "workspace.yaml",
        dagster_yaml: Path | None = None,
        log_path: Path | None = None,
    ) -> None:
        self.env = dict(env)
        self.repo_root = Path(repo_root)
        self.workspace = workspace
        self.dagster_yaml = Path(dagster_yaml) if dagster_yaml else self.repo_root / "dagster.yaml"
        self._own_home = dagster_home is None
        self._home = Path(dagster_home) if dagster_home is not None else None
        self._log_dir: Path | None = None
        self._log_path = Path(log_path) if log_path else None
        self._proc: subprocess.Popen[bytes] | None = None
        self._instance: DagsterInstance | None = None
        self.started_at: float | None = None  # time.time() when the process was started
        self.postgres_storage = "postgres" in _storage_kind(self.dagster_yaml)

    # -- lifecycle -------------------------------------------------------------------------------------
    @property
    def home(self) -> Path:
        if self._home is None:
            raise DaemonError("DagsterDaemon is not started")
        return self._home

    @property
    def pid(self) -> int:
        if self._proc is None:
            raise DaemonError("DagsterDaemon is not started")
        return self._proc.pid

    @property
    def log_path(self) -> Path:
        if self._log_path is None:
            raise DaemonError("DagsterDaemon is not started")
        return self._log_path

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def process_env(self) -> dict[str, str]:
        base = {k: v for k, v in os.environ.items() if not k.startswith("PG2K_") and k != "DAGSTER_HOME"}
        return {**base, **self.env, "DAGSTER_HOME": str(self.home)}

    def start(self) -> DagsterDaemon:
        if self.running:
            return self
        if self._home is None:
            self._home = Path(tempfile.mkdtemp(prefix="pg2k-dagster-home-"))
        self._home.mkdir(parents=True, exist_ok=True)
        if not (self._home / "dagster.yaml").exists():
            shutil.copy(self.dagster_yaml, self._home / "dagster.yaml")
        if self.postgres_storage and self._instance is None:
            # Tables first, from here: the daemon then finds them, and nothing races to create them.
            self._instance = self._open_instance()
        if self._log_path is None:
            # Outside DAGSTER_HOME, so that the daemon's own log never counts as Dagster storage.
            self._log_dir = Path(tempfile.mkdtemp(prefix="pg2k-dagster-daemon-log-"))
            self._log_path = self._log_dir / "dagster-daemon.log"
        daemon = Path(sys.executable).with_name("dagster-daemon")
        command = [str(daemon), "run", "-w", self.workspace] if daemon.exists() else [
            sys.executable, "-m", "dagster._daemon", "run", "-w", self.workspace]
        with open(self._log_path, "ab") as log:
            self.started_at = time.time()
            self._proc = subprocess.Popen(
                command,
                cwd=self.repo_root,
                env=self.process_env(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                # Own process group: stop() signals the daemon, its code server and the run workers at once.
                start_new_session=True,
            )
        return self

    def log_tail(self, chars: int = _LOG_TAIL_CHARS) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except (OSError, DaemonError):
            return "(no log)"

    def check_alive(self) -> None:
        if not self.running:
            code = self._proc.returncode if self._proc else None
            raise DaemonError(f"dagster-daemon exited ({code}); log:\n{self.log_tail()}")

    def storage_initialized(self) -> bool:
        """Whether the daemon created its SQLite storage: it has written a heartbeat into ``history/runs.db``.

        Read with plain sqlite3, read-only: opening a DagsterInstance creates any missing table, and doing that
        while the starting daemon creates the same ones makes one of the two fail ("table ... already exists"),
        which kills a daemon at startup.
        """
        runs_db = self.home / "history" / "runs.db"
        if not runs_db.exists() or not (self.home / "schedules" / "schedules.db").exists():
            return False
        try:
            conn = sqlite3.connect(f"file:{runs_db}?mode=ro", uri=True, timeout=5)
            try:
                return bool(conn.execute("SELECT count(*) FROM daemon_heartbeats").fetchone()[0])
            finally:
                conn.close()
        except sqlite3.Error:
            return False

    def instance(self, timeout: float = 180) -> DagsterInstance:
        """The instance on this DAGSTER_HOME, as the daemon sees it (opened once, closed by stop()).

        The first call waits (up to ``timeout``) until the daemon created its storage; see
        :meth:`storage_initialized`.
        """
        if self._instance is None:
            if self.running and not self.postgres_storage:
                wait_for(lambda: self.check_alive() or self.storage_initialized(), timeout,
                         "dagster-daemon to create its storage", interval=0.1)
            self._instance = self._open_instance()
        return self._instance

    def _open_instance(self) -> DagsterInstance:
        # dagster.yaml's env: values are read from this process's environment: the daemon's, for the moment.
        with _environment(self.env):
            ref = InstanceRef.from_dir(str(self.home))
            return _sqlite_retrying(lambda: DagsterInstance.from_ref(ref))

    def wait_until_ready(self, timeout: float = 180, daemons: Sequence[str] = ("SENSOR",)) -> None:
        """Until each daemon in ``daemons`` has sent a heartbeat (the process loaded the workspace)."""

        def ready() -> bool:
            self.check_alive()
            beats = _sqlite_retrying(lambda: self.instance().get_daemon_heartbeats())
            return all(name in beats for name in daemons)

        wait_for(ready, timeout, f"dagster-daemon heartbeats from {', '.join(daemons)}", interval=0.25)

    def stop(self, timeout: float = 60, terminate_runs: bool = True) -> None:
        """Terminate in-flight runs (when asked and possible), then stop the process group; idempotent."""
        proc = self._proc
        if proc is not None and proc.poll() is None and terminate_runs:
            with contextlib.suppress(Exception):
                self.terminate_runs(timeout=min(timeout, 60))
        if self._instance is not None:
            with contextlib.suppress(Exception):
                self._instance.dispose()
            self._instance = None
        self._proc = None
        if proc is not None:
            pgid = proc.pid
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(pgid, signal.SIGTERM)
                try:
                    proc.wait(timeout=timeout)
                except subprocess.TimeoutExpired:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(pgid, signal.SIGKILL)
                    proc.wait(timeout=30)
            # The code server and run workers left in the group once the daemon itself exited.
            deadline = time.monotonic() + 10
            while group_pids(pgid) and time.monotonic() < deadline:
                time.sleep(0.1)  # polling interval of a bounded wait
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pgid, signal.SIGKILL)
        if self._log_dir is not None:
            shutil.rmtree(self._log_dir, ignore_errors=True)
            self._log_dir = None
            self._log_path = None
        if self._own_home and self._home is not None:
            shutil.rmtree(self._home, ignore_errors=True)
            self._home = None

    def __enter__(self) -> DagsterDaemon:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    # -- runs ------------------------------------------------------------------------------------------
    def runs(
        self, job_name: str | None = None, statuses: Iterable[DagsterRunStatus] | None = None,
        tags: Mapping[str, str] | None = None,
    ) -> list[RunRecord]:
        """Run records, oldest first."""
        runs_filter = RunsFilter(
            job_name=job_name, statuses=list(statuses) if statuses else None, tags=dict(tags or {})
        )
        records = _sqlite_retrying(lambda: self.instance().get_run_records(runs_filter))
        return sorted(records, key=lambda r: r.create_timestamp)

    def in_flight(self, job_name: str | None = None) -> list[RunRecord]:
        return self.runs(job_name, statuses=IN_FLIGHT)

    def terminate_runs(self, timeout: float = 60) -> None:
        """Ask the run launcher to terminate every in-flight run and wait until none is in flight."""
        instance = self.instance()
        for record in self.in_flight():
            run = record.dagster_run
            if run.status in (DagsterRunStatus.QUEUED, DagsterRunStatus.NOT_STARTED):
                instance.report_run_canceled(run)
            else:
                with contextlib.suppress(Exception):
                    instance.run_launcher.terminate(run.run_id)
        wait_for(lambda: not self.in_flight(), timeout, "in-flight runs to end", interval=0.25)

    def run_worker_pid(self, run_id: str) -> int | None:
        """The pid of the process executing the run, from its "Started process for run" engine event."""
        records = _sqlite_retrying(
            lambda: self.instance().get_records_for_run(run_id, of_type=DagsterEventType.ENGINE_EVENT).records
        )
        for record in records:
            event = record.event_log_entry.dagster_event
            data = event.engine_event_data if event is not None else None
            if data is None or "pid" not in (data.metadata or {}):
                continue
            if not (event.message or "").startswith("Started process for run"):
                continue
            return int(data.metadata["pid"].value)
        return None

    def wait_run_worker(self, run_id: str, timeout: float = 120) -> int:
        """Until the run's worker reported its pid; the pid (checked to be a live process of this daemon)."""

        def found() -> int | None:
            self.check_alive()
            pid = self.run_worker_pid(run_id)
            if pid is None:
                return None
            with contextlib.suppress(ProcessLookupError):
                if os.getpgid(pid) != self.pid:
                    raise DaemonError(f"run {run_id}'s worker pid {pid} is not in the daemon's process group")
            return pid

        return wait_for(found, timeout, f"run {run_id}'s worker process", interval=0.05)

    def sensor_ticks(self, sensor_name: str, limit: int | None = None) -> list[Any]:
        """The sensor's ticks, newest first (InstigatorTick: status, timestamp, run_ids, skip_reason)."""
        instance = self.instance()
        states = [s for s in _sqlite_retrying(instance.all_instigator_state) if s.name == sensor_name]
        if not states:
            return []
        origin, selector = states[0].instigator_origin_id, states[0].selector_id
        return _sqlite_retrying(lambda: list(instance.get_ticks(origin, selector, limit=limit)))

    def describe(self) -> str:
        """What the daemon did, for a failure message: its sensors' last ticks and its log's tail."""
        lines = []
        with contextlib.suppress(Exception):
            for state in self.instance().all_instigator_state():
                for tick in self.instance().get_ticks(state.instigator_origin_id, state.selector_id, limit=5):
                    error = tick.error.message.strip().splitlines()[0] if tick.error else ""
                    lines.append(f"tick {state.name} {tick.status.value} at {tick.timestamp:.1f}: "
                                 f"runs {list(tick.run_ids)} {tick.skip_reason or ''} {error}")
        return "\n".join([*lines, "daemon log:", self.log_tail()])
