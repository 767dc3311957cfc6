"""Bot core benchmark: `python -m tests.bench.core_bench` (part of `make bench`).

200 concurrent submitters (one user each) submit jobs through `ImageService.imagine` while the
dispatcher runs them on the instant in-process FakeBackend and delivers them to a counting
delivery. Measured side by side on SQLite (a file) and PostgreSQL (a fresh database on
DATABASE_URL_TEST, default 127.0.0.1:5432; skipped with the reason if unreachable):

- submit latency p50 / p99 (the time an adapter waits for `imagine` to return: the moderation,
  quota reservation and job row transaction),
- submissions/s, and jobs/s end to end (from the first submission until the last result is
  delivered), with the backend costing nothing: this is the core's own overhead.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import sys
import tempfile
import time
import uuid
from pathlib import Path

from sqlalchemy import text
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import create_async_engine

from bot.backends.fake import FakeBackend
from bot.bootstrap import build_core
from bot.config import normalize_database_url
from bot.core.api import Actor, Place
from tests.bench.stats import percentile

PG_DEFAULT = "postgresql+asyncpg://postgres@127.0.0.1:5432/test"
SOLO_SUBMISSIONS = 50  # enough for a stable median of the uncontended submission
POOL_SIZE = int(os.environ.get("BENCH_POOL_SIZE", "10"))  # [database] pool_size default


class CountingDelivery:
    def __init__(self, expected: int):
        self.expected = expected
        self.delivered = 0
        self.failed = 0
        self.done = asyncio.Event()

    async def on_queued(self, job, position):  # noqa: ANN001 - Delivery protocol
        pass

    async def on_waiting(self, job, message):  # noqa: ANN001 - Delivery protocol
        pass

    async def on_progress(self, job, step, total):  # noqa: ANN001
        pass

    async def on_succeeded(self, job, images):  # noqa: ANN001
        self._count()

    async def on_failed(self, job, message):  # noqa: ANN001
        self.failed += 1
        self._count()

    def _count(self) -> None:
        self.delivered += 1
        if self.delivered >= self.expected:
            self.done.set()


async def run_one(
    label: str, url: str, workdir: Path, submitters: int, per_submitter: int, concurrency: int
) -> dict:
    total = submitters * per_submitter
    config = {
        "database": {"url": url, "auto_migrate": True, "pool_size": POOL_SIZE},
        "storage": {"dir": str(workdir / "images")},
        "quotas": {"daily_limit": max(per_submitter, SOLO_SUBMISSIONS)},
        # default_steps only shapes the fake's work (none); the core's cost does not depend on it.
        "bot": {
            "max_queued_jobs": max(total, SOLO_SUBMISSIONS) + 1,
            "dispatch_concurrency": concurrency,
            "default_steps": 1,
        },
    }
    delivery = CountingDelivery(total)
    latencies: list[float] = []
    async with build_core(config, {}, backend=FakeBackend(progress_events=False)) as core:
        core.service.register_delivery("bench", delivery)
        place = Place("bench", "guild", "channel")

        async def submitter(i: int) -> None:
            actor = Actor("bench", f"user{i}", f"User {i}")
            for k in range(per_submitter):
                t0 = time.perf_counter()
                await core.service.imagine(
                    actor, place, f"a bench prompt {i}-{k}", idempotency_key=f"{i}-{k}"
                )
                latencies.append(time.perf_counter() - t0)

        start = time.perf_counter()
        await asyncio.gather(*[submitter(i) for i in range(submitters)])
        submitted = time.perf_counter() - start
        await asyncio.wait_for(delivery.done.wait(), 600)
        elapsed = time.perf_counter() - start
    # The same submission alone (no other submitter, idle dispatcher): the cost of one transaction.
    solo: list[float] = []
    async with build_core(
        config, {}, backend=FakeBackend(progress_events=False), start_dispatcher=False
    ) as core:
        actor, place = Actor("bench", "solo", "Solo"), Place("bench", "guild", "channel")
        for k in range(SOLO_SUBMISSIONS):
            t0 = time.perf_counter()
            await core.service.imagine(actor, place, f"solo {k}", idempotency_key=f"solo-{k}")
            solo.append(time.perf_counter() - t0)
    return {
        "solo_p50_ms": percentile(solo, 50) * 1000,
        "db": label,
        "jobs": total,
        "failed": delivery.failed,
        "submit_p50_ms": percentile(latencies, 50) * 1000,
        "submit_p99_ms": percentile(latencies, 99) * 1000,
        "submits_per_s": total / submitted,
        "jobs_per_s": total / elapsed,
    }


async def pg_database() -> tuple[str | None, str]:
    admin = normalize_database_url(os.environ.get("DATABASE_URL_TEST", PG_DEFAULT))
    name = f"imagine_bench_{uuid.uuid4().hex[:10]}"
    engine = create_async_engine(admin, isolation_level="AUTOCOMMIT")
    try:
        async with engine.connect() as conn:
            await asyncio.wait_for(conn.execute(text(f'CREATE DATABASE "{name}"')), 10)
    except Exception as e:  # noqa: BLE001 - report and skip
        return (
            None,
            f"PostgreSQL not reachable at {make_url(admin).render_as_string(hide_password=True)}: {e!r}",
        )
    finally:
        await engine.dispose()
    return make_url(admin).set(database=name).render_as_string(hide_password=False), ""


async def drop_pg(url: str) -> None:
    admin = normalize_database_url(os.environ.get("DATABASE_URL_TEST", PG_DEFAULT))
    engine = create_async_engine(admin, isolation_level="AUTOCOMMIT")
    try:
        async with engine.connect() as conn:
            await conn.execute(text(f'DROP DATABASE IF EXISTS "{make_url(url).database}" WITH (FORCE)'))
    finally:
        await engine.dispose()


async def amain(args: argparse.Namespace) -> int:
    results = []
    with tempfile.TemporaryDirectory(prefix="core-bench-") as tmp:
        work = Path(tmp)
        if args.db in ("sqlite", "both"):
            results.append(
                await run_one(
                    "sqlite", f"sqlite+aiosqlite:///{work / 'bench.db'}", work / "s", args.submitters, args.jobs,
                    args.concurrency,
                )
            )  # fmt: skip
        if args.db in ("postgres", "both"):
            url, why = await pg_database()
            if url is None:
                print(f"core bench: PostgreSQL skipped: {why}")
            else:
                try:
                    results.append(
                        await run_one(
                            "postgres", url, work / "p", args.submitters, args.jobs, args.concurrency
                        )
                    )
                finally:
                    await drop_pg(url)
    print(
        f"\ncore bench: {args.submitters} concurrent submitters x {args.jobs} jobs, instant FakeBackend, "
        f"dispatch_concurrency {args.concurrency}, {os.cpu_count()} CPUs, "
        f"load average {', '.join(f'{x:.1f}' for x in os.getloadavg())}"
    )
    print(
        f"{'db':<10}{'jobs':>6}{'submit p50 ms':>15}{'submit p99 ms':>15}{'submits/s':>11}{'jobs/s':>9}"
        f"{'solo submit p50 ms':>20}"
    )
    for r in results:
        print(
            f"{r['db']:<10}{r['jobs']:>6}{r['submit_p50_ms']:>15.1f}{r['submit_p99_ms']:>15.1f}"
            f"{r['submits_per_s']:>11.0f}{r['jobs_per_s']:>9.0f}{r['solo_p50_ms']:>20.1f}"
            + (f"  ({r['failed']} failed!)" if r["failed"] else "")
        )
    if len(results) == 2:
        s, p = results
        print(f"postgres / sqlite: jobs/s x{p['jobs_per_s'] / s['jobs_per_s']:.2f}, "
              f"submit p50 x{p['submit_p50_ms'] / s['submit_p50_ms']:.2f}")  # fmt: skip
    return 1 if any(r["failed"] for r in results) else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tests.bench.core_bench", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--submitters", type=int, default=200, help="concurrent submitters (default 200)")
    parser.add_argument("--jobs", type=int, default=5, help="jobs per submitter (default 5)")
    parser.add_argument("--concurrency", type=int, default=4, help="[bot] dispatch_concurrency (default 4)")
    parser.add_argument("--db", choices=("sqlite", "postgres", "both"), default="both")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    with contextlib.suppress(KeyboardInterrupt):
        return asyncio.run(amain(args))
    return 130


if __name__ == "__main__":
    sys.exit(main())
