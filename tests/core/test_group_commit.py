"""The group commit on its own (no database): who shares a batch, and whose error is whose."""

from __future__ import annotations

import asyncio

import pytest

from bot.core.api import DatabaseError
from bot.core.group_commit import GroupCommit


async def settle() -> None:
    """Let the tasks started so far run up to their next wait (the caller, then the drainer)."""
    for _ in range(5):
        await asyncio.sleep(0)


async def test_what_arrives_while_a_batch_runs_is_the_next_batch_and_errors_stay_their_own():
    batches: list[list[int]] = []
    gate = asyncio.Event()

    async def run(items: list[int]) -> list[int | BaseException]:
        batches.append(items)
        await gate.wait()
        return [ValueError(f"odd {i}") if i % 2 else i * 10 for i in items]

    group: GroupCommit[int, int] = GroupCommit("test", run, max_batch=3)
    first = asyncio.ensure_future(group(0))
    await settle()  # the first item goes at once, alone
    assert batches == [[0]]
    rest = [asyncio.ensure_future(group(i)) for i in range(1, 6)]
    gate.set()
    assert await first == 0
    outcomes = await asyncio.gather(*rest, return_exceptions=True)
    assert batches == [[0], [1, 2, 3], [4, 5]]  # at most max_batch at a time
    assert [o if isinstance(o, int) else str(o) for o in outcomes] == ["odd 1", 20, "odd 3", 40, "odd 5"]


async def test_a_failed_batch_fails_each_of_its_callers_and_the_next_batch_runs():
    calls = 0

    async def run(items: list[str]) -> list[str]:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("the database went away")
        return [item.upper() for item in items]

    group: GroupCommit[str, str] = GroupCommit("test", run, max_batch=10)
    with pytest.raises(RuntimeError, match="went away"):
        await group("a")
    assert await group("b") == "B"


async def test_a_caller_cancelled_before_its_batch_starts_is_left_out():
    seen: list[list[int]] = []
    gate = asyncio.Event()

    async def run(items: list[int]) -> list[int]:
        seen.append(items)
        await gate.wait()
        return items

    group: GroupCommit[int, int] = GroupCommit("test", run, max_batch=10)
    first = asyncio.ensure_future(group(1))
    await settle()
    gone = asyncio.ensure_future(group(2))
    kept = asyncio.ensure_future(group(3))
    await settle()
    gone.cancel()
    gate.set()
    assert (await first, await kept) == (1, 3)
    assert seen == [[1], [3]]


async def test_a_row_the_database_refuses_fails_its_caller_alone():
    """A batch whose transaction fails as a whole is tried in halves down to the item that fails it:
    one caller's bad row never fails the others queued beside it."""
    batches: list[list[int]] = []
    gate = asyncio.Event()

    async def run(items: list[int]) -> list[int]:
        batches.append(items)
        await gate.wait()
        if 13 in items:
            raise DatabaseError("value out of range")  # the whole transaction rolled back
        return [i * 10 for i in items]

    group: GroupCommit[int, int] = GroupCommit("test", run, max_batch=10)
    first = asyncio.ensure_future(group(0))
    await settle()
    rest = [asyncio.ensure_future(group(i)) for i in (11, 12, 13, 14, 15)]
    gate.set()
    assert await first == 0
    outcomes = await asyncio.gather(*rest, return_exceptions=True)
    assert [o if isinstance(o, int) else str(o) for o in outcomes] == [
        110,
        120,
        "value out of range",
        140,
        150,
    ]
    assert batches[1] == [11, 12, 13, 14, 15]  # tried together first
    assert [13] in batches  # and the bad one ends up alone
    assert len(batches) <= 1 + 2 * 5 - 1  # at most a binary split's worth of tries


async def test_a_database_that_is_not_answering_fails_the_batch_at_once():
    calls: list[list[str]] = []
    gate = asyncio.Event()

    async def run(items: list[str]) -> list[str]:
        calls.append(items)
        await gate.wait()
        raise DatabaseError("The bot's database is not answering", "unavailable")

    group: GroupCommit[str, str] = GroupCommit("test", run, max_batch=10)
    first = asyncio.ensure_future(group("a"))
    await settle()
    rest = [asyncio.ensure_future(group(x)) for x in "bcd"]
    gate.set()
    outcomes = await asyncio.gather(first, *rest, return_exceptions=True)
    assert all(isinstance(o, DatabaseError) and o.kind == "unavailable" for o in outcomes)
    assert calls == [["a"], ["b", "c", "d"]]  # no retries piece by piece
