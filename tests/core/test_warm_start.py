"""Warm at start (`Submissions.warm_up`, `Dispatcher.first_round`): the core compiles its submit
path before the first users come, without keeping anything, and hands itself over once its
dispatcher has run its first round."""

from __future__ import annotations

import logging

from sqlalchemy import func, select

from bot.core.models import DispatcherHeartbeat, Job, QuotaUsage, User
from tests.core.helpers import ALICE, GUILD, running_core


async def counts(core) -> tuple[int, int, int]:  # noqa: ANN001
    async with core.db.read() as s:
        return tuple(  # type: ignore[return-value]
            [
                (await s.execute(select(func.count()).select_from(t))).scalar_one()
                for t in (Job, User, QuotaUsage)
            ]
        )


async def test_the_warm_up_keeps_nothing(db_url, tmp_path):
    async with running_core(db_url, tmp_path) as (core, _):
        assert await counts(core) == (0, 0, 0)
        await core.service.warm_up()  # again, by hand: still nothing
        assert await counts(core) == (0, 0, 0)
        view = await core.service.imagine(ALICE, GUILD, "the first real one", idempotency_key="k1")
        assert view.created and await counts(core) == (1, 1, 1)


async def test_a_failed_warm_up_is_logged_and_the_core_still_starts(
    sqlite_url, tmp_path, caplog, monkeypatch
):
    from bot.core.submit_batch import SubmitWriter

    async def broken(self, batch, **kwargs):  # noqa: ANN001, ANN202
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(SubmitWriter, "write", broken)
    with caplog.at_level(logging.WARNING, logger="bot.core"):
        async with running_core(sqlite_url, tmp_path, start=False) as (core, _):
            assert core.service is not None
    assert any(
        "warm-up failed" in r.getMessage() and "disk on fire" in r.getMessage() for r in caplog.records
    )


async def test_the_core_is_handed_over_after_the_dispatchers_first_round(db_url, tmp_path):
    async with running_core(db_url, tmp_path) as (core, _):
        # No waiting here: the first round (its heartbeat included) ran before the core came back.
        async with core.db.read() as s:
            owners = (await s.execute(select(DispatcherHeartbeat.owner))).scalars().all()
        assert owners == [core.dispatcher.owner]


def test_settle_heap_collects_start_up_garbage_then_freezes_the_rest() -> None:
    import gc
    import weakref

    from bot.bootstrap import settle_heap

    class Node:
        pass

    garbage = Node()
    garbage.me = garbage  # type: ignore[attr-defined] # a cycle: only the collector frees it
    dead = weakref.ref(garbage)
    del garbage
    try:
        settle_heap()
        assert dead() is None  # collected before the freeze, not frozen with the rest
        assert gc.get_freeze_count() > 0
    finally:
        gc.unfreeze()  # this test process builds many cores: keep them collectable
