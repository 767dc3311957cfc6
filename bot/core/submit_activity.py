"""Submissions first: dispatchers wait while submissions are pouring in.

A submission is what a user waits on ("queued, position N" within tens of milliseconds); a claim
of the next jobs is not: a job claimed a fraction of a second later starts that much later, on
a backend that takes seconds per image. In one process both share one event loop (and on SQLite
one write lock), so during a burst of submissions the dispatcher's work (claims, results,
deliveries, position reports) would take turns with the submissions and double their latency.
`SubmitActivity` counts the submissions in progress (from the entry point's call to its answer,
the parameter checks included); the dispatcher's next round waits until none is, for at most
`SUBMISSIONS_FIRST_S`, so dispatch is deferred, never starved: a storm of submissions that never
pauses still lets the dispatcher claim once per that interval, a full round of its slots.

Dispatchers of other processes (PostgreSQL) compete for the machine's cores rather than for one
event loop. They learn of a storm from the notification that wakes them: a batch of submissions
committed while its process has started more than `STORM_SUBMISSIONS` within `STORM_WINDOW_S`
says so in the payload (`STORM`), and a dispatcher that heard one within `STORM_HOLD_S` waits as
above. A lone submission, or ordinary traffic, wakes them to claim at once as before.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, ParamSpec, TypeVar

T = TypeVar("T")
P = ParamSpec("P")

# The longest a dispatcher round waits for the process's submissions to pause. Long enough for a
# burst (1000 submissions take ~0.2 s of one core), short against a job's own seconds on a GPU.
SUBMISSIONS_FIRST_S = 0.5
# A storm: more than STORM_SUBMISSIONS started within STORM_WINDOW_S (200 a second) in one process.
# A chat server's ordinary traffic is a few a second; an announcement's burst is hundreds.
STORM_WINDOW_S = 0.1
STORM_SUBMISSIONS = 20
# The payload of a notification sent during a storm (`bot.core.fair_queue`).
STORM = "storm"
# How long a dispatcher keeps deferring after a storm's notification: longer than the gap between
# a storm's batches (tens of milliseconds), so that it does not claim between two of them.
STORM_HOLD_S = 0.15


class SubmitActivity:
    def __init__(self) -> None:
        self._in_progress = 0
        self._waiters: list[asyncio.Future[None]] = []
        self._starts: deque[float] = deque(maxlen=STORM_SUBMISSIONS)

    def storming(self) -> bool:
        """This process is taking a storm of submissions (see STORM_SUBMISSIONS)."""
        starts = self._starts
        return len(starts) == STORM_SUBMISSIONS and time.monotonic() - starts[0] < STORM_WINDOW_S

    @property
    def busy(self) -> bool:
        return self._in_progress > 0

    @property
    def waiting(self) -> int:
        """Dispatcher rounds waiting for the submissions to pause."""
        return len(self._waiters)

    def counted(self, fn: Callable[P, Awaitable[T]]) -> Callable[P, Coroutine[Any, Any, T]]:
        """`fn` (an entry point that creates a job), counted while it runs."""

        @functools.wraps(fn)
        async def wrapper(*args: P.args, **kwargs: P.kwargs) -> T:
            self._starts.append(time.monotonic())
            self._in_progress += 1
            try:
                return await fn(*args, **kwargs)
            finally:
                self._in_progress -= 1
                if not self._in_progress:
                    waiters, self._waiters = self._waiters, []
                    for waiter in waiters:
                        if not waiter.done():
                            waiter.set_result(None)

        return wrapper

    async def quiet(self, within_s: float) -> None:
        """Return when no submission is in progress, or after `within_s` at the latest."""
        if not self._in_progress:
            return
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            await asyncio.wait_for(asyncio.shield(waiter), within_s)
        except TimeoutError:
            pass
        finally:
            if waiter in self._waiters:
                self._waiters.remove(waiter)
