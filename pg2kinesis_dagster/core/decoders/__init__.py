"""Output-plugin decoders: slot rows in, committed :class:`Transaction` objects out.

One decoder per logical decoding output plugin. Each is pure code (no I/O): the
slot adapter passes it the rows of ``pg_logical_slot_peek_changes`` called with
the decoder's ``slot_options``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any, Protocol, runtime_checkable

from pg2kinesis_dagster.core.changes import SlotRow, Transaction
from pg2kinesis_dagster.core.decoders.pgoutput import PgOutputDecoder
from pg2kinesis_dagster.core.decoders.test_decoding import TestDecodingDecoder
from pg2kinesis_dagster.core.decoders.wal2json import Wal2JsonDecoder
from pg2kinesis_dagster.core.errors import ConfigError

__all__ = ["Decoder", "PgOutputDecoder", "TestDecodingDecoder", "Wal2JsonDecoder", "decoder_for", "supported_plugins"]


@runtime_checkable
class Decoder(Protocol):
    """What the pipeline needs from a decoder."""

    # Name of the output plugin the slot was created with.
    plugin: str
    # Flat key/value list passed to pg_logical_slot_peek_changes (options after upto_nchanges).
    slot_options: tuple[str, ...]

    def is_commit(self, data: str | bytes) -> bool:
        """Whether a row is a transaction's commit row."""
        ...

    def commit_time(self, data: str | bytes) -> str | None:
        """The commit time of a commit row, as ``decode`` stamps it on the transaction."""
        ...

    def decode(self, rows: Iterable[SlotRow], part_size: int | None = None) -> Iterator[Transaction]:
        """Yield each complete (committed) transaction of ``rows``, in order.

        With ``part_size``, a transaction with more changes is yielded in parts of that many
        changes (``partial=True``, not yet stamped with their commit), then its last part.
        """
        ...


# Plugin name -> decoder factory, called with decoder_for()'s keyword arguments
# (wal2json: type_name, columns; pgoutput: publication, type_name, ...).
_DECODERS: dict[str, Callable[..., Decoder]] = {
    "test_decoding": TestDecodingDecoder,
    "wal2json": Wal2JsonDecoder,
    "pgoutput": PgOutputDecoder,
}


def supported_plugins() -> tuple[str, ...]:
    return tuple(sorted(_DECODERS))


def decoder_for(plugin: str, **kwargs: Any) -> Decoder:
    """A fresh decoder for ``plugin``; ConfigError when the plugin is not supported.

    ``kwargs`` go to the decoder's constructor (test_decoding takes none).
    """
    factory = _DECODERS.get(plugin)
    if factory is None:
        raise ConfigError(
            f"unsupported output plugin {plugin!r}: supported plugins are "
            f"{', '.join(supported_plugins())}; set --pg-slot-output-plugin to one of them "
            "(and create the slot with that plugin)"
        )
    return factory(**kwargs)
