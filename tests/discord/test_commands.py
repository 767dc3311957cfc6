"""Slash commands end to end: the real discord.py bot and core, Discord faked on loopback."""

from __future__ import annotations

import pytest

from bot.backends.fake import FakeBackend
from bot.core.api import Actor
from tests.discord.fake_discord import FakeDiscord
from tests.discord.harness import App, app_config, image_size, result_job, wait_ephemeral, wait_result


async def test_command_sync_payload(fake_discord: FakeDiscord, tmp_path):
    async with App(fake_discord, app_config(tmp_path, fake_discord)):
        sync = fake_discord.command_syncs[-1]
    assert sync["guild_id"] == fake_discord.guild_id  # guild sync: instant in development
    commands = {c["name"]: c for c in sync["payload"]}
    assert set(commands) == {"imagine", "inpaint", "history", "quota", "help", "models", "admin"}
    opts = {o["name"]: o for o in commands["imagine"]["options"]}
    assert opts["prompt"]["type"] == 3 and opts["prompt"]["required"] is True
    assert opts["count"]["type"] == 4 and (opts["count"]["min_value"], opts["count"]["max_value"]) == (1, 4)
    assert opts["steps"]["max_value"] == 150 and opts["seed"]["max_value"] == 2**32 - 1
    assert opts["guidance"]["type"] == 10
    assert opts["model"]["autocomplete"] is True and opts["lora"]["autocomplete"] is True
    assert {c["value"] for c in opts["aspect"]["choices"]} >= {"1:1", "3:2", "16:9"}
    inpaint = {o["name"]: o for o in commands["inpaint"]["options"]}
    assert inpaint["image"]["type"] == 11 and inpaint["image"]["required"] is True
    assert inpaint["mask"]["type"] == 11 and not inpaint["mask"].get("required", False)
    admin = commands["admin"]
    assert int(admin["default_member_permissions"]) == 1 << 5  # Manage Server: hidden from others
    assert {o["name"] for o in admin["options"]} == {
        "user-limit",
        "server-limit",
        "credits",
        "reset",
        "usage",
        "ban",
        "unban",
        "stats",
        "default-model",
        "allow-models",
        "allow-loras",
        "allow-channels",
        "channel-defaults",
        "private",
        "role-limit",
        "settings",
    }
    assert all(o["type"] == 1 for o in admin["options"])  # subcommands
    assert commands["imagine"]["description"]  # Discord shows it to users


async def test_global_sync_when_no_guilds(fake_discord: FakeDiscord, tmp_path):
    config = app_config(tmp_path, fake_discord, discord={"guild_ids": [], "hide_admin_commands": False})
    async with App(fake_discord, config):
        pass
    assert [s["guild_id"] for s in fake_discord.command_syncs] == [None]
    admin = next(c for c in fake_discord.command_syncs[0]["payload"] if c["name"] == "admin")
    assert admin.get("default_member_permissions") is None


async def test_sync_to_a_guild_the_bot_is_not_in_names_the_key(fake_discord: FakeDiscord, tmp_path):
    from bot.bootstrap import build_core
    from bot.discord_adapter import run

    config = app_config(tmp_path, fake_discord, discord={"guild_ids": [fake_discord.guild_id, 42]})
    async with build_core(config, {}) as core:
        with pytest.raises(RuntimeError, match=r"guild_ids: cannot sync commands to guild 42"):
            await run(core.service, config, {"DISCORD_TOKEN": fake_discord.token})
    assert [s["guild_id"] for s in fake_discord.command_syncs] == [fake_discord.guild_id]


