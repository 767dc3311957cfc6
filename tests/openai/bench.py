"""What the OpenAI layer costs: `python -m tests.openai.bench`.

The real server (`python -m inference_server` in a subprocess, tiny pipeline) answers the same
text-to-image requests through the native `/v1/txt2img` and through `/v1/images/generations`
(`b64_json`), both with the same aiohttp client (the server-side cost of the OpenAI layer), and through
`/v1/images/generations` with the official `openai` client (what a user of the client sees), at
concurrency 1 and 8, side by side in one run. Rounds interleave the modes and each mode reports its median round, so load from
other jobs on a shared machine hits all modes alike. Not a test: nothing is asserted.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiohttp
import openai

from inference_server.testing import TinyPipelineSpec, save_tiny_pipeline

TOKEN = "bench-token"
# The embedded model's geometry (64x64 images, 16x16 latents) with a tiny UNet: per-request overhead
# is a visible share of the time, which is where an extra HTTP layer would show.
SPEC = TinyPipelineSpec(sample_size=64, vae_channels=(8, 8, 16), unet_channels=(8, 16))


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m tests.openai.bench", description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=24, help="requests (1 image each) per measurement")
    parser.add_argument("--steps", type=int, default=4, help="denoising steps per image")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (the median is reported)")
    parser.add_argument("--levels", default="1,8", help="concurrency levels, comma-separated")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the server")
    return parser.parse_args()


async def measure(
    send: Callable[[int], Awaitable[None]], requests: int, concurrency: int
) -> dict[str, float]:
    pending = list(range(requests))
    latencies: list[float] = []

    async def worker() -> None:
        while pending:
            i = pending.pop(0)
            t = time.perf_counter()
            await send(i)
            latencies.append(time.perf_counter() - t)

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    wall = time.perf_counter() - started
    latencies.sort()
    return {
        "ips": requests / wall,
        "p50": statistics.median(latencies),
        "p95": latencies[min(len(latencies) - 1, round(0.95 * (len(latencies) - 1)))],
    }


async def run_modes(url: str, args: argparse.Namespace) -> dict[str, list[dict[str, float]]]:
    levels = [int(x) for x in args.levels.split(",")]
    rounds: dict[str, list[dict[str, float]]] = {}
    headers = {"Authorization": f"Bearer {TOKEN}"}
    async with (
        aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=max(levels))) as session,
        openai.AsyncOpenAI(base_url=f"{url}/v1", api_key=TOKEN, max_retries=0) as client,
    ):

        async def native(i: int) -> None:
            body = {"prompt": f"a lighthouse {i}", "seed": i, "steps": args.steps}
            async with session.post(f"{url}/v1/txt2img", json=body, headers=headers) as resp:
                payload = await resp.json()
                if resp.status != 200:
                    raise RuntimeError(f"native answered {resp.status}: {payload}")

        async def openai_api(i: int) -> None:
            await client.images.generate(
                prompt=f"a lighthouse {i}",
                response_format="b64_json",
                extra_body={"seed": i, "steps": args.steps},
            )

        async def openai_route(i: int) -> None:
            # The OpenAI route through the same aiohttp client as `native`: the server-side cost
            # of the OpenAI layer alone, without the official client's own overhead.
            body = {
                "prompt": f"a lighthouse {i}",
                "response_format": "b64_json",
                "seed": i,
                "steps": args.steps,
            }
            async with session.post(f"{url}/v1/images/generations", json=body, headers=headers) as resp:
                payload = await resp.json()
                if resp.status != 200:
                    raise RuntimeError(f"OpenAI route answered {resp.status}: {payload}")

        modes = [
            ("native /v1/txt2img, aiohttp", native),
            ("/v1/images/generations, aiohttp", openai_route),
            ("/v1/images/generations, openai client", openai_api),
        ]
        for _, send in modes:
            await measure(send, 8, 8)  # warm every path and the server's shapes
        for round_ in range(args.rounds):
            for level in levels:
                # Rotate which mode goes first, so none always runs right after another.
                for name, send in modes[round_ % len(modes) :] + modes[: round_ % len(modes)]:
                    rounds.setdefault(f"{name}, concurrency {level}", []).append(
                        await measure(send, args.requests, level)
                    )
    return rounds


async def wait_ready(url: str, proc: subprocess.Popen[bytes]) -> None:
    async with aiohttp.ClientSession() as session:
        for _ in range(1200):
            if proc.poll() is not None:
                raise RuntimeError("the server exited during start-up")
            try:
                async with session.get(f"{url}/ready") as resp:
                    if resp.status == 200:
                        return
            except aiohttp.ClientConnectionError:
                pass
            await asyncio.sleep(0.1)
    raise RuntimeError("the server did not become ready")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    args = parse_args()
    with tempfile.TemporaryDirectory(prefix="openai-bench-") as tmp:
        folder = save_tiny_pipeline(Path(tmp) / "tiny", SPEC)
        port = free_port()
        config = Path(tmp) / "config.toml"
        config.write_text(
            f'[inference_server]\nhost = "127.0.0.1"\nport = {port}\nlog_level = "WARNING"\n'
            f'[model]\npath = "{folder}"\nwidth = 64\nheight = 64\ncpu_threads = {args.threads}\ndevice = "cpu"\n'
            f"[batching]\nmax_batch_size = 8\nmax_wait_ms = 25.0\nmax_queue = 256\n"
        )
        print(f"tiny pipeline: {SPEC.describe()}; {args.steps} steps, 64x64, 1 image per request")
        print(
            f"{args.requests} requests per measurement; torch threads {args.threads}; cores {os.cpu_count()}; "
            f"median of {args.rounds} interleaved rounds; load average before: {os.getloadavg()[0]:.1f}"
        )
        env = {**os.environ, "INFERENCE_API_TOKEN": TOKEN, "HF_HUB_OFFLINE": "1"}
        proc = subprocess.Popen([sys.executable, "-m", "inference_server", "--config", str(config)], env=env)
        try:
            url = f"http://127.0.0.1:{port}"
            asyncio.run(wait_ready(url, proc))
            rounds = asyncio.run(run_modes(url, args))
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=60)
    rows = {name: sorted(rs, key=lambda r: r["ips"])[len(rs) // 2] for name, rs in rounds.items()}
    print(f"\n{'mode':<56} {'images/s':>9} {'p50 ms':>8} {'p95 ms':>8} {'vs native':>10}")
    for name, row in rows.items():
        level = name.rsplit(", ", 1)[1]
        ratio = row["ips"] / rows[f"native /v1/txt2img, aiohttp, {level}"]["ips"]
        print(
            f"{name:<56} {row['ips']:>9.2f} {row['p50'] * 1000:>8.1f} {row['p95'] * 1000:>8.1f} {ratio:>9.2f}x"
        )


if __name__ == "__main__":
    main()
