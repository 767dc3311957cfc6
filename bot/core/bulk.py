"""Statements whose text does not depend on how many values or rows they carry.

A batch (`bot.core.group_commit`) has a different size each time. Written the plain way, its
statements change text with the size: `IN (...)` with one parameter per value, a multi-row
`INSERT ... VALUES` with one per column and row. On PostgreSQL each new text costs asyncpg a
prepare (a round trip, and the server parses and plans a statement of thousands of parameters)
and its cache of prepared statements (100 per connection) churns; SQLAlchemy also runs each of
those thousands of parameters through its type processing. Here the values travel as one
parameter instead: an array compared with `= ANY(...)`, and rows as one JSON document expanded
by `json_populate_recordset`, so the text is the same for 1 row or 500 and the parameters are
encoded by orjson (`bot.core.fastjson`).

SQLite has no prepare round trip: there `one_of` is the usual `IN` (SQLAlchemy expands it from
one compiled statement) and rows go as rows. (Rows as JSON through `json_each` and `json_extract`
measured no cheaper there: SQLite parses each row's JSON once per column.) Rows are written by
`execute_rows`, which on SQLite writes the multi-row INSERT itself (see `_SqliteRows`).
"""

from __future__ import annotations

import datetime as dt
import operator
from collections import namedtuple
from collections.abc import Collection, Mapping, Sequence
from typing import Any, TypeVar

from sqlalchemy import (
    ColumnElement,
    Dialect,
    Insert,
    Table,
    any_,
    bindparam,
    cast,
    func,
    literal_column,
    select,
)
from sqlalchemy.dialects.postgresql import ARRAY, JSON
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import QueryableAttribute
from sqlalchemy.types import Text, TypeDecorator, TypeEngine

from bot.core import fastjson

InsertT = TypeVar("InsertT", bound=Insert)  # a dialect's Insert keeps its on_conflict_* methods

# SQLite's limit on a statement's parameters (SQLITE_MAX_VARIABLE_NUMBER, 32766 since 3.32): a
# larger batch of rows is written in several statements.
SQLITE_MAX_VARIABLES = 32766
# The parameter that carries a batch's rows as JSON on PostgreSQL (`from_rows`, `rows_param`).
ROWS_PARAM = "rows"


def one_of(
    column: ColumnElement[Any] | QueryableAttribute[Any], values: Collection[Any], *, postgres: bool
) -> ColumnElement[bool]:
    """`column IN values` as one parameter whatever the count: on PostgreSQL `column = ANY(:array)`,
    on SQLite `column IN (SELECT value FROM json_each(:array))`."""
    if postgres:
        array = bindparam(None, list(values), type_=ARRAY(column.expression.type))
        return column == any_(array)
    return column.in_(_json_each(bindparam(None, list(values), type_=_JsonArray(column.expression.type))))


def one_of_param(
    column: ColumnElement[Any] | QueryableAttribute[Any], name: str, *, postgres: bool
) -> ColumnElement[bool]:
    """`one_of` with the values left to execution (`{name: [...]}`), for a statement built once."""
    if postgres:
        return column == any_(bindparam(name, type_=ARRAY(column.expression.type)))
    return column.in_(_json_each(bindparam(name, type_=_JsonArray(column.expression.type))))


def _json_each(array: Any) -> Any:
    # SQLite reads the array's elements as a table and looks each one up in the column's index.
    # An expanding `IN (?, ?, ...)` instead sends one parameter per value, each handled by
    # SQLAlchemy and the text rewritten per call: 2-4 ms of a 200-submission batch's statement.
    return select(literal_column("value")).select_from(func.json_each(array))


class _JsonArray(TypeDecorator[list[Any]]):
    """A list of a column's values sent as one JSON array (`one_of` on SQLite), each value
    converted as the column's own type converts it (a date to its text, a bool to 0/1)."""

    impl = Text
    cache_ok = True

    def __init__(self, element: TypeEngine[Any]):
        super().__init__()
        self.element = element
        # The element's processor, by dialect name: looked up once, not on every execution.
        self._processors: dict[str, Any] = {}

    def process_bind_param(self, value: Any, dialect: Dialect) -> str:
        if dialect.name not in self._processors:
            self._processors[dialect.name] = self.element.dialect_impl(dialect).bind_processor(dialect)
        process = self._processors[dialect.name]
        items = list(value) if process is None else [process(v) for v in value]
        return fastjson.dumps(items)


def from_rows(statement: InsertT, table: Table, names: Sequence[str], *, postgres: bool) -> InsertT:
    """`insert(table)` (`statement`) of a batch's rows, executed with `rows_param(rows)`. On
    PostgreSQL the rows come from one JSON parameter: `INSERT ... SELECT names FROM
    json_populate_recordset(NULL::table, :rows)`, typed by the table's own row type (a column a
    row leaves out is NULL, as the base record's; `rows_param` leaves out the None values). On
    SQLite the statement is left as it is, executed with the rows.

    `json`, not `jsonb`: the server reads the document once, and `jsonb`'s conversion of the
    whole document first (its binary form, keys sorted) made a 200-job INSERT take 8.7-12.7 ms
    against 5.4-8.3 (4.7 with the None values left out), measured on the development machine
    with the statement prepared as asyncpg prepares it."""
    if not postgres:
        return statement
    records = func.json_populate_recordset(
        literal_column(f"NULL::{table.name}"), cast(bindparam(ROWS_PARAM, type_=Text), JSON)
    ).table_valued(*names)
    return statement.from_select(names, select(*[records.c[name] for name in names]))


