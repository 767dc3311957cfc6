"""Several reads of one transaction in one statement: each read a SELECT of tagged rows of one
shape, joined by `UNION ALL`.

Each statement costs the event loop 1-3 ms of SQLAlchemy's and the driver's work (and on SQLite the
hops to aiosqlite's thread), and on PostgreSQL a round trip during which the loop has nothing else
to do while submitters wait for the batch; that cost is per statement, not per row. The submit
batch's reads after its users' upsert (the idempotency keys, the queue's admission, the quota book:
`bot.core.submit_batch`) are independent of one another, so they go as one statement: every part
selects `tag, i0..i2, t0..t2, day` (`part`), filling the columns it needs in order and leaving the
others NULL, and the owner of each part turns its rows back into what it needs (`TaggedRows`).

The columns are typed in every part (a NULL is a typed NULL): PostgreSQL resolves a UNION's column
types from all its branches, and SQLAlchemy takes the result types (SQLite's text-to-date
conversion) from the first branch.
"""

from __future__ import annotations

import collections
from collections.abc import Iterable, Sequence
from typing import Any

from sqlalchemy import BigInteger, ColumnElement, Date, Select, Text, cast, literal_column, null, select
from sqlalchemy.sql.elements import BindParameter
from sqlalchemy.sql.expression import CompoundSelect, union_all
from sqlalchemy.sql.visitors import iterate

INTS = 3  # integer columns i0..i2 (ids, rounds, counts)
TEXTS = 3  # text columns t0..t2 (keys, platforms, scopes)
# The columns' positions in a row: owners read rows by position (`row[I0]`), which costs a tenth of
# a Row's attribute lookup by name (0.05 against 0.5 microseconds; a batch of 200 users reads
# about 1400 values).
TAG, I0, I1, I2, T0, T1, T2, DAY = range(2 + INTS + TEXTS)


def part(
    tag: str,
    *,
    ints: Sequence[ColumnElement[Any]] = (),
    texts: Sequence[ColumnElement[Any]] = (),
    day: ColumnElement[Any] | None = None,
) -> Select[Any]:
    """A SELECT of rows tagged `tag` in the shared shape; add its FROM, WHERE and GROUP BY as to
    any select. `ints`, `texts`: its integer and text values, in the columns' order."""
    if not tag.isidentifier() or len(ints) > INTS or len(texts) > TEXTS:
        raise ValueError(f"a tagged part is a plain tag, at most {INTS} integers and {TEXTS} texts")
    columns: list[ColumnElement[Any]] = [literal_column(f"'{tag}'", Text).label("tag")]
    columns += [_padded(ints, n, BigInteger).label(f"i{n}") for n in range(INTS)]
    columns += [_padded(texts, n, Text).label(f"t{n}") for n in range(TEXTS)]
    columns.append((cast(null(), Date) if day is None else day).label("day"))
    return select(*columns)


def _padded(values: Sequence[ColumnElement[Any]], n: int, type_: Any) -> ColumnElement[Any]:
    return values[n] if n < len(values) else cast(null(), type_)


def merged(*owners: Sequence[Select[Any]]) -> CompoundSelect:
    """The parts of several owners (each a sequence of `part`s) as one statement, executed with
    all their parameters in one dict. Two owners must not name a parameter alike: SQLAlchemy would
    give both the one value without a word, so that is refused here, when the statement is built."""
    seen: dict[str, int] = {}
    for index, parts in enumerate(owners):
        for name in {
            b.key for p in parts for b in iterate(p) if isinstance(b, BindParameter) and not b.unique
        }:
            if seen.setdefault(name, index) != index:
                raise ValueError(f"two parts of a merged read name the parameter {name!r}")
    return union_all(*[p for parts in owners for p in parts])


class TaggedRows:
    """A merged read's rows, by tag (the rows of a tag no part returned: none). `rows`: its
    result's `.all()` (iterating a result fetches it a row at a time: 0.1-0.3 ms more of the
    loop's time for the 400 rows of a batch of 200 users with jobs queued)."""

    def __init__(self, rows: Iterable[Any]):
        self._rows: dict[str, list[Any]] = collections.defaultdict(list)
        for row in rows:
            self._rows[row[TAG]].append(row)

    def __getitem__(self, tag: str) -> list[Any]:
        return self._rows.get(tag, [])
