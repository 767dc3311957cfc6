"""Takeover bench: `python -m tests.bench.takeover_bench` (part of `make bench`).

Two bot cores share one SQLite database with the default `[bot] lease_s` (60 s) and poll interval.
The first claims a job and then dies without a word (its dispatcher and its job are cancelled: no
release, no more beats or lease renewals, as after `kill -9` or a lost host). Prints how long the
second takes to start the job again, by heartbeat (bot/core/heartbeats.py), next to the lease it
would otherwise wait out. Same hostname and PID namespace or not makes no difference to it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
import tempfile
import time
from pathlib import Path

from bot.backends.fake import FakeBackend
from bot.bootstrap import build_core
from bot.core.api import Actor, JobView, Place, ResultImage


class QuietDelivery:
    """The Delivery protocol, doing nothing: the bench only watches the backends."""

    async def on_queued(self, job: JobView, position: int) -> None: ...
    async def on_progress(self, job: JobView, step: int, total: int) -> None: ...
    async def on_waiting(self, job: JobView, message: str) -> None: ...
    async def on_succeeded(self, job: JobView, images: list[ResultImage]) -> None: ...
    async def on_failed(self, job: JobView, message: str) -> None: ...


async def crash(dispatcher: object) -> None:
    """Stop a dispatcher as a killed process stops: nothing released, nothing renewed."""
    tasks = [dispatcher._main, *dispatcher._tasks.values()]  # type: ignore[attr-defined]
    for task in tasks:
        if task is not None:
            task.cancel()
    for task in tasks:
        if task is not None:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
    dispatcher._main = None  # type: ignore[attr-defined]
    dispatcher._tasks.clear()  # type: ignore[attr-defined]


async def one_round(workdir: Path, lease_s: float) -> float:
    config = {
        "database": {"url": f"sqlite+aiosqlite:///{workdir / 'bot.db'}", "auto_migrate": True},
        "storage": {"dir": str(workdir / "images")},
        "bot": {"lease_s": lease_s},
    }
    first, second = FakeBackend(), FakeBackend()
    first.hold()
    delivery = QuietDelivery()
    async with (
        build_core(config, {}, backend=first, dispatcher_owner="host:1:first") as a,
        build_core(config, {}, backend=second, dispatcher_owner="host:1:second") as b,
    ):
        a.service.register_delivery("bench", delivery)  # only the first one claims the job
        await a.service.imagine(Actor("bench", "u", "U"), Place("bench", "g", "c"), "x", idempotency_key="k")
        while not first.calls:  # noqa: ASYNC110 - the fake backend offers no event to wait on
            await asyncio.sleep(0.05)
        b.service.register_delivery("bench", delivery)
        await crash(a.dispatcher)
        crashed = time.monotonic()
        while not second.calls:  # noqa: ASYNC110 - as above; polled every 50 ms, well below the figure
            await asyncio.sleep(0.05)
        return time.monotonic() - crashed


async def amain(args: argparse.Namespace) -> int:
    times = []
    for r in range(args.rounds):
        with tempfile.TemporaryDirectory() as tmp:
            times.append(await one_round(Path(tmp), args.lease_s))
        print(f"  round {r + 1}: taken over after {times[-1]:.1f} s")
    print(
        f"takeover of a dead dispatcher's job: {min(times):.1f}-{max(times):.1f} s by heartbeat "
        f"({args.rounds} rounds; lease_s = {args.lease_s:g} s, which a lease alone would wait out)"
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--lease-s", type=float, default=60.0)
    parser.add_argument("--quick", action="store_true", help="one round")
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds = 1
    return asyncio.run(amain(args))


if __name__ == "__main__":
    sys.exit(main())
