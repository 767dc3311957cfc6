"""Fixtures: a tiny random pipeline saved to disk once, and the real server on an ephemeral port."""

from __future__ import annotations

import asyncio
import base64
import io
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from inference_server import keys
from inference_server.app import create_app, runner_options
from inference_server.config import BatchingConfig, Config, ModelConfig, ServerConfig
from inference_server.testing import TinyPipelineSpec, save_tiny_pipeline

TOKEN = "test-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_pipeline(tmp_path_factory.mktemp("tiny-sd") / "pipe", TinyPipelineSpec())


def make_config(model_path: Path, **sections: dict[str, Any]) -> Config:
    base = Config(
        server=ServerConfig(port=0, progress_interval_s=0.0, shutdown_grace_s=20.0),
        # One thread: the 2 shared cores also run other jobs, and oversubscription is far slower.
        model=ModelConfig(path=str(model_path), width=32, height=32, steps=2, guidance=7.5, cpu_threads=1),
        batching=BatchingConfig(max_batch_size=8, max_wait_ms=50.0, max_queue=32),
    )
    return base.replace(**sections) if sections else base


class Server:
    """The real app on 127.0.0.1:<ephemeral port>, with a real client session."""

    def __init__(self, app: web.Application, runner: web.AppRunner, url: str, session: aiohttp.ClientSession):
        self.app = app
        self.runner = runner
        self.url = url
        self.session = session

    async def post(
        self, task: str, body: dict[str, Any] | None = None, **kwargs: Any
    ) -> aiohttp.ClientResponse:
        headers = {**AUTH, **kwargs.pop("headers", {})}
        if body is not None:
            kwargs["json"] = body
        return await self.session.post(f"{self.url}/v1/{task}", headers=headers, **kwargs)

    async def generate(self, task: str, body: dict[str, Any]) -> dict[str, Any]:
        async with await self.post(task, body) as resp:
            payload = await resp.json()
            assert resp.status == 200, payload
            return payload

    async def metrics(self) -> dict[str, float]:
        async with self.session.get(f"{self.url}/metrics") as resp:
            assert resp.status == 200
            return parse_metrics(await resp.text())


def parse_metrics(text: str) -> dict[str, float]:
    """Every sample of a scrape as `name{label="value",...}` (labels sorted by name) -> value."""
    return {
        sample_key(sample.name, sample.labels): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def sample_key(name: str, labels: dict[str, str]) -> str:
    # Bucket bounds as numbers: `le="4"` and the exposition's `le="4.0"` are the same bucket.
    canonical = {k: str(float(v)) if k == "le" else v for k, v in labels.items()}
    inner = ",".join(f'{k}="{v}"' for k, v in sorted(canonical.items()))
    return f"{name}{{{inner}}}" if inner else name


@asynccontextmanager
async def running_server(config: Config, *, token: str = TOKEN) -> AsyncIterator[Server]:
    app = create_app(config, api_token=token)
    runner = web.AppRunner(app, **runner_options(config))
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    url = f"http://127.0.0.1:{port}"
    session = aiohttp.ClientSession()
    try:
        for _ in range(600):
            async with session.get(f"{url}/ready") as resp:
                if resp.status == 200:
                    break
            await asyncio.sleep(0.05)
        else:
            raise AssertionError("server never became ready")
        yield Server(app, runner, url, session)
    finally:
        await session.close()
        if runner.server is not None:  # a shutdown test may have cleaned up already
            await runner.cleanup()


@pytest.fixture
def server_factory(tiny_model: Path) -> Callable[..., Any]:
    """`async with server_factory(batching={...}) as server:` for tests that need their own config."""

    def factory(**sections: dict[str, Any]) -> Any:
        return running_server(make_config(tiny_model, **sections))

    return factory


@pytest.fixture
async def server(tiny_model: Path) -> AsyncIterator[Server]:
    async with running_server(make_config(tiny_model)) as s:
        yield s


def png_b64(img: Image.Image, fmt: str = "PNG") -> str:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return base64.b64encode(buf.getvalue()).decode()


def decode_png(b64: str) -> Image.Image:
    data = base64.b64decode(b64)
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    img = Image.open(io.BytesIO(data))
    img.load()
    return img


def metric(values: dict[str, float], sample: str) -> float:
    """The value of `sample` (`name` or `name{label="value",...}`, labels in any order), 0 if absent."""
    [family] = text_string_to_metric_families(f"{sample} 0\n")
    [parsed] = family.samples
    return values.get(sample_key(parsed.name, parsed.labels), 0.0)


class DeviceGate:
    """Holds the pipeline inside its UNet until released: a fault-injection hook on the real model
    (a forward pre-hook), so tests can keep the device busy for as long as they need."""

    def __init__(self, server: Server) -> None:
        import threading

        self.entered = threading.Event()
        self.release = threading.Event()
        unet = server.app[keys.ENGINE].runner.pipeline("txt2img").unet  # shared by all three pipelines

        def hook(module: Any, args: Any) -> None:
            self.entered.set()
            # Bounded, so a failing test can't hang the suite.
            self.release.wait(timeout=30)

        self.handle = unet.register_forward_pre_hook(hook)

    async def wait_entered(self) -> None:
        assert await asyncio.to_thread(self.entered.wait, 30), "the pipeline never started"

    def open(self) -> None:
        self.release.set()
        self.handle.remove()


async def wait_for(predicate: Callable[[], Any], limit_s: float = 60.0) -> None:
    """Poll `predicate` (sync or async) until it is truthy. The limit only bounds a failing test: a
    loaded 2-core CI machine running two test workers can be many times slower than a desk."""
    deadline = asyncio.get_running_loop().time() + limit_s
    while True:
        value = predicate()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"condition not reached within {limit_s} s")
        await asyncio.sleep(0.02)


HOLDER = {"prompt": "holder", "seed": 0, "steps": 1}  # a batch of its own (no test batches 1 step)


async def generate_together(server: Server, bodies: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """POST every txt2img body at once, with the device held by another request (`HOLDER`) until all
    of them are queued: they meet in the batcher however slowly a loaded machine delivers them, not
    only if they arrive within `max_wait_ms`. The holder adds one pipeline call and one image of
    batch size 1 to the metrics."""
    gate = DeviceGate(server)
    holder = asyncio.ensure_future(server.generate("txt2img", HOLDER))
    try:
        await gate.wait_entered()
        sent = asyncio.gather(*(server.generate("txt2img", b) for b in bodies))
        await wait_for(lambda: server.app[keys.ENGINE].queue_depth == len(bodies))
    finally:
        gate.open()
    results = await sent
    await holder
    return results
