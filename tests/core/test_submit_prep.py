"""The submission's preparation made cheap without changing what it decides: `validate.ident` and
`validate.label` answer on their fast paths exactly as their full checks do, `split_flags` without a
flag marker as with one, and the place rules' shared read answers every caller that asked while it
ran (one read for a burst), each caller on its own: one that gives up leaves the others waiting,
and a read that fails fails those callers alone; rows just read answer the next asks for
RULES_FRESH_S unless a change was made here since the read began, and the submit transaction
enforces another process's change at once; a job's view made without the dataclasses' __init__
is the constructor's."""

from __future__ import annotations

import asyncio
import datetime as dt
import unicodedata
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sqlalchemy import event

from bot.core import validate
from bot.core.api import BadParameters, ChannelDefaults, NotAllowedHere, Place
from bot.core.params import _FLAG_RE, split_flags
from tests.core.helpers import ADMIN, running_core

TEXT = st.one_of(
    st.text(max_size=40),
    st.text(alphabet=st.characters(max_codepoint=0x200), max_size=20),
    st.sampled_from(["123456789012345678", "U0123ABC", "a b", "a\tb", "\x00", "x\ud800", "é", "", "!~"]),
)


def reference_ident(value: str, max_chars: int) -> bool:
    """`ident`'s rule spelled out: non-empty, at most `max_chars`, no whitespace or control
    character or lone surrogate."""
    return (
        bool(value) and len(value) <= max_chars and validate.first_bad_char(value, allow_space=False) is None
    )


@settings(max_examples=400, derandomize=True, database=None, deadline=None)
@given(TEXT, st.sampled_from([1, 8, 200]))
def test_ident_accepts_exactly_what_its_rule_accepts(value: str, max_chars: int) -> None:
    if reference_ident(value, max_chars):
        assert validate.ident("user", value, max_chars=max_chars) == value
    else:
        with pytest.raises(BadParameters) as e:
            validate.ident("user", value, max_chars=max_chars)
        assert e.value.field == "user"


@settings(max_examples=400, derandomize=True, database=None, deadline=None)
@given(TEXT)
def test_label_drops_control_characters_and_surrogates_and_collapses_spaces(value: str) -> None:
    kept = "".join(ch for ch in value if unicodedata.category(ch) not in ("Cc", "Cs"))
    assert validate.label(value, max_chars=12) == " ".join(kept.split())[:12]


@settings(max_examples=400, derandomize=True, database=None, deadline=None)
@given(
    st.one_of(
        TEXT, st.lists(st.sampled_from(["a", " ", "--n", "2", "\u2014seed", "\u20133", "-"])).map("".join)
    )
)
def test_split_flags_fast_path_agrees_with_the_flag_search(text: str) -> None:
    try:
        prompt, flags = split_flags(text)
    except BadParameters:
        assert _FLAG_RE.search(text) is not None  # only a flag can be refused
        return
    if _FLAG_RE.search(text) is None:
        assert (prompt, flags) == (" ".join(text.split()), {})


def test_ident_still_takes_numeric_ids_and_refuses_non_text() -> None:
    assert validate.ident("guild", 123456789012345678) == "123456789012345678"
    for bad in (None, True, 1.5, b"abc", ""):
        with pytest.raises(BadParameters):
            validate.ident("guild", bad)


