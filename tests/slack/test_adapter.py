"""End-to-end: real signed requests -> real Bolt AsyncApp -> real core + FakeBackend -> fake Slack Web API."""

from __future__ import annotations

import asyncio
import io
import json
import time
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from PIL import Image

from bot.core.api import Actor, Place
from tests.slack.fake_slack import BOT_USER_ID, FakeMessage, FakeSlack
from tests.slack.harness import (
    ADMIN_ID,
    Running,
    postgres_database,
    reaction,
    result_messages,
    running_adapter,
)
from tests.slack.images import mask_png, opaque_png, transparent_hole_png
from tests.slack.signed import SIGNING_SECRET

# A hang shows up as a failure with stacks within two minutes, not at the suite's 300 s limit.
pytestmark = pytest.mark.timeout(120)


async def acked_while_held(slack: Running, send: Callable[[], Awaitable[tuple[Any, Any]]]) -> tuple[Any, Any]:
    """`send()` with the backend held: its 200 comes back while no job can finish, so the ack did not
    wait for the work (Slack's deadline is 3 s). How long the ack took is not asserted: a loaded CI
    machine may take any time, and an ack that waited for the job would never come at all."""
    slack.backend.hold()
    try:
        async with asyncio.timeout(60):
            reply, extra = await send()
        assert reply.status == 200, reply.body
        return reply, extra
    finally:
        slack.backend.release()


async def imagine_and_wait(slack: Running, text: str, count: int = 1, user: str = "UALICE01"):
    """Run /imagine and wait for the `count`-th result message in the channel."""
    reply, trigger = await acked_while_held(
        slack, lambda: slack.sender.slash_command("/imagine", text, user_id=user)
    )
    await slack.fake.wait_for(lambda: len(result_messages(slack.fake)) >= count)
    return reply, trigger, result_messages(slack.fake)[count - 1]


async def attached_job(slack: Running, msg) -> object:
    """The job the core resolves a result message to (what reactions go through)."""

    job = None
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        job = await slack.service.job_for_message("slack", f"{msg.channel}:{msg.ts}")
        if job is not None:
            break
        await asyncio.sleep(0.05)
    assert job is not None, "result message was never attached to its job"
    return job


async def test_bad_or_stale_signature_gets_401_and_starts_nothing(slack: Running):
    reply, _ = await slack.sender.slash_command("/imagine", "a cat", secret="not-the-secret")
    assert reply.status == 401
    reply, _ = await slack.sender.slash_command("/imagine", "a cat", timestamp=int(time.time()) - 6 * 60)
    assert reply.status == 401
    reply, _ = await slack.sender.event(
        {
            "type": "app_mention",
            "user": "UALICE01",
            "channel": "CGENERAL1",
            "text": "<@UBOT0001> imagine a cat",
            "ts": "1.1",
        },
        secret="wrong" + SIGNING_SECRET,
    )
    assert reply.status == 401
    assert slack.backend.calls == []
    assert not slack.fake.calls_to("chat.postMessage")


