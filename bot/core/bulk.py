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

SQLite has no prepare round trip: there `one_of` is the usual `IN` (SQLAlchemy expands it from
one compiled statement) and rows go as rows. (Rows as JSON through `json_each` and `json_extract`
measured no cheaper there: SQLite parses each row's JSON once per column.)
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Collection, Mapping, Sequence
from typing import Any, TypeVar

from sqlalchemy import ColumnElement, Insert, Table, any_, bindparam, cast, func, literal_column, select
from sqlalchemy.dialects.postgresql import ARRAY, JSONB
from sqlalchemy.orm import QueryableAttribute
from sqlalchemy.types import Text

InsertT = TypeVar("InsertT", bound=Insert)  # a dialect's Insert keeps its on_conflict_* methods

# The parameter that carries a batch's rows as JSON on PostgreSQL (`from_rows`, `rows_param`).
ROWS_PARAM = "rows"


def one_of(
    column: ColumnElement[Any] | QueryableAttribute[Any], values: Collection[Any], *, postgres: bool
) -> ColumnElement[bool]:
    """`column IN values`; on PostgreSQL `column = ANY(:array)`, one parameter whatever the count."""
    if postgres:
        array = bindparam(None, list(values), type_=ARRAY(column.expression.type))
        return column == any_(array)
    return column.in_(values)


def one_of_param(
    column: ColumnElement[Any] | QueryableAttribute[Any], name: str, *, postgres: bool
) -> ColumnElement[bool]:
    """`one_of` with the values left to execution (`{name: [...]}`), for a statement built once: on
    PostgreSQL `= ANY(:name)`, on SQLite an expanding `IN`."""
    if postgres:
        return column == any_(bindparam(name, type_=ARRAY(column.expression.type)))
    return column.in_(bindparam(name, expanding=True))


def from_rows(statement: InsertT, table: Table, names: Sequence[str], *, postgres: bool) -> InsertT:
    """`insert(table)` (`statement`) of a batch's rows, executed with `rows_param(rows)`. On
    PostgreSQL the rows come from one JSON parameter: `INSERT ... SELECT names FROM
    jsonb_populate_recordset(NULL::table, :rows)`, typed by the table's own row type (columns left
    out get their defaults). On SQLite the statement is left as it is, executed with the rows."""
    if not postgres:
        return statement
    records = func.jsonb_populate_recordset(
        literal_column(f"NULL::{table.name}"), cast(bindparam(ROWS_PARAM, type_=Text), JSONB)
    ).table_valued(*names)
    return statement.from_select(names, select(*[records.c[name] for name in names]))


def rows_param(rows: Sequence[Mapping[str, Any]], *, postgres: bool) -> Any:
    """The parameters of a `from_rows` statement: on PostgreSQL the rows as one JSON document
    (datetimes must be timezone-aware, as `UTCDateTime` requires anyway); on SQLite the rows."""
    if not postgres:
        return rows
    return {ROWS_PARAM: json.dumps(rows, default=_pg_value, separators=(",", ":"))}


def _pg_value(value: Any) -> str:
    if isinstance(value, dt.datetime):
        if value.tzinfo is None:
            raise ValueError("naive datetime given to a UTC column")
        return value.isoformat()
    if isinstance(value, dt.date):
        return value.isoformat()
    raise TypeError(f"{type(value).__name__} is not a column value")
