"""The inference server client against a loopback fake of the server's HTTP contract (API v1)."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import io

import pytest
from PIL import Image

from bot.backends.base import (
    BackendError,
    BackendEvent,
    BackendRejected,
    BackendUnavailable,
    GenerationParams,
    InferenceBackend,
)
from bot.backends.inference_server import InferenceServerBackend
from tests.backends.fakes import TOKEN, error, png_bytes, result_body, seed_png, stream


@pytest.fixture
async def make_backend(sleeps):
    made = []

    def make(urls, **kw):
        kw.setdefault("token", TOKEN)
        kw.setdefault("max_retries", 2)
        kw.setdefault("sleep", sleeps)
        # The usual rounds only (outages are waited out in test_outages.py, on a fake clock).
        kw.setdefault("outage_horizon_s", 0.0)
        backend = InferenceServerBackend(urls, **kw)
        made.append(backend)
        return backend

    yield make
    for backend in made:
        await backend.close()


def recorder():
    events: list[BackendEvent] = []

    async def on_event(e: BackendEvent) -> None:
        events.append(e)

    return events, on_event


async def test_txt2img_sends_the_contract_body_and_returns_images(inference_server, make_backend):
    backend = make_backend([inference_server.url])
    assert isinstance(backend, InferenceBackend)
    params = GenerationParams(
        "txt2img",
        "a lighthouse",
        negative_prompt="fog",
        seeds=(11, 12),
        width=64,
        height=48,
        steps=5,
        guidance=6.0,
        timeout_s=30.0,
    )
    images = await backend.generate(params)
    assert [(i.seed, i.png) for i in images] == [(11, seed_png(11, 64, 48)), (12, seed_png(12, 64, 48))]
    [req] = inference_server.seen
    # The server gets the time left of the job's deadline (a hair under 30 s by now).
    assert 25.0 < req.body.pop("timeout_s") <= 30.0
    assert req.path == "/v1/txt2img"
    assert req.headers["Authorization"] == f"Bearer {TOKEN}"
    assert req.body == {
        "prompt": "a lighthouse",
        "negative_prompt": "fog",
        "n": 2,
        "seeds": [11, 12],
        "width": 64,
        "height": 48,
        "steps": 5,
        "guidance": 6.0,
        "stream": False,
    }


async def test_a_priority_is_sent_only_when_set(inference_server, make_backend):
    backend = make_backend([inference_server.url])
    base = GenerationParams("txt2img", "a lighthouse", seeds=(1,), width=64, height=64, steps=2)
    await backend.generate(base)
    await backend.generate(dataclasses.replace(base, priority=3))
    first, second = inference_server.seen
    assert "priority" not in first.body  # 0, the server's default: older servers never see the field
    assert second.body["priority"] == 3


async def test_img2img_and_inpaint_send_base64_images_to_their_routes(inference_server, make_backend):
    backend = make_backend([inference_server.url])
    image, mask = png_bytes(colour=(1, 2, 3)), png_bytes(colour=(255, 255, 255))
    await backend.generate(GenerationParams("img2img", "x", image=image, strength=0.4))
    await backend.generate(GenerationParams("inpaint", "y", image=image, mask=mask))
    var, inp = inference_server.seen
    assert var.path == "/v1/img2img" and base64.b64decode(var.body["image"]) == image
    assert var.body["strength"] == 0.4 and "mask" not in var.body
    assert inp.path == "/v1/inpaint" and base64.b64decode(inp.body["mask"]) == mask
    with pytest.raises(BackendRejected) as info:
        await backend.generate(GenerationParams("inpaint", "y", image=image))
    assert info.value.field == "mask"


async def test_streaming_maps_ndjson_events_to_backend_events(inference_server, make_backend):
    backend = make_backend([inference_server.url])
    events, on_event = recorder()
    images = await backend.generate(GenerationParams("txt2img", "x", seeds=(5,), steps=3), on_event)
    assert inference_server.seen[0].body["stream"] is True
    assert inference_server.seen[0].headers["Accept"] == "application/x-ndjson"
    assert [(e.kind, e.position, e.step, e.total) for e in events] == [
        ("queued", 1, None, None),
        ("queued", 0, None, None),
        ("started", None, None, None),
        ("progress", None, 1, 3),
        ("progress", None, 2, 3),
        ("progress", None, 3, 3),
    ]
    assert events[2].extra == {"batch_size": 1}
    assert Image.open(io.BytesIO(images[0].png)).size == (64, 64)


async def test_preview_events_carry_their_png_and_malformed_ones_are_skipped(inference_server, make_backend):
    preview = png_bytes(colour=(9, 8, 7))

    async def with_previews(request, body):
        return await stream(
            request,
            [
                {"event": "progress", "step": 1, "total": 2},
                {
                    "event": "preview",
                    "step": 1,
                    "total": 2,
                    "index": 0,
                    "png_base64": base64.b64encode(preview).decode(),
                },
                {"event": "preview", "step": 1, "total": 2, "index": 1, "png_base64": "not base64!"},
                {"event": "progress", "step": 2, "total": 2},
                {"event": "result", **result_body(body)},
            ],
        )

    inference_server.script = [with_previews]
    backend = make_backend([inference_server.url])
    events, on_event = recorder()
    images = await backend.generate(GenerationParams("txt2img", "x", steps=2), on_event)
    assert len(images) == 1
    assert [(e.kind, e.step) for e in events] == [("progress", 1), ("preview", 1), ("progress", 2)]
    assert events[1].extra == {"index": 0, "png": preview} and events[1].total == 2


async def test_a_failing_progress_callback_does_not_lose_the_images(inference_server, make_backend):
    backend = make_backend([inference_server.url])

    async def broken(_event):
        raise RuntimeError("chat platform hiccup")

    assert len(await backend.generate(GenerationParams("txt2img", "x", steps=2), broken)) == 1


async def test_503_is_retried_after_retry_after_capped(inference_server, make_backend, sleeps):
    async def overloaded(request, body):
        return error(503, "overloaded", "queue full", headers={"Retry-After": "7"})

    async def very_overloaded(request, body):
        return error(503, "overloaded", "queue full", headers={"Retry-After": "3600"})

    inference_server.script = [overloaded, very_overloaded]
    backend = make_backend([inference_server.url], retry_after_max_s=20.0, backoff_base_s=0.1)
    images = await backend.generate(GenerationParams("txt2img", "x"))
    assert len(images) == 1 and len(inference_server.seen) == 3
    # The first wait honours Retry-After; the second is capped so a server cannot park the job.
    assert sleeps.delays == [7.0, 20.0]
    assert backend.servers_down() == []  # overloaded is not down


async def test_backoff_grows_exponentially_with_jitter_when_no_retry_after(refused_url, make_backend, sleeps):
    backend = make_backend([refused_url], max_retries=4, backoff_base_s=1.0, backoff_max_s=5.0)
    with pytest.raises(BackendUnavailable):
        await backend.generate(GenerationParams("txt2img", "x"))
    ceilings = [1.0, 2.0, 4.0, 5.0]
    assert len(sleeps.delays) == 4
    for delay, ceiling in zip(sleeps.delays, ceilings, strict=True):
        assert ceiling / 2 <= delay <= ceiling


async def test_fails_over_from_a_refused_server_and_marks_it_down(
    refused_url, inference_server, make_backend, sleeps
):
    backend = make_backend([refused_url, inference_server.url], server_cooloff_s=60.0)
    assert len(await backend.generate(GenerationParams("txt2img", "x"))) == 1
    assert sleeps.delays == []  # fail-over within the round, no backoff needed
    assert backend.servers_down() == [refused_url]
    # The round-robin start would now pick the refused server first, but it is cooling off.
    assert len(await backend.generate(GenerationParams("txt2img", "y"))) == 1
    assert [r.body["prompt"] for r in inference_server.seen] == ["x", "y"]


async def test_round_robin_spreads_jobs_over_healthy_servers(
    inference_server, second_inference_server, make_backend
):
    backend = make_backend([inference_server.url, second_inference_server.url])
    for i in range(4):
        await backend.generate(GenerationParams("txt2img", f"p{i}"))
    assert [r.body["prompt"] for r in inference_server.seen] == ["p0", "p2"]
    assert [r.body["prompt"] for r in second_inference_server.seen] == ["p1", "p3"]


async def test_overloaded_server_fails_over_to_the_other(
    inference_server, second_inference_server, make_backend, sleeps
):
    async def overloaded(request, body):
        return error(503, "overloaded", "queue full", headers={"Retry-After": "2"})

    inference_server.script = [overloaded]
    backend = make_backend([inference_server.url, second_inference_server.url])
    await backend.generate(GenerationParams("txt2img", "x"))
    assert len(second_inference_server.seen) == 1 and sleeps.delays == []


async def test_exhausted_retries_name_every_server_tried(refused_url, inference_server, make_backend, sleeps):
    async def overloaded(request, body):
        return error(503, "overloaded", "queue full", headers={"Retry-After": "1"})

    inference_server.script = [overloaded] * 3
    backend = make_backend([refused_url, inference_server.url], max_retries=2)
    with pytest.raises(BackendUnavailable) as info:
        await backend.generate(GenerationParams("txt2img", "x"))
    message = info.value.message
    assert info.value.retryable
    assert f"{refused_url} (connection refused)" in message
    assert f"{inference_server.url} (overloaded: queue full)" in message
    assert "3 attempt" in message and "Traceback" not in message
    assert len(sleeps.delays) == 2


async def test_bad_token_is_rejected_without_retrying(inference_server, make_backend, sleeps):
    backend = make_backend([inference_server.url], token="wrong")
    with pytest.raises(BackendRejected) as info:
        await backend.generate(GenerationParams("txt2img", "x"))
    assert "INFERENCE_API_TOKEN" in info.value.message
    assert sleeps.delays == [] and not info.value.retryable


async def test_400_carries_the_servers_message_and_field(inference_server, make_backend, sleeps):
    async def bad_width(request, body):
        return error(400, "invalid_request", "width must be a multiple of 8, got 65", "width")

    inference_server.script = [bad_width]
    backend = make_backend([inference_server.url])
    with pytest.raises(BackendRejected) as info:
        await backend.generate(GenerationParams("txt2img", "x"))
    assert info.value.field == "width"
    assert info.value.message == "width must be a multiple of 8, got 65"
    assert len(inference_server.seen) == 1 and sleeps.delays == []


async def test_server_errors_and_deadlines_map_to_the_right_error(inference_server, make_backend):
    async def internal(request, body):
        return error(500, "internal", "device failure")

    async def deadline(request, body):
        return error(504, "deadline_exceeded", "the job waited past its deadline")

    async def html_proxy_error(request, body):
        from aiohttp import web

        return web.Response(status=500, text="<html>Oops</html>", content_type="text/html")

    inference_server.script = [internal, deadline, html_proxy_error]
    backend = make_backend([inference_server.url])
    with pytest.raises(BackendError) as info:
        await backend.generate(GenerationParams("txt2img", "x"))
    assert type(info.value) is BackendError and "device failure" in info.value.message
    with pytest.raises(BackendUnavailable) as info:
        await backend.generate(GenerationParams("txt2img", "x"))
    assert "deadline" in info.value.message
    with pytest.raises(BackendError) as info:
        await backend.generate(GenerationParams("txt2img", "x"))
    assert "HTTP 500" in info.value.message and "<html>" not in info.value.message


async def test_bad_gateway_fails_over_like_a_down_server(
    inference_server, second_inference_server, make_backend
):
    async def bad_gateway(request, body):
        from aiohttp import web

        return web.Response(status=502, text="<html>Bad Gateway</html>", content_type="text/html")

    inference_server.script = [bad_gateway]
    backend = make_backend([inference_server.url, second_inference_server.url])
    assert len(await backend.generate(GenerationParams("txt2img", "x"))) == 1
    assert len(second_inference_server.seen) == 1
    assert backend.servers_down() == [inference_server.url]


async def test_stream_error_events_are_mapped(inference_server, make_backend, sleeps):
    async def rejected(request, body):
        return await stream(
            request,
            [
                {"event": "queued", "position": 0},
                {
                    "event": "error",
                    "error": {"code": "invalid_request", "message": "prompt too long", "field": "prompt"},
                },
            ],
        )

    async def overloaded_mid_stream(request, body):
        return await stream(
            request, [{"event": "error", "error": {"code": "overloaded", "message": "shutting down"}}]
        )

    async def draining(request, body):
        return error(503, "shutting_down", "the server is shutting down", headers={"Retry-After": "1"})

    inference_server.script = [rejected, overloaded_mid_stream, draining]
    backend = make_backend([inference_server.url])
    events, on_event = recorder()
    with pytest.raises(BackendRejected) as info:
        await backend.generate(GenerationParams("txt2img", "x"), on_event)
    assert info.value.field == "prompt" and info.value.message == "prompt too long"
    assert [e.kind for e in events] == ["queued"]
    # An overloaded error inside the stream, then a draining server, are retried like a 503.
    assert len(await backend.generate(GenerationParams("txt2img", "x"), on_event)) == 1
    assert len(sleeps.delays) == 2 and len(inference_server.seen) == 4


async def test_a_stream_cut_mid_job_is_retried(inference_server, make_backend, sleeps):
    async def crash(request, body):
        return await stream(
            request,
            [{"event": "started", "batch_size": 1}, {"event": "progress", "step": 1, "total": 2}],
            cut=True,
        )

    inference_server.script = [crash]
    backend = make_backend([inference_server.url])
    events, on_event = recorder()
    images = await backend.generate(GenerationParams("txt2img", "x", steps=2), on_event)
    assert len(images) == 1 and len(inference_server.seen) == 2
    assert [e.kind for e in events][:2] == ["started", "progress"]


async def test_malformed_result_is_a_clear_error(inference_server, make_backend):
    async def wrong_count(request, body):
        from aiohttp import web

        return web.json_response(result_body({**body, "seeds": [1]}))

    inference_server.script = [wrong_count]
    backend = make_backend([inference_server.url])
    with pytest.raises(BackendError) as info:
        await backend.generate(GenerationParams("txt2img", "x", seeds=(1, 2)))
    assert "1 image(s), expected 2" in info.value.message


async def test_close_closes_the_shared_session(inference_server, make_backend):
    backend = make_backend([inference_server.url])
    await backend.generate(GenerationParams("txt2img", "x"))
    session = backend._session
    assert session is not None and not session.closed
    await backend.generate(GenerationParams("txt2img", "y"))
    assert backend._session is session  # one session for every request
    await backend.close()
    assert session.closed
    with pytest.raises(BackendUnavailable):
        await backend.generate(GenerationParams("txt2img", "x"))


async def test_no_retry_wait_past_the_jobs_deadline(inference_server, make_backend, sleeps):
    async def overloaded(request, body):
        return error(503, "overloaded", "queue full", headers={"Retry-After": "60"})

    inference_server.script = [overloaded]
    backend = make_backend([inference_server.url], retry_after_max_s=120.0)
    with pytest.raises(BackendUnavailable) as info:
        await backend.generate(GenerationParams("txt2img", "x", timeout_s=20.0))
    assert "before its deadline" in info.value.message and "overloaded: queue full" in info.value.message
    assert sleeps.delays == []  # waiting 60 s for a job due in 20 s would only waste the slot


async def test_a_server_that_never_answers_times_out(inference_server, make_backend):
    async def hang(request, body):
        await asyncio.sleep(30)

    inference_server.script = [hang]
    backend = make_backend([inference_server.url], request_timeout_s=0.3)
    with pytest.raises(BackendUnavailable) as info:
        await backend.generate(GenerationParams("txt2img", "x"))
    assert "did not finish the job within 0.3 s" in info.value.message


async def test_cancelling_a_job_closes_its_request(inference_server, make_backend):
    client_gone = asyncio.Event()
    arrived = asyncio.Event()

    async def slow(request, body):
        arrived.set()
        try:
            for _ in range(3000):  # poll for a vanished client, as the real server does
                if request.transport is None or request.transport.is_closing():
                    break
                await asyncio.sleep(0.01)
            else:
                return error(500, "internal", "the client never went away")
        except (asyncio.CancelledError, ConnectionError):
            pass  # aiohttp cancels a handler whose client disconnected
        client_gone.set()
        raise asyncio.CancelledError

    inference_server.script = [slow]
    backend = make_backend([inference_server.url])
    job = asyncio.create_task(backend.generate(GenerationParams("txt2img", "x")))
    await asyncio.wait_for(arrived.wait(), 30)
    job.cancel()
    with pytest.raises(asyncio.CancelledError):
        await job
    await asyncio.wait_for(client_gone.wait(), 30)
    assert client_gone.is_set()