async def test_imagine_acks_fast_then_uploads_result_with_prompt_seed_and_params(slack: Running):
    reply, trigger, msg = await imagine_and_wait(slack, "a red fox in snow --seed 42 --n 2 --steps 12")
    assert reply.body == ""  # empty ack: nothing is shown until the status message appears
    # auth.test ran once, at start-up: the first request's ack did not wait for it
    assert len(slack.fake.calls_to("auth.test")) == 1
    # the result: files upload v2 into the channel, with prompt, seed and parameters
    assert "a red fox in snow" in msg.text and "seeds 42–43" in msg.text and "12 steps" in msg.text
    assert len(msg.files) == 2
    for file_id in msg.files:
        img = Image.open(io.BytesIO(slack.fake.files[file_id].data))
        assert img.format == "PNG" and img.size == (64, 64)
    # the status message showed the queue/progress (with a Cancel button), and is removed once the
    # result is shared: the job leaves one message
    await slack.fake.wait_for(lambda: slack.fake.deleted)
    [status] = slack.fake.deleted
    assert "a red fox" in status.text and not status.files
    assert any("queued" in t or "started" in t or "step" in t for t in status.history), status.history
    assert [m for m in slack.fake.messages.values() if "a red fox" in m.text] == [msg]
    posted = slack.fake.calls_to("chat.postMessage")[0].params
    assert "imagine:cancel:1" in json.dumps(posted["blocks"])
    # the job row knows its result message, so reactions and buttons resolve to it (even after a restart)
    job = await attached_job(slack, msg)
    assert job.state == "succeeded" and job.params.seeds == (42, 43) and job.params.steps == 12
    # the controls are buttons on the result; no hint reactions
    assert slack.fake.buttons(msg) == [
        "imagine:up:1:0", "imagine:up:1:1", "imagine:var:1:0", "imagine:var:1:1",
        "imagine:reroll:1", "imagine:remix:1",
    ]  # fmt: skip
    assert slack.fake.reactions == []
    # the backend saw what the user asked for
    params = slack.backend.calls[0].params
    assert params.task == "txt2img" and params.prompt == "a red fox in snow" and params.seeds == (42, 43)


async def test_imagine_bad_flag_gets_ephemeral_error_naming_it(slack: Running):
    reply, trigger = await slack.sender.slash_command("/imagine", "a cat --steps 9999")
    assert reply.status == 200
    await slack.fake.wait_for(lambda: slack.fake.responses)
    text = slack.fake.responses[0]["text"]
    assert "steps" in text and "Traceback" not in text
    assert slack.fake.responses[0]["response_type"] == "ephemeral"
    assert slack.backend.calls == [] and not slack.fake.calls_to("chat.postMessage")


async def test_text_the_database_cannot_store_is_a_named_refusal(slack: Running):
    """A NUL (PostgreSQL refuses it in text) or an id longer than its column reaches the core's
    checks, not the driver: the user reads what was wrong, never the catch-all."""
    await slack.sender.slash_command("/imagine", "a cat \x00 asleep")
    await slack.sender.slash_command("/imagine", "a cat", user_id="U" + "X" * 80)
    await slack.fake.wait_for(lambda: len(slack.fake.responses) == 2)
    texts = sorted(r["text"] for r in slack.fake.responses)
    assert any("prompt contains a NUL byte" in t for t in texts), texts
    assert any("user is too long" in t for t in texts), texts
    assert not any("Something went wrong" in t for t in texts)
    assert slack.backend.calls == [] and not slack.fake.calls_to("chat.postMessage")


async def test_prompt_text_is_unescaped_for_the_model_and_escaped_in_the_caption(slack: Running):
    _, _, msg = await imagine_and_wait(slack, "a sign saying &lt;hi&gt; &amp; <@U0BOB|bob> --seed 2")
    assert slack.backend.calls[0].params.prompt == "a sign saying <hi> & @bob"
    assert "a sign saying &lt;hi&gt; &amp; @bob" in msg.text  # shown as text, never as markup


async def test_imagine_help_when_empty(slack: Running):
    await slack.sender.slash_command("/imagine", "  ")
    await slack.fake.wait_for(lambda: slack.fake.responses)
    assert "--seed" in slack.fake.responses[0]["text"] and "inpaint" in slack.fake.responses[0]["text"]


def mention(text: str, files: list | None = None, user: str = "UALICE01", channel: str = "CGENERAL1") -> dict:
    event = {
        "type": "app_mention",
        "user": user,
        "text": f"<@{BOT_USER_ID}> {text}",
        "ts": f"{time.time():.6f}",
        "channel": channel,
        "event_ts": f"{time.time():.6f}",
    }
    if files is not None:
        event["files"] = files
    return event


