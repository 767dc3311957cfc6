"""The submit and dispatch paths apart: `python -m tests.bench.core_paths`.

`core_bench` runs submitters and dispatchers together on one machine, so its submit latency is
also the dispatchers' CPU. Here each path runs alone, on SQLite (a file) and PostgreSQL (a fresh
database on DATABASE_URL_TEST), with the process's CPU time per job:

- submit: closed-loop submitters (one user each, 5 jobs each), no dispatcher, after one warm-up
  submission; submit p50/p99, the p99 of each submitter's second job on (the first wave creates
  its 200 users and their quota rows, and before the core warmed up at start it also paid the
  process's first compile of each statement: with 5 jobs each it is a fifth of the submissions
  and can set the p99), and CPU per submission;
- dispatch: the jobs those submitters queued, then the dispatcher started (64 slots, the instant
  backend of `core_bench`, in-process) until every job is delivered; jobs/s, CPU and commits per job.
  "CPU ms/job" is the whole process's; "loop CPU ms/job" the event loop's thread alone, the
  dispatcher's own work: the rest is the threads that write the image files and (SQLite) run the
  database, whose kernel time for a file creation varies tenfold with the machine and the
  directory (`$TMPDIR`), while the loop's figure moves little with the machine's load.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from sqlalchemy import event

from bot.bootstrap import build_core
from bot.core.api import Actor, Place
from tests.bench.core_bench import (
    CountingDelivery,
    InstantBackend,
    bench_config,
    closed_loop_submits,
    database,
)
from tests.bench.stats import percentile

JOBS_EACH = 5


async def run(url: str, workdir: Path, submitters: int) -> dict[str, Any]:
    total = submitters * JOBS_EACH
    config = bench_config(url, workdir, total + 1, JOBS_EACH, 64)
    backend = InstantBackend(progress_events=False)
    async with build_core(config, {}, backend=backend, start_dispatcher=False) as core:
        place = Place("bench", "guild", "channel")
        await core.service.imagine(Actor("bench", "warm", "W"), place, "warm", idempotency_key="warm")
        cpu = time.process_time()
        each = await closed_loop_submits(core, submitters, JOBS_EACH)
        submit_cpu = time.process_time() - cpu
        latencies = [t for mine in each for t in mine]
        later = [t for mine in each for t in mine[1:]]  # the first batch's cold start left out

        commits = [0]
        event.listen(core.db.engine.sync_engine, "commit", lambda _: commits.__setitem__(0, commits[0] + 1))
        delivery = CountingDelivery(total + 1)
        core.service.register_delivery("bench", delivery)
        cpu, loop_cpu, start = time.process_time(), time.thread_time(), time.perf_counter()
        core.dispatcher.start()
        await asyncio.wait_for(delivery.done.wait(), 600)
        elapsed = time.perf_counter() - start
        dispatch_cpu = time.process_time() - cpu
        dispatch_loop_cpu = time.thread_time() - loop_cpu
    return {
        "submit_p50_ms": percentile(latencies, 50) * 1000,
        "submit_p99_ms": percentile(latencies, 99) * 1000,
        "later_p99_ms": percentile(later, 99) * 1000,
        "submit_cpu_ms": submit_cpu / total * 1000,
        "dispatch_jobs_s": (total + 1) / elapsed,
        "dispatch_cpu_ms": dispatch_cpu / (total + 1) * 1000,
        "dispatch_loop_cpu_ms": dispatch_loop_cpu / (total + 1) * 1000,
        "commits_per_job": commits[0] / (total + 1),
    }


async def amain(args: argparse.Namespace) -> int:
    print(f"{'db':<10}{'submitters':>11}{'submit p50 ms':>15}{'submit p99 ms':>15}{'p99, 2nd on':>13}{'CPU ms/submit':>15}"
          f"{'dispatch jobs/s':>17}{'CPU ms/job':>12}{'loop CPU ms/job':>17}{'commits/job':>13}")  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="core-paths-") as tmp:
        for n, submitters in enumerate(args.submitters):
            for db in ("sqlite", "postgres"):
                async with database(db, Path(tmp) / f"paths{n}.db") as url:
                    if url is None:
                        continue
                    r = await run(url, Path(tmp) / f"{db}{n}", submitters)
                print(f"{db:<10}{submitters:>11}{r['submit_p50_ms']:>15.1f}{r['submit_p99_ms']:>15.1f}{r['later_p99_ms']:>13.1f}"
                      f"{r['submit_cpu_ms']:>15.3f}{r['dispatch_jobs_s']:>17.0f}{r['dispatch_cpu_ms']:>12.2f}"
                      f"{r['dispatch_loop_cpu_ms']:>17.2f}{r['commits_per_job']:>13.2f}", flush=True)  # fmt: skip
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"{os.cpu_count()} CPUs, load average {load} after")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tests.bench.core_paths", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--submitters", type=int, nargs="+", default=[200, 1000])
    return asyncio.run(amain(parser.parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