class Reads:
    """The channel-settings reads a database sees."""

    def __init__(self, engine: Any) -> None:
        self.count = 0
        self.engine = engine.sync_engine

    def __enter__(self) -> Reads:
        event.listen(self.engine, "before_cursor_execute", self._seen)
        return self

    def __exit__(self, *exc: object) -> None:
        event.remove(self.engine, "before_cursor_execute", self._seen)

    def _seen(self, conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if "FROM channel_settings" in statement:
            self.count += 1


GUILD1 = Place("discord", "guild1", "art")


async def test_a_burst_of_rule_asks_shares_one_read_and_a_later_ask_reads_again(db_url, tmp_path):
    async with running_core(db_url, tmp_path) as (core, _):
        places = core.service.places
        await core.service.allow_channels(ADMIN, Place("discord", "guild1", "x"), ["art"])
        with Reads(core.db.engine) as reads:
            rules = await asyncio.gather(
                *[places.rules(Place("discord", "guild1", "art" if i % 2 else "bots")) for i in range(50)]
            )
            assert reads.count == 1
            assert [r.allowed for r in rules] == [i % 2 == 1 for i in range(50)]
            assert all(r.allowed_channels == ("art",) for r in rules)
            # A change made after the read is seen by the next ask: it reads again.
            await core.service.allow_channels(ADMIN, GUILD1, ["art", "bots"])
            before = reads.count
            assert (await places.rules(Place("discord", "guild1", "bots"))).allowed
            assert reads.count == before + 1
            with pytest.raises(NotAllowedHere):
                await places.with_defaults(Place("discord", "guild1", "elsewhere"), "a fox", None)


async def test_a_caller_that_gives_up_leaves_the_others_their_answer(db_url, tmp_path):
    async with running_core(db_url, tmp_path) as (core, _):
        places = core.service.places
        first = asyncio.ensure_future(places.rules(GUILD1))
        others = [asyncio.ensure_future(places.rules(GUILD1)) for _ in range(5)]
        await asyncio.sleep(0)  # all of them waiting on the one read
        first.cancel()
        answers = await asyncio.gather(*others)
        assert all(a.allowed for a in answers)
        assert first.cancelled()
        assert places._reading == {}  # nothing left behind for the next caller


async def test_a_failed_read_fails_its_callers_and_the_next_ask_reads_again(db_url, tmp_path, monkeypatch):
    async with running_core(db_url, tmp_path) as (core, _):
        places = core.service.places
        real = places._read_rows
        calls = 0

        async def failing_once(platform: str, guild_id: str) -> Any:
            nonlocal calls
            calls += 1
            if calls == 1:
                raise RuntimeError("the database went away")
            return await real(platform, guild_id)

        monkeypatch.setattr(places, "_read_rows", failing_once)
        outcomes = await asyncio.gather(*[places.rules(GUILD1) for _ in range(3)], return_exceptions=True)
        assert [type(o) for o in outcomes] == [RuntimeError] * 3
        assert (await places.rules(GUILD1)).allowed
        assert calls == 2


def test_a_view_made_without_the_constructor_is_the_constructors_view() -> None:
    import dataclasses
    import datetime as dt
    from types import SimpleNamespace

    from bot.core.api import JobParams, JobView
    from bot.core.views import view_of

    job = SimpleNamespace(
        id=7, kind="imagine", state="queued", platform="discord", guild_id="g", channel_id=None,
        prompt="a fox", negative_prompt="blur", seed=3, seeds=[3, 4], parent_job_id=None,
        parent_image_index=None, error=None, created_at=dt.datetime(2026, 12, 3, tzinfo=dt.UTC),
        started_at=None, finished_at=None, result_message_id="m1", delivery={"token": "t"},
        attempts=1, model=None, loras=[{"name": "ink", "weight": 0.5}],
        params={"width": 64, "height": 96, "steps": 4, "guidance": 3, "n": 2, "task": "txt2img",
                "aspect_ratio": "2:3", "private": True, "model": "old-upscaler"},
    )  # fmt: skip
    view = view_of(job, "alice", "Alice", created=False)
    for made in (view, view.params):
        names = {f.name for f in dataclasses.fields(made)}
        assert set(vars(made)) == names  # every field, nothing else
        rebuilt = type(made)(**{name: getattr(made, name) for name in names})
        assert rebuilt == made
    assert hash(view.params) == hash(
        JobParams(**{f.name: getattr(view.params, f.name) for f in dataclasses.fields(JobParams)})
    )
    assert isinstance(view.params, JobParams) and isinstance(view, JobView)
    assert view.params.model == "old-upscaler" and view.params.loras[0].weight == 0.5 and view.private
    with pytest.raises(dataclasses.FrozenInstanceError):
        view.state = "running"  # type: ignore[misc]
    assert dataclasses.replace(view, state="running").state == "running"


async def test_rows_just_read_answer_the_next_asks_for_a_moment_and_a_change_here_ends_that(
    db_url, tmp_path, monkeypatch
):
    from bot.core import place_settings

    async with running_core(db_url, tmp_path) as (core, _):
        places = core.service.places
        with Reads(core.db.engine) as reads:
            first = await places.rules(GUILD1)
            again = await places.rules(GUILD1)  # within RULES_FRESH_S of the read: no read of its own
            assert reads.count == 1
            assert again is first  # made once per read and channel (frozen, so shared)
            assert (await places.rules(Place("discord", "guild1", "bots"))) is not first
            await core.service.set_channel_defaults(ADMIN, GUILD1, "art", ChannelDefaults(aspect_ratio="3:2"))
            assert (await places.rules(GUILD1)).defaults.aspect_ratio == "3:2"  # read again at once
            before, window = reads.count, place_settings.RULES_FRESH_S
            await asyncio.sleep(window * 1.5)
            await places.rules(GUILD1)  # the window has passed: read again
            assert reads.count == before + 1
            monkeypatch.setattr(place_settings, "RULES_FRESH_S", 0.0)
            await asyncio.sleep(window * 1.5)
            await places.rules(GUILD1)
            await places.rules(GUILD1)
            assert reads.count == before + 3  # no window: every ask reads


async def test_a_read_that_a_change_overtook_does_not_answer_later_asks(db_url, tmp_path):
    async with running_core(db_url, tmp_path) as (core, _):
        places = core.service.places
        real = places._read_rows
        release = asyncio.Event()

        async def slow(platform: str, guild_id: str) -> Any:
            rows = await real(platform, guild_id)  # read before the change below commits
            await release.wait()
            return rows

        places._read_rows = slow  # type: ignore[method-assign]
        old = asyncio.ensure_future(places.rules(GUILD1))
        await asyncio.sleep(0.05)
        places._read_rows = real  # type: ignore[method-assign]
        await core.service.allow_channels(ADMIN, GUILD1, ["bots"])
        release.set()
        assert (await old).allowed  # its read began before the change: it answers its own caller
        assert not (await places.rules(GUILD1)).allowed  # but not the next one


async def test_another_process_change_is_enforced_by_the_submit_transaction_at_once(db_url, tmp_path):
    from tests.core.helpers import ALICE

    async with (
        running_core(db_url, tmp_path / "a", start=False) as (core_a, _),
        running_core(db_url, tmp_path / "b", start=False) as (core_b, _),
    ):
        art = Place("discord", "guild1", "art")
        await core_a.service.imagine(ALICE, art, "a fox", idempotency_key="k1")  # rows read, fresh
        await core_b.service.allow_channels(ADMIN, art, ["bots"])
        with pytest.raises(NotAllowedHere):  # core_a's rows are stale; its transaction is not
            await core_a.service.imagine(ALICE, art, "a fox", idempotency_key="k2")


@settings(max_examples=300, derandomize=True, database=None, deadline=None)
@given(
    st.datetimes(
        timezones=st.sampled_from(
            [dt.UTC, dt.timezone(dt.timedelta(hours=-7)), dt.timezone(dt.timedelta(hours=5, minutes=30))]
        )
    )
)
def test_utc_datetimes_go_to_sqlite_as_sqlalchemy_would_write_them(when: dt.datetime) -> None:
    from sqlalchemy.dialects import sqlite
    from sqlalchemy.types import TypeDecorator

    from bot.core.models import UTCDateTime

    dialect = sqlite.dialect()
    column_type = UTCDateTime().dialect_impl(dialect)
    fast = column_type.bind_processor(dialect)
    stock = TypeDecorator.bind_processor(column_type, dialect)  # process_bind_param, then SQLAlchemy's
    try:
        expected = stock(when)
    except OverflowError:  # beyond year 9999 or before 1 in UTC: refused both ways
        with pytest.raises(OverflowError):
            fast(when)
        return
    assert fast(when) == expected
    with pytest.raises(ValueError, match="naive"):
        fast(when.replace(tzinfo=None))
