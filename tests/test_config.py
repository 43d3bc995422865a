"""The configuration model and its views: PG2K_* variables, pg2k flags, the PG2K_CONFIG file, the README table."""

from __future__ import annotations

import argparse
import re
import shlex
from pathlib import Path
from typing import Any

import pytest
import yaml
from dagster import AssetKey, build_schedule_context
from hypothesis import given, settings
from hypothesis import strategies as st

from pg2kinesis_dagster import cli
from pg2kinesis_dagster.core import config
from pg2kinesis_dagster.core.errors import ConfigError
from pg2kinesis_dagster.defs import build_definitions
from pg2kinesis_dagster.defs.resources import SLOT_TAG

ROOT = Path(__file__).resolve().parents[1]

# What the code location defined from the PG2K_* variables before the model (main at 85b2af7, plus the snapshot
# sensor and asset of issue 10, which came at the same time).
SINGLE_JOBS = {"prune_history", "refresh_primary_key_metadata", "replicate", "replicate_continuous", "slot_health",
               "slot_heartbeat", "summarize_replication_day"}
SINGLE_SENSORS = {"replication_alerts", "replication_sensor", "snapshot_tables_sensor"}
SINGLE_SCHEDULES = {"primary_key_metadata_schedule", "prune_history_hourly", "replicate_schedule",
                    "slot_health_schedule", "slot_heartbeat_schedule", "summarize_replication_daily"}
SINGLE_ASSETS = {"primary_key_metadata", "replication_checkpoint", "replication_daily_summary", "table_snapshot"}


def _names(env: dict[str, str]) -> tuple[set[str], set[str], set[str], set[str]]:
    repo = build_definitions(env).get_repository_def()
    jobs = {name for name in repo.job_names if not name.startswith("__")}
    return (jobs, {s.name for s in repo.sensor_defs}, {s.name for s in repo.schedule_defs},
            {k.to_user_string() for k in repo.asset_graph.get_all_asset_keys()})


def test_the_variables_describe_one_replication_with_the_names_it_always_had() -> None:
    assert _names({}) == (SINGLE_JOBS, SINGLE_SENSORS, SINGLE_SCHEDULES, SINGLE_ASSETS)
    defs = build_definitions({"PG2K_SLOT_NAME": "orders", "PG2K_STREAM_NAME": "orders-cdc", "PG2K_PG_PASSWORD": "s3"})
    assert defs.get_job_def("replicate").tags[SLOT_TAG] == "orders"
    replication = defs.resources["replication"]
    assert (replication.slot_name, replication.kinesis.stream_name) == ("orders", "orders-cdc")
    # The password stays in its variable: the resource holds the EnvVar, by name.
    assert defs.resources["postgres"].password == "PG2K_PG_PASSWORD"
    assert type(defs.resources["postgres"].password).__name__ == "EnvVar"


def _write(path: Path, document: dict[str, Any]) -> str:
    path.write_text(yaml.safe_dump(document))
    return str(path)


def test_a_file_gives_each_replication_its_own_prefixed_definitions(tmp_path: Path) -> None:
    path = _write(tmp_path / "c.yaml", {
        "retention_days": 3,
        "defaults": {"pg_host": "db.internal", "aws_region": "eu-west-1", "mode": "continuous"},
        "replications": {
            "orders_db": {"pg_dbname": "orders", "slot_name": "orders", "stream_name": "orders-cdc",
                          "pg_password_env": "ORDERS_PASSWORD"},
            "users_db": {"pg_dbname": "users", "stream_name": "users-cdc", "mode": "micro"},
        },
    })
    jobs, sensors, schedules, assets = _names({"PG2K_CONFIG": path})
    for name in ("orders_db", "users_db"):
        assert {f"{name}__{job}" for job in SINGLE_JOBS - {"prune_history"}} <= jobs
        assert {f"{name}__{sensor}" for sensor in SINGLE_SENSORS} <= sensors
        assert {f"{name}__{s}" for s in SINGLE_SCHEDULES - {"prune_history_hourly"}} <= schedules
        assert {f"{name}/{asset}" for asset in SINGLE_ASSETS} == {a for a in assets if a.startswith(f"{name}/")}
    assert "prune_history" in jobs and "replicate" not in jobs
    defs = build_definitions({"PG2K_CONFIG": path})
    assert defs.get_job_def("orders_db__replicate").tags[SLOT_TAG] == "orders_db.orders"
    assert defs.get_job_def("users_db__replicate").tags[SLOT_TAG] == "users_db.pg2kinesis"
    orders = defs.resources["orders_db__replication"]
    assert (orders.name, orders.postgres.host, orders.postgres.dbname, orders.kinesis.region_name) == \
        ("orders_db", "db.internal", "orders", "eu-west-1")
    assert defs.resources["orders_db__postgres"].password == "ORDERS_PASSWORD"
    assert defs.resources["users_db__postgres"].password is None
    checks = defs.get_repository_def().asset_graph.asset_check_keys
    assert {k.asset_key for k in checks} == {AssetKey(["orders_db", "replication_checkpoint"]),
                                             AssetKey(["users_db", "replication_checkpoint"])}
    prune = defs.get_schedule_def("prune_history_hourly")
    with build_schedule_context() as context:
        prune_config = prune.evaluate_tick(context).run_requests[0].run_config
    assert "orders_db__replicate" in prune_config["ops"]["prune_old_runs"]["config"]["job_names"]


