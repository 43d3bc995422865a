"""What to do with a change whose record would exceed Kinesis's 1 MiB record limit. Pure: no I/O.

Two policies:

* ``fail`` (default): the batch fails with :class:`RecordTooLargeError` naming the record; nothing is
  sent and the slot is not advanced (fix the table or switch policy, then run again).
* ``truncate``: the largest column values of the row images (``after``/``before``) are replaced, one
  at a time, largest first, by a marker string until the record fits::

      __pg2kinesis_truncated__:<original size of the value in UTF-8 bytes>

  e.g. ``"body": "__pg2kinesis_truncated__:2400000"``. The marker is a string like every value (values
  keep PostgreSQL's text form), so it works in every format; consumers recognise it by its prefix.
  Primary-key columns are never truncated. A record that still does not fit once every other value is
  truncated fails as under ``fail``. Truncated records are counted (``truncated_records``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Collection
from enum import Enum

from pg2kinesis_dagster.core.changes import Change, Column
from pg2kinesis_dagster.core.errors import ConfigError, RecordTooLargeError

TRUNCATED_PREFIX = "__pg2kinesis_truncated__:"
# Kinesis's limit on one record: data plus the UTF-8 partition key (batching.MAX_RECORD_BYTES).
DEFAULT_LIMIT = 1024 * 1024


def truncated_marker(original_bytes: int) -> str:
    return f"{TRUNCATED_PREFIX}{original_bytes}"


def is_truncated(value: object) -> bool:
    return isinstance(value, str) and value.startswith(TRUNCATED_PREFIX)


class OversizedPolicy(str, Enum):
    FAIL = "fail"
    TRUNCATE = "truncate"

    @classmethod
    def parse(cls, value: str | OversizedPolicy) -> OversizedPolicy:
        try:
            return cls(value.lower() if isinstance(value, str) else value)
        except ValueError:
            raise ConfigError(f"unknown oversized-record policy {value!r}: use fail or truncate") from None


def _size(value: str) -> int:
    return len(value) if value.isascii() else len(value.encode("utf-8"))


def fit_record(
    change: Change,
    fmt: Callable[[Change], bytes],
    partition_key: str,
    *,
    limit: int = DEFAULT_LIMIT,
    protected: Collection[str] = (),
) -> tuple[bytes, list[str]]:
    """Format ``change``; if data plus partition key exceed ``limit``, truncate its largest values.

    Returns the record's data and the names of the truncated columns (empty when it fitted as is).
    ``protected`` columns (the primary key) are never truncated. Raises :class:`RecordTooLargeError`
    when the record cannot be made to fit. ``change`` itself is left unchanged.
    """
    key_bytes = _size(partition_key)
    data = fmt(change)
    if len(data) + key_bytes <= limit:
        return data, []
    # (size, image, position) of every value that may be replaced, largest first.
    candidates = sorted(
        (
            (_size(column.value), image, i)
            for image in ("after", "before")
            for i, column in enumerate(getattr(change, image) or ())
            if column.value is not None and not column.unchanged_toast and column.name not in protected
            and not is_truncated(column.value)
        ),
        key=lambda c: (-c[0], c[1], c[2]),
    )
    images: dict[str, list[Column]] = {
        image: list(getattr(change, image) or ()) for image in ("after", "before")
    }
    truncated: list[str] = []
    for size, image, i in candidates:
        column = images[image][i]
        images[image][i] = dataclasses.replace(column, value=truncated_marker(size))
        if column.name not in truncated:
            truncated.append(column.name)
        trimmed = dataclasses.replace(
            change,
            after=tuple(images["after"]) if change.after is not None else None,
            before=tuple(images["before"]) if change.before is not None else None,
        )
        data = fmt(trimmed)
        if len(data) + key_bytes <= limit:
            return data, truncated
    raise RecordTooLargeError(
        f"record {change.id} ({change.qualified_table} {change.op.value}) is {len(data) + key_bytes} bytes "
        f"even with every non-key column value truncated ({', '.join(truncated) or 'none to truncate'}); "
        f"Kinesis accepts at most {limit} bytes per record. Nothing was sent and the slot was not "
        "advanced. Choose a more compact output format or exclude this table."
    )
