"""The optional heartbeat job (see :mod:`pg2kinesis_dagster.postgres.heartbeat`); its schedule is off unless
``PG2K_HEARTBEAT_CRON`` is set."""
# Dagster inspects these annotations at runtime: no "from __future__ import annotations" here.

from typing import Any

from dagster import JobDefinition, OpExecutionContext, in_process_executor, job, op

from pg2kinesis_dagster.core.changes import format_lsn
from pg2kinesis_dagster.defs.resources import ReplicationResource
from pg2kinesis_dagster.postgres.heartbeat import emit_heartbeat

HEARTBEAT_JOB = "slot_heartbeat"


@op(description="Write a non-transactional logical message (pg_logical_emit_message) into the replicated database.")
def write_heartbeat(context: OpExecutionContext, replication: ReplicationResource) -> None:
    lsn = emit_heartbeat(replication.postgres.settings())
    context.log.info(f"heartbeat written at {format_lsn(lsn)} for slot {replication.slot_name!r}")


def build_heartbeat_job(name: str = HEARTBEAT_JOB, resource_defs: dict[str, Any] | None = None) -> JobDefinition:
    @job(name=name, executor_def=in_process_executor, resource_defs=resource_defs,
         description="Writes one heartbeat message into the replicated database.")
    def slot_heartbeat() -> None:
        write_heartbeat()

    return slot_heartbeat
