"""The playground over HTTP with Gradio's own client, on the real core (SQLite, fake image backend).

Gradio's client is synchronous, so it runs in a thread while the playground and the core serve on
this test's event loop.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from bot.core.api import Actor, Place
from bot.playground.delivery import message_id_for
from tests.playground.harness import app_config, running_playground


def client(url: str, auth: tuple[str, str] | None = None) -> Any:
    from gradio_client import Client

    # download_files=False: the results stay on the server; the tests read them from the core.
    return Client(url, verbose=False, auth=auth, download_files=False)


def field(outputs: tuple[Any, ...], marker: str) -> str:
    """The output (HTML or Markdown text) that contains `marker`."""
    found = [o for o in outputs if isinstance(o, str) and marker in o]
    assert found, f"no output containing {marker!r} in {outputs!r}"
    return found[-1]


def chat_texts(outputs: tuple[Any, ...]) -> list[str]:
    chat = next(o for o in outputs if isinstance(o, list))
    return [c.get("text", "") for m in chat for c in m["content"] if c.get("type") == "text"]


def chat_files(outputs: tuple[Any, ...]) -> list[str]:
    """The images of the chat: each result is a gallery in one message."""
    chat = next(o for o in outputs if isinstance(o, list))
    galleries = [c for m in chat for c in m["content"] if c.get("component") == "gallery"]
    return [item["image"]["path"] for g in galleries for item in g["value"]]


async def one_running(service: Any, actor: Actor) -> None:
    """`actor`'s job "one" submitted and running (the held backend keeps it so)."""
    running = await service.imagine(actor, Place("web"), "one", idempotency_key="one")
    async with asyncio.timeout(30):
        while (await service.get_job(running.id)).state != "running":  # noqa: ASYNC110
            await asyncio.sleep(0.02)


def statuses_of(url: str, command: str, submitted: list[Any]) -> list[str]:
    """Send `command` to the page's /imagine and follow it to its end: every status panel the page
    showed. The Gradio job joins `submitted` as soon as it exists, for the caller to watch."""
    c = client(url)
    try:
        job = c.submit(command, api_name="/imagine")
        submitted.append(job)
        job.result(timeout=60)
        return [field(u, 'class="job-status"') for u in job.outputs()]
    finally:
        c.close()


async def test_the_status_panel_shows_the_live_preview(tmp_path):
    from bot.backends.fake import FakeBackend

    backend = FakeBackend(delay_s=0.3, preview_every=2)
    config = app_config(tmp_path, bot={"preview_interval_s": 0.001})
    async with running_playground(config, backend=backend) as app:

        def go() -> list[tuple[Any, ...]]:
            c = client(app.url)
            try:
                job = c.submit("/imagine a red fox --seed 42 --steps 5", api_name="/imagine")
                job.result(timeout=60)
                return list(job.outputs())
            finally:
                c.close()

        updates = await asyncio.to_thread(go)
    panels = [field(u, 'class="job-status"') for u in updates]
    shown = [p for p in panels if 'class="job-preview"' in p]
    assert shown and all('data-state="running"' in p and "data:image/png;base64," in p for p in shown)
    assert 'class="job-preview"' not in panels[-1] and 'data-state="succeeded"' in panels[-1]


