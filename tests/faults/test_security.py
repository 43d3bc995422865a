"""Least privilege, secrets kept out of every log and message, sslmode, names validated and quoted."""

from __future__ import annotations

import contextlib
import json
import logging
import secrets
import string
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg2
import pytest
from dagster import Definitions, EnvVar, instance_for_test

from pg2kinesis_dagster.core.errors import ConfigError, SourceError
from pg2kinesis_dagster.defs.handles import window_handle_io_manager
from pg2kinesis_dagster.defs.jobs import HANDLES, build_replicate_job
from pg2kinesis_dagster.defs.resources import KinesisResource, PostgresResource, ReplicationResource
from pg2kinesis_dagster.devstack.moto import MotoServer
from pg2kinesis_dagster.devstack.postgres import PostgresServer
from pg2kinesis_dagster.devstack.workload import create_sample_schema, run_sample_workload
from pg2kinesis_dagster.pipeline import ReplicationSettings, Replicator
from pg2kinesis_dagster.postgres.connection import PostgresSettings
from tests.faults.harness import confirmed_lsn, run_once, stack_args
from tests.helpers import assert_no_loss_no_reordering, check_against_ledger, make_sink, read_json

DEBUG_LOGS = {"loggers": {"console": {"config": {"log_level": "DEBUG"}}}}


def _secret(prefix: str, n: int = 24) -> str:
    return prefix + "".join(secrets.choice(string.ascii_letters + string.digits) for _ in range(n))


@pytest.fixture
def minimal_role(pg_server: PostgresServer, pg_database: str, pg_conn) -> Iterator[tuple[str, str]]:
    """A role with exactly what the README asks for: LOGIN REPLICATION and a password. No SELECT anywhere."""
    role, password = f"pg2k_min_{secrets.token_hex(4)}", _secret("pw-")
    with pg_conn.cursor() as cur:
        cur.execute(f"CREATE ROLE {role} LOGIN REPLICATION PASSWORD %s", (password,))
    try:
        yield role, password
    finally:
        pg_server.drop_database(pg_database)  # its slots first; then the role owns nothing anywhere
        with contextlib.closing(pg_server.connect()) as conn, conn.cursor() as cur:
            cur.execute(f"DROP ROLE IF EXISTS {role}")
        pg_server.create_database(pg_database)  # the fixture drops it again


@pytest.mark.parametrize("plugin", ["test_decoding", "wal2json", "pgoutput"])
def test_least_privilege_role_runs_the_whole_pipeline(
    plugin: str, pg_server: PostgresServer, pg_database: str, pg_conn, minimal_role: tuple[str, str],
    moto_server: MotoServer, kinesis_stream: str, tmp_path: Path,
) -> None:
    role, password = minimal_role
    create_sample_schema(pg_conn)
    with pg_conn.cursor() as cur:
        cur.execute("ALTER TABLE public.audit_log REPLICA IDENTITY FULL")  # wal2json/pgoutput need it
        if plugin == "pgoutput":
            # FOR ALL TABLES needs a superuser: created once by an administrator, not by pg2k's role.
            cur.execute("CREATE PUBLICATION pg2kinesis FOR ALL TABLES")
        cur.execute("SELECT rolsuper, rolreplication, rolcreatedb, rolcreaterole FROM pg_roles WHERE rolname = %s",
                    (role,))
        assert cur.fetchone() == (False, True, False, False)
        cur.execute("SELECT bool_or(has_table_privilege(%s, c.oid, 'SELECT')) FROM pg_class c "
                    "JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = 'public' AND c.relkind = 'r'",
                    (role,))
        assert cur.fetchone()[0] is False, "the role must not be able to read the replicated tables"
    args = [*stack_args(pg_server, pg_database, moto_server.endpoint_url, kinesis_stream, user=role),
            "--pg-slot-output-plugin", plugin, "--max-changes", "100"]
    env = {"PGPASSWORD": password}
    created = run_once([*args, "--create-slot"], tmp_path, "create", env=env)
    assert created.poll() == 0, created.stderr
    ledger = run_sample_workload(pg_conn, transactions=60, seed=71)
    drained = run_once(args, tmp_path, "drain", env=env)
    assert drained.poll() == 0, drained.stderr
    assert json.loads(drained.stdout.strip().splitlines()[-1])["windows"] > 1
    # Primary keys came from the catalogs (pk objects are checked against the ledger).
    assert_no_loss_no_reordering(check_against_ledger(read_json(moto_server, kinesis_stream), ledger),
                                 max_duplicates=0)
    for proc in (created, drained):
        assert password not in proc.stdout + proc.stderr