@pytest.mark.parametrize(("env", "expected"), [
    ({"PG2K_MODE": "fast"}, "mode (PG2K_MODE)='fast': Input should be 'micro' or 'continuous'"),
    ({"PG2K_MAX_CHANGES": "ten"}, "max_changes (--max-changes, PG2K_MAX_CHANGES)='ten': Input should be a valid "
                                  "integer"),
    ({"PG2K_PG_PORT": "70000"}, "pg_port (--pg-port, PG2K_PG_PORT)='70000': Input should be less than or equal to "
                                "65535"),
    ({"PG2K_SENSOR_RUNNING": "maybe"}, "sensor_running (PG2K_SENSOR_RUNNING)='maybe': Input should be a valid "
                                       "boolean"),
    ({"PG2K_OUTPUT_PLUGIN": "decoderbufs"}, "'pgoutput', 'test_decoding' or 'wal2json'"),
    ({"PG2K_TABLE_PAT": "orders("}, "table_pat (--table-pat, PG2K_TABLE_PAT)='orders(': not a valid regular "
                                    "expression"),
    ({"PG2K_OPERATIONS": "insert,upsert"}, "unknown operation in 'insert,upsert'"),
    ({"PG2K_MAX_LAG_BYTES": "10", "PG2K_LAG_ERROR_BYTES": "5"}, "max_lag_bytes (10) must not exceed lag_error_bytes"),
    ({"PG2K_SLOT_NAME": "Orders"}, "PG2K_SLOT_NAME: slot_name: invalid replication slot name 'Orders': use 1-63"),
])
def test_a_bad_variable_fails_at_load_naming_the_field_the_value_and_what_is_allowed(
    env: dict[str, str], expected: str
) -> None:
    with pytest.raises(ConfigError) as error:
        build_definitions(env)
    assert expected in str(error.value)


def test_a_bad_file_names_the_replication_and_the_field(tmp_path: Path) -> None:
    base = {"replications": {"orders_db": {"max_changes": 0, "partition_key": "random"}}}
    with pytest.raises(ConfigError) as error:
        config.load_file(_write(tmp_path / "bad.yaml", base))
    text = str(error.value)
    assert "replication 'orders_db'" in text
    assert "max_changes (--max-changes, PG2K_MAX_CHANGES)=0: Input should be greater than 0" in text
    assert "partition_key (--partition-key, PG2K_PARTITION_KEY)='random'" in text and "'constant'" in text
    typo = {"replications": {"orders_db": {"stream": "x"}}}
    with pytest.raises(ConfigError, match=r"stream: unknown setting \(did you mean stream_name\?\)"):
        config.load_file(_write(tmp_path / "typo.yaml", typo))
    with pytest.raises(ConfigError, match="replication name 'Orders-DB' is not allowed"):
        config.load_file(_write(tmp_path / "name.yaml", {"replications": {"Orders-DB": {}}}))
    same = {"defaults": {"pg_dbname": "app"}, "replications": {"a": {}, "b": {}}}
    with pytest.raises(ConfigError, match="replications 'a' and 'b' read the same slot 'pg2kinesis'"):
        config.load_file(_write(tmp_path / "same.yaml", same))
    with pytest.raises(ConfigError, match="cannot read PG2K_CONFIG="):
        config.load_file(tmp_path / "missing.yaml")


def test_with_a_file_the_replication_variables_are_refused_not_ignored(tmp_path: Path) -> None:
    path = _write(tmp_path / "c.yaml", {"replications": {"a": {}}})
    with pytest.raises(ConfigError, match=r"PG2K_SLOT_NAME.*Unset them or move them into the file"):
        build_definitions({"PG2K_CONFIG": path, "PG2K_SLOT_NAME": "x"})
    # AWS's own variables are fine: they are not ours.
    assert build_definitions({"PG2K_CONFIG": path, "AWS_REGION": "eu-west-1"})


def test_a_bad_flag_value_fails_before_connecting(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["--once", "--max-changes", "0", "--pg-host", "127.0.0.1", "--pg-port", "1"]) == 1
    err = capsys.readouterr().err
    assert "pg2k: error: invalid configuration in the command line" in err
    assert "max_changes (--max-changes, PG2K_MAX_CHANGES)=0: Input should be greater than 0" in err
    assert "cannot connect" not in err


