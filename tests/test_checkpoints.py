"""The slot's advances made in a thread of their own while the next chunk is published (pipeline._Checkpoints)."""

from __future__ import annotations

import threading

import pytest

from pg2kinesis_dagster.core.errors import SourceUnavailableError
from pg2kinesis_dagster.pipeline import _Checkpoints
from pg2kinesis_dagster.postgres.slot import AdvanceResult


class SlowSlot:
    """advance() blocks until released, one call at a time; records the targets it was asked for."""

    def __init__(self) -> None:
        self.targets: list[int] = []
        self.release = threading.Semaphore(0)
        self.started = threading.Semaphore(0)
        self.fail_at: int | None = None

    def advance(self, target: int) -> AdvanceResult:
        self.targets.append(target)
        self.started.release()
        assert self.release.acquire(timeout=10)
        if target == self.fail_at:
            raise SourceUnavailableError("lost the connection")
        return AdvanceResult(before=None, after=target, target=target, moved=True)


def test_requests_made_while_an_advance_runs_become_one_advance_to_the_newest() -> None:
    slot = SlowSlot()
    checkpoints = _Checkpoints(slot)  # type: ignore[arg-type]
    try:
        assert checkpoints.request(10) == []
        assert slot.started.acquire(timeout=10)  # advancing to 10 now
        checkpoints.request(20)
        checkpoints.request(30)  # both wait for the one in progress
        slot.release.release()
        assert slot.started.acquire(timeout=10)
        slot.release.release()
        done = checkpoints.wait()
        assert [r.target for r in done] == [10, 30]
        assert slot.targets == [10, 30]
    finally:
        checkpoints.close()


def test_an_advance_that_failed_is_raised_by_the_next_call_and_wait_returns() -> None:
    slot = SlowSlot()
    slot.fail_at = 10
    checkpoints = _Checkpoints(slot)  # type: ignore[arg-type]
    try:
        checkpoints.request(10)
        slot.release.release()
        with pytest.raises(SourceUnavailableError):
            checkpoints.wait()
        assert checkpoints.wait() == []  # raised once; nothing is pending
    finally:
        checkpoints.close()