def _collect_run_texts(instance: Any, run_ids: list[str]) -> list[str]:
    """Everything the Dagster UI shows of these runs: every event, the run config, the job snapshot."""
    from dagster._serdes import serialize_value

    texts = []
    for run_id in run_ids:
        run = instance.get_run_by_id(run_id)
        texts.append(repr(run.run_config))
        texts.append(serialize_value(run))
        if run.job_snapshot_id:
            texts.append(serialize_value(instance.get_job_snapshot(run.job_snapshot_id)))
        for entry in instance.all_logs(run_id):
            texts.append(serialize_value(entry))
            texts.append(repr(entry))
    return texts


def test_no_secret_in_dagster_logs_events_run_config_or_errors(
    pg_server: PostgresServer, pg_database: str, pg_conn, minimal_role: tuple[str, str], moto_server: MotoServer,
    kinesis_stream: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
    capfd: pytest.CaptureFixture[str],
) -> None:
    role, password = minimal_role
    wrong_password = _secret("wrong-")
    key_id, secret_key = "AKIA" + _secret("", 16).upper(), _secret("", 40)
    monkeypatch.setenv("PG2K_TEST_PG_PASSWORD", password)
    monkeypatch.setenv("PG2K_TEST_WRONG_PASSWORD", wrong_password)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", key_id)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret_key)
    monkeypatch.delenv("AWS_SESSION_TOKEN", raising=False)
    monkeypatch.delenv("AWS_SECURITY_TOKEN", raising=False)
    caplog.set_level(logging.INFO)
    caplog.set_level(logging.DEBUG, logger="pg2kinesis")
    caplog.set_level(logging.DEBUG, logger="dagster")
    create_sample_schema(pg_conn)

    def replication(password_var: str = "PG2K_TEST_PG_PASSWORD", sslmode: str | None = None) -> ReplicationResource:
        postgres = PostgresResource(host=pg_server.host, port=pg_server.port, dbname=pg_database, user=role,
                                    password=EnvVar(password_var), sslmode=sslmode)
        kinesis = KinesisResource(stream_name=kinesis_stream, region_name=moto_server.region,
                                  endpoint_url=moto_server.endpoint_url,
                                  aws_access_key_id=EnvVar("AWS_ACCESS_KEY_ID"),
                                  aws_secret_access_key=EnvVar("AWS_SECRET_ACCESS_KEY"))
        return ReplicationResource(postgres=postgres, kinesis=kinesis, slot_name="secret_test",
                                   message_formatter="JSON", create_slot=True)

    from dagster._core.remote_representation.external_data import RepositorySnap
    from dagster._serdes import serialize_value

    texts: list[str] = []

    def run(resource: ReplicationResource) -> Any:
        # As deployed: the resources bound in Definitions; what the UI shows of them is the repository snapshot.
        defs = Definitions(jobs=[build_replicate_job("secret_test")],
                           resources={"replication": resource, HANDLES: window_handle_io_manager})
        texts.append(serialize_value(RepositorySnap.from_def(defs.get_repository_def())))
        return defs.get_job_def("replicate").execute_in_process(instance=instance, run_config=DEBUG_LOGS,
                                                                raise_on_error=False)

    with instance_for_test() as instance:
        first = run(replication())
        assert first.success
        ledger = run_sample_workload(pg_conn, transactions=30, seed=72)
        second = run(replication())
        assert second.success
        bad_password = run(replication("PG2K_TEST_WRONG_PASSWORD"))
        no_ssl = run(replication(sslmode="require"))
        assert not bad_password.success and not no_ssl.success
        texts += _collect_run_texts(instance, [r.run_id for r in (first, second, bad_password, no_ssl)])
    captured = capfd.readouterr()
    texts += [captured.out, captured.err, caplog.text]
    everything = "\n".join(texts)
    assert_no_loss_no_reordering(check_against_ledger(read_json(moto_server, kinesis_stream), ledger),
                                 max_duplicates=0)
    # The failures were recorded, with their reasons (so the grep below looked at real error text) ...
    assert "password authentication failed" in everything
    assert "server does not support SSL" in everything
    assert "PG2K_TEST_PG_PASSWORD" in everything, "the resource config shows the variable's name"
    # ... and no secret appears anywhere.
    for name, value in {"password": password, "wrong password": wrong_password, "AWS key id": key_id,
                        "AWS secret key": secret_key}.items():
        assert value not in everything, f"the {name} leaked into Dagster's logs, events or run config"


