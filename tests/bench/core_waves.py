"""A core_bench run wave by wave: `python -m tests.bench.core_waves`.

`core_bench`'s p99 at 200 closed-loop submitters x 5 jobs is the slowest of five waves (each
submitter's k-th submission shares the k-th batch with the others'), so one slow wave decides it.
This runs the same set-ups (`tests.bench.core_bench.run_one`) and prints, per run, each wave's
fastest and slowest submission, the collector's passes over the whole heap (generation 2) that
ran during the submissions with the time each held the event loop, and with `--statements` the
median wall time of each kind of statement the submitting process ran (from SQLAlchemy's cursor
events: the driver's and, on PostgreSQL, the server's time, which the event loop waits through).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import gc
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from sqlalchemy import event
from sqlalchemy.ext.asyncio import AsyncEngine

from tests.bench import core_bench


class Collections:
    """The collector's full passes and how long each took, while `active`."""

    def __init__(self) -> None:
        self.active = False
        self.pauses: list[float] = []
        self._started = 0.0

    def __call__(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._started = time.perf_counter()
        elif self.active and info["generation"] == 2:
            self.pauses.append((time.perf_counter() - self._started) * 1000)


class StatementWalls:
    """Each statement's wall time by its first words, from the engines the run builds."""

    def __init__(self) -> None:
        self.times: collections.defaultdict[str, list[float]] = collections.defaultdict(list)
        self._started: dict[int, float] = {}

    def watch(self, engine: AsyncEngine) -> None:
        sync = engine.sync_engine
        event.listen(sync, "before_cursor_execute", self._before)
        event.listen(sync, "after_cursor_execute", self._after)

    def _before(self, conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        self._started[id(cursor)] = time.perf_counter()

    def _after(self, conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        started = self._started.pop(id(cursor), None)
        if started is not None:
            self.times[" ".join(statement.split())[:60]].append((time.perf_counter() - started) * 1000)


async def run(db: str, processes: int, submitters: int, jobs: int, statements: bool) -> None:
    collections_ = Collections()
    walls = StatementWalls()
    closed_loop = core_bench.closed_loop_submits

    async def waves(core: Any, n: int, per: int) -> list[list[float]]:
        if statements:
            walls.watch(core.db.engine)
        collections_.active = True
        try:
            latencies = await closed_loop(core, n, per)
        finally:
            collections_.active = False
        for k in range(per):
            wave = [each[k] * 1000 for each in latencies]
            print(f"  wave {k}: {min(wave):6.1f} - {max(wave):6.1f} ms")
        return latencies

    core_bench.closed_loop_submits = waves
    gc.callbacks.append(collections_)
    try:
        with tempfile.TemporaryDirectory(prefix="core-waves-") as tmp:
            async with core_bench.database(db, Path(tmp) / "waves.db") as url:
                if url is None:
                    return
                label = f"{db}, {processes} dispatcher processes" if processes else f"{db}, in-process"
                print(f"{label}, {submitters} submitters x {jobs}:")
                r = await core_bench.run_one(db, url, Path(tmp) / "run", submitters, jobs, 64, processes)
    finally:
        core_bench.closed_loop_submits = closed_loop
        gc.callbacks.remove(collections_)
    pauses = ", ".join(f"{ms:.1f}" for ms in collections_.pauses) or "none"
    print(f"  full collections during the submissions (ms each): {pauses}")
    print(
        f"  submit p50 {r['submit_p50_ms']:.1f} ms, p99 {r['submit_p99_ms']:.1f} ms, {r['jobs_per_s']:.0f} jobs/s"
    )
    for text, times in sorted(walls.times.items(), key=lambda kv: -statistics.median(kv[1])):
        print(f"  {statistics.median(times):7.2f} ms median of {len(times):4d}  {text}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tests.bench.core_waves", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--db", choices=["sqlite", "postgres"], default="postgres")
    parser.add_argument(
        "--processes", type=int, default=1, help="PostgreSQL dispatcher processes (0: in-process)"
    )
    parser.add_argument("--submitters", type=int, default=200)
    parser.add_argument("--jobs", type=int, default=5, help="jobs per submitter, one wave each")
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--statements", action="store_true", help="each statement kind's median wall time")
    args = parser.parse_args(argv)
    processes = 0 if args.db == "sqlite" else args.processes

    async def runs() -> None:
        for _ in range(args.runs):
            await run(args.db, processes, args.submitters, args.jobs, args.statements)

    asyncio.run(runs())
    return 0


if __name__ == "__main__":
    sys.exit(main())
