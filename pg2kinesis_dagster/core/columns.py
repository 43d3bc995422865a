"""Column exclusion: columns that never leave the database (``--exclude-columns``). Pure.

A spec names tables and their columns::

    public.users:ssn,password_hash;billing.cards:number

``schema.table:column,column`` entries separated by ``;`` (or given as several flags); the schema defaults
to ``public``; a name with ``.``, ``,``, ``:``, ``;`` or spaces in it is double-quoted as in SQL
(``"My Schema"."Odd, Table":"a:b"``). Names are matched exactly as PostgreSQL stores them (case matters).

Excluded columns are removed from every row image of the change (``after``, ``before``, unchanged TOAST
columns included) before it is formatted, so no format, size check or truncation ever sees them. A
primary-key column cannot be excluded: the key identifies the row in Kinesis (partition key, ``pk``,
per-row order). That is refused with a clear error, at start against the catalog and again at the change.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from pg2kinesis_dagster.core.changes import Change
from pg2kinesis_dagster.core.errors import ConfigError

Name = tuple[str, str]
_TOKEN = re.compile(r'"((?:[^"]|"")*)"|([^.,:;"\s]+)|([.,:;])|(\s+)|(.)', re.S)
_EXAMPLE = "public.users:ssn,password_hash;billing.cards:number"


def _tokens(text: str) -> list[tuple[str, str]]:
    """(kind, value): kind "name" or a punctuation character."""
    out: list[tuple[str, str]] = []
    for match in _TOKEN.finditer(text):
        quoted, bare, punct, _space, junk = match.groups()
        if junk is not None:
            raise ConfigError(f"--exclude-columns {text!r}: unexpected {junk!r} (an unclosed double quote?). "
                              f"Write schema.table:column,column entries separated by ';', e.g. {_EXAMPLE}")
        if quoted is not None:
            out.append(("name", quoted.replace('""', '"')))
        elif bare is not None:
            out.append(("name", bare))
        elif punct is not None:
            out.append((punct, punct))
    return out


def _entry(text: str) -> tuple[Name, frozenset[str]]:
    tokens = _tokens(text)
    wrong = ConfigError(f"--exclude-columns entry {text.strip()!r} is not schema.table:column[,column...]: "
                        f"e.g. {_EXAMPLE} (double-quote names with dots, commas, colons or spaces)")
    if ":" not in [kind for kind, _ in tokens]:
        raise wrong
    colon = [kind for kind, _ in tokens].index(":")
    table_part, column_part = tokens[:colon], tokens[colon + 1:]
    kinds = [kind for kind, _ in table_part]
    if kinds == ["name"]:
        schema, table = "public", table_part[0][1]
    elif kinds == ["name", ".", "name"]:
        schema, table = table_part[0][1], table_part[2][1]
    else:
        raise wrong
    columns: list[str] = []
    expect_name = True
    for kind, value in column_part:
        if expect_name and kind == "name":
            columns.append(value)
        elif not expect_name and kind == ",":
            pass
        else:
            raise wrong
        expect_name = not expect_name
    # Quoted empty names ("") are not names either.
    if not columns or expect_name or not all(columns) or not schema or not table:
        raise wrong
    return (schema, table), frozenset(columns)


@dataclass(frozen=True)
class ColumnExclusion:
    by_table: Mapping[Name, frozenset[str]] = field(default_factory=dict)

    @classmethod
    def parse(cls, spec: str | Iterable[str] | None) -> ColumnExclusion:
        parts = [spec] if isinstance(spec, str) else list(spec or [])
        by_table: dict[Name, frozenset[str]] = {}
        for part in parts:
            for entry in _split_entries(part):
                name, columns = _entry(entry)
                by_table[name] = by_table.get(name, frozenset()) | columns
        return cls(by_table)

    def __bool__(self) -> bool:
        return bool(self.by_table)

    def describe(self) -> str:
        return "; ".join(f"{s}.{t}:{','.join(sorted(c))}" for (s, t), c in sorted(self.by_table.items()))

    def check_keys(self, schema: str, table: str, key_columns: Iterable[str] | None) -> None:
        excluded = self.by_table.get((schema, table))
        if not excluded or not key_columns:
            return
        clash = [c for c in key_columns if c in excluded]
        if clash:
            raise ConfigError(
                f"--exclude-columns names {', '.join(clash)} of {schema}.{table}, part of its primary key "
                f"({', '.join(key_columns)}): a key column cannot be excluded, because the key identifies the row "
                "in Kinesis (partition key, pk, per-row order). Remove it from --exclude-columns "
                "(PG2K_EXCLUDE_COLUMNS). Nothing was published and the slot was not advanced."
            )

    def check_catalog(self, keys: Mapping[Name, Iterable[str] | None]) -> None:
        """Refuse at start a spec that names a key column of a table in the catalog."""
        for (schema, table) in self.by_table:
            self.check_keys(schema, table, keys.get((schema, table)))

    def apply(self, change: Change, key_columns: Iterable[str] | None) -> None:
        """Remove the excluded columns of ``change``'s table from its images, in place."""
        excluded = self.by_table.get((change.schema, change.table))
        if not excluded:
            return
        self.check_keys(change.schema, change.table, key_columns)
        if change.after is not None:
            change.after = tuple(c for c in change.after if c.name not in excluded)
        if change.before is not None:
            change.before = tuple(c for c in change.before if c.name not in excluded)


def _split_entries(text: str) -> list[str]:
    """Entries of a spec, split at ``;`` outside double quotes."""
    entries, current, quoted = [], [], False
    for ch in text:
        if ch == '"':
            quoted = not quoted
        if ch == ";" and not quoted:
            entries.append("".join(current))
            current = []
        else:
            current.append(ch)
    entries.append("".join(current))
    return [e for e in entries if e.strip()]