def test_sslmode_require_against_a_server_without_tls(
    pg_server: PostgresServer, pg_database: str, minimal_role: tuple[str, str], moto_server: MotoServer,
    kinesis_stream: str, tmp_path: Path,
) -> None:
    role, password = minimal_role
    base = {"host": pg_server.host, "port": pg_server.port, "dbname": pg_database, "user": role, "password": password}
    variants = (
        PostgresSettings(**base, sslmode="require"),
        PostgresSettings(**base, options={"sslmode": "require"}),
        PostgresSettings(dsn=f"sslmode=require password={password}", **{**base, "password": None}),
    )
    for settings in variants:
        with pytest.raises(SourceError) as err:
            settings.connect()
        message = str(err.value)
        assert "server does not support SSL" in message and password not in message and password not in repr(err.value)
    # sslmode=disable passes through as well: the same settings connect.
    PostgresSettings(**base, sslmode="disable").connect().close()
    proc = run_once([*stack_args(pg_server, pg_database, moto_server.endpoint_url, kinesis_stream, user=role),
                     "--pg-sslmode", "require", "--create-slot"], tmp_path, "cli", env={"PGPASSWORD": password})
    assert proc.poll() == 1
    assert "pg2k: error: cannot connect to PostgreSQL" in proc.stderr and "server does not support SSL" in proc.stderr
    assert password not in proc.stderr and "Traceback" not in proc.stderr


def test_a_connection_string_as_database_name_is_expanded_and_its_password_never_shown(
    pg_server: PostgresServer, pg_database: str, pg_conn, minimal_role: tuple[str, str], moto_server: MotoServer,
    kinesis_stream: str, tmp_path: Path,
) -> None:
    """libpq tools take a URI or key=value string as the database name: so does pg2k, and no message shows the
    password it carries, whatever goes wrong."""
    from urllib.parse import quote

    role, password = minimal_role
    wrong = _secret("wrong-")
    create_sample_schema(pg_conn)
    endpoint = moto_server.endpoint_url

    def cli(dbname: str, name: str, *extra: str) -> Any:
        args = ["--pg-dbname", dbname, "--stream-name", kinesis_stream, "--endpoint-url", endpoint,
                "--aws-region", "us-east-1", "--message-formatter", "JSON", *extra]
        # A PGPASSWORD that would work must not be what made it work: the URI's password is used.
        return run_once(args, tmp_path, name, env={"PGPASSWORD": wrong, "PGHOST": "", "PGUSER": ""})

    uri = f"postgresql://{role}:{quote(password)}@{pg_server.host}:{pg_server.port}/{pg_database}"
    keyvalue = f"host={pg_server.host} port={pg_server.port} dbname={pg_database} user={role} password='{password}'"
    ok = cli(uri, "uri", "--create-slot")
    assert ok.poll() == 0, ok.stderr
    ledger = run_sample_workload(pg_conn, transactions=10, seed=73)
    drained = cli(keyvalue, "keyvalue")
    assert drained.poll() == 0, drained.stderr
    assert_no_loss_no_reordering(check_against_ledger(read_json(moto_server, kinesis_stream), ledger),
                                 max_duplicates=0)
    failures = {
        "wrong password": cli(uri.replace(quote(password), quote(wrong)), "wrong"),
        "missing database": cli(uri.replace(f"/{pg_database}", "/no_such_db"), "nodb"),
        "malformed": cli(f"host={pg_server.host} password={password} dbname", "malformed"),
        "bad URI parameter": cli(uri + "?bogus=1", "param"),
    }
    for what, proc in failures.items():
        assert proc.poll() == 1, (what, proc.stderr)
        assert proc.stderr.startswith("pg2k: error: ") and "Traceback" not in proc.stderr, (what, proc.stderr)
        for secret in (password, quote(password), wrong, quote(wrong)):
            assert secret not in proc.stdout + proc.stderr, f"{what}: a password leaked: {proc.stderr}"
    assert "password authentication failed" in failures["wrong password"].stderr
    assert 'database "no_such_db" does not exist' in failures["missing database"].stderr
    assert "--pg-dsn" in failures["malformed"].stderr and "--pg-dsn" in failures["bad URI parameter"].stderr
    # The same for every message that describes the connection, from any setting.
    for settings in (PostgresSettings(dbname=uri), PostgresSettings(dsn=uri), PostgresSettings(dsn=keyvalue),
                     PostgresSettings(host="h", dbname="db", password=password)):
        assert password not in settings.describe() and quote(password) not in settings.describe()
        assert password not in settings.mask(f"{uri} {keyvalue} password={password}")