async def execute_rows(s: AsyncSession, statement: Any, rows: Sequence[Mapping[str, Any]]) -> list[Any]:
    """Run a `from_rows` statement (an INSERT or upsert of a batch's rows, each with the `names`
    it was built with, in that order) with `rows`; its RETURNING rows (attributes by column key),
    or [] without RETURNING. On PostgreSQL the rows go as one JSON parameter (`rows_param`); on
    SQLite as one multi-row INSERT written here (`_SqliteRows`)."""
    bind = s.get_bind()
    if bind.dialect.name != "sqlite":
        result = await s.execute(statement, rows_param(rows, postgres=True))
        return list(result.all()) if statement.exported_columns else []
    template = _SQLITE_ROWS.get(id(statement))
    if template is None:
        template = _SQLITE_ROWS[id(statement)] = _SqliteRows(statement, tuple(rows[0]), bind.dialect)
    return await template.execute(s, rows)


class _SqliteRows:
    """A `from_rows` statement on SQLite as text with one VALUES group per row, its values converted
    by each column type's own bind processor (what SQLAlchemy would send) in one pass and handed
    to the driver as they are. SQLAlchemy's own multi-row INSERT handles each of a batch's values
    one by one through its parameter bookkeeping: 7 ms of a 200-job batch's INSERT, 1 ms here."""

    def __init__(self, statement: Any, names: tuple[str, ...], dialect: Dialect):
        self.statement = statement  # kept alive: `_SQLITE_ROWS` is keyed by its id
        compiled = statement.compile(dialect=dialect, column_keys=list(names))
        group = "(" + ", ".join("?" * len(names)) + ")"
        sql = str(compiled)
        # The row's values go in the order the statement names its columns (the table's).
        order = tuple(compiled.positiontup or ())[: len(names)]
        if set(order) != set(names) or sql.count(group) != 1:
            raise ValueError(f"not a statement of one row of {names}: {sql}")
        names = order
        self._head, self._tail = sql.split(group)
        self._group = group
        table = statement.table
        self._columns = len(names)
        # A row's values in the statement's order, read by one C call (`itemgetter`); then only
        # the columns whose type converts its values (about a third of a job's) go through Python.
        self._values = operator.itemgetter(*names) if len(names) > 1 else (lambda row: (row[names[0]],))
        self._processors = []
        for index, name in enumerate(names):
            process = table.c[name].type.dialect_impl(dialect).bind_processor(dialect)
            if process is not None:
                # A processor that keeps None as None is skipped for None (most of a job's
                # timestamps are empty); one that does not (JSON's, which writes 'null') always runs.
                self._processors.append((index, process, process(None) is None))
        # Bound values of the statement itself (after the VALUES, as in an ON CONFLICT clause).
        extra = list(compiled.positiontup or ())[len(names) :]
        self._extra = []
        for name in extra:
            bind = compiled.binds[name]
            process = bind.type.dialect_impl(dialect).bind_processor(dialect)
            self._extra.append(bind.value if process is None else process(bind.value))
        returning = list(statement.exported_columns)
        self._row = namedtuple("Row", [c.key for c in returning], rename=True) if returning else None  # type: ignore[misc]
        self._results = [c.type.dialect_impl(dialect).result_processor(dialect, None) for c in returning]

    async def execute(self, s: AsyncSession, rows: Sequence[Mapping[str, Any]]) -> list[Any]:
        per_statement = max(1, (SQLITE_MAX_VARIABLES - len(self._extra)) // self._columns)
        if len(rows) > per_statement:
            return [
                row
                for start in range(0, len(rows), per_statement)
                for row in await self.execute(s, rows[start : start + per_statement])
            ]
        values: list[Any] = []
        get, converters = self._values, self._processors
        for row in rows:
            row_values = list(get(row))
            for index, process, keeps_none in converters:
                value = row_values[index]
                if not (keeps_none and value is None):
                    row_values[index] = process(value)
            values += row_values
        values += self._extra
        sql = self._head + ", ".join([self._group] * len(rows)) + self._tail
        conn = await s.connection()
        result = await conn.exec_driver_sql(sql, tuple(values))
        if self._row is None:
            return []
        processors = self._results
        return [
            self._row(*[v if p is None else p(v) for p, v in zip(processors, raw, strict=True)])
            for raw in result.all()
        ]


# `execute_rows`' SQLite statements, by the id of the statement they write (statements are built
# once per process: each caller caches its own).
_SQLITE_ROWS: dict[int, _SqliteRows] = {}


def rows_param(rows: Sequence[Mapping[str, Any]], *, postgres: bool) -> Any:
    """The parameters of a `from_rows` statement: on PostgreSQL the rows as one JSON document
    (datetimes must be timezone-aware, as `UTCDateTime` requires anyway); on SQLite the rows."""
    if not postgres:
        return rows
    # None is what a key left out gives (`from_rows`): a job's dozen empty columns are not sent.
    return {
        ROWS_PARAM: fastjson.dumps_with(
            [{k: v for k, v in row.items() if v is not None} for row in rows], _pg_value
        )
    }


def _pg_value(value: Any) -> str:
    if isinstance(value, dt.datetime):
        if value.tzinfo is None:
            raise ValueError("naive datetime given to a UTC column")
        return value.isoformat()
    if isinstance(value, dt.date):
        return value.isoformat()
    raise TypeError(f"{type(value).__name__} is not a column value")
