"""A loopback fake of the inference server's HTTP contract (Hugging Face's is in fake_hf.py).

`FakeInferenceServer` speaks the inference server's API v1 (docs/inference-server.md: auth, JSON and
NDJSON streaming, error bodies) on 127.0.0.1 with the real aiohttp server; a test queues what the
next requests should get and reads back what the client sent. The real inference server is exercised in
test_end_to_end.py.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from aiohttp.test_utils import TestServer
from PIL import Image

TOKEN = "test-token"


def png_bytes(size=(64, 64), colour=(200, 10, 10), fmt="PNG") -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, colour).save(out, format=fmt)
    return out.getvalue()


def seed_png(seed: int, width: int, height: int) -> bytes:
    return png_bytes((width, height), (seed % 256, (seed * 7) % 256, (seed * 13) % 256))


Action = Callable[[web.Request, dict], Awaitable[web.StreamResponse]]


@dataclass
class Seen:
    path: str
    headers: dict[str, str]
    body: Any


@dataclass
class FakeInferenceServer:
    token: str = TOKEN
    script: list[Any] = field(default_factory=list)  # actions for the next requests; then "ok"
    seen: list[Seen] = field(default_factory=list)
    url: str = ""
    # What /health reports as the model's capabilities (None: still loading, as the real server says).
    capabilities: dict[str, Any] | None = None

    def app(self) -> web.Application:
        app = web.Application()
        for route in ("/v1/txt2img", "/v1/img2img", "/v1/inpaint"):
            app.router.add_post(route, self.handle)
        app.router.add_get("/health", self.health)
        return app

    async def health(self, request: web.Request) -> web.Response:
        status = "loading" if self.capabilities is None else "ok"
        return web.json_response({"status": status, "capabilities": self.capabilities})

    async def handle(self, request: web.Request) -> web.StreamResponse:
        if request.headers.get("Authorization") != f"Bearer {self.token}":
            return error(401, "unauthorized", "missing or invalid bearer token")
        body = await request.json()
        self.seen.append(Seen(request.path, dict(request.headers), body))
        action = self.script.pop(0) if self.script else "ok"
        if action == "ok":
            return await success(request, body)
        return await action(request, body)


def error(status: int, code: str, message: str, fld: str | None = None, headers=None) -> web.Response:
    return web.json_response(
        {"error": {"code": code, "message": message, "field": fld}}, status=status, headers=headers
    )


def result_body(body: dict) -> dict:
    seeds = body.get("seeds") or [body.get("seed", 0) + i for i in range(body.get("n", 1))]
    w, h = body.get("width", 64), body.get("height", 64)
    return {
        "images": [{"png_base64": base64.b64encode(seed_png(s, w, h)).decode(), "seed": s} for s in seeds],
        "width": w,
        "height": h,
        "steps": body.get("steps", 20),
        "model": "fake",
        "timings": {"queue_s": 0.0, "run_s": 0.0, "total_s": 0.0},
        "batch_size": len(seeds),
    }


async def success(request: web.Request, body: dict) -> web.StreamResponse:
    if not body.get("stream"):
        return web.json_response(result_body(body))
    steps = body.get("steps", 20)
    events = [{"event": "queued", "position": 1}, {"event": "queued", "position": 0}]
    events += [{"event": "started", "batch_size": body.get("n", 1)}]
    events += [{"event": "progress", "step": i, "total": steps} for i in range(1, steps + 1)]
    events += [{"event": "result", **result_body(body)}]
    return await stream(request, events)


async def stream(request: web.Request, events: list[dict], *, cut: bool = False) -> web.StreamResponse:
    resp = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
    await resp.prepare(request)
    for event in events:
        await resp.write(json.dumps(event).encode() + b"\n")
    if cut:
        # Drop the connection mid-stream, as a crashing server would.
        request.transport.close()
        return resp
    await resp.write_eof()
    return resp


async def start(app: web.Application) -> TestServer:
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    return server


class RecordingSleep:
    """Stands in for asyncio.sleep in the backends: records the delays chosen, waits for none."""

    def __init__(self) -> None:
        self.delays: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.delays.append(seconds)
        await asyncio.sleep(0)
