"""The one model of a replication's configuration, and the views derived from it.

Every setting is declared once here, as a pydantic field whose metadata names its ``pg2k`` flag (the
pg2kinesis spelling where pg2kinesis had one), its group and its help text; the ``PG2K_*`` variable is
always ``PG2K_`` + the field's name in capitals. From this model come:

* the ``pg2k`` command's flags (:func:`add_arguments` / :func:`from_args`),
* the code location's ``PG2K_*`` variables (:func:`from_env`, through pydantic-settings),
* the Dagster resources' fields (:mod:`pg2kinesis_dagster.defs.resources` generates them),
* the ``PG2K_CONFIG`` file of several replications (:func:`load_file`),
* the README's configuration table (:func:`markdown_table`; a test keeps the README equal to it).

Bad values fail when the configuration is loaded, with the field, its flag or variable, the value and
what is allowed (:func:`describe_errors`). This module is pure: no Dagster, no I/O beyond reading the file.
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Iterable, Mapping, Sequence
from datetime import date
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, get_args, get_origin

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic.fields import FieldInfo

from pg2kinesis_dagster.core import health, snapshot, window
from pg2kinesis_dagster.core.errors import ConfigError
from pg2kinesis_dagster.core.filters import parse_operations
from pg2kinesis_dagster.core.formats import FORMATTERS

if TYPE_CHECKING:  # pydantic-settings and PyYAML are imported where used: pg2k's start does without them
    from pydantic_settings import BaseSettings

ENV_PREFIX = "PG2K_"
# The configuration file of several replications; without it the PG2K_* variables describe one.
CONFIG_FILE_ENV = "PG2K_CONFIG"
# The password is never configuration: the variable holds it, and Dagster reads it through EnvVar.
PASSWORD_ENV = "PG2K_PG_PASSWORD"
# A replication's name prefixes its asset keys, jobs, sensors and schedules.
NAME_PATTERN = re.compile(r"^[a-z][a-z0-9_]{0,47}$")

GROUPS = {
    "source": "PostgreSQL (pg2kinesis flags)",
    "kinesis": "Kinesis",
    "format": "What is published (pg2kinesis flags)",
    "budget": "Running",
    "dagster": "Dagster: jobs, sensor, schedules",
    "health": "Dagster: health checks",
    "alerts": "Dagster: alerts",
    "snapshot": "Snapshots (pg2k snapshot, the table_snapshot asset)",
}

SslMode = Literal["disable", "allow", "prefer", "require", "verify-ca", "verify-full"]
OutputPlugin = Literal["pgoutput", "test_decoding", "wal2json"]


def setting(
    default: Any,
    help: str,
    *,
    group: str,
    flag: str | None = None,
    env: bool = True,
    cli_env: bool = False,
    append: str | None = None,
    pipeline: bool = False,
    **constraints: Any,
) -> Any:
    """A field of the model with what the derived views need.

    ``flag``: the ``pg2k`` option (None: not a CLI setting). ``env``: whether ``PG2K_<NAME>`` sets it.
    ``cli_env``: ``pg2k`` takes its default from the variable too (as it always did for these).
    ``append``: a repeatable flag whose values are joined with this separator. ``pipeline``: part of
    :class:`ReplicationSettings`, what the pipeline itself reads.
    """
    extra = {"group": group, "flag": flag, "env": env, "cli_env": cli_env, "append": append, "pipeline": pipeline}
    return Field(default, description=help, json_schema_extra=extra, **constraints)


def meta(info: FieldInfo) -> dict[str, Any]:
    extra = info.json_schema_extra
    return dict(extra) if isinstance(extra, dict) else {}


class ReplicationSettings(BaseModel):
    """What to replicate and how: the part of the model that the pipeline reads (CLI and Dagster alike)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    # Its rule (1-63 of a-z, 0-9, _) is checked by postgres.slot.validate_slot_name before any SQL, and by the
    # code location when it loads.
    slot_name: str = setting("pg2kinesis", "logical replication slot", group="source", flag="--pg-slot-name",
                             pipeline=True)
    output_plugin: OutputPlugin = setting("test_decoding", "the slot's output plugin", group="source",
                                          flag="--pg-slot-output-plugin", pipeline=True)
    publication: str = setting(
        "pg2kinesis", "pgoutput only: the publication to replicate (created FOR ALL TABLES with the slot when "
        "missing)", group="source", flag="--publication", pipeline=True, min_length=1)
    create_slot: bool = setting(False, "create the slot if it does not exist", group="source",
                                flag="--create-slot", pipeline=True)
    recreate_slot: bool = setting(False, "drop and create the slot first (loses the changes pending on it)",
                                  group="source", flag="--recreate-slot", env=False, pipeline=True)
    message_formatter: str = setting(
        "CSVPayload", "CSV, CSVPayload (pg2kinesis formats), JSON, or a class as package.module:Class",
        group="format", flag="--message-formatter", pipeline=True)
    full_change: bool = setting(False, "include the row images in CSVPayload", group="format",
                                flag="--full-change", pipeline=True)
    typed_json: bool = setting(
        False, "JSON format: numbers, booleans, json and arrays as typed JSON values where lossless (see README)",
        group="format", flag="--typed-json", pipeline=True)
    table_pat: str | None = setting(None, "only tables whose schema.table matches this regex", group="format",
                                    flag="--table-pat", pipeline=True)
    exclude_table_pat: str | None = setting(None, "skip tables whose schema.table matches", group="format",
                                            flag="--exclude-table-pat", pipeline=True)
    exclude_columns: str | None = setting(
        None, "columns never published, from every format: schema.table:col,col, entries separated by ';' or "
        "repeated, e.g. public.users:ssn,password_hash; key columns cannot be", group="format",
        flag="--exclude-columns", cli_env=True, append=";", pipeline=True)
    operations: str | None = setting(
        None, "operations to publish, comma-separated or repeated: insert,update,delete,truncate (default: all)",
        group="format", flag="--operations", append=",", pipeline=True)
    no_primary_key: Literal["publish", "skip"] = setting(
        "publish", "changes of tables without a primary key: publish keyed by table, or skip as pg2kinesis did",
        group="format", flag="--no-primary-key", pipeline=True)
    partition_key: Literal["row", "table", "xid", "constant"] = setting(
        "row", "Kinesis partition key: the row (table + key), the table, the transaction id, or a constant",
        group="format", flag="--partition-key", pipeline=True)
    partition_key_constant: str = setting("pg2kinesis", "with --partition-key constant", group="format",
                                          flag="--partition-key-constant", pipeline=True, min_length=1)
    oversized: Literal["fail", "truncate"] = setting(
        "fail", "a record over Kinesis's 1 MiB limit: fail the run (slot untouched), or replace its largest "
        "non-key values by the marker __pg2kinesis_truncated__:<bytes> until it fits", group="format",
        flag="--oversized", pipeline=True)
    max_changes: int = setting(
        window.DEFAULT_MAX_CHANGES, "window budget: rows of plugin output per window (it ends at the next commit; "
        "a window is processed in chunks, so a large one costs disk in the spool, not memory)", group="budget",
        flag="--max-changes", pipeline=True, gt=0)
    max_bytes: int = setting(window.DEFAULT_MAX_BYTES, "window budget: plugin output bytes", group="budget",
                             flag="--max-bytes", pipeline=True, gt=0)
    max_seconds: float = setting(window.DEFAULT_MAX_SECONDS, "window budget: seconds spent reading the slot",
                                 group="budget", flag="--max-seconds", pipeline=True, gt=0)
    chunk_changes: int = setting(
        window.DEFAULT_CHUNK_CHANGES, "changes per chunk inside a window: about what memory holds, and what a "
        "crash sends again", group="budget", flag="--chunk-changes", pipeline=True, gt=0)
    chunk_bytes: int = setting(window.DEFAULT_CHUNK_BYTES, "bytes of records per chunk inside a window",
                               group="budget", pipeline=True, gt=0)
    spool_dir: str | None = setting(
        None, "local folder for the window being replicated (default: the system's temporary folder)",
        group="budget", flag="--spool-dir", cli_env=True, pipeline=True)
    key_refresh_seconds: float = setting(
        3600.0, "re-read primary keys from the catalog at least this often (schema changes seen in the stream "
        "re-read them at once)", group="budget", flag="--key-refresh-seconds", pipeline=True, gt=0)

    @field_validator("message_formatter")
    @classmethod
    def _formatter(cls, value: str) -> str:
        known = {name.lower() for name in FORMATTERS} | {f"{name.lower()}formatter" for name in FORMATTERS}
        if value.lower() in known or re.fullmatch(r"[\w.]+:\w+", value):
            return value
        raise ValueError(
            f"unknown message format {value!r}: use one of {', '.join(FORMATTERS)} or a class as package.module:Class")

    @field_validator("table_pat", "exclude_table_pat")
    @classmethod
    def _regex(cls, value: str | None) -> str | None:
        if value:
            try:
                re.compile(value)
            except re.error as exc:
                raise ValueError(f"not a valid regular expression ({exc})") from None
        return value or None

    @field_validator("operations")
    @classmethod
    def _operations(cls, value: str | None) -> str | None:
        if value:
            try:
                parse_operations(value)
            except ConfigError as exc:
                raise ValueError(str(exc)) from None
        return value or None

    @model_validator(mode="after")
    def _typed_json_with_json(self) -> ReplicationSettings:
        if self.typed_json and self.message_formatter.lower() not in ("json", "jsonformatter"):
            raise ValueError("typed_json (--typed-json, PG2K_TYPED_JSON) applies to the JSON message format only: "
                             "set message_formatter to JSON or drop typed_json")
        return self

    def budget(self) -> window.WindowBudget:
        return window.WindowBudget(
            max_changes=self.max_changes,
            max_bytes=self.max_bytes,
            max_seconds=self.max_seconds,
            chunk_changes=self.chunk_changes,
            chunk_bytes=self.chunk_bytes,
        )


