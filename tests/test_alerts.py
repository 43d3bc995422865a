"""Alerts: failed runs and failing checks reach the Dagster log and a webhook, once per incident."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
from dagster import DagsterInstance, build_sensor_context, instance_for_test

from pg2kinesis_dagster.core.incidents import ERROR, WARN, IncidentBook, Signal, render
from pg2kinesis_dagster.defs import build_definitions
from pg2kinesis_dagster.defs.alerts import ALERT_SENSOR
from pg2kinesis_dagster.defs.health import HEALTH_JOB
from pg2kinesis_dagster.devstack.moto import MotoServer
from pg2kinesis_dagster.devstack.postgres import PostgresServer
from tests.webhook_recorder import WebhookRecorder

SLOT = "alert_slot"
QUIET = {"loggers": {"console": {"config": {"log_level": "CRITICAL"}}}}


def test_incident_book_announces_start_escalation_and_end_once() -> None:
    book = IncidentBook()
    lag_warn = Signal("check:lag", WARN, "check lag", "behind", "run it")
    changes = book.update([lag_warn], [], now=100.0)
    assert changes.opened == [lag_warn] and not changes.escalated
    assert not book.update([lag_warn], [], now=160.0), "the same problem again is no news"
    lag_error = Signal("check:lag", ERROR, "check lag", "far behind", "run it")
    assert book.update([lag_error], [], now=220.0).escalated == [lag_error]
    assert not book.update([lag_warn], [], now=280.0), "better but still failing: no news"
    run = Signal("run:replicate:publish:SinkError", ERROR, "run of replicate failed", "stream gone")
    changes = book.update([run], [], now=300.0)
    assert changes.opened == [run]
    changes = book.update([], ["run:replicate:", "check:lag"], now=400.0)
    assert [key for key, _ in changes.resolved] == ["run:replicate:publish:SinkError", "check:lag"]
    assert book.open == {}
    restored = IncidentBook.from_json(json.loads(json.dumps(IncidentBook(open={"k": {"level": WARN}}).to_json())))
    assert restored.open == {"k": {"level": WARN}}
    text = render("s", "database d", "slot 's' confirmed up to 0/10", book.update([lag_error], [], 500.0), 500.0)
    assert text.startswith(":rotating_light: pg2kinesis ERROR: replication slot 's' (database d)")
    assert "What to do: run it" in text and "Where the slot stands: slot 's' confirmed up to 0/10" in text


@pytest.fixture
def hook() -> Iterator[WebhookRecorder]:
    with WebhookRecorder() as recorder:
        yield recorder


@pytest.fixture
def env(pg_server: PostgresServer, pg_database: str, moto_server: MotoServer, aws_fake_env: str,
        hook: WebhookRecorder) -> dict[str, str]:
    return {
        "PG2K_PG_HOST": pg_server.host, "PG2K_PG_PORT": str(pg_server.port), "PG2K_PG_DBNAME": pg_database,
        "PG2K_PG_USER": "postgres", "PG2K_SLOT_NAME": SLOT, "PG2K_STREAM_NAME": "alerts-stream",
        "PG2K_KINESIS_ENDPOINT_URL": moto_server.endpoint_url, "PG2K_MESSAGE_FORMATTER": "JSON",
        "PG2K_ALERT_WEBHOOK_URL": hook.url,
        # The freshness check would fail too while nothing replicates: these tests drive the others.
        "PG2K_FRESHNESS_WARN_MINUTES": "inf", "PG2K_FRESHNESS_ERROR_MINUTES": "inf",
    }


class Ticks:
    """The alert sensor evaluated tick after tick, carrying its cursor like the daemon does."""

    def __init__(self, env: dict[str, str], instance: DagsterInstance) -> None:
        self.defs = build_definitions(env)
        self.instance = instance
        self.cursor: str | None = None
        self.skip_reasons: list[str] = []

    def tick(self) -> None:
        sensor = self.defs.get_sensor_def(ALERT_SENSOR)
        with build_sensor_context(instance=self.instance, cursor=self.cursor, definitions=self.defs,
                                  resources=self.defs.resources) as context:
            result = sensor(context)
            self.cursor = context.cursor
        self.skip_reasons.append(str(result))

    def run(self, job: str, env: dict[str, str] | None = None) -> bool:
        defs = build_definitions(env) if env is not None else self.defs
        return defs.get_job_def(job).execute_in_process(instance=self.instance, run_config=QUIET,
                                                         raise_on_error=False).success


def test_failing_checks_are_announced_once_per_incident(env: dict[str, str], hook: WebhookRecorder, pg_conn,
                                                       ) -> None:
    with instance_for_test() as instance:
        ticks = Ticks(env, instance)
        ticks.tick()
        assert hook.messages() == [], "nothing happened yet"

        # The slot does not exist: every check fails; one message says so, with the way back.
        assert ticks.run(HEALTH_JOB)
        ticks.tick()
        (first,) = hook.messages()
        assert first.startswith(f":rotating_light: pg2kinesis ERROR: replication slot '{SLOT}'")
        assert "check slot_lag_within_limit, check slot_wal_status, check slot_restart_lsn_not_pinned, " \
               "check replication_fresh" in first
        assert "does not exist" in first and "pg_create_logical_replication_slot" in first
        assert "Where the slot stands: slot 'alert_slot' does not exist" in first

        # The same failures minute after minute: no new message.
        assert ticks.run(HEALTH_JOB)
        ticks.tick()
        ticks.tick()
        assert len(hook.messages()) == 1

        # The slot is created: the checks pass again, which is announced once.
        with pg_conn.cursor() as cur:
            cur.execute("SELECT pg_create_logical_replication_slot(%s, 'test_decoding')", (SLOT,))
        assert ticks.run(HEALTH_JOB)
        ticks.tick()
        messages = hook.messages()
        assert len(messages) == 2 and messages[1].startswith(":white_check_mark:")
        assert messages[1].count("resolved: check") == 4 and "confirmed up to" in messages[1]

        # A new incident: the slot holds more WAL than the (lowered) warning limit -> one warning.
        with pg_conn.cursor() as cur:
            cur.execute("CREATE TABLE t (id int PRIMARY KEY); INSERT INTO t SELECT generate_series(1, 100)")
        lagging = {**env, "PG2K_MAX_LAG_BYTES": "1"}
        assert ticks.run(HEALTH_JOB, lagging)
        ticks.tick()
        ticks.tick()
        messages = hook.messages()
        assert len(messages) == 3 and messages[2].startswith(":warning: pg2kinesis WARN")
        assert "WARN check slot_lag_within_limit" in messages[2] and "What to do:" in messages[2]
        # ... that gets worse: announced once more, as worse.
        assert ticks.run(HEALTH_JOB, {**lagging, "PG2K_LAG_ERROR_BYTES": "2"})
        ticks.tick()
        assert ticks.run(HEALTH_JOB, {**lagging, "PG2K_LAG_ERROR_BYTES": "2"})
        ticks.tick()
        messages = hook.messages()
        assert len(messages) == 4 and "ERROR check slot_lag_within_limit (worse than before)" in messages[3]
    assert all(r["headers"]["Content-Type"].startswith("application/json") for r in hook.requests)


def test_failed_runs_are_announced_once_and_the_recovery_too(
    env: dict[str, str], hook: WebhookRecorder, moto_server: MotoServer, pg_conn, capfd: pytest.CaptureFixture[str],
) -> None:
    env = {**env, "PG2K_CREATE_SLOT": "1"}
    with instance_for_test() as instance:
        ticks = Ticks(env, instance)
        # The stream does not exist: every replicate run fails the same way.
        assert not ticks.run("replicate")
        assert not ticks.run("replicate")
        ticks.tick()
        assert not ticks.run("replicate")
        ticks.tick()
        (message,) = hook.messages()
        assert "ERROR run of replicate failed (peek_batch: SinkError)" in message
        assert "Kinesis stream 'alerts-stream' does not exist" in message
        assert "nothing is lost" in message and f"slot '{SLOT}' confirmed up to" in message

        # The webhook is down when the stream comes back: the message waits for the next tick.
        moto_server.create_stream("alerts-stream", shards=1)
        assert ticks.run("replicate")
        hook.fail_next = 1
        ticks.tick()
        assert hook.refused == 1 and len(hook.messages()) == 1
        logged = capfd.readouterr().err
        assert "alert not delivered, kept for the next tick" in logged
        ticks.tick()
        messages = hook.messages()
        assert len(messages) == 2 and "resolved: run of replicate failed (peek_batch: SinkError)" in messages[1]
        ticks.tick()
        assert len(hook.messages()) == 2
    # The webhook URL carries a token: it appears in no message, log or sensor result.
    logged += capfd.readouterr().err
    assert "pg2kinesis ERROR: replication slot 'alert_slot'" in logged  # the Dagster log has it all
    everything = "\n".join([*hook.messages(), logged, *ticks.skip_reasons, ticks.cursor or ""])
    assert "secret-webhook-token" not in everything


def test_without_a_webhook_alerts_go_to_the_dagster_log(env: dict[str, str], capfd: pytest.CaptureFixture[str]
                                                        ) -> None:
    env = {k: v for k, v in env.items() if k != "PG2K_ALERT_WEBHOOK_URL"}
    with instance_for_test() as instance:
        ticks = Ticks(env, instance)
        assert ticks.run(HEALTH_JOB)
        capfd.readouterr()
        ticks.tick()
        assert "pg2kinesis ERROR: replication slot 'alert_slot'" in capfd.readouterr().err
        state: dict[str, Any] = json.loads(ticks.cursor or "{}")
        assert len(state["incidents"]["open"]) == 4 and state["unsent"] == []
