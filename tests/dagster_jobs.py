"""A reconstructable replicate job for re-execution tests, with a switchable publish failure.

Re-execution rebuilds the job in a fresh context, so it must come from a module-level function;
configuration comes from the environment exactly as in the shipped code location.
"""

from __future__ import annotations

import os

from dagster import Definitions, JobDefinition, reconstructable
from dagster._core.definitions.reconstruct import ReconstructableJob

from pg2kinesis_dagster.core.window import FormattedWindow, PublishedWindow
from pg2kinesis_dagster.defs import build_resources
from pg2kinesis_dagster.defs.jobs import build_replicate_job
from pg2kinesis_dagster.defs.resources import ReplicationResource
from pg2kinesis_dagster.kinesis.sink import PreparedPut, PutReport
from pg2kinesis_dagster.pipeline import Replicator

FAIL_PUBLISH_FILE = "PG2K_TEST_FAIL_PUBLISH_FILE"
FAIL_PUT_NUMBER = "PG2K_TEST_FAIL_PUT_NUMBER"


class FailingPublishReplication(ReplicationResource):
    """Publishing raises while the file named by $PG2K_TEST_FAIL_PUBLISH_FILE exists; the sink's put
    number $PG2K_TEST_FAIL_PUT_NUMBER raises (the earlier puts, and their checkpoints, go through)."""

    def replicator(self) -> Replicator:
        replicator = super().replicator()
        publish = replicator.publish
        marker = os.environ.get(FAIL_PUBLISH_FILE, "")
        fail_put = int(os.environ.get(FAIL_PUT_NUMBER) or 0)
        send = replicator.sink.send
        puts = [0]

        def failing_send(prepared: PreparedPut) -> PutReport:
            puts[0] += 1
            if puts[0] == fail_put:
                raise RuntimeError(f"injected failure of put {fail_put}")
            return send(prepared)

        replicator.sink.send = failing_send  # type: ignore[method-assign]

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
        chunk_changes=base.chunk_changes,
        create_slot=base.create_slot,
    )
    defs = Definitions(jobs=[build_replicate_job(base.slot_name)], resources={**resources, "replication": replication})
    return defs.get_job_def("replicate")


def reconstructable_replicate_job() -> ReconstructableJob:
    """``reconstructable(replicate_job)``, rebuilt from the current environment.

    Dagster keeps the last job it loaded for a reconstructable target (an lru_cache), so a second test with
    other settings would otherwise run the first test's job.
    """
    ReconstructableJob.get_definition.cache_clear()
    ReconstructableJob.get_repository_definition.cache_clear()
    return reconstructable(replicate_job)