_DEFAULT_THRESHOLDS = health.Thresholds()


class ReplicationConfig(ReplicationSettings):
    """One replication: where from, where to, what and how (ReplicationSettings), and how Dagster runs it."""

    # -- PostgreSQL (connection settings left empty fall back to libpq's PG* variables)
    pg_dsn: str = setting("", "a libpq connection string or URI (no password in it); the flags below override it",
                          group="source", flag="--pg-dsn")
    pg_host: str | None = setting(None, "host (default: PGHOST or the local socket)", group="source",
                                  flag="--pg-host")
    pg_port: int | None = setting(None, "port (default: PGPORT or 5432)", group="source", flag="--pg-port",
                                  ge=1, le=65535)
    pg_dbname: str | None = setting(
        None, "database (default: PGDATABASE); as in libpq, a URI or key=value string here is a connection string "
        "(the flags below override it)", group="source", flag="--pg-dbname")
    pg_user: str | None = setting(None, "role (default: PGUSER)", group="source", flag="--pg-user")
    pg_sslmode: SslMode | None = setting(None, "libpq sslmode (default: PGSSLMODE or prefer)", group="source",
                                         flag="--pg-sslmode")
    pg_password_env: str | None = setting(
        None, f"the environment variable that holds the password (Dagster reads it with EnvVar; {PASSWORD_ENV} "
        "when that is set); default: PGPASSWORD or ~/.pgpass", group="source", pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")
    # -- Kinesis
    # Not checked here: Kinesis's answer for a name it does not have is the clearer error ("does not exist").
    stream_name: str = setting("pg2kinesis", "Kinesis data stream", group="kinesis", flag="--stream-name",
                               min_length=1)
    aws_region: str | None = setting(None, "AWS region (default: AWS_REGION/AWS_DEFAULT_REGION)", group="kinesis",
                                     flag="--aws-region")
    aws_profile: str | None = setting(None, "AWS profile (default: AWS_PROFILE)", group="kinesis",
                                      flag="--aws-profile")
    kinesis_endpoint_url: str | None = setting(
        None, "Kinesis endpoint, e.g. a local emulator (default: AWS_ENDPOINT_URL_KINESIS, then AWS)",
        group="kinesis", flag="--endpoint-url", pattern=r"^https?://")
    aggregate: bool = setting(
        False, "pack changes into KPL-aggregated records, as pg2kinesis did: far fewer Kinesis records (consumers "
        "deaggregate with the KCL or aws-kinesis-agg)", group="kinesis", flag="--aggregate")
    max_retry_seconds: float = setting(
        300.0, "keep retrying Kinesis (and, pg2k without --once, a lost PostgreSQL connection) this long, then fail "
        "with the slot untouched", group="kinesis", flag="--max-retry-seconds", gt=0)
    # -- Dagster: how the code location runs it
    mode: Literal["micro", "continuous"] = setting(
        "micro", "what the sensor keeps running: micro (a replicate run per window) or continuous (one long run)",
        group="dagster")
    continuous_max_runtime_seconds: float = setting(
        1800.0, "a continuous run ends after this long and the sensor starts the next one; run monitoring fails "
        "it 10 minutes later", group="dagster", gt=0)
    replicate_max_runtime_seconds: int = setting(
        3600, "run monitoring fails a replicate (micro-batch) run that takes longer", group="dagster", gt=0)
    sensor_running: bool = setting(False, "the replication sensor starts on when the code location loads",
                                   group="dagster")
    sensor_interval_seconds: int = setting(5, "seconds between the replication sensor's ticks", group="dagster",
                                           gt=0)
    dead_run_grace_seconds: float = setting(
        45.0, "a STARTED run gets this long to open its PostgreSQL session before the sensor looks for it",
        group="dagster", gt=0)
    dead_run_after_seconds: float = setting(
        15.0, "the sensor fails a STARTED run whose sessions have all been gone this long (its process died)",
        group="dagster", gt=0)
    schedule_cron: str = setting("*/5 * * * *", "cron of replicate_schedule (off by default)", group="dagster",
                                 min_length=1)
    summary_start_date: date = setting(date(2026, 1, 1), "first day of replication_daily_summary's partitions",
                                       group="dagster")
    key_metadata_cron: str = setting("0 * * * *", "when primary_key_metadata is refreshed", group="dagster",
                                     min_length=1)
    key_metadata_running: bool = setting(True, "its schedule is on", group="dagster")
    heartbeat_cron: str | None = setting(
        None, "when set, slot_heartbeat writes a logical message into the database on this cron (schedule on)",
        group="dagster")
    # -- Dagster: health checks' thresholds
    max_lag_bytes: int = setting(_DEFAULT_THRESHOLDS.lag_warn_bytes, "slot lag that warns", group="health", ge=0)
    lag_error_bytes: int = setting(_DEFAULT_THRESHOLDS.lag_error_bytes, "slot lag that errors", group="health",
                                   ge=0)
    pinned_warn_bytes: int = setting(_DEFAULT_THRESHOLDS.pinned_warn_bytes,
                                     "restart_lsn behind confirmed_flush_lsn that warns", group="health", ge=0)
    pinned_error_bytes: int = setting(_DEFAULT_THRESHOLDS.pinned_error_bytes, "... that errors", group="health",
                                      ge=0)
    safe_wal_warn_fraction: float = setting(_DEFAULT_THRESHOLDS.safe_wal_warn_fraction,
                                            "safe_wal_size below this fraction of max_slot_wal_keep_size warns",
                                            group="health", ge=0, le=1)
    safe_wal_error_fraction: float = setting(_DEFAULT_THRESHOLDS.safe_wal_error_fraction, "... errors",
                                             group="health", ge=0, le=1)
    freshness_warn_minutes: float = setting(_DEFAULT_THRESHOLDS.fresh_warn_minutes,
                                            "changes pending and no checkpoint for this long warns (inf: never)",
                                            group="health",
                                            ge=0)
    freshness_error_minutes: float = setting(_DEFAULT_THRESHOLDS.fresh_error_minutes, "... errors",
                                             group="health", ge=0)
    health_cron: str = setting("* * * * *", "when the slot health checks run", group="health", min_length=1)
    health_running: bool = setting(True, "their schedule is on", group="health")
    # -- Dagster: alerts
    alert_webhook_url: str | None = setting(
        None, "POST alerts as JSON {\"text\": ...} here (a Slack incoming webhook); always in the Dagster log",
        group="alerts", pattern=r"^https?://")
    alerts_running: bool = setting(True, "the alert sensor starts on", group="alerts")
    alert_interval_seconds: int = setting(30, "seconds between the alert sensor's ticks", group="alerts", gt=0)
    # -- Snapshots of existing tables (README: "Snapshots and backfills")
    snapshot_tables: str | None = setting(
        None, "table_snapshot's partitions, comma-separated schema.table (default: the catalog's tables with a "
        "primary key, kept in step by snapshot_tables_sensor)", group="snapshot")
    snapshot_sync_running: bool = setting(True, "snapshot_tables_sensor starts on", group="snapshot")
    snapshot_chunk_rows: int = setting(
        snapshot.DEFAULT_CHUNK_ROWS, "rows per snapshot chunk (one short transaction and two WAL messages each)",
        group="snapshot", flag="--snapshot-chunk-rows", gt=0)
    snapshot_chunk_bytes: int = setting(snapshot.DEFAULT_CHUNK_BYTES, "at most this many bytes of rows per chunk",
                                        group="snapshot", flag="--snapshot-chunk-bytes", gt=0)
    snapshot_state_dir: str | None = setting(
        None, "where each table's snapshot progress is kept for a resume (default: <spool dir>/.snapshots)",
        group="snapshot", flag="--snapshot-state-dir")

    @field_validator("pg_dsn", mode="before")
    @classmethod
    def _empty_dsn(cls, value: object) -> object:
        return "" if value is None else value

    @model_validator(mode="after")
    def _thresholds_ordered(self) -> ReplicationConfig:
        pairs = [("max_lag_bytes", "lag_error_bytes"), ("pinned_warn_bytes", "pinned_error_bytes"),
                 ("freshness_warn_minutes", "freshness_error_minutes")]
        for warn, error in pairs:
            if getattr(self, warn) > getattr(self, error):
                raise ValueError(f"{warn} ({getattr(self, warn)}) must not exceed {error} ({getattr(self, error)})")
        if self.safe_wal_error_fraction > self.safe_wal_warn_fraction:
            raise ValueError("safe_wal_error_fraction must not exceed safe_wal_warn_fraction (errors come later)")
        return self

    def settings(self) -> ReplicationSettings:
        """The pipeline's part of the configuration."""
        return ReplicationSettings(**{name: getattr(self, name) for name in ReplicationSettings.model_fields})

    def thresholds(self) -> health.Thresholds:
        return health.Thresholds(
            lag_warn_bytes=self.max_lag_bytes, lag_error_bytes=self.lag_error_bytes,
            pinned_warn_bytes=self.pinned_warn_bytes, pinned_error_bytes=self.pinned_error_bytes,
            safe_wal_warn_fraction=self.safe_wal_warn_fraction, safe_wal_error_fraction=self.safe_wal_error_fraction,
            fresh_warn_minutes=self.freshness_warn_minutes, fresh_error_minutes=self.freshness_error_minutes,
        )

    def snapshot_table_list(self) -> list[str] | None:
        """The configured snapshot tables (None: every keyed table of the catalog)."""
        tables = [t.strip() for t in (self.snapshot_tables or "").split(",") if t.strip()]
        return list(dict.fromkeys(tables)) or None

    def snapshot_state_folder(self) -> str | None:
        """Where snapshot progress files go: the setting, else next to the spool (None: the default spool's)."""
        if self.snapshot_state_dir:
            return self.snapshot_state_dir
        return f"{self.spool_dir}/.snapshots" if self.spool_dir else None

    def postgres_fields(self) -> dict[str, Any]:
        """The connection settings as PostgresSettings / PostgresResource name them (without the password)."""
        return {name.removeprefix("pg_"): getattr(self, name) for name in POSTGRES_FIELDS}


# The model's connection fields, named pg_<libpq keyword>.
POSTGRES_FIELDS = ("pg_dsn", "pg_host", "pg_port", "pg_dbname", "pg_user", "pg_sslmode")


class LocationSettings(BaseModel):
    """What the code location shares across its replications."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    retention_days: float = setting(7.0, "finished runs of the location's jobs older than this are deleted hourly "
                                    "(file: a top-level key)",
                                    group="dagster", gt=0)


class Replication(BaseModel):
    """A named replication of the code location. The name "" is the single replication of the PG2K_* variables:
    its definitions keep the names they always had (no prefix)."""

    model_config = ConfigDict(frozen=True)

    name: str
    config: ReplicationConfig


class Location(BaseModel):
    model_config = ConfigDict(frozen=True)

    settings: LocationSettings = LocationSettings()
    replications: tuple[Replication, ...]


# -- errors ------------------------------------------------------------------------------------------------


def env_name(field: str) -> str:
    return f"{ENV_PREFIX}{field.upper()}"


def _field_info(name: str) -> FieldInfo | None:
    return ReplicationConfig.model_fields.get(name) or LocationSettings.model_fields.get(name)


def _spelling(name: str) -> str:
    """How a user sets a field: its name, flag and variable."""
    info = _field_info(name)
    if info is None:
        return name
    extra = meta(info)
    ways = [w for w in (extra.get("flag"), env_name(name) if extra.get("env") else None) if w]
    return f"{name} ({', '.join(ways)})" if ways else name


def _allowed(name: str) -> str:
    info = _field_info(name)
    if info is None:
        return ""
    choices = choices_of(info.annotation)
    return f"; allowed: {', '.join(choices)}" if choices else ""


def _literal(error: Any) -> bool:
    return error["type"] == "literal_error"


def describe_errors(exc: ValidationError, where: str) -> str:
    """One line per bad field: where, the field with its flag and variable, the value, what is allowed."""
    lines = []
    for error in exc.errors():
        loc = [str(part) for part in error["loc"]]
        field = loc[-1] if loc else ""
        path = ".".join(loc[:-1])
        prefix = f"{path}." if path else ""
        value = error.get("input")
        shown = "" if error["type"] in ("missing", "extra_forbidden") or isinstance(value, dict) else f"={value!r}"
        message = error["msg"].removeprefix("Value error, ")
        if error["type"] == "extra_forbidden":
            message = f"unknown setting{_did_you_mean(field)}"
            lines.append(f"  {prefix}{field}: {message}")
            continue
        if not loc:
            lines.append(f"  {message}")
            continue
        allowed = "" if _literal(error) else _allowed(field)
        lines.append(f"  {prefix}{_spelling(field)}{shown}: {message}{allowed}")
    return f"invalid configuration in {where}:\n" + "\n".join(lines)


def _did_you_mean(name: str) -> str:
    import difflib

    known = [*ReplicationConfig.model_fields, *LocationSettings.model_fields]
    close = difflib.get_close_matches(name.lower().removeprefix("pg2k_"), known, n=1)
    return f" (did you mean {close[0]}?)" if close else " (see the README's configuration table)"


def _validated(model: type[BaseModel], data: Mapping[str, Any], where: str) -> Any:
    try:
        return model.model_validate(dict(data))
    except ValidationError as exc:
        raise ConfigError(describe_errors(exc, where)) from None


def choices_of(annotation: Any) -> tuple[str, ...]:
    """The allowed values of a Literal field (also inside ``X | None``)."""
    if get_origin(annotation) is Literal:
        return tuple(str(a) for a in get_args(annotation))
    for arg in get_args(annotation):
        if get_origin(arg) is Literal:
            return tuple(str(a) for a in get_args(arg))
    return ()


# -- view: the PG2K_* variables (pydantic-settings) --------------------------------------------------------


def _env_model(model: type[BaseModel], env: Mapping[str, str]) -> type[BaseSettings]:
    from pydantic_settings import BaseSettings, EnvSettingsSource, PydanticBaseSettingsSource, SettingsConfigDict
    from pydantic_settings.sources.utils import parse_env_vars

    class _MappingEnvSource(EnvSettingsSource):
        """pydantic-settings' environment source over a given mapping (the code location's, or a test's)."""

        def __init__(self, settings_cls: type[BaseSettings], env: Mapping[str, str]) -> None:
            self._mapping = env
            super().__init__(settings_cls, case_sensitive=False, env_prefix=ENV_PREFIX, env_ignore_empty=True)

        def _load_env_vars(self) -> Mapping[str, str | None]:
            return parse_env_vars(self._mapping, self.case_sensitive, self.env_ignore_empty, self.env_parse_none_str)

    class FromEnv(BaseSettings, model):  # type: ignore[misc, valid-type]
        model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="ignore", frozen=True)

        @classmethod
        def settings_customise_sources(
            cls, settings_cls: type[BaseSettings], init_settings: PydanticBaseSettingsSource,
            *args: PydanticBaseSettingsSource, **kwargs: PydanticBaseSettingsSource,
        ) -> tuple[PydanticBaseSettingsSource, ...]:
            return (init_settings, _MappingEnvSource(settings_cls, env))

    return FromEnv


