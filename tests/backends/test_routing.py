"""Routing over several servers by their reported load, health and capacity, and waiting out an
outage up to `outage_horizon_s` (against loopback fakes of the server; a fake clock, no timings)."""

from __future__ import annotations

import asyncio

import pytest

from bot.backends.base import BackendEvent, BackendUnavailable, GenerationParams
from bot.backends.inference_server import InferenceServerBackend
from tests.backends.conftest import _serve
from tests.backends.fakes import TOKEN, FakeInferenceServer, error


@pytest.fixture
async def make_backend(sleeps):
    made = []

    def make(urls, **kw):
        kw.setdefault("token", TOKEN)
        kw.setdefault("sleep", sleeps)
        kw.setdefault("clock", sleeps.clock)
        backend = InferenceServerBackend(urls, **kw)
        made.append(backend)
        return backend

    yield make
    for backend in made:
        await backend.close()


def prompts(fake: FakeInferenceServer) -> list[str]:
    return [r.body["prompt"] for r in fake.seen]


async def test_each_job_goes_to_the_server_with_the_least_work_per_capacity(
    inference_server, second_inference_server, make_backend
):
    a, b = inference_server, second_inference_server
    backend = make_backend([a.url, b.url])
    # a: 8 requests over a batch of 8 = 1 batch ahead; b: 4 over 1 = 4 batches ahead.
    a.load, b.load = (6, 2, 8), (4, 0, 1)
    await backend.capabilities()  # /health: both loads known
    assert backend.outstanding() == {a.url: 1.0, b.url: 4.0}
    assert backend.capacity() == 9
    await backend.generate(GenerationParams("txt2img", "one"))
    await backend.generate(GenerationParams("txt2img", "two"))  # round-robin would pick b
    assert prompts(a) == ["one", "two"] and prompts(b) == []
    # Each response carries the load: b drains, a fills; the next job follows without a poll.
    b.load, a.load = (0, 0, 1), (12, 4, 8)
    await backend.capabilities()
    await backend.generate(GenerationParams("txt2img", "three"))
    assert prompts(b) == ["three"]


async def test_jobs_sent_since_the_last_report_count(inference_server, second_inference_server, make_backend):
    a, b = inference_server, second_inference_server
    a.load, b.load = (0, 0, 4), (0, 0, 1)
    release = asyncio.Event()
    arrived = asyncio.Queue()

    async def held(request, body):
        arrived.put_nowait(body["prompt"])
        await release.wait()
        return error(503, "overloaded", "done waiting")  # the outcome does not matter here

    a.script = [held] * 3
    b.script = [held]
    backend = make_backend([a.url, b.url], max_retries=0, routing="least_work")
    await backend.capabilities()
    jobs = []
    for name in ("j1", "j2", "j3", "j4"):
        jobs.append(asyncio.ensure_future(backend.generate(GenerationParams("txt2img", name))))
        assert await arrived.get() == name  # sent (and counted) before the next one is routed
    # j1 a (tie, first in turn); j2 b (a has 1/4 ahead); j3 a (1/4 < 1/1); j4 a (2/4 < 1/1), where
    # round-robin would have sent it to b.
    assert prompts(a) == ["j1", "j3", "j4"] and prompts(b) == ["j2"]
    release.set()
    await asyncio.gather(*jobs, return_exceptions=True)


async def test_round_robin_remains_available(inference_server, second_inference_server, make_backend):
    a, b = inference_server, second_inference_server
    a.load, b.load = (0, 0, 8), (30, 0, 1)
    backend = make_backend([a.url, b.url], routing="round_robin")
    await backend.capabilities()
    for i in range(4):
        await backend.generate(GenerationParams("txt2img", f"p{i}"))
    assert prompts(a) == ["p0", "p2"] and prompts(b) == ["p1", "p3"]


