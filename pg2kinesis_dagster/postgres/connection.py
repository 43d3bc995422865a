"""How we reach PostgreSQL: libpq settings, connecting, and errors without secrets."""

from __future__ import annotations

from dataclasses import dataclass, field

import psycopg2
import psycopg2.extensions

from pg2kinesis_dagster.core.errors import SourceUnavailableError

APPLICATION_NAME = "pg2kinesis"


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
        kwargs: dict[str, object] = {"application_name": self.application_name}
        for name in ("host", "port", "dbname", "user", "password", "sslmode"):
            value = getattr(self, name)
            if value not in (None, ""):
                kwargs[name] = value
        kwargs.update(self.options)
        return kwargs

    def describe(self, *, with_user: bool = True) -> str:
        """Where we connect, for messages: never the password."""
        params = psycopg2.extensions.parse_dsn(self.dsn) if self.dsn else {}
        kwargs = {**params, **self.connect_kwargs()}
        host = kwargs.get("host") or "(PGHOST or local socket)"
        port = kwargs.get("port") or "(PGPORT or 5432)"
        db = kwargs.get("dbname") or "(PGDATABASE)"
        user = kwargs.get("user") or "(PGUSER)"
        where = f"database {db} on {host}:{port}"
        return f"{where} as user {user}" if with_user else where

    def connect(self, *, autocommit: bool = True) -> psycopg2.extensions.connection:
        try:
            conn = psycopg2.connect(self.dsn, **self.connect_kwargs())
        except psycopg2.OperationalError as exc:
            # libpq messages name host and user but never the password.
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise SourceUnavailableError(
                f"cannot connect to PostgreSQL ({self.describe()}): {reason}. "
                "Check --pg-host/--pg-port/--pg-dbname/--pg-user (or PGHOST, PGPORT, PGDATABASE, PGUSER), "
                "the password (PGPASSWORD or ~/.pgpass) and pg_hba.conf."
            ) from None
        conn.autocommit = autocommit
        return conn