async def test_inpaint_mention_with_transparent_png(slack: Running):
    f = slack.fake.host_file("photo.png", transparent_hole_png())
    event = {**mention("inpaint a red knitted hat --seed 7", [f]), "thread_ts": "1699999999.000001"}
    await acked_while_held(slack, lambda: slack.sender.event(event))
    await slack.fake.wait_for(lambda: result_messages(slack.fake))
    msg = result_messages(slack.fake)[0]
    assert "inpaint" in msg.text and "a red knitted hat" in msg.text and "seed 7" in msg.text
    assert msg.thread_ts == "1699999999.000001"  # asked in a thread, answered in that thread
    params = slack.backend.calls[0].params
    assert params.task == "inpaint" and params.image is not None and params.mask is not None
    # the adapter downloaded the file with the bot token (the fake refuses otherwise)
    assert params.prompt == "a red knitted hat"


async def test_inpaint_mention_with_image_and_mask(slack: Running):
    # order does not matter: the file named "mask" is the mask
    files = [slack.fake.host_file("my-mask.png", mask_png()), slack.fake.host_file("photo.png", opaque_png())]
    await slack.sender.event(mention("inpaint a stone wall", files))
    await slack.fake.wait_for(lambda: result_messages(slack.fake))
    params = slack.backend.calls[0].params
    assert params.task == "inpaint"
    mask = Image.open(io.BytesIO(params.mask)).convert("L")
    assert mask.getpixel((0, 0)) == 255 and mask.getpixel((63, 0)) == 0  # our mask, not the photo


async def test_inpaint_bad_attachments_get_clear_replies(slack: Running):
    fake = slack.fake
    cases = [
        (None, "Attach an image"),
        ([fake.host_file("notes.pdf", b"%PDF-1.4 ...", "application/pdf")], "`notes.pdf` is not an image"),
        ([fake.host_file("flat.png", opaque_png())], "mask"),  # no transparency, no mask: the core refuses
        ([fake.host_file(f"{i}.png", opaque_png()) for i in range(3)], "this message has 3 files"),
        ([{**fake.host_file("huge.png", opaque_png()), "size": 50_000_000}], "`huge.png` is 50.0 MB"),
        ([fake.host_file("photo.png", transparent_hole_png())], "Say what to paint"),  # no prompt
    ]
    for i, (files, expected) in enumerate(cases):
        prompt = "" if expected == "Say what to paint" else " a hat"
        await slack.sender.event(mention("inpaint" + prompt, files))
        await fake.wait_for(lambda i=i: len(fake.ephemerals) > i)
        text = fake.ephemerals[i]["text"]
        assert expected in text, text
        assert fake.ephemerals[i]["user"] == "UALICE01" and "Traceback" not in text
    assert slack.backend.calls == [] and not result_messages(fake)


async def test_inpaint_shortcut_opens_modal_then_runs(slack: Running):
    fake = slack.fake
    f = fake.host_file("cat.png", transparent_hole_png())
    message = {
        "type": "message",
        "user": "UBOB0001",
        "ts": "1699999999.000100",
        "text": "my cat",
        "files": [f],
    }
    reply, trigger = await slack.sender.message_shortcut("imagine_inpaint", message)
    assert reply.status == 200
    await fake.wait_for(lambda: fake.views)
    view = fake.views[0]["view"]
    assert fake.views[0]["trigger_id"] == trigger and view["callback_id"] == "imagine_inpaint_modal"
    # an empty prompt is refused inside the modal
    reply = await slack.sender.view_submission(
        view, {"prompt": {"prompt": {"type": "plain_text_input", "value": " "}}}
    )
    assert reply.status == 200 and reply.json()["response_action"] == "errors"
    assert "prompt" in reply.json()["errors"]
    reply = await slack.sender.view_submission(
        view, {"prompt": {"prompt": {"type": "plain_text_input", "value": "a wizard hat"}}}
    )
    assert reply.status == 200 and reply.body == ""
    await fake.wait_for(lambda: result_messages(fake))
    assert "a wizard hat" in result_messages(fake)[0].text
    assert slack.backend.calls[0].params.task == "inpaint"


