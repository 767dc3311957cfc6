"""Fuzzing the request schemas of both APIs (native and OpenAI-compatible) against the real server.

For each route Hypothesis starts from a valid body and changes a few fields (the route's own, and
unknown ones) to values of every JSON type, awkward ones included (integers past the float range,
NaN and infinities, lone surrogates, nested lists, images of odd modes and sizes, bytes that are no
image), sent as JSON, as a multipart form or as raw bytes. Whatever arrives, the answer is a
well-formed error or a result, never a 500, and a valid request still succeeds afterwards. The
examples are derandomized (the same on every run) and bounded, so the module takes about 20 s; a
failure prints the body that caused it.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import pytest_asyncio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from tests.server.conftest import AUTH, Server, make_config, running_server

# One server for the whole module (the fuzzing, then the check that it still serves), so the tests
# share the module's event loop.
pytestmark = pytest.mark.asyncio(loop_scope="module")


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def fuzz_server(tiny_model: Path) -> AsyncIterator[Server]:
    # Small limits, so that the valid requests the fuzzer hits are cheap to generate.
    config = make_config(tiny_model, server={"max_side": 64, "max_steps": 3, "max_images_per_request": 2})
    async with running_server(config) as server:
        yield server


NATIVE = ["prompt", "negative_prompt", "n", "width", "height", "steps", "guidance", "seed", "seeds", "scheduler",
          "stream", "timeout_s", "priority", "strength"]  # fmt: skip
OPENAI = ["prompt", "n", "size", "response_format", "output_format", "output_compression", "background", "stream",
          "partial_images", "model", "quality", "user", "negative_prompt", "seed", "steps", "guidance", "strength"]  # fmt: skip
UNKNOWN = ["colour", "", "image[]"]


def png(size: tuple[int, int], mode: str = "RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, 0).save(buf, format="PNG")
    return buf.getvalue()


GOOD_IMAGE, GOOD_MASK = png((32, 32)), png((32, 32), "L")
ODD_IMAGES = [png((32, 32), "RGBA"), png((16, 16), "LA"), png((24, 40)), png((8, 8), "1"),
              b"\x89PNG\r\n\x1a\nbroken", b"", b"GIF89a"]  # fmt: skip
# route -> (a valid body, the image fields it takes, the fields worth mutating)
ROUTES: dict[str, tuple[dict[str, Any], tuple[str, ...], list[str]]] = {
    "/v1/txt2img": ({"prompt": "a cat", "steps": 2, "width": 32, "height": 32}, (), NATIVE),
    "/v1/img2img": ({"prompt": "a cat", "steps": 2}, ("image",), NATIVE),
    "/v1/inpaint": ({"prompt": "a cat", "steps": 2}, ("image", "mask"), NATIVE),
    "/v1/images/generations": ({"prompt": "a cat", "size": "32x32", "steps": 2}, (), OPENAI),
    "/v1/images/edits": ({"prompt": "a cat", "steps": 2}, ("image", "mask"), OPENAI),
    "/v1/images/variations": ({"steps": 2}, ("image",), OPENAI),
}
# A 5xx the client can cause without anything being wrong: its own deadline passing (timeout_s), a
# full queue. Every other 5xx is a defect.
ALLOWED_5XX = {504: "deadline_exceeded", 503: "overloaded"}
# Values that have broken servers like this one: past the float range, past Python's digit limit,
# not finite, lone surrogates, the wrong JSON type, nesting, empty.
AWKWARD: list[Any] = [
    10**400, -(10**400), 2**64, -1, 0, 0.5, 1e308, float("nan"), float("inf"), True, None, "", " ",
    "a \ud800 b", "\udc80", "\x00", "9" * 5000, "1" * 400, "1e999", "-0", [], [[[[1]]]], {}, {"a": {"b": 1}},
]  # fmt: skip
TEXT = st.text(st.characters(exclude_categories=[]), max_size=24)  # lone surrogates included
SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**40), 2**40),
    st.floats(allow_nan=True, allow_infinity=True),
    TEXT,
    st.sampled_from(AWKWARD),
    st.sampled_from(
        [
            "a cat",
            "32x32",
            "auto",
            "64x64",
            "url",
            "b64_json",
            "png",
            "jpeg",
            "euler",
            "dall-e-2",
            "true",
            "1",
            "1,2",
            "0.5",
            "2",
            "32",
        ]
    ),  # fmt: skip
)
VALUES = st.recursive(
    SCALARS,
    lambda children: st.lists(children, max_size=3) | st.dictionaries(TEXT, children, max_size=3),
    max_leaves=6,
)


@st.composite
def requests(draw: st.DrawFn, route: str) -> tuple[str, dict[str, Any], dict[str, bytes], bytes]:
    """(encoding, fields, image uploads, raw bytes): a valid body for `route` with a few fields changed."""
    base, image_fields, mutable = ROUTES[route]
    body = dict(base)
    body.update(draw(st.dictionaries(st.sampled_from(mutable + UNKNOWN), VALUES, max_size=3)))
    for name in draw(st.sets(st.sampled_from(sorted(body)), max_size=1)):
        del body[name]
    uploads = {}
    for name in image_fields:
        good = GOOD_MASK if name == "mask" else GOOD_IMAGE
        choice = draw(st.sampled_from(["good", "good", "odd", "missing"]))
        if choice != "missing":
            uploads[name] = good if choice == "good" else draw(st.sampled_from(ODD_IMAGES))
    encoding = draw(st.sampled_from(["json", "json", "form", "raw"]))
    return encoding, body, uploads, draw(st.binary(max_size=64))


def as_json(body: dict[str, Any], uploads: dict[str, bytes]) -> bytes:
    full = {**body, **{name: base64.b64encode(data).decode() for name, data in uploads.items()}}
    return json.dumps(full).encode()  # NaN and Infinity go as JavaScript's tokens, which Python reads


def as_form(body: dict[str, Any], uploads: dict[str, bytes]) -> aiohttp.FormData:
    form = aiohttp.FormData(default_to_multipart=True)
    for name, value in body.items():
        text = value if isinstance(value, str) else json.dumps(value)
        # Lone surrogates can't be UTF-8: they go as the bytes a careless client would send.
        form.add_field(name, text.encode("utf-8", "surrogatepass"))
    for name, data in uploads.items():
        form.add_field(name, data, filename=f"{name}.png", content_type="image/png")
    return form


def check_answer(status: int, payload: Any, route: str, text: str, sent: Any) -> None:
    openai = route.startswith("/v1/images/")
    where = f"{route} {str(sent)[:300]} -> {status} {text[:300]}"
    if status == 200:
        if payload is not None:
            assert "data" in payload or "images" in payload, where
        elif text.startswith("{"):  # a native stream: one JSON event per line, ending in the result
            last = [json.loads(line) for line in text.splitlines()][-1]
            assert last["event"] == "result" or last["error"]["code"] in ALLOWED_5XX.values(), where
        # No streamed event (NDJSON or server-sent) may report an internal failure.
        assert '"internal"' not in text and '"generation_failed"' not in text, where
        return
    assert isinstance(payload, dict) and set(payload) == {"error"}, where
    error = payload["error"]
    assert isinstance(error["message"], str) and error["message"], where
    assert set(error) == ({"message", "type", "param", "code"} if openai else {"code", "message", "field"}), (
        where
    )
    if status >= 500:
        assert ALLOWED_5XX.get(status) == error["code"], where


async def send(server: Server, route: str, encoding: str, body: dict[str, Any], uploads: dict[str, bytes],
               raw: bytes = b"") -> None:  # fmt: skip
    json_headers = {**AUTH, "Content-Type": "application/json"}
    if encoding == "json":
        kwargs: dict[str, Any] = {"data": as_json(body, uploads), "headers": json_headers}
    elif encoding == "raw":
        kwargs = {"data": raw, "headers": json_headers}
    else:
        kwargs = {"data": as_form(body, uploads), "headers": AUTH}
    async with server.session.post(f"{server.url}{route}", **kwargs) as resp:
        text = await resp.text()
        try:
            payload = json.loads(text) if text.startswith("{") else None
        except ValueError:
            payload = None
        check_answer(
            resp.status,
            payload,
            route,
            text,
            (encoding, body, raw) if encoding == "raw" else (encoding, body),
        )


@pytest.mark.parametrize("route", sorted(ROUTES))
async def test_every_field_takes_every_awkward_value_without_a_500(fuzz_server: Server, route: str) -> None:
    """The generated corpus: each field of a valid body replaced by each awkward value, as JSON and
    as a form field (and the image fields by odd images), one change at a time."""
    base, image_fields, fields = ROUTES[route]
    uploads = {name: GOOD_MASK if name == "mask" else GOOD_IMAGE for name in image_fields}
    cases: list[tuple[str, dict[str, Any], dict[str, bytes]]] = []
    for name in fields + UNKNOWN:
        for value in AWKWARD:
            cases.append(("json", {**base, name: value}, uploads))
            if isinstance(value, str):
                cases.append(("form", {**base, name: value}, uploads))
    for name in image_fields:
        others = {k: v for k, v in uploads.items() if k != name}
        cases += [("json", {**base, name: value}, others) for value in AWKWARD]
        for odd in ODD_IMAGES:
            cases += [("json", base, {**uploads, name: odd}), ("form", base, {**uploads, name: odd})]
    limit = asyncio.Semaphore(4)  # a few at a time: the server's batching sees company, the test stays quick

    async def one(case: tuple[str, dict[str, Any], dict[str, bytes]]) -> None:
        async with limit:
            await send(fuzz_server, route, *case)

    await asyncio.gather(*(one(case) for case in cases))


@pytest.mark.parametrize("route", sorted(ROUTES))
@given(data=st.data())
@settings(
    max_examples=25,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
async def test_random_bodies_get_no_500(fuzz_server: Server, route: str, data: st.DataObject) -> None:
    """Hypothesis: a valid body with a few fields changed to random values, or random bytes."""
    await send(fuzz_server, route, *data.draw(requests(route)))


async def test_the_server_answers_a_valid_request_after_the_fuzzing(fuzz_server: Server) -> None:
    assert (await fuzz_server.generate("txt2img", {"prompt": "still here"}))["images"]