async def test_imagine_defers_shows_queue_progress_then_result(fake_discord: FakeDiscord, tmp_path):
    alice, zoe = fake_discord.user("alice"), fake_discord.user("zoe")
    backend = FakeBackend()
    config = app_config(tmp_path, fake_discord, bot={"dispatch_concurrency": 1})
    async with App(fake_discord, config, backend=backend) as app:
        backend.hold()  # zoe's job occupies the only slot, so alice's job has to wait in the queue
        blocker = await fake_discord.slash("imagine", zoe, {"prompt": "a slow start"})
        await fake_discord.wait_for(lambda: backend.in_flight == 1, what="the first job to start")
        rec = await fake_discord.slash(
            "imagine", alice, {"prompt": "a red fox in the snow", "count": 4, "seed": 1234, "steps": 5}
        )
        await fake_discord.wait_for(
            lambda: any("starts next" in t or "position" in t for t in rec.texts()), what="the queue position"
        )
        backend.release()
        result = await wait_result(fake_discord, rec)
        await wait_result(fake_discord, blocker)
        job = await result_job(app, result)
    # Deferred publicly ("thinking…") first: the core was only called after that.
    assert rec.callbacks[0]["status"] == 200 and rec.callbacks[0]["body"]["type"] == 5
    assert not rec.ephemeral
    texts = rec.texts()
    queued_at = next(i for i, t in enumerate(texts) if "starts next" in t or "position" in t)
    progress_at = next(i for i, t in enumerate(texts) if "step " in t)
    assert queued_at < progress_at < len(texts) - 1, texts  # queue position, then progress, then result
    assert "starts next" in texts[queued_at] or "position 1" in texts[queued_at]
    # The result: one 2x2 grid PNG, prompt, seed, parameters and who asked.
    assert len(result["_files"]) == 1 and result["attachments"][0]["filename"].endswith(".png")
    assert result["_files"][0].startswith(b"\x89PNG")
    assert image_size(result["_files"][0]) == (128, 128)  # four 64x64 images
    content = result["content"]
    assert "a red fox in the snow" in content and "seed 1234" in content and "5 steps" in content
    assert f"<@{alice.id}>" in content and "4 images" in content
    # No hint reactions: the buttons say what the result can become (U1-U4, V1-V4, re-roll, remix).
    assert fake_discord.reactions_on(int(result["id"])) == []
    assert fake_discord.button_ids(result) == [
        [f"imagine:up:{job.id}:{i}" for i in range(4)],
        [f"imagine:var:{job.id}:{i}" for i in range(4)],
        [f"imagine:reroll:{job.id}", f"imagine:remix:{job.id}"],
    ]
    # While it waited, its status carried a Cancel button.
    assert any(
        c.get("components") == [{"type": 1, "components": [c["components"][0]["components"][0]]}]
        and c["components"][0]["components"][0]["custom_id"] == f"imagine:cancel:{job.id}"
        for c in rec.edits
        if c.get("components")
    )
    assert job is not None and job.state == "succeeded" and job.params.seeds == (1234, 1235, 1236, 1237)


async def test_flags_inside_the_prompt(fake_discord: FakeDiscord, tmp_path):
    bob = fake_discord.user("bob")
    async with App(fake_discord, app_config(tmp_path, fake_discord)) as app:
        rec = await fake_discord.slash(
            "imagine", bob, {"prompt": "a lighthouse --seed 42 --n 2 --ar 2:1 --no fog"}
        )
        result = await wait_result(fake_discord, rec)
        job = await result_job(app, result)
    assert "seed 42" in result["content"] and "ar 2:1" in result["content"] and "fog" in result["content"]
    assert job.prompt == "a lighthouse" and job.negative_prompt == "fog" and job.params.n == 2
    assert job.params.width > job.params.height  # 2:1
    assert image_size(result["_files"][0]) == (2 * job.params.width, job.params.height)  # side by side
    assert [len(row) for row in fake_discord.button_ids(result)] == [2, 2, 2]  # U1-U2, V1-V2, re-roll, remix


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        ({"prompt": "a cat --steps 999"}, "steps"),
        ({"prompt": "a cat --wings 2"}, "Unknown flag --wings"),
        ({"prompt": "a cat --ar 9:1"}, "ar"),
    ],
)
async def test_bad_parameters_get_a_short_private_error(
    fake_discord: FakeDiscord, tmp_path, options, expected
):
    carol = fake_discord.user("carol")
    async with App(fake_discord, app_config(tmp_path, fake_discord)) as app:
        rec = await fake_discord.slash("imagine", carol, options)
        text = await wait_ephemeral(fake_discord, rec)
        history = await app.service.history(_actor(carol), 10)
    assert expected in text and "Traceback" not in text and len(text) < 300
    assert rec.deferred and rec.deleted_original  # the public "thinking…" message is removed
    assert history == []  # no job was created


