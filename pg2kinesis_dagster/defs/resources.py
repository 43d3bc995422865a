"""Dagster resources: where PostgreSQL and Kinesis are, and what to replicate.

Secrets never go into plain config: set the PostgreSQL password and AWS keys with
``EnvVar("...")`` (the UI then shows the variable's name, not its value), or leave them
empty and let libpq (``PGPASSWORD``, ``~/.pgpass``) and the AWS credential chain find them.
"""


from collections.abc import Callable, Iterable
from dataclasses import replace
from typing import Any

from dagster import ConfigurableResource, EnvVar, InitResourceContext
from dagster_aws.utils import ResourceWithBoto3Configuration
from pydantic import Field, PrivateAttr, create_model

from pg2kinesis_dagster.core.config import POSTGRES_FIELDS, ReplicationConfig, choices_of, meta
from pg2kinesis_dagster.kinesis.sink import KinesisSink, make_kinesis_client
from pg2kinesis_dagster.pipeline import ReplicationSettings, Replicator
from pg2kinesis_dagster.postgres.connection import PostgresSettings

SLOT_TAG = "pg2kinesis/slot"
# A run's PostgreSQL sessions carry its id in application_name: the sensor tells a run that still
# works on its slot from one whose process is gone by looking for them in pg_stat_activity.
RUN_APPLICATION_PREFIX = "pg2kinesis run "


def run_application_name(run_id: str) -> str:
    return f"{RUN_APPLICATION_PREFIX}{run_id}"


def model_fields(names: Iterable[str], rename: Callable[[str], str] = lambda name: name) -> dict[str, Any]:
    """Resource fields generated from the configuration model's (type, default, description): declared once."""
    fields: dict[str, Any] = {}
    for name in names:
        info = ReplicationConfig.model_fields[name]
        annotation, description = info.annotation, info.description or ""
        choices = choices_of(annotation)
        if choices:
            # Dagster's config has no Literal: a string, checked by the model when the pipeline's settings are built.
            annotation = str if info.default is not None else str | None
            description = f"{description} ({' / '.join(choices)})"
        fields[rename(name)] = (annotation, Field(default=info.default, description=description))
    return fields


class _PostgresResource(ConfigurableResource):
    """A PostgreSQL database with logical decoding. Empty fields fall back to libpq's PG* variables."""

    password: str | None = Field(default=None, description="Only ever set with EnvVar(...)")
    options: dict[str, str] = Field(
        default_factory=dict, description="Other libpq keywords (sslrootcert, connect_timeout ...)"
    )

    def settings(self) -> PostgresSettings:
        values = {name: getattr(self, name) for name in _POSTGRES_NAMES}
        return PostgresSettings(**values, password=self.password, options=dict(self.options))


_POSTGRES_NAMES = [name.removeprefix("pg_") for name in POSTGRES_FIELDS]
# dsn, host, port, dbname, user, sslmode: the model's pg_* fields.
PostgresResource = create_model(
    "PostgresResource", __base__=_PostgresResource, __module__=__name__,
    **model_fields(POSTGRES_FIELDS, lambda name: name.removeprefix("pg_")),
)
PostgresResource.__doc__ = _PostgresResource.__doc__


class _KinesisResource(ResourceWithBoto3Configuration):
    """A Kinesis data stream, configured like dagster-aws's boto3 resources.

    ``endpoint_url`` empty means AWS (or ``AWS_ENDPOINT_URL_KINESIS`` when set).
    """

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


# stream_name, max_retry_seconds, aggregate: the model's; region, endpoint and profile are dagster-aws's.
KinesisResource = create_model(
    "KinesisResource", __base__=_KinesisResource, __module__=__name__,
    **model_fields(("stream_name", "max_retry_seconds", "aggregate")),
)
KinesisResource.__doc__ = _KinesisResource.__doc__
# What the pipeline reads, from the model; recreate_slot is for the CLI only (it drops pending changes).
REPLICATION_FIELDS = [name for name, info in ReplicationSettings.model_fields.items() if meta(info).get("env")]


class _ReplicationResource(ConfigurableResource):
    """One slot replicated into one stream; the ops of a run share its connection and slot lock."""

    # postgres: PostgresResource and kinesis: KinesisResource, declared with the generated classes below.
    name: str = Field(default="", description="The replication's name in the code location (empty: the only one)")

    _replicator: Replicator | None = PrivateAttr(default=None)
    _run_id: str | None = PrivateAttr(default=None)

    def replication_settings(self) -> ReplicationSettings:
        return ReplicationSettings(**{name: getattr(self, name) for name in REPLICATION_FIELDS})

    def slot_tag(self) -> str:
        """The value of the run tag that holds the instance to one run per slot."""
        return slot_tag(self.name, self.slot_name)

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


ReplicationResource = create_model(
    "ReplicationResource", __base__=_ReplicationResource, __module__=__name__,
    postgres=(PostgresResource, ...), kinesis=(KinesisResource, ...), **model_fields(REPLICATION_FIELDS),
)
ReplicationResource.__doc__ = _ReplicationResource.__doc__


def slot_tag(replication_name: str, slot_name: str) -> str:
    """One run per slot: the slot's name, qualified by the replication's (two databases may have equal slot names)."""
    return f"{replication_name}.{slot_name}" if replication_name else slot_name


def build_replication_resources(name: str, config: ReplicationConfig) -> dict[str, Any]:
    """The resources of one replication of the model: its database, its stream, and the two together."""
    postgres = PostgresResource(
        **config.postgres_fields(),
        # Through EnvVar only: the UI and run config show the variable's name, never the value.
        password=EnvVar(config.pg_password_env) if config.pg_password_env else None,
    )
    kinesis = KinesisResource(
        stream_name=config.stream_name,
        region_name=config.aws_region,
        endpoint_url=config.kinesis_endpoint_url,
        profile_name=config.aws_profile,
        max_retry_seconds=config.max_retry_seconds,
        aggregate=config.aggregate,
    )
    replication = ReplicationResource(
        postgres=postgres, kinesis=kinesis, name=name, **{f: getattr(config, f) for f in REPLICATION_FIELDS}
    )
    return {"postgres": postgres, "kinesis": kinesis, "replication": replication}
