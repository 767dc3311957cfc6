"""Channel settings over real signed requests to the real Bolt app and core, against the fake Slack:
/imagine-admin channels / private / channel-defaults / settings, allowed channels, private mode."""

from __future__ import annotations

import pytest

from bot.core.api import Actor, Place
from tests.slack.fake_slack import TEAM_ID, FakeSlack
from tests.slack.harness import ADMIN_ID, Running, result_messages

pytestmark = pytest.mark.timeout(120)


async def _admin(slack: Running, text: str, user: str = ADMIN_ID) -> str:
    before = len(slack.fake.responses)
    await slack.sender.slash_command("/imagine-admin", text, user_id=user)
    await slack.fake.wait_for(lambda: len(slack.fake.responses) > before)
    return slack.fake.responses[-1]["text"]


async def test_settings_need_an_admin_and_are_audited(slack: Running):
    refused = await _admin(slack, "channels <#CART0001|art>", user="UBOB0001")
    assert "Only admins" in refused
    text = await _admin(slack, "channels <#CART0001|art> CBOTS0001")
    assert "*Image commands allowed in*: <#CART0001>, <#CBOTS0001>" in text
    text = await _admin(slack, "channel-defaults <#CART0001|art> ar=3:2 steps=12")
    assert "*Defaults in <#CART0001>*: --ar 3:2, --steps 12" in text
    bad = await _admin(slack, "channel-defaults steps=999")
    assert "steps" in bad and "999" in bad
    usage = await _admin(slack, "private maybe")
    assert "`private` takes `on`, `off` or `default`" in usage
    listing = await _admin(slack, "settings")
    assert "<#CART0001>, <#CBOTS0001>" in listing and "off for the workspace" in listing
    entries = await slack.service.audit_log(Actor("slack", ADMIN_ID, is_admin=True), 10)
    actions = [e.action for e in entries]
    assert actions[:2] == ["set_channel_defaults", "allow_channels"]
    assert "refused:allow_channels" in actions


async def test_allowed_channels_refuse_elsewhere_privately(slack: Running):
    fake: FakeSlack = slack.fake
    await _admin(slack, "channels <#CART0001|art>")
    before = len(fake.responses)
    reply, _ = await slack.sender.slash_command("/imagine", "a fox")
    assert reply.status == 200
    await fake.wait_for(lambda: len(fake.responses) > before)
    refusal = fake.responses[-1]
    assert refusal["response_type"] == "ephemeral"
    assert "not allowed in this channel. Use them in <#CART0001>" in refusal["text"]
    # In the allowed channel, with that channel's defaults, it runs.
    await _admin(slack, "channel-defaults <#CART0001|art> steps=7")
    await slack.sender.slash_command("/imagine", "a fox", channel_id="CART0001")
    await fake.wait_for(lambda: result_messages(fake, "CART0001"))
    (job,) = await slack.service.history(Actor("slack", "UALICE01"))
    assert job.params.steps == 7 and job.channel_id == "CART0001"
    before = len(fake.responses)
    await slack.sender.slash_command("/imagine", "help", channel_id="CART0001")
    await fake.wait_for(lambda: len(fake.responses) > before)
    assert "Defaults here (flags override them): --steps 7." in fake.responses[-1]["text"]


async def test_private_mode_sends_the_result_to_a_dm_and_nothing_to_the_channel(slack: Running):
    fake: FakeSlack = slack.fake
    text = await _admin(slack, "private on")
    assert "Private mode of <#CGENERAL1>: on" in text
    before = len(fake.responses)
    await slack.sender.slash_command("/imagine", "a secret fox")
    await fake.wait_for(lambda: result_messages(fake, "DUALICE01"))
    await fake.wait_for(lambda: any("in your DM" in e["text"] for e in fake.ephemerals))
    queued = [r["text"] for r in fake.responses[before:]]
    assert any("DM with me" in t for t in queued), queued
    assert [m for m in fake.messages.values() if m.channel == "CGENERAL1"] == []
    (job,) = await slack.service.history(Actor("slack", "UALICE01"))
    assert job.private
    # Back to public: the workspace's setting (off) applies again.
    await _admin(slack, "private default")
    assert not (await slack.service.place_rules(Place("slack", TEAM_ID, "CGENERAL1"))).private
