"""The playground's HTTP API fuzzed with Hypothesis: any JSON in a `/gradio_api/call/<name>` request
gets an answer that is not a 5xx, handlers fail only with the core's own errors (never the catch-all
that logs "playground handler failed"), the server keeps serving, and every job a request made is a
finished row. Malformed and oversized bodies are refused before anything parses them.

Hypothesis runs in a worker thread with a plain HTTP client while the playground and the core serve
on this test's event loop. Derandomized; IMAGINE_FUZZ_EXAMPLES explores further.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from bot.core.api import Actor
from bot.playground.server import MAX_BODY_BYTES
from tests.playground.harness import app_config, running_playground

EXPLORE = int(os.environ.get("IMAGINE_FUZZ_EXAMPLES", "0"))
NASTY = st.sampled_from(
    ["\x00", "\ud800", "/imagine", "/quota", "/history", "/help", "/nope", "--n 4", "--steps 0", "--ar 9:1",
     "--seed 1e400", "9" * 5000, "\u202e", "--no \x00", "/imagine a --n 2 --steps 2"]
)  # fmt: skip
TEXT = st.one_of(
    st.text(max_size=40), NASTY, st.lists(st.one_of(st.text(max_size=8), NASTY), max_size=6).map(" ".join)
)
JSON_VALUES = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), TEXT),
    lambda inner: st.one_of(
        st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=4), inner, max_size=3)
    ),
    max_leaves=6,
)
# Each endpoint with a strategy for its `data` list: mostly the right shape with hostile values,
# sometimes any JSON at all.
ENDPOINTS = st.one_of(
    st.tuples(st.just("imagine"), st.one_of(st.tuples(TEXT).map(list), st.lists(JSON_VALUES, max_size=3))),
    st.tuples(
        st.sampled_from(
            ["reroll", "variation_1", "variation_4", "upscale_1", "zoom_out_2x", "pan_left", "vary_subtle"]
        ),
        st.lists(JSON_VALUES, max_size=2),
    ),
    st.tuples(st.just("remix"), st.one_of(st.tuples(TEXT).map(list), st.lists(JSON_VALUES, max_size=3))),
    st.tuples(
        st.sampled_from(["admin_usage", "admin_set_limit", "admin_grant", "admin_ban", "admin_unban"]),
        st.one_of(
            st.tuples(TEXT, st.one_of(st.none(), st.integers(), st.floats(), TEXT), TEXT).map(list),
            st.lists(JSON_VALUES, max_size=4),
        ),
    ),
)


def call(http: httpx.Client, base: str, api: str, data: Any) -> tuple[int, str, Any]:
    """POST a call, then read its event stream to the end: (status, last event, its data)."""
    # Serialized here: ASCII escapes carry lone surrogates ("\\ud800"), and NaN/Infinity go as
    # Python writes them, as a hand-made client would send them.
    body = json.dumps({"data": data}).encode()
    r = http.post(f"{base}gradio_api/call/{api}", content=body, headers={"Content-Type": "application/json"})
    if r.status_code != 200:
        return r.status_code, "", r.text
    event_id = r.json()["event_id"]
    last, payload = "", None
    with http.stream("GET", f"{base}gradio_api/call/{api}/{event_id}") as stream:
        assert stream.status_code == 200
        for line in stream.iter_lines():
            if line.startswith("event:"):
                last = line.split(":", 1)[1].strip()
            elif line.startswith("data:") and last in ("complete", "error", "generating"):
                payload = json.loads(line.split(":", 1)[1])
    return 200, last, payload


async def test_api_calls_with_any_json_get_an_answer_and_lose_nothing(tmp_path, caplog):
    config = app_config(
        tmp_path, backends={"kind": "fake", "fake_delay_s": 0.0}, quotas={"daily_limit": 1_000_000}
    )
    caplog.set_level(logging.ERROR, logger="bot")
    async with running_playground(config) as app:
        job_ids: set[int] = set()

        @settings(
            max_examples=EXPLORE or 60,
            derandomize=not EXPLORE,
            deadline=None,
            database=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
        )
        @given(endpoint=ENDPOINTS)
        # Always some real work among the hostile calls, whatever the draw: a job and a button on it.
        @example(endpoint=("imagine", ["/imagine a kite --seed 1"]))
        @example(endpoint=("upscale_1", []))
        def fuzz(endpoint: tuple[str, list[Any]]) -> None:
            api, data = endpoint
            with httpx.Client(timeout=60) as http:
                status, last, payload = call(http, app.url, api, data)
            assert status < 500, (api, data, status, payload)
            if status == 200:
                assert last in ("complete", "error"), (api, data, last)
                assert "object at 0x" not in json.dumps(payload), payload  # no internals shown
                job_ids.update(int(n) for n in re.findall(r"job #(\d+)", json.dumps(payload)))

        await asyncio.to_thread(fuzz)
        with httpx.Client() as http:
            assert (await asyncio.to_thread(http.get, f"{app.url}healthz")).status_code == 200
            ready = await asyncio.to_thread(http.get, f"{app.url}readyz")
            assert (ready.status_code, ready.json()) == (200, {"status": "ready", "reason": "ready"})
            metrics = (await asyncio.to_thread(http.get, f"{app.url}metrics")).text
            assert 'imagine_bot_submit_seconds_count{operation="imagine",outcome="accepted"}' in metrics
        unexpected = [r for r in caplog.records if "handler failed" in r.getMessage()]
        assert not unexpected, unexpected[0].exc_info
        # Every job a request made is a row that finished (the API call streamed it to its end).
        assert job_ids
        for job_id in job_ids:
            job = await app.service.get_job(job_id)
            assert job.done and job.platform == "web", job
        assert len(await app.service.history(Actor("web", "local"), limit=100)) >= len(job_ids)


@pytest.mark.parametrize(
    ("body", "headers", "expected"),
    [
        (b"not json", {"Content-Type": "application/json"}, 422),
        (b"[" * 200_000 + b"]" * 200_000, {"Content-Type": "application/json"}, 400),
        (b'{"data": ["' + b"x" * (MAX_BODY_BYTES + 1) + b'"]}', {"Content-Type": "application/json"}, 413),
    ],
    ids=["not-json", "deeply-nested", "oversized"],
)
async def test_malformed_and_oversized_bodies_are_refused(tmp_path, body, headers, expected):
    async with running_playground(app_config(tmp_path)) as app:

        def go() -> tuple[int, int]:
            with httpx.Client(timeout=60) as http:
                first = http.post(f"{app.url}gradio_api/call/imagine", content=body, headers=headers)

                def chunks():  # no Content-Length: the limit counts the bytes as they come
                    for i in range(0, len(body), 1 << 20):
                        yield body[i : i + 1 << 20]

                chunked = http.post(f"{app.url}gradio_api/call/imagine", content=chunks(), headers=headers)
                return first.status_code, chunked.status_code

        assert await asyncio.to_thread(go) == (expected, expected)