def _env_only(env: Mapping[str, str]) -> dict[str, str]:
    """Only the variables of fields that a variable may set (recreate_slot, e.g., may not)."""
    allowed = {env_name(n) for n, info in ReplicationConfig.model_fields.items() if meta(info).get("env")}
    allowed |= {env_name(n) for n in LocationSettings.model_fields}
    data = {k.upper(): v for k, v in env.items() if k.upper() in allowed}
    if not data.get("PG2K_AWS_REGION"):
        region = env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION")
        if region:
            data["PG2K_AWS_REGION"] = region
    if env.get(PASSWORD_ENV) and not data.get("PG2K_PG_PASSWORD_ENV"):
        data["PG2K_PG_PASSWORD_ENV"] = PASSWORD_ENV
    return data


def from_env(env: Mapping[str, str]) -> Location:
    """The code location's configuration: the file named by PG2K_CONFIG, or else one replication from PG2K_*."""
    path = env.get(CONFIG_FILE_ENV)
    if path:
        stray = sorted(k for k in _env_only(env) if k not in ("PG2K_AWS_REGION", "PG2K_PG_PASSWORD_ENV"))
        if stray:
            raise ConfigError(
                f"{CONFIG_FILE_ENV}={path} is set, and so are {', '.join(stray)}: with a configuration file every "
                "setting is in the file (put common ones under its defaults:) and these variables are not read. "
                "Unset them or move them into the file.")
        return load_file(path)
    data = _env_only(env)
    where = "the PG2K_* environment variables"
    try:
        config = _env_model(ReplicationConfig, data)()
        location = _env_model(LocationSettings, data)()
    except ValidationError as exc:
        raise ConfigError(describe_errors(exc, where)) from None
    replication_config = ReplicationConfig.model_validate(config.model_dump())
    return Location(settings=LocationSettings.model_validate(location.model_dump()),
                    replications=(Replication(name="", config=replication_config),))


