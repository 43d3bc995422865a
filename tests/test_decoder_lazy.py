"""Lazy row images (``TestDecodingDecoder(lazy_images=True)``): the same changes, keys and errors as eager decoding.

Reuses the generators of the test_decoding property tests: every rendered line decodes lazily to changes equal to
the eager ones, the key read from the raw text equals extract_pk() on the parsed images for any choice of key
columns, and a damaged line raises a DecodeError in lazy mode exactly when it does in eager mode.
"""

from __future__ import annotations

import dataclasses
import pickle

from hypothesis import assume, given
from hypothesis import strategies as st

from pg2kinesis_dagster.core.changes import Change, LazyChange, SlotRow, Transaction
from pg2kinesis_dagster.core.decoders import TestDecodingDecoder
from pg2kinesis_dagster.core.errors import DecodeError
from pg2kinesis_dagster.core.keys import extract_pk
from tests.test_decoder_properties import Rendered, _profile, row_changes, transactions


def _changes(rows: list[SlotRow], lazy: bool) -> list[Change]:
    return [c for txn in TestDecodingDecoder(lazy_images=lazy).decode(rows) for c in txn.changes]


@_profile
@given(transactions())
def test_lazy_decoding_gives_the_eager_transactions(case: tuple[list[SlotRow], list[Transaction]]) -> None:
    rows, expected = case
    got = list(TestDecodingDecoder(lazy_images=True).decode(rows))
    assert got == expected
    # Read in the other order too: equality parses the images, either side first.
    assert expected == list(TestDecodingDecoder(lazy_images=True).decode(rows))


@_profile
@given(transactions(), st.data())
def test_key_from_raw_text_equals_extract_pk_of_the_parsed_images(case: tuple[list[SlotRow], list[Transaction]],
                                                                  data: st.DataObject) -> None:
    rows, _ = case
    lazy, eager = _changes(rows, True), _changes(rows, False)
    for fresh, parsed in zip(lazy, eager, strict=True):
        # A table's column names are unique (pg_attribute's key); the generator may repeat them, where the
        # key from the raw text takes the first column of a name and the parsed image the last.
        assume(all(len({c.name for c in image}) == len(image) for image in (parsed.after or (), parsed.before or ())))
        names = sorted({c.name for image in (parsed.after or (), parsed.before or ()) for c in image})
        keys = data.draw(st.lists(st.sampled_from([*names, "no such column"]), min_size=1, max_size=3, unique=True))
        assert extract_pk(fresh, keys) == extract_pk(parsed, keys)
        assert fresh == parsed  # and reading the key did not spoil the images


@_profile
@given(row_changes(), st.data())
def test_damaged_lines_fail_lazily_exactly_when_they_fail_eagerly(rendered: Rendered, data: st.DataObject) -> None:
    line = rendered.line
    cut = data.draw(st.integers(0, len(line)))
    junk = data.draw(st.sampled_from(["", "'", '"', " ", "]", "[", ":", "x", "''", " a[b]:"]))
    damaged = line[:cut] + junk + line[cut + data.draw(st.integers(0, 3)):]
    rows: list[SlotRow] = [(1, 2, "BEGIN 2"), (3, 2, damaged), (4, 2, "COMMIT 2")]
    outcomes = []
    for lazy in (False, True):
        try:
            outcomes.append(_changes(rows, lazy))
        except DecodeError as exc:
            outcomes.append(str(exc))
    assert outcomes[0] == outcomes[1]


def test_replace_and_pickle_see_the_parsed_images() -> None:
    rows: list[SlotRow] = [(1, 2, "BEGIN 2"), (3, 2, "table public.t: INSERT: id[integer]:1 v[text]:'a'"),
                           (4, 2, "COMMIT 2")]
    [change] = _changes(rows, True)
    [eager] = _changes(rows, False)
    assert isinstance(change, LazyChange) and change.pending is not None
    assert extract_pk(change, ["id"]) == {"id": "1"} and change.pending is not None, "the key alone parses nothing"
    assert pickle.loads(pickle.dumps(change)) == eager
    assert dataclasses.replace(change, before=eager.after).after == eager.after
    assert change.after == eager.after and change.pending is None
