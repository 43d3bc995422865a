"""Errors with a name per failure, each message saying what is wrong and how to fix it.

Callers can tell a missing slot from an unparsable line by type. Messages must
never contain secrets (passwords, AWS keys).
"""

from __future__ import annotations


class Pg2KinesisError(Exception):
    """Base class of every error this tool raises on purpose."""


class ConfigError(Pg2KinesisError):
    """Invalid configuration (names, options, formats)."""


class DecodeError(Pg2KinesisError):
    """Plugin output that the decoder cannot parse."""

    MAX_TEXT = 300

    def __init__(self, reason: str, *, lsn: int | None = None, text: str | bytes = "",
                 slot: str | None = None) -> None:
        self.reason = reason
        self.lsn = lsn
        self.text = text
        self.slot = slot
        super().__init__(self._message())

    def _message(self) -> str:
        from pg2kinesis_dagster.core.changes import format_lsn

        shown = self.text if isinstance(self.text, str) else repr(self.text)
        if len(shown) > self.MAX_TEXT:
            shown = shown[: self.MAX_TEXT] + f"... ({len(shown)} characters in all)"
        where = []
        if self.slot:
            where.append(f"slot {self.slot!r}")
        if self.lsn is not None:
            where.append(f"LSN {format_lsn(self.lsn)}")
        at = f" at {', '.join(where)}" if where else ""
        return (
            f"cannot parse the output plugin's text{at}: {self.reason}: {shown!r}. "
            "Nothing was published and the slot was not advanced; check that "
            "--pg-slot-output-plugin matches the slot's plugin and report the line if it does."
        )

    def with_slot(self, slot: str) -> DecodeError:
        return DecodeError(self.reason, lsn=self.lsn, text=self.text, slot=slot)


class SourceError(Pg2KinesisError):
    """A PostgreSQL-side problem: wal_level, slot, privileges, connection."""


class SourceUnavailableError(SourceError):
    """PostgreSQL could not be reached, or the connection broke (restart, failover, network).

    Nothing is lost: the slot only moves after a batch is published. A long-running process may
    reconnect and carry on; ``pg2k`` in continuous mode does, for up to ``--max-retry-seconds``.
    """


class SinkError(Pg2KinesisError):
    """A Kinesis-side problem: missing stream, oversized record, retries exhausted."""


class RecordTooLargeError(SinkError):
    """A single record exceeds Kinesis's 1 MiB limit."""