async def test_imagine_streams_queue_and_progress_then_images(tmp_path):
    async with running_playground(app_config(tmp_path)) as app:

        def go() -> list[tuple[Any, ...]]:
            c = client(app.url)
            try:
                job = c.submit("/imagine a red fox --seed 42 --n 2 --steps 5", api_name="/imagine")
                job.result(timeout=60)
                return list(job.outputs())
            finally:
                c.close()

        updates = await asyncio.to_thread(go)
        states = [field(u, 'class="job-status"').split('data-state="')[1].split('"')[0] for u in updates]
        assert states[0] == "queued" and states[-1] == "succeeded"
        running = [field(u, 'class="job-status"') for u in updates if 'data-state="running"' in str(u)]
        assert any('<progress value="5" max="5"' in r for r in running), running
        final = updates[-1]
        assert "a red fox" in chat_texts(final)[-1] and "seed 42" in chat_texts(final)[-1]
        assert len(chat_files(final)) == 2
        assert "**23** image(s) left" in field(final, "image(s) left")

        job = await app.service.get_job(1)
        assert (job.platform, job.user_id, job.state, job.params.seeds) == (
            "web",
            "local",
            "succeeded",
            (42, 43),
        )
        assert job.result_message_id == message_id_for(1)
        # The result "message" resolves like a chat message: a 🔁 reaction re-rolls it.
        actor = Actor("web", "local", is_admin=True)
        again = await app.service.react(actor, Place("web"), message_id_for(1), "🔁", idempotency_key="r1")
        assert again is not None and again.kind == "reroll" and again.parent_id == 1


async def test_reroll_and_variation_buttons_make_child_jobs(tmp_path):
    async with running_playground(app_config(tmp_path)) as app:

        def go() -> tuple[Any, ...]:
            c = client(app.url)
            try:
                # The buttons act on the session's last result, so they share one client session.
                c.predict("/imagine a lighthouse --n 3 --seed 7", api_name="/imagine")
                c.predict(api_name="/reroll")
                return c.predict(api_name="/variation_3")
            finally:
                c.close()

        last = await asyncio.to_thread(go)
        reroll, variation = await app.service.get_job(2), await app.service.get_job(3)
        assert (reroll.kind, reroll.parent_id, reroll.params.n) == ("reroll", 1, 3)
        assert reroll.params.seed != 7
        assert (variation.kind, variation.parent_id, variation.parent_image_index) == ("variation", 2, 2)
        assert variation.state == "succeeded"
        assert "variation" in chat_texts(last)[-1]


async def test_upscale_zoom_pan_vary_and_remix_buttons(tmp_path):
    async with running_playground(app_config(tmp_path)) as app:

        def go() -> list[tuple[Any, ...]]:
            c = client(app.url)
            try:
                c.predict("/imagine a harbour --n 2 --seed 5", api_name="/imagine")
                up = c.predict(api_name="/upscale_2")  # job 2: one image, so the single-image buttons
                return [
                    up,
                    c.predict(api_name="/zoom_out_2x"),  # of job 2
                    c.predict(api_name="/pan_up"),  # of job 3
                    c.predict(api_name="/vary_subtle"),  # of job 4
                    c.predict("", api_name="/remix"),  # no text: says how, starts nothing
                    c.predict("a stormy harbour --strength 0.5", api_name="/remix"),  # of job 5
                ]
            finally:
                c.close()

        outputs = await asyncio.to_thread(go)
        jobs = [await app.service.get_job(i) for i in range(2, 7)]
        calls = app.core.backend.calls
    up, zoom, pan, vary, remix = jobs
    assert (up.kind, up.parent_id, up.parent_image_index, up.params.width) == ("upscale", 1, 1, 128)
    assert (zoom.kind, zoom.parent_id, zoom.params.width) == ("zoom", 2, 256)
    assert (pan.kind, pan.parent_id, pan.params.detail, pan.params.height) == ("pan", 3, "up", 384)
    assert (vary.kind, vary.parent_id, vary.params.detail) == ("variation", 4, "subtle")
    assert (remix.kind, remix.parent_id, remix.prompt, remix.params.strength) == (
        "remix",
        5,
        "a stormy harbour",
        0.5,
    )
    assert all(j.state == "succeeded" for j in jobs)
    assert "Type the prompt and flags to remix with" in field(outputs[4], "remix with")
    assert [c.params.task for c in calls] == [
        "txt2img",
        "img2img",
        "inpaint",
        "inpaint",
        "img2img",
        "img2img",
    ]


