"""Reactions on results: variations and re-rolls for whoever reacts, everything else ignored."""

from __future__ import annotations

import asyncio

from bot.core.api import Actor
from tests.discord.fake_discord import FakeDiscord
from tests.discord.harness import App, app_config, image_size, result_job, wait_result


def actor(user) -> Actor:
    return Actor("discord", str(user.id), user.username)


async def test_reactions_start_a_variation_and_a_reroll(fake_discord: FakeDiscord, tmp_path):
    alice, bob = fake_discord.user("alice"), fake_discord.user("bob")
    async with App(fake_discord, app_config(tmp_path, fake_discord)) as app:
        rec = await fake_discord.slash("imagine", alice, {"prompt": "a castle", "count": 4, "seed": 10})
        result = await wait_result(fake_discord, rec)
        mid = int(result["id"])
        await result_job(app, result)

        await fake_discord.react(mid, "2️⃣", bob)
        variation = await fake_discord.wait_for(
            lambda: [m for m in fake_discord.channel_messages() if m["attachments"]], what="variation result"
        )
        await fake_discord.react(mid, "🔁", bob)
        both = await fake_discord.wait_for(
            lambda: (lambda ms: ms if len(ms) == 2 else None)(
                [m for m in fake_discord.channel_messages() if m["attachments"]]
            ),
            what="re-roll result",
        )
        jobs = {m["id"]: await result_job(app, m) for m in both}
        bob_quota = await app.service.quota(actor(bob), _place(fake_discord))
        alice_quota = await app.service.quota(actor(alice), _place(fake_discord))
        await fake_discord.wait_for(
            lambda: all(fake_discord.button_ids(fake_discord.messages[int(m["id"])]) for m in both),
            what="buttons on the new results",
        )
    var_job = jobs[variation[0]["id"]]
    reroll_job = next(j for j in jobs.values() if j.id != var_job.id)
    parent = await app_parent(fake_discord, mid, jobs)
    assert var_job.parent_id == parent
    assert var_job.kind == "variation" and var_job.parent_image_index == 1 and var_job.user_id == str(bob.id)
    assert reroll_job.kind == "reroll" and reroll_job.parent_id == parent and reroll_job.params.n == 4
    assert reroll_job.params.seed != 10 and reroll_job.prompt == "a castle"
    # Answered in the channel, as a reply to the result, naming who asked.
    for m in both:
        assert int(m["_reference"]["message_id"]) == mid
        assert f"<@{bob.id}>" in m["content"]
    assert "variation" in variation[0]["content"]
    cols, rows = (2, (var_job.params.n + 1) // 2) if var_job.params.n > 1 else (1, 1)
    assert image_size(variation[0]["_files"][0]) == (64 * cols, 64 * rows)
    # Charged to who reacted, not to who asked for the original.
    assert bob_quota.used_today == var_job.params.n + reroll_job.params.n and alice_quota.used_today == 4


async def app_parent(fake: FakeDiscord, mid: int, jobs: dict) -> int:
    """The job id of the original result (the parent both new jobs must point at)."""
    parents = {j.parent_id for j in jobs.values()}
    assert len(parents) == 1, parents
    return parents.pop()


def _place(fake: FakeDiscord):
    from bot.core.api import Place

    return Place("discord", str(fake.guild_id), str(fake.channel_id))


async def test_reactions_that_must_be_ignored(fake_discord: FakeDiscord, tmp_path):
    alice, bob = fake_discord.user("alice"), fake_discord.user("bob")
    other_bot = fake_discord.user("another-bot", bot=True)
    async with App(fake_discord, app_config(tmp_path, fake_discord)) as app:
        rec = await fake_discord.slash("imagine", alice, {"prompt": "a tower"})
        result = await wait_result(fake_discord, rec)
        mid = int(result["id"])
        await result_job(app, result)
        # A plain message in the channel that is not a result.
        plain = await app_post_plain(fake_discord)

        await fake_discord.react(mid, "🔁", fake_discord.bot_user)  # the bot's own reaction echoed back
        await fake_discord.react(mid, "🔁", other_bot)  # another bot
        await fake_discord.react(mid, "👍", bob)  # an emoji that means nothing here
        await fake_discord.react(mid, "4️⃣", bob)  # variation of an image this single result lacks
        await fake_discord.react(plain, "🔁", bob)  # not a result message
        await asyncio.sleep(0.5)
        # Then one that counts, to prove the handler was alive all along.
        await fake_discord.react(mid, "🎨", bob)
        await fake_discord.wait_for(
            lambda: [m for m in fake_discord.channel_messages() if m["attachments"]],
            what="the one real variation",
        )
        # The refusal of 4️⃣ is waited for, not assumed to be there after a sleep; the sleep is
        # only room for anything that must not come (a wrong job or refusal would show by then).
        await fake_discord.wait_for(
            lambda: [m for m in fake_discord.channel_messages() if "⛔" in m["content"]],
            what="the refusal of 4️⃣",
        )
        await asyncio.sleep(0.3)
        alice_jobs = await app.service.history(actor(alice), 10)
        bob_jobs = await app.service.history(actor(bob), 10)
        bot_jobs = await app.service.history(Actor("discord", str(fake_discord.bot_user.id)), 10)
        other_jobs = await app.service.history(actor(other_bot), 10)
    assert len(alice_jobs) == 1 and bot_jobs == [] and other_jobs == []
    assert [j.kind for j in bob_jobs] == ["variation"], bob_jobs
    refusals = [
        m for m in fake_discord.channel_messages() if not m["attachments"] and m["content"].startswith("<@")
    ]
    assert fake_discord.reactions == []  # the bot adds no reactions of its own
    # Only 4️⃣ on a one-image result deserved an answer (a refusal naming bob); the rest: silence.
    assert len(refusals) == 1 and str(bob.id) in refusals[0]["content"] and "⛔" in refusals[0]["content"]


async def app_post_plain(fake: FakeDiscord) -> int:
    """A message in the channel that is not a bot result (as if posted by someone)."""
    msg = fake._message(fake.channel_id, {"content": "hello"}, [])
    fake.messages[int(msg["id"])] = msg
    return int(msg["id"])