def _actor(user):
    from bot.core.api import Actor

    return Actor("discord", str(user.id), user.username)


async def test_quota_exceeded_history_and_quota(fake_discord: FakeDiscord, tmp_path):
    dave = fake_discord.user("dave")
    config = app_config(tmp_path, fake_discord, quotas={"daily_limit": 2})
    async with App(fake_discord, config):
        first = await fake_discord.slash("imagine", dave, {"prompt": "two boats", "count": 2})
        result = await wait_result(fake_discord, first)
        over = await fake_discord.slash("imagine", dave, {"prompt": "one more boat"})
        refusal = await wait_ephemeral(fake_discord, over)
        quota = await fake_discord.slash("quota", dave)
        quota_text = await wait_ephemeral(fake_discord, quota)
        history = await fake_discord.slash("history", dave)
        history_text = await wait_ephemeral(fake_discord, history)
    assert "Daily limit reached" in refusal and "resets" in refusal.lower() and "<t:" in refusal
    assert "**2** of **2**" in quota_text and "Resets <t:" in quota_text
    assert quota.ephemeral and history.ephemeral
    link = f"https://discord.com/channels/{fake_discord.guild_id}/{fake_discord.channel_id}/{result['id']}"
    assert "two boats" in history_text and link in history_text
    assert "one more boat" not in history_text  # refused before a job existed


async def test_moderation_refusal_names_the_rule(fake_discord: FakeDiscord, tmp_path):
    erin = fake_discord.user("erin")
    config = app_config(tmp_path, fake_discord, moderation={"banned_terms": ["gore"]})
    async with App(fake_discord, config):
        rec = await fake_discord.slash("imagine", erin, {"prompt": "lots of GORE everywhere"})
        text = await wait_ephemeral(fake_discord, rec)
    assert "moderation" in text and "gore" in text


async def test_help_is_private_and_lists_commands(fake_discord: FakeDiscord, tmp_path):
    frank = fake_discord.user("frank")
    async with App(fake_discord, app_config(tmp_path, fake_discord)):
        rec = await fake_discord.slash("help", frank)
        text = await wait_ephemeral(fake_discord, rec)
    for word in ("/imagine", "/inpaint", "/history", "/quota", "--seed", "🔁"):
        assert word in text


async def test_server_busy_is_a_short_private_error(fake_discord: FakeDiscord, tmp_path):
    users = [fake_discord.user(f"u{i}") for i in range(3)]
    backend = FakeBackend()
    config = app_config(tmp_path, fake_discord, bot={"dispatch_concurrency": 1, "max_queued_jobs": 1})
    async with App(fake_discord, config, backend=backend):
        backend.hold()
        running = await fake_discord.slash("imagine", users[0], {"prompt": "running"})
        await fake_discord.wait_for(lambda: backend.in_flight == 1, what="the first job to start")
        queued = await fake_discord.slash("imagine", users[1], {"prompt": "waiting"})
        await fake_discord.wait_for(lambda: queued.texts(), what="the second job to be queued")
        busy = await fake_discord.slash("imagine", users[2], {"prompt": "one too many"})
        text = await wait_ephemeral(fake_discord, busy)
        backend.release()
        await wait_result(fake_discord, running)
        await wait_result(fake_discord, queued)
    assert "queue is full" in text and "Traceback" not in text