async def test_inpaint_shortcut_on_message_without_image(slack: Running):
    message = {"type": "message", "user": "UBOB0001", "ts": "1699999999.000200", "text": "no picture here"}
    await slack.sender.message_shortcut("imagine_inpaint", message)
    await slack.fake.wait_for(lambda: slack.fake.responses)
    assert "Attach an image" in slack.fake.responses[0]["text"]
    assert not slack.fake.views


async def test_reactions_start_a_variation_and_a_reroll(slack: Running):
    _, _, first = await imagine_and_wait(slack, "a lighthouse --seed 100 --n 2")
    parent = await attached_job(slack, first)
    await acked_while_held(slack, lambda: slack.sender.event(reaction("two", first)))
    await slack.fake.wait_for(lambda: len(result_messages(slack.fake)) >= 2)
    variation = await attached_job(slack, result_messages(slack.fake)[1])
    assert (
        variation.kind == "variation"
        and variation.parent_id == parent.id
        and variation.parent_image_index == 1
    )
    assert slack.backend.calls[1].params.task == "img2img"
    assert variation.user_id == "UBOB0001"

    await slack.sender.event(reaction("repeat", first))
    await slack.fake.wait_for(lambda: len(result_messages(slack.fake)) >= 3)
    reroll = await attached_job(slack, result_messages(slack.fake)[2])
    assert reroll.kind == "reroll" and reroll.prompt == "a lighthouse" and reroll.params.seed != 100
    assert slack.backend.calls[2].params.task == "txt2img"

    # a reaction that is not a control, or on a message that is not a result, is ignored
    await slack.sender.event(reaction("thumbsup", first))
    await slack.sender.event(reaction("repeat", type("M", (), {"channel": "CGENERAL1", "ts": "1.000001"})()))
    await slack.sender.slash_command(
        "/imagine", "sync point"
    )  # a later request, to know the above were handled
    await slack.fake.wait_for(lambda: len(result_messages(slack.fake)) >= 4)
    assert len(slack.backend.calls) == 4 and not slack.fake.ephemerals


async def test_retried_event_never_starts_a_second_job(slack: Running):
    _, _, first = await imagine_and_wait(slack, "a boat --seed 5")
    await attached_job(slack, first)
    event = reaction("repeat", first)
    _, event_id = await slack.sender.event(event)
    await slack.fake.wait_for(lambda: len(result_messages(slack.fake)) >= 2)
    for retry in (1, 2, 3):  # Slack retries up to three times with the same event_id
        reply, _ = await slack.sender.event(event, event_id=event_id, retry_num=retry)
        assert reply.status == 200
    # a fresh event after the retries: once its result is there, the retries were long handled
    await slack.sender.event(reaction("art", first))
    await slack.fake.wait_for(lambda: len(result_messages(slack.fake)) >= 3)
    assert [c.params.task for c in slack.backend.calls] == ["txt2img", "txt2img", "img2img"]
    assert len(result_messages(slack.fake)) == 3


async def test_reactions_work_after_a_restart(fake_slack: FakeSlack, tmp_path, http):
    async with running_adapter(fake_slack, tmp_path, http) as first_run:
        _, _, msg = await imagine_and_wait(first_run, "a castle --seed 9")
        await attached_job(first_run, msg)
    # a new process: new core on the same database, new adapter, nothing in memory
    async with running_adapter(fake_slack, tmp_path, http) as second_run:
        await second_run.sender.event(reaction("art", msg))
        await fake_slack.wait_for(lambda: len(result_messages(fake_slack)) >= 2)
        job = await attached_job(second_run, result_messages(fake_slack)[1])
        assert job.kind == "variation" and job.prompt == "a castle"


