"""A throwaway PostgreSQL server for the demo, local development and tests.

:class:`PostgresServer` runs ``initdb`` into a fresh temporary folder, starts a
server with logical decoding enabled on a free loopback port, and removes
everything on :meth:`~PostgresServer.stop`. It is tuned for speed, not safety
(``fsync=off``): never point it at data you care about.

Example::

    with PostgresServer() as pg:
        conn = pg.connect(pg.create_database("demo"))

Authentication: the superuser ``postgres`` is trusted over the local socket and
127.0.0.1; every other role needs its password (``scram-sha-256``), which lets
tests exercise a least-privilege role the way production would.

When running as root (containers, CI) the server runs as the OS user
``postgres`` through ``runuser``, because ``initdb`` and ``postgres`` refuse to
run as root.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import weakref
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import Any

import psycopg2
import psycopg2.errors
import psycopg2.extensions
from psycopg2 import sql

DEFAULT_BINDIR = "/usr/lib/postgresql/15/bin"
INSTALL_HINT = (
    "install PostgreSQL 15 with wal2json (Debian/Ubuntu: "
    "apt-get install postgresql-15 postgresql-15-wal2json) or set PG_BINDIR to the folder "
    "that holds initdb, pg_ctl and postgres"
)
_REQUIRED_BINARIES = ("initdb", "pg_ctl", "postgres")
_LOG_TAIL_LINES = 40
# NAMEDATALEN - 1: longer names are silently truncated by PostgreSQL, which would
# make create_database() return a name that does not exist.
_MAX_IDENTIFIER_BYTES = 63

SettingValue = str | int | float | bool


class PostgresServerError(RuntimeError):
    """The throwaway server could not be found, initialised, started or stopped."""


def find_bindir() -> Path:
    """The folder holding the PostgreSQL server binaries.

    Order: ``$PG_BINDIR``, ``pg_config --bindir``, :data:`DEFAULT_BINDIR`, then
    the folder of ``initdb`` on ``PATH``. Raises :class:`PostgresServerError`
    with installation advice when none holds initdb, pg_ctl and postgres.
    """
    candidates: list[tuple[str, Path]] = []
    env = os.environ.get("PG_BINDIR")
    if env:
        # An explicit override must not silently fall back to something else.
        path = Path(env)
        if not _has_binaries(path):
            raise PostgresServerError(
                f"PG_BINDIR={env!r} does not contain {', '.join(_REQUIRED_BINARIES)}; "
                f"fix PG_BINDIR or unset it, or {INSTALL_HINT}"
            )
        return path
    pg_config = shutil.which("pg_config")
    if pg_config:
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            out = subprocess.run(
                [pg_config, "--bindir"], capture_output=True, text=True, timeout=30, check=True
            ).stdout.strip()
            if out:
                candidates.append(("pg_config --bindir", Path(out)))
    candidates.append(("default", Path(DEFAULT_BINDIR)))
    initdb = shutil.which("initdb")
    if initdb:
        # /usr/local/bin may hold symlinks to only some binaries: follow to the real folder.
        candidates.append(("PATH", Path(initdb).resolve().parent))
    for _, path in candidates:
        if _has_binaries(path):
            return path
    tried = ", ".join(f"{path} ({how})" for how, path in candidates)
    raise PostgresServerError(f"PostgreSQL server binaries not found (tried {tried}); {INSTALL_HINT}")


def _has_binaries(path: Path) -> bool:
    return all(os.access(path / name, os.X_OK) for name in _REQUIRED_BINARIES)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago (the OS picks it when binding port 0)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _format_setting(value: SettingValue) -> str:
    """A value as postgresql.conf wants it: strings single-quoted, booleans on/off."""
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, int | float):
        return str(value)
    return "'" + str(value).replace("\\", "\\\\").replace("'", "''") + "'"


def _tail(path: Path, lines: int = _LOG_TAIL_LINES, start: int = 0) -> str:
    try:
        with path.open("rb") as fh:
            fh.seek(start)
            text = fh.read().decode("utf-8", "replace")
    except OSError as exc:
        return f"(cannot read {path}: {exc})"
    return "\n".join(text.splitlines()[-lines:]) or "(empty)"


class _Runner:
    """Runs PostgreSQL binaries as the OS user that owns the cluster.

    Kept separate from :class:`PostgresServer` so that the emergency cleanup
    (a :func:`weakref.finalize` callback) can use it without keeping the server alive.
    """

    def __init__(self, bindir: Path, os_user: str | None, cwd: Path) -> None:
        self.bindir = bindir
        self.os_user = os_user
        self.cwd = cwd
        # libpq/pg_ctl honour PGDATA, PGPORT, ...: a developer's environment must not
        # redirect the throwaway server to a real cluster.
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        self.env["LC_ALL"] = "C"
        self.env["TZ"] = "UTC"

    def command(self, binary: str, *args: str) -> list[str]:
        cmd = [str(self.bindir / binary), *args]
        if self.os_user is not None:
            runuser = shutil.which("runuser") or "/usr/sbin/runuser"
            cmd = [runuser, "-u", self.os_user, "--", *cmd]
        return cmd

    def run(self, binary: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            self.command(binary, *args),
            capture_output=True,
            text=True,
            cwd=self.cwd,  # the postgres user may not be allowed into the caller's cwd
            env=self.env,
            timeout=timeout,
            check=False,
        )

    def is_running(self, datadir: Path) -> bool:
        if not (datadir / "postmaster.pid").exists():
            return False
        # pg_ctl status: 0 = running, 3 = not running, 4 = no data directory.
        return self.run("pg_ctl", "-D", str(datadir), "status", timeout=30).returncode == 0


def _emergency_cleanup(runner: _Runner, datadir: Path, tmpdir: Path) -> None:
    """Stop the server (immediately) and delete its folder; safe to call twice.

    Runs from :meth:`PostgresServer.stop` after a clean stop (then it only deletes
    the folder) and, through :func:`weakref.finalize`, at interpreter exit when a
    test run was interrupted, so no postgres process outlives the Python process.
    """
    pidfile = datadir / "postmaster.pid"
    if pidfile.exists():
        with contextlib.suppress(Exception):
            runner.run("pg_ctl", "-D", str(datadir), "-m", "immediate", "-w", "-t", "30", "stop", timeout=60)
        if pidfile.exists():
            # pg_ctl failed: signal the postmaster we started ourselves, by its pid.
            with contextlib.suppress(Exception):
                pid = int(pidfile.read_text().splitlines()[0])
                os.kill(pid, signal.SIGQUIT)
                deadline = time.monotonic() + 10
                while time.monotonic() < deadline:
                    os.kill(pid, 0)  # raises once the process is gone
                    time.sleep(0.05)
                os.kill(pid, signal.SIGKILL)
    shutil.rmtree(tmpdir, ignore_errors=True)


class PostgresServer:
    """A throwaway PostgreSQL cluster in a temporary folder, on a free loopback port.

    Use as a context manager, or call :meth:`start` and :meth:`stop` (in a
    ``finally``). :meth:`restart` and :meth:`kill` keep the data; :meth:`stop`
    deletes it. After :meth:`stop`, :meth:`start` creates a brand-new cluster.

    Args:
        wal_level: ``"logical"`` for CDC; ``"replica"`` (or ``"minimal"``) to test
            the tool's error for a server without logical decoding.
        settings: extra ``postgresql.conf`` settings; they override the defaults.
        os_user: OS user to run the server as. Default: ``postgres`` when running
            as root (initdb refuses root), else the current user.
        base_dir: parent of the temporary folder (default: the system temp dir).
        start_timeout: seconds to wait for the server to accept connections.
    """

    host = "127.0.0.1"
    superuser = "postgres"

    def __init__(
        self,
        *,
        wal_level: str = "logical",
        settings: Mapping[str, SettingValue] | None = None,
        os_user: str | None = None,
        base_dir: str | os.PathLike[str] | None = None,
        start_timeout: float = 60.0,
    ) -> None:
        self.wal_level = wal_level
        self.settings: dict[str, SettingValue] = dict(settings or {})
        if os_user is None and os.geteuid() == 0:
            os_user = "postgres"
        self.os_user = os_user
        self.base_dir = Path(base_dir) if base_dir is not None else None
        self.start_timeout = start_timeout
        self._bindir: Path | None = None
        self._tmpdir: Path | None = None
        self._port: int | None = None
        self._runner: _Runner | None = None
        self._finalizer: weakref.finalize | None = None
        self._running = False
        # Whether this cluster ever ran: a failed start() then keeps its data for inspection.
        self._has_been_started = False

    # -- paths and addresses -------------------------------------------------------

    @property
    def port(self) -> int:
        if self._port is None:
            raise PostgresServerError("the server has no port yet: call start() first")
        return self._port

    @property
    def tmpdir(self) -> Path:
        if self._tmpdir is None:
            raise PostgresServerError("the server has no folder yet: call start() first")
        return self._tmpdir

    @property
    def data_dir(self) -> Path:
        return self.tmpdir / "data"

    @property
    def socket_dir(self) -> Path:
        return self.tmpdir / "socket"

    @property
    def log_path(self) -> Path:
        """The server's log file (stderr of the postmaster, via ``pg_ctl -l``)."""
        return self.tmpdir / "postgres.log"

    @property
    def bindir(self) -> Path:
        if self._bindir is None:
            self._bindir = find_bindir()
        return self._bindir

    @property
    def is_running(self) -> bool:
        return self._running

    def dsn(self, dbname: str = "postgres", user: str = "postgres", password: str | None = None) -> str:
        """A libpq ``key=value`` connection string over TCP loopback (values quoted as needed)."""
        return psycopg2.extensions.make_dsn(
            host=self.host, port=self.port, dbname=dbname, user=user, password=password
        )

    def connect(
        self,
        dbname: str = "postgres",
        *,
        user: str = "postgres",
        password: str | None = None,
        autocommit: bool = True,
        **kwargs: Any,
    ) -> psycopg2.extensions.connection:
        """A new psycopg2 connection (autocommit unless told otherwise); the caller closes it.

        Extra keyword arguments go to :func:`psycopg2.connect` (e.g.
        ``connection_factory=psycopg2.extras.LogicalReplicationConnection``).
        """
        kwargs.setdefault("connect_timeout", 10)
        conn = psycopg2.connect(self.dsn(dbname, user, password), **kwargs)
        # Replication connections (they have a replication_type) are always autocommit
        # and refuse even to report it.
        if getattr(conn, "replication_type", None) is None:
            conn.autocommit = autocommit
        return conn

    def create_database(self, name: str) -> str:
        """Create database ``name`` (any characters; it is quoted) and return its name."""
        _check_identifier(name)
        with contextlib.closing(self.connect()) as conn, conn.cursor() as cur:
            cur.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        return name

    def drop_database(self, name: str, *, timeout: float = 30.0) -> None:
        """Drop database ``name`` and the replication slots in it, disconnecting everyone.

        Slots are dropped first: a logical slot blocks ``DROP DATABASE`` and, left
        behind on a shared test server, would retain WAL for the rest of the session.
        """
        _check_identifier(name)
        with contextlib.closing(self.connect()) as conn, conn.cursor() as cur:
            deadline = time.monotonic() + timeout
            while True:
                cur.execute(
                    "SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots "
                    "WHERE database = %s AND active_pid IS NOT NULL",
                    (name,),
                )
                # A slot stays active for a moment after its walsender is terminated.
                cur.execute(
                    "SELECT slot_name, active FROM pg_replication_slots WHERE database = %s", (name,)
                )
                slots = cur.fetchall()
                for slot_name, active in slots:
                    if not active:
                        with contextlib.suppress(psycopg2.errors.UndefinedObject,
                                                 psycopg2.errors.ObjectInUse):
                            cur.execute("SELECT pg_drop_replication_slot(%s)", (slot_name,))
                if not slots:
                    break
                if time.monotonic() > deadline:
                    raise PostgresServerError(
                        f"replication slots {[s for s, _ in slots]} in database {name!r} are still "
                        f"in use after {timeout:.0f}s; cannot drop the database"
                    )
                time.sleep(0.05)
            cur.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )

    # -- lifecycle -----------------------------------------------------------------

    def start(self) -> PostgresServer:
        """Create the cluster (first time only) and start the server; returns ``self``."""
        if self._running:
            return self
        if self._tmpdir is None:
            self._init_cluster()
        try:
            self._start_postmaster()
        except BaseException:
            # A server that never came up must not leave its folder behind, unless
            # it holds data from an earlier run (restart/kill) someone may want to inspect.
            if not self._has_been_started:
                self._cleanup()
            raise
        self._has_been_started = True
        return self

    def stop(self, mode: str = "fast") -> None:
        """Stop the server (``pg_ctl -m mode``) and delete its folder. Safe to call twice."""
        try:
            if self._tmpdir is not None and self._runner is not None:
                self._pg_ctl_stop(mode)
        finally:
            self._cleanup()

    def restart(self, mode: str = "fast") -> None:
        """Stop (``fast``, ``smart`` or ``immediate``) and start again on the same port, keeping data."""
        self._pg_ctl_stop(mode)
        self._start_postmaster()

    def kill(self) -> None:
        """Stop at once like a crash (``-m immediate``), keeping data; :meth:`start` recovers it."""
        self._pg_ctl_stop("immediate")

    def __enter__(self) -> PostgresServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = "running" if self._running else "stopped"
        where = f" on {self.host}:{self._port}" if self._port else ""
        return f"<PostgresServer {state}{where} wal_level={self.wal_level}>"

    # -- internals -----------------------------------------------------------------

    def _init_cluster(self) -> None:
        bindir = self.bindir
        owner: pwd.struct_passwd | None = None
        if self.os_user is not None:
            try:
                owner = pwd.getpwnam(self.os_user)
            except KeyError:
                raise PostgresServerError(
                    f"OS user {self.os_user!r} does not exist; PostgreSQL refuses to run as root, so "
                    f"create that user or {INSTALL_HINT} (the Debian package creates 'postgres')"
                ) from None
        tmpdir = Path(tempfile.mkdtemp(prefix="pg2k-postgres-", dir=self.base_dir))
        runner = _Runner(bindir, self.os_user, tmpdir)
        self._tmpdir, self._runner = tmpdir, runner
        self._finalizer = weakref.finalize(self, _emergency_cleanup, runner, tmpdir / "data", tmpdir)
        self.socket_dir.mkdir()
        if owner is not None:
            for path in (tmpdir, self.socket_dir):
                os.chown(path, owner.pw_uid, owner.pw_gid)
        result = runner.run(
            "initdb",
            "-D", str(self.data_dir),
            "-U", self.superuser,
            "-A", "trust",
            "--encoding=UTF8",
            "--locale=C",
            "--no-sync",  # throwaway: no point in fsyncing the fresh cluster
        )
        if result.returncode != 0:
            output = (result.stdout + result.stderr).strip()
            self._cleanup()
            hint = ""
            if self.os_user is not None and "Permission denied" in output:
                hint = (
                    f" (the OS user {self.os_user!r} must be able to reach {tmpdir}: pass base_dir= "
                    "a folder it can traverse, e.g. /tmp, or fix TMPDIR)"
                )
            raise PostgresServerError(
                f"initdb failed (exit {result.returncode}) in {tmpdir}{hint}: {output[-3000:]}"
            )
        self._write(self.data_dir / "pg_hba.conf", self._hba_conf())
        # Our settings live in their own file, rewritten on each start attempt (the port
        # may change if another process grabbed it between choosing and binding).
        with (self.data_dir / "postgresql.conf").open("a") as fh:
            fh.write("\ninclude 'pg2kinesis_devstack.conf'\n")

    def _hba_conf(self) -> str:
        return (
            "# Written by pg2kinesis_dagster.devstack.postgres: a throwaway test server.\n"
            "# TYPE  DATABASE     USER      ADDRESS        METHOD\n"
            "local  all          postgres                 trust\n"
            "host   all          postgres  127.0.0.1/32   trust\n"
            "local  replication  postgres                 trust\n"
            "host   replication  postgres  127.0.0.1/32   trust\n"
            # Every other role must present its password, as in production.
            "local  all          all                      scram-sha-256\n"
            "host   all          all       127.0.0.1/32   scram-sha-256\n"
            "local  replication  all                      scram-sha-256\n"
            "host   replication  all       127.0.0.1/32   scram-sha-256\n"
        )

    def _config(self, port: int) -> dict[str, SettingValue]:
        config: dict[str, SettingValue] = {
            "wal_level": self.wal_level,
            "max_replication_slots": 20,
            "max_wal_senders": 0 if self.wal_level == "minimal" else 20,
            "listen_addresses": self.host,
            "port": port,
            "unix_socket_directories": str(self.socket_dir),
            # Throwaway data: trade durability for speed.
            "fsync": False,
            "full_page_writes": False,
            # NOT off, although that would be faster in theory: logical decoding (both
            # pg_logical_slot_*_changes and walsenders) only reads WAL up to the flush
            # pointer, so with asynchronous commit a just-committed transaction stays
            # invisible to the slot for up to ~3 x wal_writer_delay (600 ms) and tests
            # that write then drain would be flaky. With fsync=off a flush is a mere write().
            "synchronous_commit": True,
            "max_connections": 100,
            "shared_buffers": "128MB",
            "password_encryption": "scram-sha-256",
            # Fixed time zone so timestamptz text forms do not depend on the host.
            "timezone": "UTC",
            "log_timezone": "UTC",
            "log_line_prefix": "%m [%p] %q%u@%d ",
        }
        config.update(self.settings)
        return config

    def _write(self, path: Path, text: str) -> None:
        path.write_text(text)
        if self.os_user is not None:
            owner = pwd.getpwnam(self.os_user)
            os.chown(path, owner.pw_uid, owner.pw_gid)

    def _write_config(self, port: int) -> None:
        lines = [f"{key} = {_format_setting(value)}" for key, value in self._config(port).items()]
        self._write(self.data_dir / "pg2kinesis_devstack.conf", "\n".join(lines) + "\n")

    def _start_postmaster(self) -> None:
        assert self._runner is not None
        attempts = 1 if self._port is not None else 3  # keep the port once clients know it
        for attempt in range(attempts):
            port = self._port if self._port is not None else free_port(self.host)
            self._write_config(port)
            log_start = self.log_path.stat().st_size if self.log_path.exists() else 0
            result = self._runner.run(
                "pg_ctl", "-D", str(self.data_dir), "-w", "-t", str(int(self.start_timeout)),
                "-l", str(self.log_path), "start",
                timeout=self.start_timeout + 30,
            )
            if result.returncode == 0:
                self._port = port
                self._running = True
                self._wait_until_accepting()
                return
            log = _tail(self.log_path, start=log_start)
            port_taken = "could not bind" in log or "Address already in use" in log
            if port_taken and attempt + 1 < attempts:
                continue  # lost the race for the port: pick another
            raise PostgresServerError(
                f"PostgreSQL did not start (pg_ctl exit {result.returncode}): "
                f"{(result.stdout + result.stderr).strip()}\n"
                f"--- last lines of {self.log_path} ---\n{log}"
            )

    def _wait_until_accepting(self) -> None:
        # pg_ctl -w already waited for "ready"; this also proves TCP + pg_hba work.
        deadline = time.monotonic() + self.start_timeout
        while True:
            try:
                psycopg2.connect(self.dsn(), connect_timeout=5).close()
                return
            except psycopg2.OperationalError as exc:
                if time.monotonic() > deadline:
                    raise PostgresServerError(
                        f"PostgreSQL started but refused connections on {self.host}:{self._port} for "
                        f"{self.start_timeout:.0f}s ({exc}).\n"
                        f"--- last lines of {self.log_path} ---\n{_tail(self.log_path)}"
                    ) from exc
                time.sleep(0.05)

    def _pg_ctl_stop(self, mode: str) -> None:
        if mode not in ("smart", "fast", "immediate"):
            raise ValueError(f"stop mode must be 'smart', 'fast' or 'immediate', not {mode!r}")
        if self._runner is None or self._tmpdir is None:
            return
        if not self._runner.is_running(self.data_dir):
            self._running = False
            return
        result = self._runner.run(
            "pg_ctl", "-D", str(self.data_dir), "-m", mode, "-w", "-t", "60", "stop", timeout=90
        )
        if result.returncode != 0 and self._runner.is_running(self.data_dir):
            raise PostgresServerError(
                f"pg_ctl stop -m {mode} failed (exit {result.returncode}): "
                f"{(result.stdout + result.stderr).strip()}\n"
                f"--- last lines of {self.log_path} ---\n{_tail(self.log_path)}"
            )
        self._running = False

    def _cleanup(self) -> None:
        if self._finalizer is not None:
            self._finalizer()  # stops a server still running, then deletes the folder
        self._finalizer = None
        self._tmpdir = None
        self._runner = None
        self._port = None
        self._running = False
        self._has_been_started = False


def _check_identifier(name: str) -> None:
    if not name or "\x00" in name or len(name.encode()) > _MAX_IDENTIFIER_BYTES:
        raise ValueError(
            f"invalid database name {name!r}: it must be 1 to {_MAX_IDENTIFIER_BYTES} bytes without NUL"
        )