def test_adapter_status_and_config_errors():
    from bot.discord_adapter import adapter_status
    from bot.discord_adapter.config import DiscordConfig
    from bot.settings import ConfigError, load_section

    assert adapter_status({}) == (False, "off: DISCORD_TOKEN not set")
    assert adapter_status({"DISCORD_TOKEN": "  "})[0] is False
    assert adapter_status({"DISCORD_TOKEN": "abc"})[0] is True
    with pytest.raises(ConfigError, match="progress_edit_interval_s"):
        load_section({"discord": {"progress_edit_interval_s": -1}}, "discord", DiscordConfig)
    with pytest.raises(ConfigError, match="guild_ids"):
        load_section({"discord": {"guild_ids": ["general"]}}, "discord", DiscordConfig)
    for key, value in [
        ("progress_edit_interval_s", float("inf")),
        ("guild_ready_timeout_s", float("nan")),
        ("token_margin_s", float("nan")),
        ("max_attachment_bytes", 2**40),
        ("activity", "x" * 200),
    ]:
        with pytest.raises(ConfigError, match=key):
            load_section({"discord": {key: value}}, "discord", DiscordConfig)
    with pytest.raises(ConfigError, match="unknown key"):
        load_section({"discord": {"guild": [1]}}, "discord", DiscordConfig)
    cfg = load_section({}, "discord", DiscordConfig, environ={"IMAGINE_DISCORD_GUILD_IDS": "[1, 2]"})
    assert cfg.guild_ids == (1, 2)


async def test_run_refuses_a_bad_token(fake_discord: FakeDiscord, tmp_path):
    from bot.bootstrap import build_core
    from bot.discord_adapter import run

    config = app_config(tmp_path, fake_discord)
    async with build_core(config, {}) as core:
        with pytest.raises(RuntimeError, match="DISCORD_TOKEN"):
            await run(core.service, config, {"DISCORD_TOKEN": "wrong"})
        with pytest.raises(RuntimeError, match="DISCORD_TOKEN is not set"):
            await run(core.service, config, {})
        assert "discord" not in core.service.deliveries  # unregistered on the way out


async def test_progress_edits_are_throttled(fake_discord: FakeDiscord, tmp_path):
    gus = fake_discord.user("gus")
    # An interval longer than the test: after the first status edit only the result may follow.
    config = app_config(tmp_path, fake_discord, discord={"progress_edit_interval_s": 1000.0})
    async with App(fake_discord, config):
        rec = await fake_discord.slash("imagine", gus, {"prompt": "a slow sunset", "steps": 30})
        result = await wait_result(fake_discord, rec)
    status_edits = [e for e in rec.edits if not e["_files"]]
    assert len(status_edits) == 1, [e.get("content") for e in status_edits]
    assert "a slow sunset" in result["content"]


async def test_a_bug_shows_a_reference_not_a_traceback(
    fake_discord: FakeDiscord, tmp_path, monkeypatch, caplog
):
    hal = fake_discord.user("hal")
    async with App(fake_discord, app_config(tmp_path, fake_discord)) as app:

        async def broken_quota(*args, **kwargs):
            raise RuntimeError("internal detail: postgres://user:secret@db")

        # A bug inside the core (simulated): the user gets a reference, the log the traceback.
        monkeypatch.setattr(app.service, "quota", broken_quota)
        rec = await fake_discord.slash("quota", hal)
        text = await wait_ephemeral(fake_discord, rec)
    assert "Something went wrong" in text and "secret" not in text and "Traceback" not in text
    ref = text.split("(ref ")[1].split(")")[0]
    logged = [r for r in caplog.records if ref in r.getMessage()]
    assert logged and logged[0].exc_info is not None and "secret" in str(logged[0].exc_info[1])


async def test_text_the_database_cannot_store_is_a_named_refusal(fake_discord: FakeDiscord, tmp_path):
    """A NUL in an option (PostgreSQL refuses it in text) reaches the core's checks, not the driver:
    the user reads which option was wrong, and no job is made."""
    ivy = fake_discord.user("ivy")
    async with App(fake_discord, app_config(tmp_path, fake_discord)) as app:
        prompt = await fake_discord.slash("imagine", ivy, {"prompt": "a cat \x00 asleep"})
        negative = await fake_discord.slash("imagine", ivy, {"prompt": "a cat", "negative": "dogs\x00"})
        texts = [await wait_ephemeral(fake_discord, rec) for rec in (prompt, negative)]
        jobs = await app.service.history(Actor("discord", str(ivy.id)), 5)
    assert "prompt contains a NUL byte" in texts[0]
    assert "'negative' contains a NUL byte" in texts[1]
    assert not any("Something went wrong" in t for t in texts)
    assert jobs == []
