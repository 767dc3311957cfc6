"""A loopback fake of Hugging Face: the Hub's model API and the Inference Providers router.

What huggingface_hub's clients call, and the fake answers (on 127.0.0.1, the real aiohttp server):

- `GET  /api/models/{id}[?expand=inferenceProviderMapping]`: the Hub. Which providers serve a model,
  under which id, for which task; `pipeline_tag` (hf-inference checks that one instead).
- `POST /hf-inference/models/{id}`: hf-inference. `{"inputs": prompt, "parameters": {...}}`, or for
  image-to-image `{"inputs": base64 image, "parameters": {...}}`; answers the image bytes.
- `POST /fal-ai/{provider id}`: fal-ai text-to-image. `{"prompt", "image_size": {"width", "height"},
  ...}`; answers `{"images": [{"url"}]}`, and the client then downloads the url.
- `POST /fal-ai/{provider id}?_subdomain=queue`, `GET .../requests/{rid}/status`, `GET
  .../requests/{rid}`: fal-ai's queue, which its image-to-image goes through.
- `POST /replicate/v1/models/{provider id}/predictions`: Replicate. `{"input": {"prompt", ...}}`;
  answers `{"output": [url]}` (with `Prefer: wait`).
- `POST /endpoints/{name}`: a dedicated endpoint (`hf_base_url`), hf-inference's format.
- `GET  /files/{name}`: the providers' file storage.

How the client gets here: the router (`https://router.huggingface.co/{provider}`) and the Hub
(`https://huggingface.co`) are constants inside huggingface_hub. Instead of patching them,
`fake_hugging_face()` gives huggingface_hub HTTP clients through its own hooks for that
(`set_client_factory`, `set_async_client_factory`: "custom proxy or certificates") whose transport
sends requests for those two hosts to the fake, lets 127.0.0.1 through, and refuses any other host
(recorded in `blocked`, asserted empty on exit): no test can reach the internet. The backend and
the client run unmodified, routing, payloads, auth and error parsing included.

tests/conftest.py sets HF_HUB_OFFLINE=1 for the whole suite, and huggingface_hub's default clients
then refuse every request, even to 127.0.0.1 (the bot refuses to start with the HF backend under
it). Inside `fake_hugging_face()` the flag is off, as it must be for a bot using this backend; the
loopback-only transport is what keeps the tests offline.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import itertools
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import httpx2
from aiohttp import web
from aiohttp.test_utils import TestServer
from huggingface_hub import constants
from huggingface_hub.inference._providers._common import _fetch_inference_provider_mapping
from huggingface_hub.inference._providers.hf_inference import _check_supported_task
from huggingface_hub.utils import set_async_client_factory, set_client_factory
from huggingface_hub.utils._http import default_async_client_factory, default_client_factory
from multidict import CIMultiDict
from PIL import Image

HF_TOKEN = "hf_test_token"
HUB_HOST = "huggingface.co"
ROUTER_HOST = "router.huggingface.co"
LOOPBACK = ("127.0.0.1", "localhost")
# The sync client (Hub lookups, file downloads) runs in worker threads against the fake in the test's
# event loop; were it ever called on the loop itself it would wait for the fake forever. This turns
# that bug into a failure.
SYNC_TIMEOUT_S = 10.0

Action = Callable[[web.Request, Any], Awaitable[web.StreamResponse]]


def image_bytes(size: tuple[int, int], colour: tuple[int, int, int], fmt: str = "JPEG") -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, colour).save(out, format=fmt)
    return out.getvalue()


def seed_colour(seed: int) -> tuple[int, int, int]:
    """The colour of the fake's image for a seed: tests read the seed back from the pixels."""
    return (seed % 256, 50, 200)


@dataclass
class Seen:
    """A request to the router (or an endpoint) as it arrived."""

    provider: str
    path: str
    query: dict[str, str]
    headers: CIMultiDict[str]  # case-insensitive, as HTTP headers are
    body: Any


