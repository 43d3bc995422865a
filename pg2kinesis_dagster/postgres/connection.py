"""How we reach PostgreSQL: libpq settings, connecting, and errors without secrets."""

from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass, field

import psycopg2
import psycopg2.extensions

from pg2kinesis_dagster.core.errors import ConfigError, SourceUnavailableError

APPLICATION_NAME = "pg2kinesis"
MASK = "********"
_URI_PREFIXES = ("postgresql://", "postgres://")
# password=value (bare or single-quoted) in a key=value string, and user:password@ in a URI.
_KV_PASSWORD = re.compile(r"(password\s*=\s*)('(?:[^'\\]|\\.)*'|\S+)", re.IGNORECASE)
_URI_PASSWORD = re.compile(r"(postgres(?:ql)?://[^:/?#@\s]*:)([^@\s]*)(@)", re.IGNORECASE)


def is_conninfo(value: object) -> bool:
    """Whether a database name is really a connection string, by libpq's rule (a URI prefix, or an "=")."""
    return isinstance(value, str) and (value.startswith(_URI_PREFIXES) or "=" in value)


def mask_passwords(text: str, secrets: list[str] | tuple[str, ...] = ()) -> str:
    """``text`` without passwords: the given ones anywhere, and any password=... or URI user:password@."""
    for secret in sorted(set(secrets), key=len, reverse=True):
        text = text.replace(secret, MASK)
    text = _KV_PASSWORD.sub(lambda m: m.group(1) + MASK, text)
    return _URI_PASSWORD.sub(lambda m: m.group(1) + MASK + m.group(3), text)


def _parse_conninfo(text: str, what: str) -> dict[str, str]:
    try:
        return dict(psycopg2.extensions.parse_dsn(text))
    except psycopg2.ProgrammingError as exc:
        reason = mask_passwords(str(exc).strip())
        raise ConfigError(
            f"{what} is not a valid libpq connection string ({reason}): write a URI "
            "(postgresql://user@host:port/dbname) or key=value pairs (host=... dbname=...), and pass a "
            "connection string as --pg-dsn (PG2K_PG_DSN) rather than as a database name; keep the password in "
            "PGPASSWORD or ~/.pgpass"
        ) from None


@dataclass(frozen=True)
class PostgresSettings:
    """Connection settings. Empty fields fall back to libpq's ``PG*`` environment variables.

    ``dsn`` is a libpq connection string or URI; the explicit fields override what it says.
    ``options`` passes any other libpq keyword (``sslrootcert``, ``sslcert``, ``connect_timeout`` ...).
    """

    dsn: str = ""
    host: str | None = None
    port: int | None = None
    dbname: str | None = None
    user: str | None = None
    password: str | None = field(default=None, repr=False)
    sslmode: str | None = None
    options: dict[str, str] = field(default_factory=dict)
    # Shown in pg_stat_activity; a Dagster run puts its run id here, which is how a sensor tells a
    # run that still works on the slot from one whose process died.
    application_name: str = APPLICATION_NAME

    def connect_kwargs(self) -> dict[str, object]:
        kwargs: dict[str, object] = {}
        # libpq's rule (PQconnectdbParams with expand_dbname): a database name that is a URI or key=value
        # string is a connection string. Its settings come after --pg-dsn's; the explicit fields win (the
        # application name too: a Dagster run's id is how a sensor tells its sessions).
        kwargs.update(self._expanded_dbname())
        kwargs["application_name"] = self.application_name
        for name in ("host", "port", "dbname", "user", "password", "sslmode"):
            value = getattr(self, name)
            if name == "dbname" and is_conninfo(value):
                continue
            if value not in (None, ""):
                kwargs[name] = value
        kwargs.update(self.options)
        return kwargs

    def _expanded_dbname(self) -> dict[str, str]:
        if not is_conninfo(self.dbname):
            return {}
        return _parse_conninfo(str(self.dbname), "the database name (--pg-dbname)")

    def secrets(self) -> list[str]:
        """Every password these settings carry, wherever it was given: to mask them in any message."""
        found = [self.password or "", self.options.get("password", "")]
        for text in (self.dsn, self.dbname if is_conninfo(self.dbname) else ""):
            if text:
                with contextlib.suppress(psycopg2.Error):
                    found.append(psycopg2.extensions.parse_dsn(text).get("password", ""))
        return [secret for secret in found if secret]

    def mask(self, text: str) -> str:
        """``text`` with every password of these settings (and any password=... / user:password@) masked."""
        return mask_passwords(text, self.secrets())

    def describe(self, *, with_user: bool = True) -> str:
        """Where we connect, for messages: never the password."""
        params = _parse_conninfo(self.dsn, "--pg-dsn") if self.dsn else {}
        kwargs = {**params, **self.connect_kwargs()}
        host = kwargs.get("host") or "(PGHOST or local socket)"
        port = kwargs.get("port") or "(PGPORT or 5432)"
        db = kwargs.get("dbname") or "(PGDATABASE)"
        user = kwargs.get("user") or "(PGUSER)"
        where = f"database {db} on {host}:{port}"
        return self.mask(f"{where} as user {user}" if with_user else where)

    def connect(self, *, autocommit: bool = True) -> psycopg2.extensions.connection:
        kwargs = self.connect_kwargs()
        if self.dsn:
            _parse_conninfo(self.dsn, "--pg-dsn")  # a malformed string: a clear error, its password masked
        try:
            conn = psycopg2.connect(self.dsn, **kwargs)
        except psycopg2.ProgrammingError as exc:  # a connection string libpq cannot parse
            raise ConfigError(self.mask(f"invalid PostgreSQL connection settings: {exc}".strip())) from None
        except psycopg2.OperationalError as exc:
            # libpq names host and user, never the password; but a database name may have carried one.
            text = self.mask(str(exc).strip())
            reason = text.splitlines()[0] if text else type(exc).__name__
            raise SourceUnavailableError(
                f"cannot connect to PostgreSQL ({self.describe()}): {reason}. "
                "Check --pg-host/--pg-port/--pg-dbname/--pg-user (or PGHOST, PGPORT, PGDATABASE, PGUSER), "
                "the password (PGPASSWORD or ~/.pgpass) and pg_hba.conf."
            ) from None
        conn.autocommit = autocommit
        return conn