async def test_cancel_stops_the_latest_waiting_job(tmp_path):
    async with running_playground(app_config(tmp_path, backends={"kind": "fake", "fake_delay_s": 30})) as app:

        def go() -> str:
            c = client(app.url)
            try:
                c.submit("/imagine a very slow one", api_name="/imagine")
                for _ in range(100):
                    if app.core.backend.in_flight:
                        break
                    time.sleep(0.05)
                return c.predict(api_name="/cancel")
            finally:
                c.close()

        said = await asyncio.to_thread(go)
        job = await app.service.get_job(1)
        quota = await app.service.quota(Actor("web", "local"), Place("web"))
    assert "Job #1 cancelled" in said and job.state == "cancelled" and quota.used_today == 0


async def test_refusals_are_short_messages_and_create_no_job(tmp_path):
    config = app_config(tmp_path, moderation={"banned_terms": ["gore"]})
    async with running_playground(config) as app:

        def go() -> list[tuple[Any, ...]]:
            c = client(app.url)
            try:
                return [
                    c.predict("/imagine a cat --steps 9999", api_name="/imagine"),
                    c.predict("/imagine gore everywhere", api_name="/imagine"),
                    c.predict("/quota", api_name="/imagine"),
                    c.predict("/nonsense", api_name="/imagine"),
                ]
            finally:
                c.close()

        bad_steps, moderated, quota, unknown = await asyncio.to_thread(go)
        assert "⚠️" in chat_texts(bad_steps)[-1] and "steps" in chat_texts(bad_steps)[-1]
        assert "moderation rule" in chat_texts(moderated)[-1] and "gore" in chat_texts(moderated)[-1]
        assert "**25** image(s) left" in chat_texts(quota)[-1]
        assert "Unknown command `/nonsense`" in chat_texts(unknown)[-1]
        assert await app.service.history(Actor("web", "local"), limit=10) == []


async def test_admin_limit_shows_in_the_quota_and_is_enforced(tmp_path):
    async with running_playground(app_config(tmp_path)) as app:

        def go() -> tuple[Any, ...]:
            c = client(app.url)
            try:
                limited = c.predict("", 2, "", api_name="/admin_set_limit")
                refused = c.predict("/imagine a cat --n 3", api_name="/imagine")
                stats = c.predict("", None, "", api_name="/admin_stats")
                return limited, refused, stats
            finally:
                c.close()

        limited, refused, stats = await asyncio.to_thread(go)
        assert "Daily limit of `local` set to 2 per day" in limited[0]
        assert "used **0** of **2** today (your own limit)" in limited[1]
        assert "Daily limit reached" in chat_texts(refused)[-1]
        assert "Latest admin actions" in stats[0] and "set_user_limit" in stats[0]


async def test_password_login_names_the_user_and_admins_need_their_password(tmp_path):
    config = app_config(tmp_path, playground={"admin_users": ["boss"]})
    env = {"PLAYGROUND_PASSWORD": "team-pw", "PLAYGROUND_ADMIN_PASSWORD": "boss-pw"}
    async with running_playground(config, env) as app:

        def go() -> tuple[Any, ...]:
            with pytest.raises(ValueError):
                client(app.url, auth=("alice", "wrong"))
            c = client(app.url, auth=("alice", "team-pw"))
            try:
                made = c.predict("/imagine a kite --seed 1", api_name="/imagine")
                denied = c.predict("bob", 5, "", api_name="/admin_grant")
            finally:
                c.close()
            b = client(app.url, auth=("boss", "boss-pw"))
            try:
                granted = b.predict("alice", 5, "", api_name="/admin_grant")
            finally:
                b.close()
            return made, denied, granted

        made, denied, granted = await asyncio.to_thread(go)
        job = await app.service.get_job(1)
        assert (job.user_id, job.state) == ("alice", "succeeded")
        assert len(chat_files(made)) == 1
        assert "Only admins" in denied[0]
        assert "Granted 5 credits to `alice`" in granted[0]
        q = await app.service.quota(Actor("web", "alice"), Place("web"))
        assert q.bonus_credits == 5