async def test_admin_commands_allowed_for_configured_and_workspace_admins(slack: Running):
    fake = slack.fake
    await slack.sender.slash_command("/imagine-admin", "credits <@UBOB0001|bob> 5", user_id=ADMIN_ID)
    await fake.wait_for(lambda: fake.responses)
    assert "Granted 5" in fake.responses[-1]["text"], fake.responses[-1]
    await slack.sender.slash_command("/imagine-admin", "usage <@UBOB0001|bob>", user_id="UWSADMIN")
    await fake.wait_for(lambda: len(fake.responses) >= 2)
    assert "5 bonus credit" in fake.responses[-1]["text"], fake.responses[-1]
    assert any(c.params.get("user") == "UWSADMIN" for c in fake.calls_to("users.info"))
    await slack.sender.slash_command("/imagine-admin", "ban <@UBOB0001|bob> spamming", user_id=ADMIN_ID)
    await fake.wait_for(lambda: len(fake.responses) >= 3)
    assert "banned" in fake.responses[-1]["text"]
    # the ban is real: bob's /imagine is refused with a message saying so
    await slack.sender.slash_command("/imagine", "a cat", user_id="UBOB0001")
    await fake.wait_for(lambda: len(fake.responses) >= 4)
    assert "banned" in fake.responses[-1]["text"].lower()
    await slack.sender.slash_command("/imagine-admin", "stats", user_id=ADMIN_ID)
    await fake.wait_for(lambda: len(fake.responses) >= 5)
    assert "Stats" in fake.responses[-1]["text"]
    await slack.sender.slash_command("/imagine-admin", "limits workspace 3", user_id=ADMIN_ID)
    await fake.wait_for(lambda: len(fake.responses) >= 6)
    assert "set to 3" in fake.responses[-1]["text"]
    quota = await slack.service.quota(Actor("slack", "UALICE01"), Place("slack", "T0TEST01", "CGENERAL1"))
    assert quota.daily_limit == 3 and quota.limit_source == "guild"


async def test_admin_commands_refused_for_others(slack: Running):
    fake = slack.fake
    await slack.sender.slash_command("/imagine-admin", "credits <@UALICE01|alice> 100", user_id="UALICE01")
    await fake.wait_for(lambda: fake.responses)
    assert "Only admins" in fake.responses[0]["text"], fake.responses[0]
    quota = await slack.service.quota(Actor("slack", "UALICE01"), Place("slack", "T0TEST01", "CGENERAL1"))
    assert quota.bonus_credits == 0
    # usage errors are explained, with the help text
    await slack.sender.slash_command("/imagine-admin", "credits bob lots", user_id=ADMIN_ID)
    await fake.wait_for(lambda: len(fake.responses) >= 2)
    assert "not a user mention" in fake.responses[1]["text"]


async def test_rate_limited_web_api_calls_are_retried(slack: Running):
    fake = slack.fake
    fake.rate_limit("chat.postMessage", times=1, retry_after=1)
    fake.rate_limit("files.completeUploadExternal", times=1, retry_after=0)
    _, _, msg = await imagine_and_wait(slack, "a rainy street --seed 3")
    statuses = [c.status for c in fake.calls if c.method == "chat.postMessage"]
    assert statuses[:2] == [429, 200]
    assert [c.status for c in fake.calls if c.method == "files.completeUploadExternal"] == [429, 200]
    assert "a rainy street" in msg.text