@dataclass
class FakeHuggingFace:
    token: str = HF_TOKEN
    # model id -> {"pipeline_tag": str, "mapping": {provider: {"providerId", "task", "status"}}}
    models: dict[str, dict[str, Any]] = field(default_factory=dict)
    # Responses for the next inference requests (router or endpoint), in order; then success.
    script: list[Action] = field(default_factory=list)
    seen: list[Seen] = field(default_factory=list)
    hub_lookups: list[tuple[str, str | None]] = field(default_factory=list)  # (model, Authorization)
    image_format: str = "JPEG"  # providers answer JPEG by default
    url: str = ""
    _files: dict[str, bytes] = field(default_factory=dict)
    _queue: dict[str, dict] = field(default_factory=dict)
    _ids: Any = field(default_factory=itertools.count)

    def serve(
        self,
        model: str,
        provider: str,
        *,
        task: str = "text-to-image",
        provider_id: str | None = None,
        pipeline_tag: str | None = None,
    ) -> None:
        """Make the Hub say `provider` serves `model` for `task` (as `provider_id` on its side)."""
        entry = self.models.setdefault(model, {"pipeline_tag": pipeline_tag or task, "mapping": {}})
        entry["mapping"][provider] = {"providerId": provider_id or model, "task": task, "status": "live"}

    def app(self) -> web.Application:
        app = web.Application(client_max_size=32 * 1024**2)
        app.router.add_get("/api/models/{model:.+}", self.hub_model)
        app.router.add_post("/hf-inference/models/{model:.+}", self.hf_inference)
        app.router.add_post("/endpoints/{name}", self.hf_inference)
        app.router.add_post("/fal-ai/{tail:.+}", self.fal_submit)
        app.router.add_get("/fal-ai/{tail:.+}", self.fal_queue)
        app.router.add_post("/replicate/v1/models/{model:.+}/predictions", self.replicate)
        app.router.add_get("/files/{name}", self.file)
        return app

    # -- the Hub ------------------------------------------------------------------------------

    async def hub_model(self, request: web.Request) -> web.Response:
        model = request.match_info["model"]
        auth = request.headers.get("Authorization")
        self.hub_lookups.append((model, auth))
        if auth is not None and auth != f"Bearer {self.token}":  # anonymous lookups are allowed
            message = "Invalid credentials in Authorization header"
            return web.json_response({"error": message}, status=401, headers={"X-Error-Message": message})
        entry = self.models.get(model)
        if entry is None:
            return web.json_response(
                {"error": "Repository not found"}, status=404, headers={"X-Error-Code": "RepoNotFound"}
            )
        return web.json_response(
            {
                "id": model,
                "pipeline_tag": entry["pipeline_tag"],
                "inferenceProviderMapping": entry["mapping"],
            }
        )

    # -- providers ----------------------------------------------------------------------------

    async def _inference(self, request: web.Request, provider: str, body: Any) -> web.StreamResponse | None:
        """Record the request; check the token; play the script. None: the provider answers."""
        self.seen.append(
            Seen(provider, request.path, dict(request.query), CIMultiDict(request.headers), body)
        )
        if request.headers.get("Authorization") != f"Bearer {self.token}":
            return web.json_response({"error": "Invalid credentials in Authorization header"}, status=401)
        if self.script:
            return await self.script.pop(0)(request, body)
        return None

    async def hf_inference(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        if (scripted := await self._inference(request, "hf-inference", body)) is not None:
            return scripted
        p = body.get("parameters", {})
        size = (p["target_size"]["width"], p["target_size"]["height"]) if "target_size" in p else None
        size = size or (p.get("width", 64), p.get("height", 64))
        data = image_bytes(size, seed_colour(p.get("seed", 0)), self.image_format)
        return web.Response(body=data, content_type=f"image/{self.image_format.lower()}")

    def _store(self, size: tuple[int, int], seed: int) -> dict[str, Any]:
        name = f"{next(self._ids)}.{self.image_format.lower()}"
        self._files[name] = image_bytes(size, seed_colour(seed), self.image_format)
        return {"url": f"{self.url}/files/{name}", "width": size[0], "height": size[1]}

    async def fal_submit(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        if (scripted := await self._inference(request, "fal-ai", body)) is not None:
            return scripted
        provider_id = request.match_info["tail"]
        size = body.get("image_size", {"width": 64, "height": 64})
        result = {"images": [self._store((size["width"], size["height"]), body.get("seed", 0))],
                  "seed": body.get("seed", 0), "has_nsfw_concepts": [False], "prompt": body["prompt"]}  # fmt: skip
        if request.query.get("_subdomain") != "queue":
            return web.json_response(result)
        rid = f"req-{next(self._ids)}"
        self._queue[rid] = {"polls": 0, "result": result}
        return web.json_response(
            {
                "request_id": rid,
                "status": "IN_QUEUE",
                "response_url": f"https://queue.fal.run/{provider_id}/requests/{rid}",
                "status_url": f"https://queue.fal.run/{provider_id}/requests/{rid}/status",
            }
        )

    async def fal_queue(self, request: web.Request) -> web.Response:
        match = re.fullmatch(
            r"(?P<pid>.+)/requests/(?P<rid>[^/]+)(?P<status>/status)?", request.match_info["tail"]
        )
        job = self._queue.get(match["rid"]) if match else None
        if job is None:
            return web.json_response({"detail": "Request not found"}, status=404)
        if match["status"]:
            job["polls"] += 1
            # In progress at the first poll, as a real job is: the client must poll again.
            return web.json_response({"status": "COMPLETED" if job["polls"] > 1 else "IN_PROGRESS"})
        return web.json_response(job["result"])

    async def replicate(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        if (scripted := await self._inference(request, "replicate", body)) is not None:
            return scripted
        p = body["input"]
        image = self._store((p.get("width", 64), p.get("height", 64)), p.get("seed", 0))
        return web.json_response({"id": "pred-1", "status": "succeeded", "output": [image["url"]]})

    async def file(self, request: web.Request) -> web.Response:
        data = self._files.get(request.match_info["name"])
        if data is None:
            raise web.HTTPNotFound()
        return web.Response(body=data, content_type=f"image/{self.image_format.lower()}")


def decoded_input(body: dict) -> Image.Image:
    """The input image of an image-to-image request (hf-inference's base64, or fal's data URL)."""
    data = body.get("inputs") or body["image_url"].split(",", 1)[1]
    return Image.open(io.BytesIO(base64.b64decode(data)))


# -- actions for `FakeHuggingFace.script` -------------------------------------------------------


def answer(status: int, body: Any = None, *, text: str | None = None, headers=None) -> Action:
    async def action(request: web.Request, _body: Any) -> web.StreamResponse:
        if text is not None:
            return web.Response(status=status, text=text, headers=headers)
        return web.json_response(body, status=status, headers=headers)

    return action


def hang(seconds: float) -> Action:
    async def action(request: web.Request, _body: Any) -> web.StreamResponse:
        await asyncio.sleep(seconds)
        return web.json_response({"error": "too late"}, status=504)

    return action


# -- pointing huggingface_hub at the fake --------------------------------------------------------


class _Loopback:
    """Rewrites requests for Hugging Face's hosts to the fake; refuses anything not on loopback."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.blocked: list[str] = []

    def rewrite(self, request: httpx2.Request) -> None:
        host = request.url.host
        if host in (HUB_HOST, ROUTER_HOST):
            request.url = request.url.copy_with(scheme="http", host="127.0.0.1", port=self.port)
        elif host not in LOOPBACK:
            self.blocked.append(str(request.url))
            raise httpx2.ConnectError(
                f"the tests reach no host but 127.0.0.1 (asked: {host})", request=request
            )


class _AsyncTransport(httpx2.AsyncBaseTransport):
    def __init__(self, loopback: _Loopback) -> None:
        self.loopback = loopback
        self.inner = httpx2.AsyncHTTPTransport()

    async def handle_async_request(self, request: httpx2.Request) -> httpx2.Response:
        self.loopback.rewrite(request)
        return await self.inner.handle_async_request(request)

    async def aclose(self) -> None:
        await self.inner.aclose()


class _SyncTransport(httpx2.BaseTransport):
    def __init__(self, loopback: _Loopback) -> None:
        self.loopback = loopback
        self.inner = httpx2.HTTPTransport()

    def handle_request(self, request: httpx2.Request) -> httpx2.Response:
        self.loopback.rewrite(request)
        return self.inner.handle_request(request)

    def close(self) -> None:
        self.inner.close()


def _clear_lookup_caches() -> None:
    # huggingface_hub caches a model's provider mapping for the process; each test's fake Hub
    # says something else about the same model ids.
    _fetch_inference_provider_mapping.cache_clear()
    _check_supported_task.cache_clear()


@contextlib.asynccontextmanager
async def fake_hugging_face() -> AsyncIterator[FakeHuggingFace]:
    fake = FakeHuggingFace()
    server = TestServer(fake.app(), host="127.0.0.1")
    await server.start_server()
    fake.url = str(server.make_url("")).rstrip("/")
    loopback = _Loopback(server.port)
    offline = constants.HF_HUB_OFFLINE
    set_client_factory(lambda: httpx2.Client(transport=_SyncTransport(loopback), timeout=SYNC_TIMEOUT_S))
    set_async_client_factory(lambda: httpx2.AsyncClient(transport=_AsyncTransport(loopback), timeout=None))
    constants.HF_HUB_OFFLINE = False
    _clear_lookup_caches()
    try:
        yield fake
    finally:
        constants.HF_HUB_OFFLINE = offline
        set_client_factory(default_client_factory)
        set_async_client_factory(default_async_client_factory)
        _clear_lookup_caches()
        await server.close()
    assert not loopback.blocked, f"requests to hosts other than 127.0.0.1: {loopback.blocked}"