async def test_a_waiting_job_shows_its_place_in_the_queue(tmp_path):
    # One job at a time, and the backend held until three jobs exist: the third waits behind two.
    # (Sleeps alone made this depend on how fast a loaded machine builds Gradio clients.)
    config = app_config(tmp_path, bot={"dispatch_concurrency": 1}, backends={"kind": "fake"})
    async with running_playground(config) as app:
        app.core.backend.hold()
        me = Actor("web", "local")
        submitted: list[Any] = []  # the Gradio jobs, whose streamed outputs the test watches

        async def jobs_exist(n: int) -> None:
            async with asyncio.timeout(30):
                # polling the database: the job rows are what the test waits for
                while len(await app.service.history(me, limit=5)) < n:  # noqa: ASYNC110
                    await asyncio.sleep(0.05)

        first = asyncio.create_task(asyncio.to_thread(statuses_of, app.url, "/imagine one", submitted))
        await jobs_exist(1)
        second = asyncio.create_task(asyncio.to_thread(statuses_of, app.url, "/imagine two", submitted))
        await jobs_exist(2)
        third = asyncio.create_task(asyncio.to_thread(statuses_of, app.url, "/imagine three", submitted))
        await jobs_exist(3)

        def position_shown() -> bool:
            return any(
                isinstance(o, str) and "position 2 in the queue" in o
                for job in list(submitted)
                for update in job.outputs()
                for o in update
            )

        # Nothing moves while the backend is held, and each page asks the core for its job's place
        # when its stream starts: if job 1 was claimed before job 3's stream started, job 3 is at
        # position 2 then; if not, job 1 was still queued when job 2's stream started, and job 2
        # was at position 2. Either stays so until the release. (Before the streams asked, the
        # core's one report of job 3's place could come before its stream listened: the page then
        # said "waiting for its turn" for the whole wait, and this wait timed out once.)
        try:
            async with asyncio.timeout(60):
                while not position_shown():  # noqa: ASYNC110 - the client streams on its own threads
                    await asyncio.sleep(0.05)
        finally:
            app.core.backend.release()
        statuses = await asyncio.gather(first, second, third)
        seen = " ".join(s for job in statuses for s in job)
        assert "position 2 in the queue" in seen, seen
        assert all('data-state="succeeded"' in job[-1] for job in statuses)


async def test_reroll_before_any_result_says_so(tmp_path):
    async with running_playground(app_config(tmp_path)) as app:

        def go() -> tuple[Any, ...]:
            c = client(app.url)
            try:
                return c.predict(api_name="/reroll")
            finally:
                c.close()

        outputs = await asyncio.to_thread(go)
        assert "generate an image first" in field(outputs, 'class="job-status"')
        assert await app.service.history(Actor("web", "local"), limit=5) == []


async def test_login_form_with_non_ascii_passwords_never_answers_500(tmp_path):
    """Gradio's /login calls our check with whatever the form held. hmac.compare_digest refuses
    non-ASCII str, so a password compared as text would answer 500, and a non-ASCII
    PLAYGROUND_PASSWORD would lock everyone out."""
    import aiohttp

    env = {"PLAYGROUND_PASSWORD": "Kennwort-äöü-密码"}
    async with running_playground(app_config(tmp_path), env) as app, aiohttp.ClientSession() as http:

        async def login(username: str, password: str) -> int:
            async with http.post(f"{app.url}login", data={"username": username, "password": password}) as r:
                return r.status

        assert await login("alice", "Kennwort-äöü-密码") == 200
        for username, password in [
            ("alice", "falsch-äöü"),
            ("alice", " "),
            ("alice", "Kennwort-\u00e4\u00f6\u00fc-\u5bc6\u7801 "),
            ("bad name ü", "Kennwort-äöü-密码"),
            ("alice", "\U0001f511" * 5000),
        ]:
            assert await login(username, password) == 400, (username, password)
        assert await login("bob", "Kennwort-äöü-密码") == 200  # still serving


