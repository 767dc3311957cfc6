"""Group commit: concurrent callers' writes of one kind share a transaction.

A transaction costs a few round trips whatever it writes (and on SQLite the one write lock, which
every writer of the process waits for in turn), so 200 callers each committing their own row spend
nearly all their time waiting for one another. Here each caller queues its item and waits; one
task takes everything queued, runs it as a batch in one transaction, and hands each caller its
own outcome: its result, or its own error (a refusal of one item never fails another). When the
batch's transaction fails as a whole, it is split in halves and each half tried again, down to the
one item the database refused: one caller's row that the database will not take (a value it
rejects, a constraint) fails that caller alone. A database that is not answering fails the whole
batch at once instead: trying it again piece by piece would only keep every caller waiting longer.

Nobody waits for a batch to fill: the first caller's item goes at once, and whatever arrives
while a batch is in the database is the next batch. Under no load a call costs what it did alone;
under load the batches grow and the cost per item falls.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, TypeVar

from bot.core.api import DatabaseError

log = logging.getLogger("bot.core.group_commit")

T = TypeVar("T")
R = TypeVar("R")


class GroupCommit(Generic[T, R]):
    """`await group(item)` runs `item` in the next batch of `run`, which returns one outcome per
    item, in order: a result, or an exception to raise to that item's caller."""

    def __init__(
        self,
        name: str,
        run: Callable[[list[T]], Awaitable[Sequence[R | BaseException]]],
        *,
        max_batch: int,
    ):
        self.name = name
        self.run = run
        self.max_batch = max_batch
        self._pending: list[tuple[T, asyncio.Future[R]]] = []
        self._drainer: asyncio.Task[None] | None = None

    async def __call__(self, item: T) -> R:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[R] = loop.create_future()
        self._pending.append((item, future))
        drainer = self._drainer
        if drainer is None or drainer.done() or drainer.get_loop() is not loop:
            # Started on demand and gone when the queue is empty: nothing to start or stop.
            self._drainer = asyncio.create_task(self._drain(), name=f"group commit {self.name}")
        return await future

    async def _drain(self) -> None:
        loop = asyncio.get_running_loop()
        while self._pending:
            batch = self._pending[: self.max_batch]
            del self._pending[: self.max_batch]
            # A caller that gave up (cancelled) before its batch started has nothing written; one
            # of an event loop that has ended (a test's) has nobody waiting.
            batch = [(item, f) for item, f in batch if not f.done() and f.get_loop() is loop]
            if not batch:
                continue
            await self._settle(batch)

    async def _settle(self, batch: list[tuple[T, asyncio.Future[R]]]) -> None:
        batch = [(item, f) for item, f in batch if not f.done()]  # a half's caller may have left
        if not batch:
            return
        try:
            outcomes = await self.run([item for item, _ in batch])
        except asyncio.CancelledError:
            for _, future in batch:
                future.cancel()
            raise
        except Exception as e:  # noqa: BLE001 - the batch's error is its callers' error
            if len(batch) > 1 and not _unavailable(e):
                # The whole transaction was rolled back, so each half runs as if it came alone.
                log.info("%s: a batch of %d failed (%s); trying it in halves", self.name, len(batch), e)
                half = len(batch) // 2
                await self._settle(batch[:half])
                await self._settle(batch[half:])
                return
            for _, future in batch:
                if not future.done():
                    future.set_exception(e)
            return
        assert len(outcomes) == len(batch), f"{self.name}: {len(outcomes)} outcomes for {len(batch)}"
        for (_, future), outcome in zip(batch, outcomes, strict=True):
            if future.done():
                continue
            if isinstance(outcome, BaseException):
                future.set_exception(outcome)
            else:
                future.set_result(outcome)


def _unavailable(error: BaseException) -> bool:
    """The database is not answering (every item would fail the same way), as the core's
    DatabaseError says it."""
    return isinstance(error, DatabaseError) and error.kind == "unavailable"