# -- view: the configuration file --------------------------------------------------------------------------


class _FileModel(BaseModel):
    model_config = ConfigDict(extra="forbid")

    retention_days: float = LocationSettings.model_fields["retention_days"].default
    defaults: dict[str, Any] = Field(default_factory=dict)
    replications: dict[str, dict[str, Any] | None]


def parse_file(text: str, where: str) -> Location:
    """The replications of a configuration file (YAML). ``defaults:`` apply to every replication."""
    import yaml

    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{where} is not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping with replications: (see the README's example)")
    parsed: _FileModel = _validated(_FileModel, data, where)
    if not parsed.replications:
        raise ConfigError(f"{where}: replications: is empty; list at least one replication")
    replications = []
    for name, block in parsed.replications.items():
        if not NAME_PATTERN.match(str(name)):
            raise ConfigError(
                f"{where}: replication name {name!r} is not allowed: lower-case letters, digits and _, starting "
                "with a letter, at most 48 characters (it prefixes asset keys and job names)")
        merged = {**parsed.defaults, **(block or {})}
        try:
            config = ReplicationConfig.model_validate(merged)
        except ValidationError as exc:
            raise ConfigError(describe_errors(exc, f"{where}, replication {name!r}")) from None
        replications.append(Replication(name=str(name), config=config))
    _check_distinct(replications, where)
    settings = _validated(LocationSettings, {"retention_days": parsed.retention_days}, where)
    return Location(settings=settings, replications=tuple(replications))


def load_file(path: str | Path) -> Location:
    file = Path(path)
    try:
        text = file.read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read {CONFIG_FILE_ENV}={path}: {exc.strerror}") from None
    return parse_file(text, f"{CONFIG_FILE_ENV}={path}")


def _check_distinct(replications: Sequence[Replication], where: str) -> None:
    """Two replications of one slot would fight over it (one run per slot): refuse at load."""
    seen: dict[tuple[object, ...], str] = {}
    for replication in replications:
        c = replication.config
        key = (c.pg_dsn, c.pg_host, c.pg_port, c.pg_dbname, c.slot_name)
        if key in seen:
            raise ConfigError(
                f"{where}: replications {seen[key]!r} and {replication.name!r} read the same slot "
                f"{c.slot_name!r} of the same database: give each its own slot_name (a slot has one reader)")
        seen[key] = replication.name


# -- view: the pg2k command's flags ------------------------------------------------------------------------


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Show a default only where there is one worth showing."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default in (None, False, "", argparse.SUPPRESS) or "default:" in (action.help or ""):
            return action.help or ""
        return super()._get_help_string(action) or ""


def cli_fields(groups: Iterable[str] | None = None) -> list[tuple[str, FieldInfo]]:
    wanted = set(groups) if groups is not None else None
    chosen = [(name, info) for name, info in ReplicationConfig.model_fields.items()
              if meta(info).get("flag") and (wanted is None or meta(info)["group"] in wanted)]
    order = list(GROUPS)
    # By group, the connection before the slot (as pg2kinesis listed them); otherwise as declared.
    return sorted(chosen, key=lambda item: (order.index(meta(item[1])["group"]), not item[0].startswith("pg_")))


def add_arguments(parser: argparse.ArgumentParser, groups: Iterable[str] = ("source", "kinesis", "format", "budget"),
                  env: Mapping[str, str] | None = None) -> dict[str, argparse._ArgumentGroup]:
    """Add the model's flags of ``groups`` to ``parser`` (a subcommand can take only the source and kinesis ones).

    Returns the argument groups by key so a caller can add its own options to them.
    """
    env = {} if env is None else env
    made: dict[str, argparse._ArgumentGroup] = {}
    for name, info in cli_fields(groups):
        extra = meta(info)
        group = made.get(extra["group"]) or parser.add_argument_group(GROUPS[extra["group"]])
        made[extra["group"]] = group
        default = info.default
        if extra.get("cli_env") and env.get(env_name(name)):
            default = env[env_name(name)]
        kwargs: dict[str, Any] = {"dest": name, "help": info.description}
        if info.annotation is bool:
            kwargs["action"] = "store_true"
        elif extra.get("append"):
            kwargs.update(action="append", default=None)
            if default:
                kwargs["help"] = f"{info.description} (default: {env_name(name)})"
        else:
            kwargs["default"] = default
            kind = _scalar_type(info.annotation)
            if kind in (int, float):
                kwargs["type"] = kind
            choices = choices_of(info.annotation)
            if choices:
                kwargs["choices"] = choices
        if name == "spool_dir":
            kwargs["help"] = f"{info.description}; default: {env_name(name)} when set"
        group.add_argument(extra["flag"], **kwargs)
    return made


def _scalar_type(annotation: Any) -> Any:
    args = [a for a in get_args(annotation) if a is not type(None)]
    return args[0] if len(args) == 1 else annotation


def from_args(args: argparse.Namespace, env: Mapping[str, str] | None = None) -> ReplicationConfig:
    """The configuration the parsed flags describe (flags not given keep the model's defaults)."""
    env = {} if env is None else env
    data: dict[str, Any] = {}
    for name, info in cli_fields():
        if not hasattr(args, name):
            continue
        value = getattr(args, name)
        separator = meta(info).get("append")
        if separator and isinstance(value, list):
            value = separator.join(value)
        elif separator and value is None and meta(info).get("cli_env"):
            value = env.get(env_name(name)) or None
        data[name] = value
    try:
        return ReplicationConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(describe_errors(exc, "the command line")) from None


# -- view: the README's table ------------------------------------------------------------------------------


def _default_text(name: str, info: FieldInfo) -> str:
    if name == "spool_dir":
        return "system temp"
    value = info.default
    if value is None or value == "":
        return ""
    if isinstance(value, bool):
        return "on" if value else "off"
    return f"`{value}`"


def markdown_table() -> str:
    """The README's configuration table: every setting with its variable, flag, default, allowed values."""
    rows = ["| setting (file) | variable | `pg2k` flag | default | meaning |", "| --- | --- | --- | --- | --- |"]
    fields = [*ReplicationConfig.model_fields.items(), *LocationSettings.model_fields.items()]
    order = list(GROUPS)
    fields.sort(key=lambda item: (order.index(meta(item[1])["group"]), not item[0].startswith("pg_")))
    for name, info in fields:
        extra = meta(info)
        choices = choices_of(info.annotation)
        description = (info.description or "").replace("|", "\\|")
        if choices:
            description += f" ({' / '.join(choices)})"
        variable = f"`{env_name(name)}`" if extra.get("env") else ""
        flag = f"`{extra['flag']}`" if extra.get("flag") else ""
        rows.append(f"| `{name}` | {variable} | {flag} | {_default_text(name, info)} | {description} |")
    rows.append(f"| | `{PASSWORD_ENV}` | | | the password itself, read by Dagster through EnvVar (never stored) |")
    rows.append(f"| | `{CONFIG_FILE_ENV}` | | | a YAML file of several replications (then the variables above "
                "are not read) |")
    return "\n".join(rows)
