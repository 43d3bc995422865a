"""Dagster resources: where PostgreSQL and Kinesis are, and what to replicate.

Secrets never go into plain config: set the PostgreSQL password and AWS keys with
``EnvVar("...")`` (the UI then shows the variable's name, not its value), or leave them
empty and let libpq (``PGPASSWORD``, ``~/.pgpass``) and the AWS credential chain find them.
"""


from dataclasses import replace

from dagster import ConfigurableResource, InitResourceContext
from dagster_aws.utils import ResourceWithBoto3Configuration
from pydantic import Field, PrivateAttr

from pg2kinesis_dagster.core import window
from pg2kinesis_dagster.kinesis.sink import KinesisSink, make_kinesis_client
from pg2kinesis_dagster.pipeline import ReplicationSettings, Replicator
from pg2kinesis_dagster.postgres.connection import PostgresSettings

SLOT_TAG = "pg2kinesis/slot"
# A run's PostgreSQL sessions carry its id in application_name: the sensor tells a run that still
# works on its slot from one whose process is gone by looking for them in pg_stat_activity.
RUN_APPLICATION_PREFIX = "pg2kinesis run "


def run_application_name(run_id: str) -> str:
    return f"{RUN_APPLICATION_PREFIX}{run_id}"


class PostgresResource(ConfigurableResource):
    """A PostgreSQL database with logical decoding. Empty fields fall back to libpq's PG* variables."""

    dsn: str = Field(default="", description="libpq connection string or URI (no password in it)")
    host: str | None = None
    port: int | None = None
    dbname: str | None = None
    user: str | None = None
    password: str | None = Field(default=None, description="Only ever set with EnvVar(...)")
    sslmode: str | None = Field(default=None, description="libpq sslmode: disable ... verify-full")
    options: dict[str, str] = Field(
        default_factory=dict, description="Other libpq keywords (sslrootcert, connect_timeout ...)"
    )

    def settings(self) -> PostgresSettings:
        return PostgresSettings(
            dsn=self.dsn,
            host=self.host,
            port=self.port,
            dbname=self.dbname,
            user=self.user,
            password=self.password,
            sslmode=self.sslmode,
            options=dict(self.options),
        )


class KinesisResource(ResourceWithBoto3Configuration):
    """A Kinesis data stream, configured like dagster-aws's boto3 resources.

    ``endpoint_url`` empty means AWS (or ``AWS_ENDPOINT_URL_KINESIS`` when set).
    """

    stream_name: str = Field(default="pg2kinesis", description="The Kinesis data stream")
    max_retry_seconds: float = Field(
        default=300.0, description="Give up (and fail the run, slot untouched) after retrying this long"
    )
    aggregate: bool = Field(
        default=False,
        description="Pack changes into KPL-aggregated records (consumers deaggregate with the KCL or aws-kinesis-agg)",
    )
    connect_timeout: float = 5.0
    read_timeout: float = 30.0

    def sink(self) -> KinesisSink:
        client = make_kinesis_client(
            region_name=self.region_name,
            endpoint_url=self.endpoint_url,
            profile_name=self.profile_name,
            connect_timeout=self.connect_timeout,
            read_timeout=self.read_timeout,
            max_attempts=self.max_attempts,
            aws_access_key_id=self.aws_access_key_id,
            aws_secret_access_key=self.aws_secret_access_key,
            aws_session_token=self.aws_session_token,
            verify=self.verify,
            use_ssl=self.use_ssl,
        )
        return KinesisSink(
            client, self.stream_name, max_retry_seconds=self.max_retry_seconds, aggregate=self.aggregate
        )


class ReplicationResource(ConfigurableResource):
    """One slot replicated into one stream; the ops of a run share its connection and slot lock."""

    postgres: PostgresResource
    kinesis: KinesisResource
    slot_name: str = "pg2kinesis"
    output_plugin: str = Field(default="test_decoding", description="test_decoding, wal2json or pgoutput")
    publication: str = Field(default="pg2kinesis", description="pgoutput only: the publication to replicate")
    message_formatter: str = Field(default="CSVPayload", description="CSV, CSVPayload, JSON or pkg.mod:Class")
    full_change: bool = False
    typed_json: bool = Field(default=False, description="JSON format: typed values where lossless")
    oversized: str = Field(default="fail", description="records over 1 MiB: fail (slot untouched) or truncate")
    table_pat: str | None = Field(default=None, description="Regex searched in schema.table: include")
    exclude_table_pat: str | None = Field(default=None, description="Regex searched in schema.table: exclude")
    operations: str | None = Field(default=None, description="e.g. insert,update (default: all)")
    no_primary_key: str = Field(default="publish", description="publish (keyed by table) or skip")
    partition_key: str = Field(default="row", description="row, table, xid or constant")
    partition_key_constant: str = "pg2kinesis"
    max_changes: int = Field(default=window.DEFAULT_MAX_CHANGES, description="window budget: rows of plugin output")
    max_bytes: int = Field(default=window.DEFAULT_MAX_BYTES, description="window budget: plugin output bytes")
    max_seconds: float = Field(default=window.DEFAULT_MAX_SECONDS, description="window budget: seconds reading")
    chunk_changes: int = Field(
        default=window.DEFAULT_CHUNK_CHANGES, description="changes per chunk: what memory holds, what a crash resends"
    )
    chunk_bytes: int = window.DEFAULT_CHUNK_BYTES
    spool_dir: str | None = Field(default=None, description="local folder for the window (default: system temp)")
    create_slot: bool = False
    exclude_columns: str | None = Field(
        default=None, description="Columns never published: schema.table:col,col;... (key columns cannot be)"
    )
    key_refresh_seconds: float = Field(
        default=3600.0, description="Re-read primary keys from the catalog at least this often (seconds)"
    )

    _replicator: Replicator | None = PrivateAttr(default=None)
    _run_id: str | None = PrivateAttr(default=None)

    def replication_settings(self) -> ReplicationSettings:
        return ReplicationSettings(
            slot_name=self.slot_name,
            output_plugin=self.output_plugin,
            publication=self.publication,
            message_formatter=self.message_formatter,
            full_change=self.full_change,
            typed_json=self.typed_json,
            oversized=self.oversized,
            table_pat=self.table_pat,
            exclude_table_pat=self.exclude_table_pat,
            operations=self.operations,
            no_primary_key=self.no_primary_key,
            partition_key=self.partition_key,
            partition_key_constant=self.partition_key_constant,
            max_changes=self.max_changes,
            max_bytes=self.max_bytes,
            max_seconds=self.max_seconds,
            chunk_changes=self.chunk_changes,
            chunk_bytes=self.chunk_bytes,
            spool_dir=self.spool_dir,
            create_slot=self.create_slot,
            key_refresh_seconds=self.key_refresh_seconds,
            exclude_columns=self.exclude_columns,
        )

    def setup_for_execution(self, context: InitResourceContext) -> None:
        self._run_id = context.run_id

    def postgres_settings(self) -> PostgresSettings:
        """The connection settings, labelled with the run (if any) in ``application_name``."""
        settings = self.postgres.settings()
        if self._run_id:
            settings = replace(settings, application_name=run_application_name(self._run_id))
        return settings

    def replicator(self) -> Replicator:
        if self._replicator is None:
            self._replicator = Replicator(self.postgres_settings(), self.kinesis.sink(), self.replication_settings())
        return self._replicator

    def teardown_after_execution(self, context: InitResourceContext) -> None:
        if self._replicator is not None:
            self._replicator.close()
            self._replicator = None