async def test_a_server_failing_its_health_check_is_skipped_then_back(make_backend, sleeps):
    a, b = FakeInferenceServer(load=(0, 0, 8)), FakeInferenceServer(load=(8, 0, 8))
    server_a, server_b = await _serve(a), await _serve(b)
    try:
        backend = make_backend([a.url, b.url], server_cooloff_s=60.0)
        await backend.capabilities()
        port = server_a.port
        await server_a.close()  # a stops answering: its /health fails
        await backend.capabilities()
        assert backend.servers_down() == [a.url]
        # a reported less work, but it failed its health check: b takes the job, without a retry.
        await backend.generate(GenerationParams("txt2img", "x"))
        assert prompts(b) == ["x"] and sleeps.delays == []
        # a comes back on the same port: its next good /health puts it back at once.
        from aiohttp.test_utils import TestServer

        revived = TestServer(a.app(), host="127.0.0.1", port=port)
        await revived.start_server()
        try:
            await backend.capabilities()
            assert backend.servers_down() == []
            await backend.generate(GenerationParams("txt2img", "y"))
            assert prompts(a) == ["y"]
        finally:
            await revived.close()
    finally:
        await server_b.close()


async def test_fails_over_when_the_least_loaded_server_refuses(
    refused_url, inference_server, make_backend, sleeps
):
    inference_server.load = (20, 8, 8)
    backend = make_backend([inference_server.url, refused_url])
    await backend.capabilities()  # the refused one reports nothing: 0 work, tried first
    assert len(await backend.generate(GenerationParams("txt2img", "x"))) == 1
    assert prompts(inference_server) == ["x"] and sleeps.delays == []
    assert backend.servers_down() == [refused_url]


# -- outages ---------------------------------------------------------------------------------


async def test_a_restart_longer_than_the_retry_budget_fails_no_job(inference_server, make_backend, sleeps):
    async def restarting(request, body):
        return error(503, "not_ready", "the model is loading", headers={"Retry-After": "5"})

    inference_server.script = [restarting] * 30  # about 150 s of a server that loads its model
    backend = make_backend([inference_server.url], max_retries=4, outage_horizon_s=300.0)
    events: list[BackendEvent] = []

    async def on_event(event: BackendEvent) -> None:
        events.append(event)

    images = await backend.generate(GenerationParams("txt2img", "patient"), on_event)
    assert len(images) == 1
    assert sleeps.now > 40  # longer than the old budget of 5 rounds (fake clock)
    waiting = [e for e in events if e.kind == "waiting"]
    assert len(waiting) == 30 and waiting[-1].extra["waited_s"] > 40
    assert "still loading" in waiting[0].extra["reason"]


async def test_an_outage_past_the_horizon_fails_the_job_clearly(refused_url, make_backend, sleeps):
    backend = make_backend([refused_url], max_retries=2, outage_horizon_s=120.0)
    events: list[BackendEvent] = []

    async def on_event(event: BackendEvent) -> None:
        events.append(event)

    with pytest.raises(BackendUnavailable) as info:
        await backend.generate(GenerationParams("txt2img", "x"), on_event)
    assert "no inference server has been reachable for 120 s" in info.value.message
    # Not retryable: the job already waited the whole horizon; the dispatcher fails it (refunded).
    assert "connection refused" in info.value.message and not info.value.retryable
    assert sleeps.now == pytest.approx(120.0)
    assert all(e.kind == "waiting" for e in events) and len(events) > 3


async def test_a_busy_server_still_fails_after_the_usual_rounds(inference_server, make_backend, sleeps):
    inference_server.script = [lambda r, b: _overloaded()] * 10
    backend = make_backend([inference_server.url], max_retries=2, outage_horizon_s=600.0)
    with pytest.raises(BackendUnavailable, match="after 3 attempt"):
        await backend.generate(GenerationParams("txt2img", "x"))
    assert len(inference_server.seen) == 3  # overload is not an outage: no waiting it out


async def _overloaded():
    return error(503, "overloaded", "queue full")