@pytest.mark.parametrize("slot", ["x'; DROP TABLE customers; --", "Upper", "a" * 64, "", "slot name"])
def test_slot_names_are_validated_before_any_sql(
    slot: str, pg_server: PostgresServer, pg_database: str, pg_conn, moto_server: MotoServer, kinesis_stream: str,
    tmp_path: Path,
) -> None:
    with pytest.raises(ConfigError, match="invalid replication slot name"):
        Replicator(PostgresSettings(host=pg_server.host, port=pg_server.port, dbname=pg_database, user="postgres"),
                   make_sink(moto_server, kinesis_stream), ReplicationSettings(slot_name=slot))
    proc = run_once([*stack_args(pg_server, pg_database, moto_server.endpoint_url, kinesis_stream),
                     "--pg-slot-name", slot, "--create-slot"], tmp_path, "cli")
    assert proc.poll() == 1 and "pg2k: error: invalid replication slot name" in proc.stderr
    with pg_conn.cursor() as cur:
        cur.execute("SELECT count(*) FROM pg_replication_slots WHERE database = current_database()")
        assert cur.fetchone()[0] == 0


def test_odd_publication_and_stream_names_are_quoted_not_interpreted(
    pg_server: PostgresServer, pg_database: str, pg_conn, moto_server: MotoServer, kinesis_stream: str,
    tmp_path: Path,
) -> None:
    publication = 'Pub, "x"; DROP TABLE items; --'
    with pg_conn.cursor() as cur:
        cur.execute("CREATE TABLE items (id int PRIMARY KEY, body text)")
    settings = PostgresSettings(host=pg_server.host, port=pg_server.port, dbname=pg_database, user="postgres")
    with Replicator(settings, make_sink(moto_server, kinesis_stream),
                    ReplicationSettings(output_plugin="pgoutput", publication=publication, create_slot=True,
                                        message_formatter="JSON")) as replicator:
        replicator.prepare()
        with pg_conn.cursor() as cur:
            cur.execute("INSERT INTO items VALUES (1, 'one')")
        replicator.drain()
    with pg_conn.cursor() as cur:
        cur.execute("SELECT pubname FROM pg_publication")
        assert cur.fetchall() == [(publication,)]
        cur.execute("SELECT count(*) FROM items")  # still there
        assert cur.fetchone()[0] == 1
    assert [r["pk"] for r in read_json(moto_server, kinesis_stream)] == [{"id": "1"}]
    # A stream name is data in a JSON request, never code; a bad one is a clear error and the slot stays.
    before = confirmed_lsn(pg_server, pg_database, "pg2kinesis")
    proc = run_once([*stack_args(pg_server, pg_database, moto_server.endpoint_url, "x' OR '1'='1"),
                     "--pg-slot-output-plugin", "pgoutput", "--publication", publication], tmp_path, "cli")
    assert proc.poll() == 1 and "pg2k: error: Kinesis stream \"x' OR '1'='1\" does not exist" in proc.stderr, \
        proc.stderr
    assert confirmed_lsn(pg_server, pg_database, "pg2kinesis") == before


def test_role_name_in_the_privilege_hint_is_quoted(
    pg_server: PostgresServer, pg_database: str, pg_conn, moto_server: MotoServer, kinesis_stream: str,
) -> None:
    role, password = 'Odd "Role"', _secret("pw-")
    with pg_conn.cursor() as cur:
        cur.execute('CREATE ROLE "Odd ""Role""" LOGIN PASSWORD %s', (password,))
    try:
        settings = PostgresSettings(host=pg_server.host, port=pg_server.port, dbname=pg_database, user=role,
                                    password=password)
        with Replicator(settings, make_sink(moto_server, kinesis_stream), ReplicationSettings()) as replicator, \
                pytest.raises(SourceError) as err:
            replicator.prepare()
        assert 'ALTER ROLE "Odd ""Role""" REPLICATION' in str(err.value)
        assert 'GRANT rds_replication TO "Odd ""Role"""' in str(err.value)
    finally:
        with contextlib.suppress(psycopg2.Error), pg_conn.cursor() as cur:
            cur.execute('DROP ROLE "Odd ""Role"""')
