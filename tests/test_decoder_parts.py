"""Decoding in parts (``part_size``): a huge transaction is yielded in bounded pieces whose changes,
once stamped with the transaction's commit, equal the whole transaction's, for all three decoders."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pg2kinesis_dagster.core.changes import Change, SlotRow, Transaction
from pg2kinesis_dagster.core.decoders import Decoder, PgOutputDecoder, TestDecodingDecoder, Wal2JsonDecoder
from tests.test_decoder_pgoutput import PO_ROWS, TD_ROWS
from tests.test_decoder_wal2json import WJ_ROWS

CASES: list[tuple[str, Callable[[], Decoder], list[SlotRow]]] = [
    ("test_decoding", TestDecodingDecoder, TD_ROWS),
    ("wal2json", Wal2JsonDecoder, WJ_ROWS),
    ("pgoutput", PgOutputDecoder, PO_ROWS),
]


def stamp_parts(parts: list[Transaction]) -> list[Transaction]:
    """Give each partial part the commit of the part that ends its transaction, as the pipeline does."""
    for i, part in enumerate(parts):
        if part.partial:
            final = next(p for p in parts[i:] if not p.partial)
            assert (final.xid, final.begin_lsn) == (part.xid, part.begin_lsn)
            part.commit(final.commit_lsn, final.commit_time)
    return parts


def flat(transactions: list[Transaction]) -> list[Change]:
    return [change for txn in transactions for change in txn.changes]


@pytest.mark.parametrize(("plugin", "make", "rows"), CASES, ids=[c[0] for c in CASES])
@given(part_size=st.integers(min_value=1, max_value=6))
def test_parts_equal_whole_transactions(
    plugin: str, make: Callable[[], Decoder], rows: list[SlotRow], part_size: int
) -> None:
    whole = list(make().decode(rows))
    parts = list(make().decode(rows, part_size=part_size))
    # A part ends at the row that fills it; one TRUNCATE row of two tables can overfill it by one.
    assert all(len(p.changes) <= part_size + 1 for p in parts if p.partial)
    assert any(p.partial for p in parts) == any(len(t.changes) >= part_size for t in whole)
    assert flat(stamp_parts(parts)) == flat(whole)
    # Indexes run on across parts: ids stay those of the whole transaction.
    assert [c.id for c in flat(parts)] == [c.id for c in flat(whole)]


def test_a_long_transaction_is_never_held_whole() -> None:
    """The decoder yields each part before reading the rows after it (it streams)."""
    n = 10_000
    rows: list[SlotRow] = [(1, 7, "BEGIN 7")]
    rows += [(2 + i, 7, f"table public.t: INSERT: id[integer]:{i}") for i in range(n)]
    rows.append((n + 2, 7, "COMMIT 7 (at 2026-01-01 00:00:00+00)"))
    consumed = 0

    def counted() -> object:
        nonlocal consumed
        for row in rows:
            consumed += 1
            yield row

    largest_lead = 0
    seen = 0
    for part in TestDecodingDecoder().decode(counted(), part_size=100):  # type: ignore[arg-type]
        seen += len(part.changes)
        largest_lead = max(largest_lead, consumed - seen)
        assert len(part.changes) <= 100
    assert seen == n
    assert largest_lead <= 2  # BEGIN (and COMMIT): no change read ahead of what was yielded
