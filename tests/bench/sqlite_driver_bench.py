"""SQLite statements through SQLAlchemy's stock aiosqlite adapter and through `bot.core.sqlite_driver`
(one hop to aiosqlite's thread per statement): `python -m tests.bench.sqlite_driver_bench`.

Both engines come from `bot.core.db.make_engine` (the stock one with the one-hop module turned
off), on one SQLite file each, in one process, taking turns round by round so that the machine's
drift (a shared machine) falls on both alike. Per round and engine, on one connection:

- select: `SELECT ... WHERE id = ?` of one row, `--statements` times;
- unit of work: `Database.session()` (BEGIN IMMEDIATE, an INSERT ... RETURNING, an UPDATE,
  COMMIT), `--statements / 4` times.

Reported: the medians over the rounds of the wall time and of the event loop thread's CPU time
(`time.thread_time`) per statement or unit of work, and the hops to aiosqlite's thread each made.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiosqlite
from sqlalchemy import text

from bot.core import db as db_module
from bot.core.db import Database, make_engine

SCHEMA = "CREATE TABLE t (id INTEGER PRIMARY KEY, name TEXT NOT NULL, n INTEGER NOT NULL DEFAULT 0)"


class HopCounter:
    def __init__(self) -> None:
        self.count = 0
        execute = aiosqlite.Connection._execute
        counter = self

        async def counted(conn: aiosqlite.Connection, fn: Any, *args: Any, **kwargs: Any) -> Any:
            counter.count += 1
            return await execute(conn, fn, *args, **kwargs)

        aiosqlite.Connection._execute = counted  # type: ignore[method-assign]


def engine_for(kind: str, path: Path) -> Database:
    stock_module = db_module._sqlite_module
    if kind == "stock":
        db_module._sqlite_module = lambda driver: {}  # type: ignore[assignment]
    try:
        return Database(make_engine(f"sqlite+aiosqlite:///{path}", pool_size=1))
    finally:
        db_module._sqlite_module = stock_module  # type: ignore[method-assign]


async def select_round(db: Database, n: int) -> tuple[float, float]:
    async with db.engine.connect() as conn:
        await conn.execute(text("SELECT 1"))
        wall, cpu = time.perf_counter(), time.thread_time()
        for i in range(n):
            (await conn.execute(text("SELECT id, name, n FROM t WHERE id = :id"), {"id": i % 100 + 1})).one()
        return time.perf_counter() - wall, time.thread_time() - cpu


async def unit_round(db: Database, n: int) -> tuple[float, float]:
    wall, cpu = time.perf_counter(), time.thread_time()
    for i in range(n):
        async with db.session() as s:
            new_id = (
                await s.execute(text("INSERT INTO t (name) VALUES (:name) RETURNING id"), {"name": f"u{i}"})
            ).scalar_one()
            await s.execute(text("UPDATE t SET n = n + 1 WHERE id = :id"), {"id": new_id})
    return time.perf_counter() - wall, time.thread_time() - cpu


async def amain(args: argparse.Namespace) -> int:
    hops = HopCounter()
    kinds = ("stock", "one-hop")
    results: dict[tuple[str, str], list[tuple[float, float]]] = {}
    hop_counts: dict[tuple[str, str], int] = {}
    load_before = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    with tempfile.TemporaryDirectory(prefix="sqlite-driver-") as tmp:
        dbs = {kind: engine_for(kind, Path(tmp) / f"{kind}.db") for kind in kinds}
        try:
            for db in dbs.values():
                async with db.session() as s:
                    await s.execute(text(SCHEMA))
                    for i in range(100):
                        await s.execute(text("INSERT INTO t (name) VALUES (:name)"), {"name": f"n{i}"})
            units = max(1, args.statements // 4)
            for r in range(args.rounds + 1):  # the first round warms up and is left out
                order = kinds if r % 2 == 0 else kinds[::-1]
                for kind in order:
                    for what, fn, n in (
                        ("select", select_round, args.statements),
                        ("unit", unit_round, units),
                    ):
                        before = hops.count
                        wall, cpu = await fn(dbs[kind], n)
                        if r == 0:
                            continue
                        results.setdefault((kind, what), []).append((wall / n, cpu / n))
                        hop_counts[(kind, what)] = round((hops.count - before) / n)
        finally:
            for db in dbs.values():
                await db.close()
    print(
        f"sqlite driver bench: {args.rounds} rounds (after one of warm-up), engines taking turns; "
        f"medians per statement (select) or unit of work (BEGIN IMMEDIATE, INSERT ... RETURNING, UPDATE, COMMIT)"
    )
    print(f"{'':8} {'':8} {'hops':>5} {'wall ms':>8} {'loop CPU ms':>12}")
    for what in ("select", "unit"):
        for kind in kinds:
            rows = results[(kind, what)]
            wall = statistics.median(w for w, _ in rows) * 1000
            cpu = statistics.median(c for _, c in rows) * 1000
            print(f"{what:8} {kind:8} {hop_counts[(kind, what)]:5d} {wall:8.3f} {cpu:12.3f}")
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"{os.cpu_count()} CPUs, load average {load_before} before, {load} after")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tests.bench.sqlite_driver_bench", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--statements", type=int, default=400, help="statements per round and engine")
    return asyncio.run(amain(parser.parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
