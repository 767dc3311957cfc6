"""What the OpenAI layer costs: `python -m tests.openai.bench`.

The real server (`python -m inference_server` in a subprocess, tiny pipeline) answers the same
text-to-image requests through the native `/v1/txt2img` and through `/v1/images/generations`
(`b64_json`), both with the same aiohttp client (the server-side cost of the OpenAI layer), and through
`/v1/images/generations` with the official `openai` client (what a user of the client sees), at
concurrency 1 and 8, side by side in one run.

Every round measures every mode once, in a rotating order, so load from other jobs on a shared
machine hits all modes alike. Each round gives a ratio per mode (its throughput and its median
latency over the native route's in the same round); the table reports the geometric mean of the
per-round ratios with a 95% percentile-bootstrap interval (`tests/bench/stats.py`). An interval
that contains 1.00 means no difference is measurable at this precision; more rounds narrow it.
Not a test: nothing is asserted.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiohttp
import openai

from inference_server.testing import TinyPipelineSpec, save_tiny_pipeline
from tests.bench.stats import percentile, ratio_interval
from tests.ports import free_port

TOKEN = "bench-token"
# The embedded model's geometry (64x64 images, 16x16 latents) with a tiny UNet: per-request overhead
# is a visible share of the time, which is where an extra HTTP layer would show.
SPEC = TinyPipelineSpec(sample_size=64, vae_channels=(8, 8, 16), unet_channels=(8, 16))


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m tests.openai.bench", description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=16, help="requests (1 image each) per measurement")
    parser.add_argument("--steps", type=int, default=4, help="denoising steps per image")
    parser.add_argument(
        "--rounds", type=int, default=10, help="interleaved rounds, one ratio each (default 10, at least 2)"
    )
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
    return {"ips": requests / wall, "p50": percentile(latencies, 50), "latencies": latencies}


async def run_modes(url: str, args: argparse.Namespace) -> dict[str, list[dict]]:
    levels = [int(x) for x in args.levels.split(",")]
    rounds: dict[str, list[dict]] = {}
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
            (NATIVE, native),
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


NATIVE = "native /v1/txt2img, aiohttp"


def table(rounds: dict[str, list[dict]]) -> list[str]:
    """One row per mode and concurrency: pooled figures, and per-round ratios to native."""
    lines = [
        "| mode | concurrency | images/s (median round) | p50 ms | p95 ms | throughput vs native (95% interval) "
        "| p50 latency vs native (95% interval) |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, rs in rounds.items():
        mode, _, level = name.rpartition(", concurrency ")
        native = rounds[f"{NATIVE}, concurrency {level}"]
        latencies = [x for r in rs for x in r["latencies"]]
        ips = sorted(r["ips"] for r in rs)[len(rs) // 2]
        cells = []
        for key in ("ips", "p50"):
            if mode == NATIVE:
                cells.append("1.00x")
                continue
            mid, low, high = ratio_interval([r[key] / n[key] for r, n in zip(rs, native, strict=True)])
            cells.append(f"{mid:.2f}x ({low:.2f}-{high:.2f})")
        lines.append(
            f"| {mode} | {level} | {ips:.2f} | {percentile(latencies, 50) * 1000:.1f} | "
            f"{percentile(latencies, 95) * 1000:.1f} | {cells[0]} | {cells[1]} |"
        )
    return lines


def conclusions(rounds: dict[str, list[dict]]) -> list[str]:
    out = []
    for name, rs in rounds.items():
        mode, _, level = name.rpartition(", concurrency ")
        if mode == NATIVE:
            continue
        native = rounds[f"{NATIVE}, concurrency {level}"]
        mid, low, high = ratio_interval([r["ips"] / n["ips"] for r, n in zip(rs, native, strict=True)])
        if low <= 1.0 <= high:
            what = f"no difference measurable (interval {low:.2f}-{high:.2f}x contains 1.00)"
        else:
            what = f"{'slower' if high < 1 else 'faster'} than native: {mid:.2f}x ({low:.2f}-{high:.2f})"
        out.append(f"{mode}, concurrency {level}: {what}")
    return out


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
        if args.rounds < 2:
            sys.exit("--rounds must be at least 2 (an interval needs two ratios)")
        print(f"tiny pipeline: {SPEC.describe()}; {args.steps} steps, 64x64, 1 image per request")
        print(
            f"{args.requests} requests per measurement; torch threads {args.threads}; cores {os.cpu_count()}; "
            f"{args.rounds} interleaved rounds; load average before: {load_average()}"
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
    print()
    print("\n".join(table(rounds)))
    print()
    print("\n".join(conclusions(rounds)))
    print(f"load average after: {load_average()}")


def load_average() -> str:
    return ", ".join(f"{x:.2f}" for x in os.getloadavg())


if __name__ == "__main__":
    main()
