"""The bot's /metrics and /readyz, served by the core on `[bot] metrics_port` and scraped over HTTP:
the numbers move when jobs run (parsed with prometheus_client's own text parser), and readiness is
503 with the reason when the database is gone or no inference server answers, 200 otherwise."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Sequence
from pathlib import Path

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from bot.backends.base import BackendRejected
from bot.backends.fake import FakeBackend
from bot.bootstrap import build_core
from bot.core.api import Actor, BadParameters, JobView, Place, ResultImage
from bot.core.db import Database, make_engine
from bot.core.health import ReadinessCheck
from bot.settings import ConfigError
from tests.backends.fakes import TOKEN, FakeInferenceServer, start
from tests.core.helpers import ALICE, GUILD, RecordingDelivery, config_for, running_core
from tests.ports import free_port


class Scrape:
    def __init__(self, text: str):
        self.samples = {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
        }

    def value(self, name: str, **labels: str) -> float:
        return self.samples.get((name, tuple(sorted(labels.items()))), 0.0)


async def scrape(port: int) -> Scrape:
    async with aiohttp.ClientSession() as http, http.get(f"http://127.0.0.1:{port}/metrics") as resp:
        assert resp.status == 200 and resp.content_type == "text/plain"
        return Scrape(await resp.text())


async def readyz(port: int) -> tuple[int, dict]:
    async with aiohttp.ClientSession() as http, http.get(f"http://127.0.0.1:{port}/readyz") as resp:
        return resp.status, await resp.json()


class BrokenDelivery(RecordingDelivery):
    """A chat platform whose result posts fail (an outage the adapter gave up on)."""

    async def on_succeeded(self, job: JobView, images: Sequence[ResultImage]) -> None:
        await super().on_succeeded(job, images)
        raise ConnectionError("the platform is down")


async def test_metrics_move_when_jobs_run(db_url, tmp_path: Path):
    port = free_port()
    backend = FakeBackend()
    async with running_core(
        db_url, tmp_path, backend=backend, start=False, bot={"metrics_port": port, "dispatch_concurrency": 1}
    ) as (core, delivery):
        before = await scrape(port)
        assert before.value("imagine_bot_queue_depth") == 0
        assert before.value("imagine_bot_jobs", state="succeeded") == 0
        first = await core.service.imagine(ALICE, GUILD, "a fox", idempotency_key="m1")
        second = await core.service.imagine(ALICE, GUILD, "a cat", idempotency_key="m2")
        try:
            await core.service.imagine(ALICE, GUILD, "a dog --steps lots", idempotency_key="m3")
        except BadParameters:
            pass
        queued = await scrape(port)
        assert queued.value("imagine_bot_queue_depth") == 2
        assert queued.value("imagine_bot_jobs", state="queued") == 2
        assert queued.value("imagine_bot_submit_seconds_count", operation="imagine", outcome="accepted") == 2
        assert queued.value("imagine_bot_submit_seconds_count", operation="imagine", outcome="refused") == 1

        backend.fail_next(1, BackendRejected("no such thing", "prompt"))
        core.dispatcher.start()
        for job in (first, second):
            await core.service.wait_for_job(job.id, 30)
        await delivery.wait_for(lambda: delivery.finished() == 2)
        done = await scrape(port)
        assert done.value("imagine_bot_queue_depth") == 0
        assert done.value("imagine_bot_jobs", state="succeeded") == 1
        assert done.value("imagine_bot_jobs", state="failed") == 1
        for outcome in ("succeeded", "failed"):
            assert done.value("imagine_bot_jobs_finished_total", platform="discord", outcome=outcome) == 1
            assert done.value("imagine_bot_job_seconds_count", platform="discord", outcome=outcome) == 1
        assert done.value("imagine_bot_job_seconds_sum", platform="discord", outcome="succeeded") > 0
        assert done.value("imagine_bot_backend_errors_total", server="fake", kind="BackendRejected") == 1

        # A platform whose posts fail: counted by platform and callback.
        broken_platform = BrokenDelivery()
        core.service.register_delivery("slack", broken_platform)
        bob = Actor("slack", "U1", "Bob")
        job = await core.service.imagine(bob, Place("slack", "T1", "C1"), "a bird", idempotency_key="m4")
        await broken_platform.wait_for(lambda: job.id in broken_platform.succeeded)
        failures = ("imagine_bot_delivery_failures_total", {"platform": "slack", "callback": "on_succeeded"})
        for _ in range(100):  # the counter moves as the exception leaves the callback
            broken = await scrape(port)
            if broken.value(failures[0], **failures[1]):
                break
            await asyncio.sleep(0.05)
        assert broken.value(failures[0], **failures[1]) == 1
        assert broken.value("imagine_bot_jobs_finished_total", platform="slack", outcome="succeeded") == 0


async def test_readiness_and_backend_errors_by_inference_server(sqlite_url, tmp_path: Path):
    live = FakeInferenceServer()
    server = await start(live.app())
    live.url = str(server.make_url("")).rstrip("/")
    dead = f"http://127.0.0.1:{free_port()}"
    port = free_port()
    backends = {
        "kind": "inference_server",
        "urls": [dead, live.url],
        "max_retries": 0,
        "backoff_base_s": 0.01,
        # No cool-off: the dead server's failed /health at start-up would otherwise send the job
        # straight to the live one, and this test wants the dead one tried (and its error counted).
        "server_cooloff_s": 0,
    }
    try:
        config = config_for(sqlite_url, tmp_path, bot={"metrics_port": port}, backends=backends)
        async with build_core(config, {"INFERENCE_API_TOKEN": TOKEN}) as core:  # the configured backend
            core.service.register_delivery("discord", RecordingDelivery())
            assert await readyz(port) == (200, {"status": "ready", "reason": "ready"})
            job = await core.service.imagine(ALICE, GUILD, "a fox", idempotency_key="b1")
            assert (await core.service.wait_for_job(job.id, 30)).state == "succeeded"
            metrics = await scrape(port)
            assert metrics.value("imagine_bot_backend_errors_total", server=dead, kind="unreachable") == 1
            assert metrics.value("imagine_bot_backend_errors_total", server=live.url, kind="unreachable") == 0

            await server.close()  # the last server goes away
            status, body = await readyz(port)
            assert (status, body) == (503, {"status": "not ready", "reason": "no inference server reachable"})

            # The database gone: its file replaced by a directory, pooled connections dropped.
            await core.db.engine.dispose()
            db_file = Path(sqlite_url.removeprefix("sqlite+aiosqlite:///"))
            await asyncio.to_thread(replace_with_directory, db_file)
            status, body = await readyz(port)
            assert status == 503 and body["reason"].startswith("database unreachable")
            # /metrics still answers (the job gauges keep their last values) and /healthz is liveness.
            assert (await scrape(port)).value("imagine_bot_jobs", state="succeeded") == 1
            async with aiohttp.ClientSession() as http, http.get(f"http://127.0.0.1:{port}/healthz") as resp:
                assert resp.status == 200
            await asyncio.to_thread(restore, db_file)
    finally:
        await server.close()


def replace_with_directory(db_file: Path) -> None:
    db_file.rename(db_file.with_suffix(".moved"))
    db_file.mkdir()


def restore(db_file: Path) -> None:
    db_file.rmdir()
    db_file.with_suffix(".moved").rename(db_file)


async def test_readiness_of_an_unreachable_postgresql():
    engine = make_engine(f"postgresql+asyncpg://postgres@127.0.0.1:{free_port()}/nowhere", pool_size=1)
    try:
        state = await ReadinessCheck(Database(engine), FakeBackend()).check()
    finally:
        await engine.dispose()
    assert not state.ready and state.reason.startswith("database unreachable")


async def test_a_metrics_port_in_use_stops_the_start_naming_the_key(sqlite_url, tmp_path: Path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(ConfigError, match=r"\[bot\] metrics_port: cannot listen on 127.0.0.1"):
            async with running_core(sqlite_url, tmp_path, bot={"metrics_port": port}):
                pass
