"""Where a submission's event-loop time goes: `python -m tests.bench.submit_phases`.

For SQLite (a file) and PostgreSQL (a fresh database on DATABASE_URL_TEST), with no dispatcher,
in rounds of 200 users submitting once each (the first two rounds are left out as warm-up), the
event loop thread's CPU time (`time.thread_time`, which the other threads' work does not move):

- imagine: 200 concurrent `imagine` calls, everything included, per submission;
- batch: the submit writer's transaction for those 200 (`SubmitWriter.write`: all 200 join one
  batch), in all and per submission, its statements' time and count (medians over the rounds), and
  each statement's share (the last round's);
- before and around the batch: the rest, per submission (validation, the channel's defaults, the
  flags, the model choice, the group commit, the coroutines).

While the batch runs every submitter waits for it, so the event loop's time around each of its
statements is that statement's own: the driver's and SQLAlchemy's work, and on SQLite the hops to
aiosqlite's thread.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession

from bot.bootstrap import build_core
from bot.core.api import Actor, Place
from tests.bench.core_bench import InstantBackend, bench_config, database

USERS = 200


class StatementClock:
    """The event loop's CPU time around each statement and the number of statements; `times()`: by
    the statement's first words, which are taken afterwards (`str(statement)` compiles it again,
    which its own execution does not: taken inside, it counted in the batch's time)."""

    def __init__(self) -> None:
        self._seconds: dict[int, list[Any]] = {}  # by the statement's id: [statement, seconds]
        self.count = 0
        self._execute = AsyncSession.execute
        self._driver = AsyncConnection.exec_driver_sql

    def times(self) -> collections.Counter[str]:
        times: collections.Counter[str] = collections.Counter()
        for statement, seconds in self._seconds.values():
            times[" ".join(str(statement).split())[:60]] += seconds
        return times

    def _add(self, statement: Any, seconds: float) -> None:
        self._seconds.setdefault(id(statement), [statement, 0.0])[1] += seconds
        self.count += 1

    def __enter__(self) -> StatementClock:
        clock, execute, driver = self, self._execute, self._driver

        async def timed_execute(session: AsyncSession, statement: Any, *args: Any, **kwargs: Any) -> Any:
            started = time.thread_time()
            try:
                return await execute(session, statement, *args, **kwargs)
            finally:
                clock._add(statement, time.thread_time() - started)

        async def timed_driver(conn: AsyncConnection, sql: str, *args: Any, **kwargs: Any) -> Any:
            started = time.thread_time()
            try:
                return await driver(conn, sql, *args, **kwargs)
            finally:
                clock._add(sql, time.thread_time() - started)

        AsyncSession.execute = timed_execute  # type: ignore[method-assign]
        AsyncConnection.exec_driver_sql = timed_driver  # type: ignore[method-assign]
        return self

    def __exit__(self, *exc: object) -> None:
        AsyncSession.execute = self._execute  # type: ignore[method-assign]
        AsyncConnection.exec_driver_sql = self._driver  # type: ignore[method-assign]


async def measure(url: str, workdir: Path, rounds: int) -> dict[str, Any]:
    config = bench_config(url, workdir, USERS * rounds, rounds, 64)
    async with build_core(
        config, {}, backend=InstantBackend(progress_events=False), start_dispatcher=False
    ) as core:
        writer = core.service._submissions.writer
        write = writer.write
        place = Place("bench", "guild", "channel")
        actors = [Actor("bench", f"user{i}", f"User {i}") for i in range(USERS)]
        batches: list[float] = []
        imagines: list[float] = []
        sizes: list[int] = []
        statements: collections.Counter[str] = collections.Counter()
        statement_ms: list[float] = []  # each batch's statements, in all
        counts: list[int] = []  # each batch's number of statements

        async def timed_write(batch: list[Any], **kwargs: Any) -> Any:
            nonlocal statements
            with StatementClock() as clock:
                started = time.thread_time()
                try:
                    return await write(batch, **kwargs)
                finally:
                    batches.append((time.thread_time() - started) * 1000)
                    sizes.append(len(batch))
                    statements = clock.times()
                    statement_ms.append(sum(statements.values()) * 1000)
                    counts.append(clock.count)

        writer.write = timed_write  # type: ignore[method-assign]
        for r in range(rounds):
            started = time.thread_time()
            await asyncio.gather(
                *[
                    core.service.imagine(a, place, f"x {i} {r}", idempotency_key=f"{r}-{i}")
                    for i, a in enumerate(actors)
                ]
            )
            imagines.append((time.thread_time() - started) / USERS * 1000)
        if set(sizes) != {USERS}:
            print(f"  (batches of {sorted(set(sizes))}: the submissions did not all join one batch)")
    kept = slice(2, None)  # the first rounds create the users and warm the process up
    batch = statistics.median(batches[kept])
    return {
        "prep": statistics.median(imagines[kept]) - batch / USERS,
        "batch": batch,
        "imagine": statistics.median(imagines[kept]),
        "imagine_min": min(imagines[kept]),
        "statements": statements,
        "statement_ms": statistics.median(statement_ms[kept]),
        "statement_count": statistics.median(counts[kept]),
    }


async def amain(args: argparse.Namespace) -> int:
    print(
        f"submit phases: {USERS} users, {args.rounds} rounds (the first 2 left out), medians; event loop CPU time"
    )
    with tempfile.TemporaryDirectory(prefix="submit-phases-") as tmp:
        for db in ("sqlite", "postgres"):
            async with database(db, Path(tmp) / "phases.db") as url:
                if url is None:
                    continue
                r = await measure(url, Path(tmp) / db, args.rounds)
            print(f"\n{db}: imagine x{USERS} {r['imagine']:.3f} ms/submission (min {r['imagine_min']:.3f}): "
                  f"the batch {r['batch']:.1f} ms ({r['batch'] / USERS:.3f} ms/submission), the rest "
                  f"{r['prep']:.3f} ms/submission")  # fmt: skip
            total = sum(r["statements"].values())
            print(f"  the batch's statements: {r['statement_count']:g}, {r['statement_ms']:.1f} ms of the loop's "
                  f"time; the last batch's ({total * 1000:.1f} ms), each:")  # fmt: skip
            for text, seconds in r["statements"].most_common():
                print(f"  {seconds * 1000:7.2f} ms  {text}")
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"\n{os.cpu_count()} CPUs, load average {load} after")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tests.bench.submit_phases", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--rounds", type=int, default=12)
    return asyncio.run(amain(parser.parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
