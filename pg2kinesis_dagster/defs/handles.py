"""The IO manager of the replicate job: ops hand each other window handles, and Dagster keeps only those.

Rows and records never pass through Dagster: they are in the spool, a cache on local disk. What an op
returns is a handle of a few hundred bytes (slot, LSN range, counts, the spool's window id), kept as
the metadata of the op's output event — in Dagster's event log, like every other event of the run.
That is what makes "re-execute from failure" work on any machine: the re-executed step reads its
input handle from the parent run's events, and the pipeline reads the window again from the slot
when the spool is not on this machine.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

from dagster import (
    DagsterEventType,
    InputContext,
    IOManager,
    MetadataValue,
    OutputContext,
    io_manager,
)

from pg2kinesis_dagster.core.window import FormattedWindow, PeekedWindow, PublishedWindow

HANDLE_METADATA_KEY = "pg2kinesis_handle"
_HANDLE_TYPES: dict[str, Any] = {cls.__name__: cls for cls in (PeekedWindow, FormattedWindow, PublishedWindow)}
Handle = PeekedWindow | FormattedWindow | PublishedWindow
# Handles of the runs in this process, so the next op does not query the event log; a few runs' worth.
_RECENT_LIMIT = 32


def encode_handle(handle: Handle) -> dict[str, Any]:
    return {"type": type(handle).__name__, "handle": handle.to_dict()}


def decode_handle(data: dict[str, Any]) -> Handle:
    kind = _HANDLE_TYPES.get(data.get("type", ""))
    if kind is None:
        raise ValueError(f"not a pg2kinesis window handle: {data.get('type')!r}")
    return kind.from_dict(data["handle"])


class WindowHandleIOManager(IOManager):
    """Stores each output handle in the output's event metadata; loads it from there (or from memory)."""

    def __init__(self) -> None:
        self._recent: OrderedDict[tuple[str, str, str], Handle] = OrderedDict()

    def handle_output(self, context: OutputContext, obj: Handle) -> None:
        if type(obj).__name__ not in _HANDLE_TYPES:
            raise TypeError(f"{context.step_key} returned {type(obj).__name__}, not a window handle")
        context.add_output_metadata({HANDLE_METADATA_KEY: MetadataValue.json(encode_handle(obj))})
        self._recent[(context.run_id, context.step_key, context.name)] = obj
        while len(self._recent) > _RECENT_LIMIT:
            self._recent.popitem(last=False)

    def load_input(self, context: InputContext) -> Handle:
        upstream = context.upstream_output
        assert upstream is not None, "window handles are only passed between ops"
        key = (upstream.run_id, upstream.step_key, upstream.name)
        if key in self._recent:
            return self._recent[key]
        # Another process (a re-execution, a step worker): the handle is in the producing run's events.
        records = context.instance.get_records_for_run(
            upstream.run_id, of_type=DagsterEventType.HANDLED_OUTPUT
        ).records
        for record in reversed(records):
            event = record.event_log_entry.dagster_event
            if event is None or event.step_key != upstream.step_key:
                continue
            data = event.event_specific_data
            if getattr(data, "output_name", None) != upstream.name:
                continue
            value = data.metadata.get(HANDLE_METADATA_KEY)  # type: ignore[union-attr]
            if value is not None:
                return decode_handle(value.value)
        raise FileNotFoundError(
            f"no window handle from step {upstream.step_key!r} of run {upstream.run_id} in the event log: rerun "
            "the whole job (the slot is the truth; nothing is lost)"
        )


@io_manager(description="Keeps the replicate job's window handles in the event log; the data stays in the spool.")
def window_handle_io_manager() -> WindowHandleIOManager:
    return WindowHandleIOManager()
