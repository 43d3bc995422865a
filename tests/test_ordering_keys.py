"""core.keys.ordering_key: which changes must stay in order (README "Guarantees", order of keyless tables)."""

from __future__ import annotations

from pg2kinesis_dagster.core.batching import OrderingKeys, Record, SharedKey, describe_key, hot_rows
from pg2kinesis_dagster.core.changes import Change, Column, Operation
from pg2kinesis_dagster.core.keys import extract_pk, ordering_key

TABLE = ("table", "public", "events")


def col(name: str, value: str | None, toast: bool = False) -> Column:
    return Column(name, "text", value, toast)


def change(op: Operation, after: tuple[Column, ...] | None = None, before: tuple[Column, ...] | None = None,
           table: str = "events") -> Change:
    return Change(1, 2, 0, "public", table, op, after, before)


ROW_A = (col("at", "1"), col("msg", "a"))
ROW_B = (col("at", "1"), col("msg", "b"))


def image(row: tuple[Column, ...]) -> tuple[object, ...]:
    return ("image", "public", "events", tuple((c.name, c.value) for c in row))


def test_keyless_insert_shares_the_table_and_holds_its_content() -> None:
    assert ordering_key(change(Operation.INSERT, ROW_A)) == OrderingKeys((SharedKey(TABLE), image(ROW_A)))


def test_keyless_update_with_old_row_holds_both_contents_and_delete_the_old() -> None:
    assert ordering_key(change(Operation.UPDATE, ROW_B, ROW_A)) == OrderingKeys(
        (SharedKey(TABLE), image(ROW_A), image(ROW_B)))
    assert ordering_key(change(Operation.DELETE, None, ROW_A)) == OrderingKeys((SharedKey(TABLE), image(ROW_A)))


def test_keyless_changes_without_the_old_row_or_with_unknown_values_hold_the_whole_table() -> None:
    assert ordering_key(change(Operation.UPDATE, ROW_B, None)) == TABLE  # default replica identity
    assert ordering_key(change(Operation.DELETE, None, None)) == TABLE
    toasted = (col("at", "1"), col("msg", None, toast=True))
    assert ordering_key(change(Operation.UPDATE, toasted, ROW_A)) == TABLE
    assert ordering_key(change(Operation.TRUNCATE)) == TABLE


def test_keyed_rows_and_key_changes() -> None:
    c = change(Operation.UPDATE, (col("id", "2"), col("v", "x")), (col("id", "1"),), table="items")
    c.pk = extract_pk(c, ["id"])
    assert ordering_key(c, ["id"]) == OrderingKeys((("row", "public", "items", ("2",)),
                                                    ("row", "public", "items", ("1",))))
    same = change(Operation.UPDATE, (col("id", "2"), col("v", "y")), (col("id", "2"), col("v", "x")), table="items")
    same.pk = extract_pk(same, ["id"])
    assert ordering_key(same, ["id"]) == ("row", "public", "items", ("2",))  # REPLICA IDENTITY FULL, same key


def test_hot_rows_are_counted_by_whole_keys_and_described() -> None:
    hot = ("row", "public", "counters", ("7",))
    records = [Record(b"x", "k", hot, f"c{i}") for i in range(12)]
    records += [Record(b"y", "k", OrderingKeys((SharedKey(TABLE), ("image", "public", "events", (("m", "z"),)))),
                       f"d{i}") for i in range(3)]
    assert hot_rows(records) == [("public.counters:7", 12)]
    assert describe_key(TABLE) == "public.events"


def test_the_fault_suite_checker_flags_only_what_the_rule_forbids() -> None:
    from tests.helpers import _order_violations

    shared, whole = False, True
    assert _order_violations([((1, 1), shared), ((1, 0), shared)]) == 0  # inserts overtaking each other: fine
    assert _order_violations([((1, 0), shared), ((2, 0), whole), ((1, 1), shared)]) == 1  # one read after it
    assert _order_violations([((2, 0), whole), ((1, 0), shared)]) == 1  # read before an earlier change
    assert _order_violations([((1, 0), whole), ((1, 1), whole), ((2, 0), whole)]) == 0
