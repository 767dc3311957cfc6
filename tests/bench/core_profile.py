"""Profile of the core's submit and dispatch paths: `python -m tests.bench.core_profile`.

For each database (SQLite file, PostgreSQL on DATABASE_URL_TEST), at a short and a long queue, it
counts the statements (round trips) of one submission, one claim of 4 jobs, one queue position
and one round of position reports, and times each (median of a few, no other load). A path whose
time grows with the queue scans it. Then 200 submissions at once: the statements and transactions
they took together (the group commit batches them) and the process's CPU per submission.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from sqlalchemy import event

from bot.backends.fake import FakeBackend
from bot.bootstrap import build_core
from bot.core.api import Actor, Place
from tests.bench.core_bench import fresh_pg
from tests.bench.stats import percentile

REPEAT = 7  # median of 7: stable enough to tell constant from linear
CONCURRENT = 200  # the submitters of core_bench's goals


class StatementLog:
    def __init__(self) -> None:
        self.statements: list[str] = []

    def __call__(self, conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        words = statement.split()
        head = words[0].upper() if words else "?"
        if head in ("BEGIN", "COMMIT", "ROLLBACK"):
            self.statements.append(head)
            return
        table = next((w.strip('"') for w in words[1:] if w.strip('"') in TABLE_NAMES), "")
        self.statements.append(f"{head} {table}".strip())


TABLE_NAMES = {"users", "jobs", "quota_usage", "quota_limits", "images", "audit_log"}


async def measure(log: StatementLog, op: Callable[[], Awaitable[Any]]) -> tuple[float, list[str]]:
    times, statements = [], []
    for _ in range(REPEAT):
        log.statements.clear()
        t0 = time.perf_counter()
        await op()
        times.append(time.perf_counter() - t0)
        statements = list(log.statements)
    return percentile(times, 50) * 1000, statements


async def profile(label: str, url: str, work: Path, depths: list[int]) -> list[tuple[Any, ...]]:
    rows: list[tuple[Any, ...]] = []
    for depth in depths:
        rows += await profile_at(label, url, work, depth)
    return rows


async def profile_at(label: str, url: str, work: Path, depth: int) -> list[tuple[Any, ...]]:
    rows: list[tuple[Any, ...]] = []
    config = {
        "database": {"url": url, "auto_migrate": True},
        "storage": {"dir": str(work / f"images-{label}-{depth}")},
        "quotas": {"daily_limit": 100_000},
        "bot": {"max_queued_jobs": 1_000_000, "default_steps": 1},
    }
    async with build_core(
        config, {}, backend=FakeBackend(progress_events=False), start_dispatcher=False
    ) as core:
        log = StatementLog()
        event.listen(core.db.engine.sync_engine, "before_cursor_execute", log)
        place = Place("bench", "guild", "channel")
        service = core.service
        n = 0

        async def submit(user: int) -> Any:
            nonlocal n
            n += 1
            actor = Actor("bench", f"user{user}", "")
            return await service.imagine(actor, place, f"p{n}", idempotency_key=f"{depth}-{n}")

        # Fill the queue (50 users), plus the jobs the claims below take: they claim at `depth`.
        await asyncio.gather(*[submit(i % 50) for i in range(depth + 4 * REPEAT)])
        last = await submit(7)
        submit_ms, submit_st = await measure(log, lambda: submit(999))
        pos_ms, pos_st = await measure(log, lambda: service.queue_position(last.id))
        report_ms, report_st = await measure(
            log, lambda: service.queue.positions_to_report(["bench"], only_new=False)
        )
        claims = service.claims

        async def claim() -> Any:
            got = await claims.claim_queued("profile", ["bench"], 4)
            assert len(got) == 4, got
            return got

        claim_ms, claim_st = await measure(log, claim)

        # The same submission from `CONCURRENT` submitters at once (each its own user): batched
        # by the group commit, so the statements per submission fall with the concurrency.
        log.statements.clear()
        t0, cpu = time.perf_counter(), time.process_time()
        await asyncio.gather(*[submit(100_000 + i) for i in range(CONCURRENT)])
        wall, cpu = time.perf_counter() - t0, time.process_time() - cpu
        together = list(log.statements)
        for name, ms, st in (
            ("submit", submit_ms, submit_st),
            ("claim 4", claim_ms, claim_st),
            ("queue_position", pos_ms, pos_st),
            ("positions_to_report", report_ms, report_st),
        ):
            rows.append((label, depth, name, ms, st))
        per = {
            "ms": wall * 1000,
            # A batch inserts its jobs in one statement (PostgreSQL's BEGIN is not a statement).
            "batches": together.count("INSERT jobs"),
            "cpu_ms_per_submit": cpu / CONCURRENT * 1000,
        }
        rows.append((label, depth, f"{CONCURRENT} submits at once", per, together))
    return rows


def summary(statements: list[str]) -> str:
    counts = Counter(s for s in statements if s not in ("BEGIN", "COMMIT", "ROLLBACK"))
    return ", ".join(f"{k} x{v}" if v > 1 else k for k, v in counts.items())


async def amain(args: argparse.Namespace) -> int:
    rows: list[tuple[Any, ...]] = []
    with tempfile.TemporaryDirectory(prefix="core-profile-") as tmp:
        work = Path(tmp)
        if args.db in ("sqlite", "both"):
            rows += await profile("sqlite", f"sqlite+aiosqlite:///{work / 'p.db'}", work, args.depths)
        if args.db in ("postgres", "both"):
            for depth in args.depths:  # a fresh database per depth: queues don't add up
                async with fresh_pg() as (url, why):
                    if url is None:
                        print(f"core profile: PostgreSQL skipped: {why}")
                        break
                    rows += await profile("postgres", url, work, [depth])
    print(f"\ncore profile: median of {REPEAT}, load average "
          f"{', '.join(f'{x:.1f}' for x in os.getloadavg())}")  # fmt: skip
    print("| db | queued | operation | ms | statements | what |\n|---|---:|---|---:|---:|---|")
    for label, depth, name, ms, st in rows:
        n = len([s for s in st if s not in ("BEGIN", "COMMIT", "ROLLBACK")])
        if isinstance(ms, dict):  # the concurrent submissions: totals, and per submission
            print(f"| {label} | {depth} | {name} | {ms['ms']:.0f} in all | {n} in all, "
                  f"{n / CONCURRENT:.2f} per submit, {ms['batches']} write transaction(s) | "
                  f"{summary(st)}; CPU {ms['cpu_ms_per_submit']:.2f} ms per submit |")  # fmt: skip
            continue
        print(f"| {label} | {depth} | {name} | {ms:.2f} | {n} | {summary(st)} |")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tests.bench.core_profile", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--db", choices=("sqlite", "postgres", "both"), default="both")
    parser.add_argument("--depths", type=int, nargs="+", default=[10, 1000])
    args = parser.parse_args(argv)
    with contextlib.suppress(KeyboardInterrupt):
        return asyncio.run(amain(args))
    return 130


if __name__ == "__main__":
    sys.exit(main())
