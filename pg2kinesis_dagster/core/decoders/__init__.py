"""Output-plugin decoders: slot rows in, committed :class:`Transaction` objects out.

One decoder per logical decoding output plugin. Each is pure code (no I/O): the
slot adapter passes it the rows of ``pg_logical_slot_peek_changes`` called with
the decoder's ``slot_options``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Protocol, runtime_checkable

from pg2kinesis_dagster.core.changes import SlotRow, Transaction
from pg2kinesis_dagster.core.decoders.test_decoding import TestDecodingDecoder
from pg2kinesis_dagster.core.errors import ConfigError

__all__ = ["Decoder", "TestDecodingDecoder", "decoder_for", "supported_plugins"]


@runtime_checkable
class Decoder(Protocol):
    """What the pipeline needs from a decoder."""

    # Name of the output plugin the slot was created with.
    plugin: str
    # Flat key/value list passed to pg_logical_slot_peek_changes (options after upto_nchanges).
    slot_options: tuple[str, ...]

    def decode(self, rows: Iterable[SlotRow]) -> Iterator[Transaction]:
        """Yield each complete (committed) transaction of ``rows``, in order."""
        ...


# Plugin name -> decoder factory. Register new plugins here, e.g.
#     "wal2json": Wal2JsonDecoder,
#     "pgoutput": PgOutputDecoder,
_DECODERS: dict[str, Callable[[], Decoder]] = {
    "test_decoding": TestDecodingDecoder,
}


def supported_plugins() -> tuple[str, ...]:
    return tuple(sorted(_DECODERS))


def decoder_for(plugin: str) -> Decoder:
    """A fresh decoder for ``plugin``; ConfigError when the plugin is not supported."""
    factory = _DECODERS.get(plugin)
    if factory is None:
        raise ConfigError(
            f"unsupported output plugin {plugin!r}: supported plugins are "
            f"{', '.join(supported_plugins())}; set --pg-slot-output-plugin to one of them "
            "(and create the slot with that plugin)"
        )
    return factory()
