"""The adapter's entry points, configuration, manifest and Socket Mode."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import yaml

from bot import slack_adapter
from bot.backends.base import BackendRejected
from bot.bootstrap import build_core
from bot.settings import ConfigError, load_section
from bot.slack_adapter import admin, messages
from bot.slack_adapter.config import SlackConfig
from tests.slack.fake_slack import APP_TOKEN, BOT_TOKEN, TEAM_ID, FakeSlack
from tests.slack.harness import Running, make_config, result_messages, running_adapter

# A hang shows up as a failure with stacks within a minute or two, not at the suite's 300 s limit.
pytestmark = pytest.mark.timeout(120)

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(
    ("env", "on", "why"),
    [
        ({}, False, "SLACK_BOT_TOKEN not set"),
        ({"SLACK_BOT_TOKEN": "xoxp-user-token", "SLACK_SIGNING_SECRET": "s"}, False, "start with xoxb-"),
        ({"SLACK_BOT_TOKEN": "xoxb-1"}, False, "SLACK_SIGNING_SECRET not set"),
        ({"SLACK_BOT_TOKEN": "xoxb-1", "SLACK_SIGNING_SECRET": "s"}, True, "HTTP mode"),
        ({"SLACK_BOT_TOKEN": "xoxb-1", "SLACK_APP_TOKEN": "xapp-1"}, True, "Socket Mode"),
        ({"SLACK_BOT_TOKEN": "xoxb-1", "SLACK_APP_TOKEN": "xoxb-2"}, False, "start with xapp-"),
    ],
)
def test_adapter_status_says_why(env, on, why):
    got_on, got_why = slack_adapter.adapter_status(env)
    assert got_on is on and why in got_why


@pytest.mark.parametrize(
    ("section", "key"),
    [
        ({"imagine_command": "imagine"}, "imagine_command"),
        ({"admin_user_ids": ["alice"]}, "admin_user_ids"),
        ({"progress_interval_s": 0.5}, "progress_interval_s"),
        ({"api_base_url": "https://slack.com/api"}, "api_base_url"),
        ({"http_port": 70000}, "http_port"),
        ({"progres_interval_s": 2.0}, "progres_interval_s"),  # a typo is an error, not ignored
        ({"progress_interval_s": float("inf")}, "progress_interval_s"),
        ({"admin_cache_s": float("nan")}, "admin_cache_s"),
        ({"max_attachment_bytes": 2**40}, "max_attachment_bytes"),
    ],
)
def test_bad_config_names_the_key(section, key):
    with pytest.raises(ConfigError, match=key):
        load_section({"slack": section}, "slack", SlackConfig, environ={})


def test_config_toml_section_loads_and_env_overrides():
    import tomllib

    raw = tomllib.loads((ROOT / "config.toml").read_text())
    cfg = load_section(raw, "slack", SlackConfig, environ={"IMAGINE_SLACK_HTTP_PORT": "3100"})
    assert cfg.http_port == 3100 and cfg.imagine_command == "/imagine" and cfg.admin_user_ids == ()


def test_manifest_matches_config_and_listeners():
    manifest = yaml.safe_load((ROOT / "slack_manifest.yaml").read_text())
    cfg = SlackConfig()
    commands = {c["command"] for c in manifest["features"]["slash_commands"]}
    assert commands == {cfg.imagine_command, cfg.admin_command}
    assert all(c["should_escape"] for c in manifest["features"]["slash_commands"])  # admin parses <@U|name>
    assert [s["callback_id"] for s in manifest["features"]["shortcuts"]] == [cfg.inpaint_shortcut_callback_id]
    # Bolt answers 404 to events nobody listens to, and Slack retries those: subscribe only to ours
    assert set(manifest["settings"]["event_subscriptions"]["bot_events"]) == {"app_mention", "reaction_added"}
    scopes = set(manifest["oauth_config"]["scopes"]["bot"])
    assert {"commands", "chat:write", "files:write", "files:read", "reactions:read", "users:read"} <= scopes


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", admin.AdminCommand("help")),
        ("stats", admin.AdminCommand("stats")),
        ("usage <@U0BOB|bob>", admin.AdminCommand("usage", "U0BOB")),
        ("limits <@U0BOB> 10", admin.AdminCommand("limit_user", "U0BOB", 10)),
        ("limits U0BOB none", admin.AdminCommand("limit_user", "U0BOB", None)),
        ("limits workspace 3", admin.AdminCommand("limit_workspace", None, 3)),
        ("credits <@U0BOB|bob> 5", admin.AdminCommand("credits", "U0BOB", 5)),
        ("ban <@U0BOB|bob> spam and abuse", admin.AdminCommand("ban", "U0BOB", reason="spam and abuse")),
    ],
)
def test_admin_parse(text, expected):
    assert admin.parse(text) == expected


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("credits <@U0BOB> 0", "from 1 to 10000"),
        ("limits <@U0BOB> -1", "whole number"),
        # str.isdigit() takes these, int() refuses or misreads them: a usage message, not a crash
        ("limits <@U0BOB> \u00b2", "whole number"),
        ("credits <@U0BOB> \u0663", "from 1 to 10000"),
        ("limits <@U0BOB> " + "9" * 5000, "whole number"),
        ("credits <@U0BOB> " + "9" * 5000, "from 1 to 10000"),
        ("reset", "needs a user"),
        ("frobnicate", "unknown subcommand"),
    ],
)
def test_admin_parse_errors(text, message):
    with pytest.raises(admin.AdminUsage, match=message):
        admin.parse(text)


async def test_refused_token_stops_run_with_a_clear_error(fake_slack: FakeSlack, tmp_path):
    env = {"SLACK_BOT_TOKEN": "xoxb-revoked", "SLACK_SIGNING_SECRET": "s"}
    config = make_config(tmp_path, fake_slack, 0)
    async with build_core(config, env) as core:
        with pytest.raises(ConfigError, match="SLACK_BOT_TOKEN was refused by Slack \\(invalid_auth\\)"):
            await slack_adapter.run(core.service, config, env)
    assert "slack" not in core.service.deliveries


async def test_status_message_shows_queue_position(fake_slack: FakeSlack, tmp_path, http):
    async with running_adapter(
        fake_slack, tmp_path, http, sections={"bot": {"dispatch_concurrency": 1}}
    ) as slack:
        slack.backend.hold()
        for i in range(3):
            await slack.sender.slash_command("/imagine", f"tower {i}")
        # one job runs (held), two wait: their status messages say where they are in the queue
        await fake_slack.wait_for(lambda: any("position 2" in m.text for m in fake_slack.messages.values()))
        slack.backend.release()
        # each status message is removed once its result is shared: one message per job
        await fake_slack.wait_for(lambda: len(fake_slack.deleted) == 3)
        # the job that waited longest showed its place first; whatever came later came after it
        # (commands race, so find it; a result removes its status before a parked edit shows)
        last = next(m for m in fake_slack.deleted if any("position 2" in t for t in m.history))
        steps = [t.rsplit("—", 1)[1].strip() for t in last.history]
        assert steps[0] == "queued, position 2" and "queued, position 2" not in steps[1:], steps


async def test_progress_edits_at_most_one_per_interval(fake_slack: FakeSlack, tmp_path, http):
    # 26 steps over ~2.6 s: the backend reports a step every 0.1 s
    async with running_adapter(
        fake_slack, tmp_path, http, sections={"backends": {"fake_delay_s": 2.6}}
    ) as slack:
        start = time.monotonic()
        await slack.sender.slash_command("/imagine", "a slow sunrise --steps 26")
        await fake_slack.wait_for(lambda: fake_slack.deleted)
        elapsed = time.monotonic() - start
        [status] = fake_slack.deleted  # removed once the result was shared
        assert any("step " in t for t in status.history), status.history  # progress was shown...
        # ...in edits at least 2 s apart (the first text is the post)
        edits = status.history[1:]
        assert len(edits) <= elapsed / 2.0 + 1, (elapsed, status.history)


async def test_failed_job_tells_the_user(slack: Running):
    slack.backend.fail_next(error=BackendRejected("the prompt could not be encoded", field="prompt"))
    await slack.sender.slash_command("/imagine", "an impossible thing")
    fake = slack.fake

    def failed():
        return [t for m in fake.messages.values() for t in m.history if "failed" in t] or [
            e["text"] for e in fake.ephemerals if "failed" in e["text"]
        ]

    texts = await fake.wait_for(failed)
    assert "an impossible thing" in texts[0] and "Traceback" not in texts[0]
    assert not result_messages(fake)


async def test_socket_mode_when_app_token_is_set(fake_slack: FakeSlack, tmp_path, http):
    env = {"SLACK_BOT_TOKEN": BOT_TOKEN, "SLACK_APP_TOKEN": APP_TOKEN}  # no signing secret needed
    async with running_adapter(fake_slack, tmp_path, http, env=env) as slack:
        await fake_slack.wait_for(lambda: fake_slack.socket_connected)
        envelope = await fake_slack.socket_send(
            "slash_commands",
            {
                "team_id": TEAM_ID,
                "channel_id": "CGENERAL1",
                "user_id": "UALICE01",
                "user_name": "alice",
                "command": "/imagine",
                "text": "a paper boat --seed 11",
                "trigger_id": "trig.socket1",
                "response_url": f"{fake_slack.base_url}/response/socket1",
            },
        )
        await fake_slack.wait_for(lambda: envelope in fake_slack.socket_acks)  # acked over the socket
        await fake_slack.wait_for(lambda: result_messages(fake_slack))
        assert "a paper boat" in result_messages(fake_slack)[0].text
        assert slack.backend.calls[0].params.seeds == (11,)


@pytest.mark.parametrize(
    ("wire", "typed"),
    [
        ("a sign saying &lt;hello&gt; &amp; bye", "a sign saying <hello> & bye"),
        ("portrait of <@U0BOB|bob> in <#C0GEN|general>", "portrait of @bob in #general"),
        ("style of <https://example.com/ref.png>", "style of https://example.com/ref.png"),
        ("<https://example.com|my site> at noon", "my site at noon"),
    ],
)
def test_prompts_reach_the_core_as_typed(wire, typed):
    assert messages.plain_text(wire) == typed
