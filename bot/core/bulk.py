"""Statements whose text does not depend on how many values or rows they carry.

A batch (`bot.core.group_commit`) has a different size each time. Written the plain way, its
statements change text with the size: `IN (...)` with one parameter per value, a multi-row
`INSERT ... VALUES` with one per column and row. On PostgreSQL each new text costs asyncpg a
prepare (a round trip, and the server parses and plans a statement of thousands of parameters)
and its cache of prepared statements (100 per connection) churns; SQLAlchemy also runs each of
those thousands of parameters through its type processing. Here the values travel as one
parameter instead: an array compared with `= ANY(...)`, and rows as one JSON document expanded
by `jsonb_populate_recordset`, so the text is the same for 1 row or 500 and the parameters are
encoded by the json module's C encoder.

SQLite has no prepare round trip and reads its parameters in-process: there `one_of` is the
usual `IN` and `rows_as_json` is not used.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Collection, Mapping, Sequence
from typing import Any

from sqlalchemy import ColumnElement, Select, Table, any_, bindparam, cast, func, literal_column, select
from sqlalchemy.dialects.postgresql import ARRAY, JSONB
from sqlalchemy.types import Text

# The parameter that carries a batch's rows as JSON (`rows_from_json`, `rows_as_json`).
ROWS_PARAM = "rows"


def one_of(column: ColumnElement[Any], values: Collection[Any], *, postgres: bool) -> ColumnElement[bool]:
    """`column IN values`; on PostgreSQL `column = ANY(:array)`, one parameter whatever the count."""
    if postgres:
        return column == any_(bindparam(None, list(values), type_=ARRAY(column.type)))
    return column.in_(values)


def rows_from_json(table: Table, names: Sequence[str]) -> Select[Any]:
    """PostgreSQL: `SELECT names FROM jsonb_populate_recordset(NULL::table, :rows)`, the rows of a
    batch from one JSON parameter (`rows_as_json`), typed by the table's own row type. For
    `insert(table).from_select(names, ...)`; columns left out get their defaults."""
    records = func.jsonb_populate_recordset(
        literal_column(f"NULL::{table.name}"), cast(bindparam(ROWS_PARAM, type_=Text), JSONB)
    ).table_valued(*names)
    return select(*[records.c[name] for name in names])


def rows_as_json(rows: Sequence[Mapping[str, Any]]) -> dict[str, str]:
    """The parameters of a `rows_from_json` statement. Datetimes must be timezone-aware (the
    columns are `timestamptz`), as `UTCDateTime` requires anyway."""
    return {ROWS_PARAM: json.dumps(rows, default=_json_value, separators=(",", ":"))}


def _json_value(value: Any) -> str:
    if isinstance(value, dt.datetime):
        if value.tzinfo is None:
            raise ValueError("naive datetime given to a UTC column")
        return value.isoformat()
    if isinstance(value, dt.date):
        return value.isoformat()
    raise TypeError(f"{type(value).__name__} is not a column value")