async def test_channel_the_bot_cannot_post_in_cancels_and_explains(fake_slack: FakeSlack, tmp_path, http):
    fake = fake_slack
    fake.not_member.add("CPRIVATE1")
    async with running_adapter(fake, tmp_path, http, sections={"bot": {"dispatch_concurrency": 1}}) as slack:
        slack.backend.hold()  # a first job occupies the only slot, so the second one stays queued
        await slack.sender.slash_command("/imagine", "a public square")
        await fake.wait_for(lambda: slack.backend.in_flight == 1)
        reply, _ = await slack.sender.slash_command("/imagine", "a secret garden", channel_id="CPRIVATE1")
        assert reply.status == 200
        await fake.wait_for(lambda: fake.responses)
        assert (
            "cancelled the job" in fake.responses[0]["text"]
            and "/invite @imagine" in fake.responses[0]["text"]
        )
        slack.backend.release()
        await fake.wait_for(lambda: result_messages(fake))
        alice = Actor("slack", "UALICE01")
        jobs = {j.prompt: j for j in await slack.service.history(alice, limit=5)}
        assert jobs["a secret garden"].state == "cancelled"
        quota = await slack.service.quota(alice, Place("slack", "T0TEST01", "CGENERAL1"))
        assert quota.used_today == 1  # refunded: nothing is charged for a result nobody could see
        assert [c.params.prompt for c in slack.backend.calls] == ["a public square"]


async def test_quota_and_history_subcommands(slack: Running):
    await imagine_and_wait(slack, "a tiny robot --seed 1")
    await slack.sender.slash_command("/imagine", "quota")
    await slack.fake.wait_for(lambda: slack.fake.responses)
    assert "1/25 used today" in slack.fake.responses[0]["text"], slack.fake.responses[0]
    await slack.sender.slash_command("/imagine", "history")
    await slack.fake.wait_for(lambda: len(slack.fake.responses) >= 2)
    assert (
        "a tiny robot" in slack.fake.responses[1]["text"] and "succeeded" in slack.fake.responses[1]["text"]
    )


async def test_url_verification_and_health(slack: Running, http):
    import json

    body = json.dumps({"token": "x", "challenge": "c-123", "type": "url_verification"})
    reply = await slack.sender.post(body, "application/json")
    assert reply.status == 200 and reply.json() == {"challenge": "c-123"}
    base = slack.sender.url.rsplit("/slack/events", 1)[0]
    async with http.get(f"{base}/healthz") as resp:
        assert resp.status == 200 and (await resp.json())["status"] == "ok"
    # The operations endpoints on the same web app (docs/deployment.md#bot-metrics).
    async with http.get(f"{base}/readyz") as resp:
        assert resp.status == 200 and await resp.json() == {"status": "ready", "reason": "ready"}
    async with http.get(f"{base}/metrics") as resp:
        assert resp.status == 200 and "imagine_bot_queue_depth 0.0" in await resp.text()


async def test_job_accepted_before_a_restart_is_delivered_after_it(fake_slack: FakeSlack, tmp_path, http):
    def status_messages() -> list[FakeMessage]:
        return [m for m in fake_slack.messages.values() if "a phoenix" in m.text and not m.files]

    async with running_adapter(fake_slack, tmp_path, http) as first_run:
        first_run.backend.hold()  # the process stops while the job runs
        await first_run.sender.slash_command("/imagine", "a phoenix --seed 77")
        await fake_slack.wait_for(lambda: first_run.backend.in_flight == 1)
        await fake_slack.wait_for(lambda: any("started" in t for m in status_messages() for t in m.history))
    assert not result_messages(fake_slack)
    # a new process delivers it from what the job row holds (channel, user), not from memory
    async with running_adapter(fake_slack, tmp_path, http) as second_run:
        await fake_slack.wait_for(lambda: result_messages(fake_slack))
        msg = result_messages(fake_slack)[0]
        assert "a phoenix" in msg.text and "seed 77" in msg.text and "<@UALICE01>" in msg.text
        job = await attached_job(second_run, msg)
        assert job.state == "succeeded" and job.attempts >= 1
        # the status message posted before the restart is the one removed: no second one
        await fake_slack.wait_for(lambda: fake_slack.deleted)
        [status] = fake_slack.deleted
        assert status_messages() == [] and len(fake_slack.calls_to("chat.postMessage")) == 1
        assert job.delivery["status_ts"] == status.ts and job.delivery["status_channel"] == status.channel


