"""Fuzzing the core's request parsing with Hypothesis: whatever an adapter passes in (prompt text and
flags, slash-command options, who and where, idempotency keys, delivery mappings), only the core's own
errors come out, and every submission that is accepted is a job row, charged once.

The examples are derandomized, so `make test` always tries the same ones; set IMAGINE_FUZZ_EXAMPLES
(e.g. 5000) to explore with fresh random ones.
"""

from __future__ import annotations

import asyncio
import math
import os
import random
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bot.config import BotConfig
from bot.core.api import Actor, BadParameters, CoreError, Place
from bot.core.params import MAX_N, MAX_SEED, Limits, ParsedPrompt, parse_prompt
from bot.core.validate import first_bad_char
from tests.core.helpers import running_core

EXPLORE = int(os.environ.get("IMAGINE_FUZZ_EXAMPLES", "0"))


def fuzz_settings(examples: int) -> settings:
    return settings(
        max_examples=EXPLORE or examples,
        derandomize=not EXPLORE,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
    )


# Text that has broken parsers and drivers before: control characters, NUL, lone surrogates, digits
# other than ASCII, numbers too large for a float or for int(), dashes phones put in for "--".
NASTY = st.sampled_from(
    [
        "\x00", "\ud800", "\udfff", "\x1b[31m", "\u202e", "\ufeff", "\u0663", "\u00b2", "1e400",
        "9" * 5000, "-1", "0", "nan", "inf", "3:2", "4:1", "1:5", "0:1", "\u2014ar", "\u2013no", "--",
        "--seed", "--steps", "--n", "--ar", "--no", "--guidance", "--bogus", "—seed", ":", "\n", "\t",
    ]
)  # fmt: skip
WORDS = st.one_of(st.text(max_size=12), NASTY)
PROMPTS = st.one_of(st.lists(WORDS, max_size=12).map(" ".join), st.text(max_size=3000))
OPTION_NAMES = st.one_of(
    st.sampled_from(["seed", "steps", "n", "ar", "guidance", "negative", "negative_prompt", "aspect",
                     "aspect_ratio", "no", "prompt", "bogus"]),
    st.text(max_size=8),
    st.integers(),
)  # fmt: skip
OPTION_VALUES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**80), max_value=2**80),
    st.integers(min_value=-5, max_value=200),
    st.just(10**400),
    st.floats(allow_nan=True, allow_infinity=True),
    WORDS,
    st.lists(st.integers(), max_size=2),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
)
OPTIONS = st.one_of(
    st.none(), st.dictionaries(OPTION_NAMES, OPTION_VALUES, max_size=4), st.lists(st.integers(), max_size=2)
)
IDS = st.one_of(
    st.text(alphabet="0123456789ABCDEFGHUWT", min_size=1, max_size=20), st.text(max_size=80), NASTY
)
JSONISH = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=20), NASTY),
    lambda inner: st.one_of(
        st.lists(inner, max_size=3),
        st.dictionaries(st.one_of(st.text(max_size=5), st.integers()), inner, max_size=3),
    ),
    max_leaves=8,
)
DELIVERIES = st.one_of(
    st.none(), st.dictionaries(st.text(max_size=8), JSONISH, max_size=4), st.text(max_size=5)
)

CONFIG = BotConfig()


def check_parsed(p: ParsedPrompt) -> None:
    assert p.prompt and len(p.prompt) <= CONFIG.max_prompt_chars
    assert len(p.negative_prompt) <= CONFIG.max_prompt_chars
    assert first_bad_char(p.prompt) is None and first_bad_char(p.negative_prompt) is None
    assert 1 <= p.n <= MAX_N and 1 <= p.steps <= Limits.of(CONFIG, None).max_steps
    assert math.isfinite(p.guidance) and 0 <= p.guidance <= 30
    assert 0 <= p.seed and p.seeds[-1] <= MAX_SEED
    assert p.width % 8 == 0 and p.height % 8 == 0 and p.width > 0 and p.height > 0
    assert max(p.width / p.height, p.height / p.width) <= 4.5


@fuzz_settings(1500)
@given(text=st.one_of(PROMPTS, st.none(), st.integers(), st.binary(max_size=5)), options=OPTIONS)
def test_flag_parsing_gives_parameters_or_a_named_refusal(text: Any, options: Any) -> None:
    try:
        parsed = parse_prompt(text, options, CONFIG, rng=random.Random(0))
    except BadParameters as e:
        assert isinstance(e.field, str) and e.field and e.message
        return
    check_parsed(parsed)


async def test_submissions_raise_only_core_errors_and_every_accepted_one_is_a_charged_job(db_url, tmp_path):
    """Submissions with fuzzed actors, places, keys, prompts, options and delivery mappings, on SQLite
    and PostgreSQL. Hypothesis runs in a worker thread and hands each call to this test's loop, where
    the real core runs."""
    loop = asyncio.get_running_loop()
    accepted: dict[int, tuple[str, int]] = {}  # job id -> (user id, images charged)
    refused: dict[str, int] = {}
    failures: list[BaseException] = []
    async with running_core(db_url, tmp_path, start=False, quotas={"daily_limit": 100_000}) as (core, _):

        def run(coro: Any) -> Any:
            return asyncio.run_coroutine_threadsafe(coro, loop).result(60)

        @fuzz_settings(200)
        @given(
            user=IDS,
            name=st.one_of(st.text(max_size=300), NASTY),
            guild=st.one_of(st.none(), IDS),
            channel=st.one_of(st.none(), IDS),
            text=PROMPTS,
            options=OPTIONS,
            key=st.one_of(st.uuids().map(str), IDS),
            delivery=DELIVERIES,
        )
        def submit(user, name, guild, channel, text, options, key, delivery) -> None:
            actor, place = Actor("discord", user, name), Place("discord", guild, channel)
            try:
                job = run(
                    core.service.imagine(actor, place, text, options, idempotency_key=key, delivery=delivery)
                )
            except CoreError as e:
                assert e.message and "Traceback" not in e.message
                refused[type(e).__name__] = refused.get(type(e).__name__, 0) + 1
                return
            assert job.state == "queued" and job.user_id == user
            if job.created:
                accepted[job.id] = (user, job.params.n)

        try:
            await asyncio.to_thread(submit)
        except BaseException as e:  # re-raised below with the loop free again
            failures.append(e)
        if failures:
            raise failures[0]
        # Nothing lost: every accepted submission is a queued job row, and each user was charged
        # exactly the images of their accepted jobs.
        for job_id, (user, n) in accepted.items():
            view = await core.service.get_job(job_id)
            assert (view.state, view.user_id, view.params.n) == ("queued", user, n)
        for user in {u for u, _ in accepted.values()}:
            used = (await core.service.quota(Actor("discord", user), Place("discord"))).used_today
            assert used == sum(n for u, n in accepted.values() if u == user)
        assert accepted and refused.get("BadParameters"), (len(accepted), refused)
