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
    # The models registry (API contract of issue 18): name -> its LoRAs, the first the default, each
    # with `capabilities` above (or `model_capabilities[name]`). None: a server from before the
    # registry (GET /v1/models is 404 and a request naming a model is refused as unknown fields).
    models: dict[str, list[str]] | None = None
    model_capabilities: dict[str, dict[str, Any]] = field(default_factory=dict)
    # What its every response reports as its load (X-Queue-Depth, X-Running, X-Max-Batch; and
    # /health's "load"): (queued, running, max batch). None: a server from before load reporting.
    load: tuple[int, int, int] | None = None

    def app(self) -> web.Application:
        app = web.Application()
        app.on_response_prepare.append(self._load_headers)
        for route in ("/v1/txt2img", "/v1/img2img", "/v1/inpaint"):
            app.router.add_post(route, self.handle)
        app.router.add_get("/health", self.health)
        app.router.add_get("/v1/models", self.list_models)
        return app

    async def _load_headers(self, request: web.Request, response: web.StreamResponse) -> None:
        if self.load is not None:
            queued, running, batch = self.load
            response.headers.update(
                {"X-Queue-Depth": str(queued), "X-Running": str(running), "X-Max-Batch": str(batch)}
            )

    @property
    def default_model(self) -> str | None:
        return next(iter(self.models), None) if self.models else None

    async def health(self, request: web.Request) -> web.Response:
        status = "loading" if self.capabilities is None else "ok"
        body: dict[str, Any] = {"status": status, "capabilities": self.capabilities}
        if self.load is not None:
            body["load"] = dict(zip(("queued", "running", "max_batch_size"), self.load, strict=True))
        if self.models is not None:
            body |= {"models": list(self.models), "default_model": self.default_model}
        return web.json_response(body)

    async def list_models(self, request: web.Request) -> web.Response:
        if self.models is None:
            return error(404, "not_found", "no such route")
        data = [
            {
                "id": name,
                "object": "model",
                "created": 1764633600,
                "owned_by": "imagine",
                "default": name == self.default_model,
                "loaded": name == self.default_model,
                "family": self.model_capabilities.get(name, self.capabilities or {}).get("family", "sd15"),
                "capabilities": self.model_capabilities.get(name, self.capabilities),
                "loras": loras,
            }
            for name, loras in self.models.items()
        ]
        return web.json_response({"object": "list", "data": data})

    def check_model(self, body: dict) -> web.Response | None:
        """The registry's 400s for the request's `model` and `loras` (None: acceptable)."""
        if self.models is None:
            extra = [k for k in ("model", "loras") if k in body]
            return error(400, "invalid_request", f"unknown field {extra[0]}", extra[0]) if extra else None
        model = body.get("model", self.default_model)
        if model not in self.models:
            return error(400, "unknown_model", f"model {model!r} is not served here", "model")
        for i, lora in enumerate(body.get("loras") or []):
            if lora.get("name") not in self.models[model]:
                return error(
                    400,
                    "unknown_lora",
                    f"LoRA {lora.get('name')!r} is not available for {model}",
                    f"loras[{i}].name",
                )
            if not -2 <= lora.get("weight", 1.0) <= 2:
                return error(400, "invalid_lora", "weight must be from -2 to 2", f"loras[{i}].weight")
        return None

    async def handle(self, request: web.Request) -> web.StreamResponse:
        if request.headers.get("Authorization") != f"Bearer {self.token}":
            return error(401, "unauthorized", "missing or invalid bearer token")
        body = await request.json()
        self.seen.append(Seen(request.path, dict(request.headers), body))
        refused = self.check_model(body)
        if refused is not None:
            return refused
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
        "model": body.get("model", "fake"),
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
    """Stands in for asyncio.sleep in the backends: records the delays chosen, waits for none, and
    moves its fake clock (`now`, to pass as the backend's `clock`) on by each."""

    def __init__(self) -> None:
        self.delays: list[float] = []
        self.now = 0.0
        self.on_sleep: Callable[[float], None] | None = None

    async def __call__(self, seconds: float) -> None:
        self.delays.append(seconds)
        self.now += seconds
        if self.on_sleep is not None:
            self.on_sleep(self.now)
        await asyncio.sleep(0)

    def clock(self) -> float:
        return self.now
