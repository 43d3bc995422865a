"""A reconstructable replicate job for re-execution tests, with a switchable publish failure.

Re-execution rebuilds the job in a fresh context, so it must come from a module-level function;
configuration comes from the environment exactly as in the shipped code location.
"""

from __future__ import annotations

import os

from dagster import Definitions, JobDefinition

from pg2kinesis_dagster.core.window import FormattedWindow, PublishedWindow
from pg2kinesis_dagster.defs import build_resources
from pg2kinesis_dagster.defs.jobs import build_replicate_job
from pg2kinesis_dagster.defs.resources import ReplicationResource
from pg2kinesis_dagster.pipeline import Replicator

FAIL_PUBLISH_FILE = "PG2K_TEST_FAIL_PUBLISH_FILE"


class FailingPublishReplication(ReplicationResource):
    """Publishing raises while the file named by $PG2K_TEST_FAIL_PUBLISH_FILE exists."""

    def replicator(self) -> Replicator:
        replicator = super().replicator()
        publish = replicator.publish
        marker = os.environ.get(FAIL_PUBLISH_FILE, "")

        def failing_publish(formatted: FormattedWindow, **kwargs: object) -> PublishedWindow:
            if marker and os.path.exists(marker):
                raise RuntimeError("injected failure in publish")
            return publish(formatted, **kwargs)  # type: ignore[arg-type]

        replicator.publish = failing_publish  # type: ignore[method-assign]
        return replicator


def replicate_job() -> JobDefinition:
    resources = build_resources(os.environ)
    base: ReplicationResource = resources["replication"]  # type: ignore[assignment]
    replication = FailingPublishReplication(
        postgres=base.postgres,
        kinesis=base.kinesis,
        slot_name=base.slot_name,
        message_formatter=base.message_formatter,
        max_changes=base.max_changes,
        create_slot=base.create_slot,
    )
    defs = Definitions(jobs=[build_replicate_job(base.slot_name)], resources={**resources, "replication": replication})
    return defs.get_job_def("replicate")