def test_a_subcommand_can_take_only_the_connection_slot_and_stream_flags() -> None:
    parser = argparse.ArgumentParser()
    groups = cli.add_replication_arguments(parser, groups=("source", "kinesis"))
    assert set(groups) == {"source", "kinesis"}
    args = parser.parse_args(["--pg-dbname", "app", "--pg-slot-name", "s", "--stream-name", "out"])
    assert (args.pg_dbname, args.slot_name, args.stream_name) == ("app", "s", "out")
    with pytest.raises(SystemExit):
        parser.parse_args(["--max-changes", "5"])


# -- the views agree ------------------------------------------------------------------------------------------

# Fields every view can set, with values of their type.
_SETTABLE = {name: info for name, info in config.ReplicationConfig.model_fields.items()
             if config.meta(info).get("flag") and config.meta(info).get("env")}


def _values(name: str) -> st.SearchStrategy[Any]:
    info = _SETTABLE[name]
    choices = config.choices_of(info.annotation)
    if choices:
        return st.sampled_from(choices)
    kind = config._scalar_type(info.annotation)
    if kind is bool:
        return st.booleans()
    if kind is int:
        return st.integers(min_value=1, max_value=65535)
    if kind is float:
        return st.floats(min_value=0.5, max_value=1e6, allow_nan=False).map(lambda f: round(f, 3))
    if name in ("table_pat", "exclude_table_pat"):
        return st.sampled_from(["^public\\.", "orders|users", "audit_.*"])
    if name == "operations":
        return st.sampled_from(["insert", "insert,update", "delete,truncate"])
    if name == "exclude_columns":
        return st.sampled_from(["public.users:ssn", "public.users:ssn;public.a:b,c"])
    if name == "message_formatter":
        return st.sampled_from(["CSV", "CSVPayload", "mypkg.formats:Custom"])
    if name == "kinesis_endpoint_url":
        return st.sampled_from(["http://127.0.0.1:4566", "https://kinesis.eu-west-1.amazonaws.com"])
    if name in ("slot_name",):
        return st.from_regex(r"[a-z][a-z0-9_]{0,20}", fullmatch=True)
    if name == "stream_name":
        return st.from_regex(r"[a-zA-Z0-9_.-]{1,20}", fullmatch=True)
    return st.from_regex(r"[a-zA-Z0-9_./:]{1,20}", fullmatch=True)


@st.composite
def _configs(draw: st.DrawFn) -> dict[str, Any]:
    names = draw(st.lists(st.sampled_from(sorted(_SETTABLE)), unique=True, max_size=12))
    values = {name: draw(_values(name)) for name in names}
    if values.get("typed_json"):
        values["message_formatter"] = "JSON"
    return values


def _as_text(value: Any) -> str:
    return ("true" if value else "false") if isinstance(value, bool) else str(value)


def _as_args(values: dict[str, Any]) -> list[str]:
    argv = []
    for name, value in values.items():
        flag = config.meta(_SETTABLE[name])["flag"]
        if isinstance(value, bool):
            argv += [flag] if value else []
        elif separator := config.meta(_SETTABLE[name]).get("append"):
            for part in str(value).split(separator):
                argv += [flag, part]
        else:
            argv += [flag, str(value)]
    return argv


@settings(max_examples=60, deadline=None)
@given(_configs())
def test_variables_flags_and_file_describe_the_same_replication(values: dict[str, Any]) -> None:
    from_file = config.parse_file(yaml.safe_dump({"replications": {"r": values}}), "test").replications[0].config
    from_env = config.from_env({config.env_name(k): _as_text(v) for k, v in values.items()}).replications[0].config
    parser = argparse.ArgumentParser()
    # pg2k snapshot's flags (pg2k's own plus the snapshot group): cli.build_parser() reads the spool variable.
    config.add_arguments(parser, ("source", "kinesis", "format", "budget", "snapshot"), env={})
    from_flags = config.from_args(parser.parse_args(_as_args(values)), env={})
    assert from_file == from_env == from_flags, shlex.join(_as_args(values))
    for name, value in values.items():
        assert getattr(from_file, name) == value


def test_every_flag_of_pg2kinesis_is_declared_in_the_model() -> None:
    flags = {config.meta(info)["flag"] for _, info in config.cli_fields()}
    pg2kinesis = {"--pg-dbname", "--pg-host", "--pg-port", "--pg-user", "--pg-sslmode", "--pg-slot-name",
                  "--pg-slot-output-plugin", "--stream-name", "--message-formatter", "--table-pat",
                  "--full-change", "--create-slot", "--recreate-slot"}
    assert pg2kinesis <= flags


def test_the_readme_configuration_table_is_the_models() -> None:
    readme = (ROOT / "README.md").read_text()
    found = re.search(r"<!-- config-table:begin -->\n(.*?)\n<!-- config-table:end -->", readme, re.DOTALL)
    assert found, "the README's configuration table markers are missing"
    assert found.group(1) == config.markdown_table(), "run: python scripts/config-table --write"