async def test_mention_imagine_and_help(slack: Running):
    await slack.sender.event(mention("imagine a small red kite --seed 21"))
    await slack.fake.wait_for(lambda: result_messages(slack.fake))
    assert "a small red kite" in result_messages(slack.fake)[0].text
    await slack.sender.event(mention("hello there"))
    await slack.fake.wait_for(lambda: slack.fake.ephemerals)
    assert "/imagine" in slack.fake.ephemerals[0]["text"] and len(slack.backend.calls) == 1


async def test_retry_racing_the_original_delivery_is_still_one_job(slack: Running):
    _, _, first = await imagine_and_wait(slack, "a kite --seed 8")
    await attached_job(slack, first)
    event = reaction("repeat", first)
    # the original and three retries arrive at once (e.g. two processes behind a load balancer)
    replies = await asyncio.gather(
        *[slack.sender.event(event, event_id="EvRACE01", retry_num=i or None) for i in range(4)]
    )
    assert all(reply.status == 200 for reply, _ in replies)
    await slack.fake.wait_for(lambda: len(result_messages(slack.fake)) >= 2)
    await slack.sender.event(reaction("art", first))  # a later event: once done, the others were too
    await slack.fake.wait_for(lambda: len(result_messages(slack.fake)) >= 3)
    assert [c.params.task for c in slack.backend.calls] == ["txt2img", "txt2img", "img2img"]
    assert not slack.fake.ephemerals


@pytest.mark.postgres
async def test_end_to_end_on_postgresql(fake_slack: FakeSlack, tmp_path, http):
    """The same flow on the deployment database: a command, a reaction and its racing retries."""
    async with postgres_database() as url:
        database = {"database": {"url": url, "auto_migrate": True}}
        async with running_adapter(fake_slack, tmp_path, http, sections=database) as slack:
            _, _, first = await imagine_and_wait(slack, "a harbour at night --seed 4")
            await attached_job(slack, first)
            event = reaction("one", first)
            await asyncio.gather(
                *[slack.sender.event(event, event_id="EvPG0001", retry_num=i or None) for i in range(3)]
            )
            await fake_slack.wait_for(lambda: len(result_messages(fake_slack)) >= 2)
            variation = await attached_job(slack, result_messages(fake_slack)[1])
            assert variation.kind == "variation" and variation.parent_image_index == 0
            assert [c.params.task for c in slack.backend.calls] == ["txt2img", "img2img"]


async def test_a_bug_shows_a_reference_not_a_traceback(slack: Running, monkeypatch, caplog):
    async def broken_quota(*args, **kwargs):
        raise RuntimeError("internal detail: connection string postgres://secret")

    # a bug inside the core (simulated): the user gets a reference, the log gets the traceback
    monkeypatch.setattr(slack.core.service, "quota", broken_quota)
    await slack.sender.slash_command("/imagine", "quota")
    await slack.fake.wait_for(lambda: slack.fake.responses)
    text = slack.fake.responses[0]["text"]
    assert "Something went wrong" in text and "secret" not in text and "Traceback" not in text
    ref = text.split("ref `")[1].split("`")[0]
    logged = [r for r in caplog.records if ref in r.getMessage()]
    assert logged and logged[0].exc_info is not None and "postgres://secret" in str(logged[0].exc_info[1])


async def test_bot_removed_from_channel_while_job_runs_tells_user_via_response_url(slack: Running):
    fake = slack.fake
    slack.backend.hold()
    await slack.sender.slash_command("/imagine", "a lonely moon", channel_id="CRANDOM01")
    await fake.wait_for(lambda: slack.backend.in_flight == 1 and fake.calls_to("chat.postMessage"))
    fake.not_member.add("CRANDOM01")  # someone removes the bot from the channel
    slack.backend.release()
    await fake.wait_for(lambda: fake.responses)
    assert (
        "can't show the result" in fake.responses[0]["text"]
        and "/invite @imagine" in fake.responses[0]["text"]
    )
    assert not result_messages(fake, "CRANDOM01")
