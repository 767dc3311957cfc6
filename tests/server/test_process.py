"""`python -m inference_server` as a process: SIGTERM lets an in-flight request finish, exit code 0.

One subprocess only: importing torch and diffusers in a fresh process is most of this test's time."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path

import aiohttp

from tests.ports import free_port
from tests.server.conftest import AUTH, TOKEN

REPO = Path(__file__).resolve().parents[2]


async def _start(config: Path) -> asyncio.subprocess.Process:
    env = {**os.environ, "INFERENCE_API_TOKEN": TOKEN, "HF_HUB_OFFLINE": "1"}
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "inference_server", "--config", str(config),
        cwd=REPO, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip


async def test_sigterm_finishes_the_in_flight_request(tiny_model: Path, tmp_path: Path) -> None:
    port = free_port()
    config = tmp_path / "config.toml"
    config.write_text(
        f'[inference_server]\nport = {port}\n[model]\npath = "{tiny_model}"\nwidth = 32\nheight = 32\n'
        "cpu_threads = 1\n[batching]\nmax_wait_ms = 0\n"
    )
    proc = await _start(config)
    url = f"http://127.0.0.1:{port}"
    try:
        async with aiohttp.ClientSession() as session:
            for _ in range(1200):  # at least 120 s: a subprocess loading a model on a loaded CI machine
                try:
                    async with session.get(f"{url}/ready") as resp:
                        if resp.status == 200:
                            break
                except aiohttp.ClientConnectionError:
                    pass
                await asyncio.sleep(0.1)
            else:
                raise AssertionError("server never became ready")
            # SIGTERM goes out after the first progress event, so the request is surely in flight.
            body = {"prompt": "slow", "steps": 20, "stream": True}
            async with session.post(f"{url}/v1/txt2img", json=body, headers=AUTH) as resp:
                assert resp.status == 200
                while b'"progress"' not in await resp.content.readline():
                    pass
                proc.send_signal(signal.SIGTERM)
                lines = [line async for line in resp.content if line.strip()]
            assert b'"event": "result"' in lines[-1]
        assert await asyncio.wait_for(proc.wait(), 60) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