async def test_a_position_reported_before_the_page_listens_still_shows(tmp_path, monkeypatch):
    """The core reports a queued job's position once (again only when it changes). A report that
    came while the submission was still returning, before the page's stream listened, was lost:
    the page said "waiting for its turn" for the whole wait. Here the submission returns only once
    the core has reported the new job's position, so the stream always listens too late."""
    config = app_config(tmp_path, bot={"dispatch_concurrency": 1}, backends={"kind": "fake"})
    async with running_playground(config) as app:
        service, backend = app.service, app.core.backend
        backend.hold()
        other = Actor("web", "other")
        await one_running(service, other)
        await service.imagine(other, Place("web"), "two", idempotency_key="two")  # position 1

        delivery = service.deliveries["web"]
        reported: dict[int, asyncio.Event] = {}
        on_queued = delivery.on_queued

        async def on_queued_recorded(job: Any, position: int) -> None:
            await on_queued(job, position)
            reported.setdefault(job.id, asyncio.Event()).set()

        imagine = service.imagine

        async def imagine_then_wait_for_the_report(*args: Any, **kwargs: Any) -> Any:
            job = await imagine(*args, **kwargs)
            async with asyncio.timeout(30):
                await reported.setdefault(job.id, asyncio.Event()).wait()
            return job

        monkeypatch.setattr(delivery, "on_queued", on_queued_recorded)
        monkeypatch.setattr(service, "imagine", imagine_then_wait_for_the_report)
        submitted: list[Any] = []

        def page_shows_job_3_waiting() -> bool:
            return any(
                isinstance(o, str) and 'data-state="queued"' in o and "job #3 queued" in o
                for job in list(submitted)
                for update in job.outputs()
                for o in update
            )

        streamed = asyncio.create_task(asyncio.to_thread(statuses_of, app.url, "/imagine three", submitted))
        # Nothing moves while the backend is held: the page's first status of job 3 is the one it
        # shows for as long as job 3 waits behind the two others.
        try:
            async with asyncio.timeout(60):
                while not page_shows_job_3_waiting():  # noqa: ASYNC110 - the client streams on its own threads
                    await asyncio.sleep(0.05)
        finally:
            backend.release()
        statuses = await streamed
    waiting = [s for s in statuses if 'data-state="queued"' in s]
    assert "position 2 in the queue" in waiting[0], statuses
    assert 'data-state="succeeded"' in statuses[-1]


async def test_a_position_change_reported_elsewhere_still_reaches_the_page(tmp_path, monkeypatch):
    """Positions reported where this page cannot hear them (another bot process sharing the
    database reports them to its own playground) still show: a stream that hears nothing for
    `poll_interval_s` asks the core for the job's position."""
    config = app_config(tmp_path, bot={"dispatch_concurrency": 1}, backends={"kind": "fake"})
    async with running_playground(config) as app:
        service, backend = app.service, app.core.backend
        backend.hold()
        other = Actor("web", "other")
        await one_running(service, other)
        ahead = await service.imagine(other, Place("web"), "two", idempotency_key="two")

        async def heard_elsewhere(job: Any, position: int) -> None:
            return None

        monkeypatch.setattr(service.deliveries["web"], "on_queued", heard_elsewhere)
        submitted: list[Any] = []

        async def page_shows(text: str) -> None:
            async with asyncio.timeout(60):
                while not any(  # noqa: ASYNC110 - the client streams on its own threads
                    isinstance(o, str) and f"job #3 queued, {text}" in o
                    for job in list(submitted)
                    for update in job.outputs()
                    for o in update
                ):
                    await asyncio.sleep(0.05)

        streamed = asyncio.create_task(asyncio.to_thread(statuses_of, app.url, "/imagine three", submitted))
        try:
            await page_shows("position 2 in the queue")
            await service.cancel(other, ahead.id)  # job 3 moves up; the core's report goes nowhere
            await page_shows("starts next")
        finally:
            backend.release()
        statuses = await streamed
    assert 'data-state="succeeded"' in statuses[-1]
