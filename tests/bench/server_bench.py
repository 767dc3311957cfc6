"""Server throughput benchmark: `python -m tests.bench.server_bench` (part of `make bench`).

Measured side by side in one run, on the same tiny pipeline, the same requests and the same thread
count:

- direct, sequential: the requests as one diffusers call each, one after another (no server);
- direct, batched: the same images in diffusers calls of `max_batch_size` images (no server): the
  ceiling request batching can reach;
- the real server (`python -m inference_server` in a subprocess, over loopback HTTP with auth, PNG
  encoding and JSON) at concurrency 1, 4, 8 and 16.

Ratios are against the server at concurrency 1 (the same requests sent one at a time) and the direct
batched call, both measured in the same run: "at concurrency 8, X% of a direct batched call" compares
the server with one full batch of clients (concurrency = `--batch`) against the same images in
direct calls of that batch size. Latency percentiles use `tests/bench/stats.py` (linear). Every round runs every mode once, in a shuffled
order, and each mode reports its median round, so load from other jobs on a shared machine hits all
modes alike; the table also shows each mode's range over the rounds. Not a test: timings on shared
machines are noisy, so nothing is asserted.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp

from inference_server.testing import TinyPipelineSpec, save_tiny_pipeline
from tests.bench.stats import percentile
from tests.ports import free_port

TOKEN = "bench-token"
# Client-side keep-alive, below the server's header_timeout_s (10 s; see measure_all).
KEEPALIVE_S = 5.0
# 64x64 images, VAE 64 -> 16x16 latents (the embedded model's geometry), a tiny UNet: per-call
# overhead dominates, which is the regime where request batching pays on a CPU.
SPEC = TinyPipelineSpec(sample_size=64, vae_channels=(8, 8, 16), unet_channels=(8, 16))


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--requests", type=int, default=48, help="requests per measurement (default 48)")
    p.add_argument("--steps", type=int, default=10, help="denoising steps per image (default 10)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads, server and direct (default 1)")
    p.add_argument("--batch", type=int, default=8, help="server max_batch_size and direct batch (default 8)")
    p.add_argument("--levels", default="1,4,8,16", help="client concurrency levels (default 1,4,8,16)")
    p.add_argument(
        "--rounds", type=int, default=5, help="interleaved rounds; each mode reports its median round"
    )
    p.add_argument("--device", default="cpu", help="device for both server and direct calls (default cpu)")
    return p.parse_args()


def requests_for(n: int, steps: int) -> list[dict[str, Any]]:
    return [
        {"prompt": f"a shape number {i}", "seed": 1000 + i, "steps": steps, "guidance": 7.5} for i in range(n)
    ]


def direct_runner(folder: Path, batch: int, threads: int, device: str) -> dict[str, Any]:
    """Measurements of the direct pipeline (no server) on a list of requests, by mode name."""
    import torch
    from diffusers import StableDiffusionPipeline

    torch.set_num_threads(threads)
    pipe = StableDiffusionPipeline.from_pretrained(folder, local_files_only=True).to(device)
    pipe.set_progress_bar_config(disable=True)

    def call(chunk: list[dict[str, Any]]) -> None:
        with torch.inference_mode():
            pipe(
                prompt=[r["prompt"] for r in chunk],
                negative_prompt=[""] * len(chunk),
                generator=[torch.Generator("cpu").manual_seed(r["seed"]) for r in chunk],
                num_inference_steps=chunk[0]["steps"],
                guidance_scale=chunk[0]["guidance"],
                width=SPEC.sample_size,
                height=SPEC.sample_size,
                output_type="pil",
            )

    def measure(reqs: list[dict[str, Any]], size: int) -> dict[str, float]:
        latencies = []
        cpu = time.process_time()
        started = time.perf_counter()
        for i in range(0, len(reqs), size):
            t = time.perf_counter()
            call(reqs[i : i + size])
            latencies.append(time.perf_counter() - t)
        wall = time.perf_counter() - started
        return {
            "ips": len(reqs) / wall,
            "cpu_per_image": (time.process_time() - cpu) / len(reqs),
            "p50": percentile(latencies, 50),
            "p95": percentile(latencies, 95),
        }

    call(requests_for(1, 2))
    call(requests_for(batch, 2))  # warm both shapes
    return {
        "direct sequential (batch 1)": lambda reqs: measure(reqs, 1),
        # Batched calls are short: measure three times the images so one burst of outside load
        # can't decide the figure.
        f"direct batched (batch {batch})": lambda reqs: measure(reqs * 3, batch),
    }


def process_cpu_seconds(pid: int) -> float:
    """CPU time (user + system, all threads) a process has used so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def load_server(
    session: aiohttp.ClientSession, url: str, reqs: list[dict[str, Any]], concurrency: int, pid: int
) -> dict[str, float]:
    """`reqs` sent by `concurrency` clients, each sending its next request when the last returns.

    The session (its connection pool) lives across measurements, as a bot's does: TCP set-up is a
    property of the client, not of the server's batching, and is kept out of the figures.
    """
    headers = {"Authorization": f"Bearer {TOKEN}"}
    pending = list(reqs)
    latencies: list[float] = []
    batch_sizes: list[int] = []

    async def worker() -> None:
        while pending:
            body = pending.pop(0)
            t = time.perf_counter()
            async with session.post(f"{url}/v1/txt2img", json=body, headers=headers) as resp:
                payload = await resp.json()
                if resp.status != 200:
                    raise RuntimeError(f"server answered {resp.status}: {payload}")
            latencies.append(time.perf_counter() - t)
            batch_sizes.append(payload["batch_size"])

    cpu = process_cpu_seconds(pid)
    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    wall = time.perf_counter() - started
    cpu = process_cpu_seconds(pid) - cpu
    return {
        "ips": len(reqs) / wall,
        "cpu_per_image": cpu / len(reqs),
        "p50": percentile(latencies, 50),
        "p95": percentile(latencies, 95),
        "mean_batch": statistics.mean(batch_sizes),
    }


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


def main() -> None:
    args = parse_args()
    levels = [int(x) for x in args.levels.split(",")]
    reqs = requests_for(args.requests, args.steps)
    with tempfile.TemporaryDirectory(prefix="server-bench-") as tmp:
        folder = save_tiny_pipeline(Path(tmp) / "tiny", SPEC)
        port = free_port()
        config = Path(tmp) / "config.toml"
        config.write_text(
            f'[inference_server]\nhost = "127.0.0.1"\nport = {port}\nlog_level = "WARNING"\n'
            f'[model]\npath = "{folder}"\nwidth = {SPEC.sample_size}\nheight = {SPEC.sample_size}\n'
            f'cpu_threads = {args.threads}\ndevice = "{args.device}"\n'
            f"[batching]\nmax_batch_size = {args.batch}\nmax_wait_ms = 50.0\nmax_queue = 256\n"
        )
        print(
            f"tiny pipeline: {SPEC.describe()}; {args.steps} steps, guidance 7.5, {SPEC.sample_size}x{SPEC.sample_size}"
        )
        print(f"{args.requests} requests of 1 image per measurement; torch threads {args.threads}; device {args.device}; "
              f"cores {os.cpu_count()}; median of {args.rounds} rounds, modes shuffled in each; load average before: {', '.join(f'{x:.1f}' for x in os.getloadavg())}")  # fmt: skip
        modes = direct_runner(folder, args.batch, args.threads, args.device)
        rounds: dict[str, list[dict[str, float]]] = {}

        def record(name: str, row: dict[str, float]) -> None:
            rounds.setdefault(name, []).append(row)

        env = {**os.environ, "INFERENCE_API_TOKEN": TOKEN, "HF_HUB_OFFLINE": "1"}
        proc = subprocess.Popen([sys.executable, "-m", "inference_server", "--config", str(config)], env=env)
        try:
            url = f"http://127.0.0.1:{port}"

            async def measure_all() -> None:
                await wait_ready(url, proc)
                # One client session (connection pool) per concurrency level, opened and warmed
                # before any timing, as a long-running bot holds one. Its idle connections are
                # dropped after KEEPALIVE_S: the server closes a connection idle for its
                # header_timeout_s (10 s), and the direct modes block this loop for seconds, so a
                # level's next round reused connections the server had closed ("Cannot write to
                # closing transport": `make bench` stopped there).
                sessions = {
                    c: aiohttp.ClientSession(
                        connector=aiohttp.TCPConnector(limit=c, keepalive_timeout=KEEPALIVE_S)
                    )
                    for c in levels
                }
                try:
                    for c, session in sessions.items():
                        await load_server(session, url, reqs[: max(c, args.batch)], c, proc.pid)
                    # Every round runs every mode once, in a shuffled order, so bursts of load from
                    # other jobs on a shared machine hit all modes alike; each mode then reports its
                    # median round. The direct modes block the loop while they run: nothing else is
                    # in flight then.
                    names = list(modes) + [f"server, concurrency {c}" for c in levels]
                    shuffler = random.Random(0)
                    for _ in range(args.rounds):
                        shuffler.shuffle(names)
                        for name in names:
                            if name in modes:
                                record(name, modes[name](reqs))
                            else:
                                c = int(name.rpartition(" ")[2])
                                # One untimed round at this concurrency first: the batcher's adaptive
                                # wait judges from recent arrival gaps, and the previous mode may have
                                # been one client at a time. Steady state is what is measured here.
                                await load_server(sessions[c], url, reqs[:c], c, proc.pid)
                                record(name, await load_server(sessions[c], url, reqs, c, proc.pid))
                finally:
                    for session in sessions.values():
                        await session.close()

            asyncio.run(measure_all())
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=60)
    # The round with the median throughput stands for each mode (its latencies come with it).
    rows = {}
    for name in [*modes, *(f"server, concurrency {c}" for c in levels)]:
        ordered = sorted(rounds[name], key=lambda r: r["ips"])
        cpu = statistics.median(r["cpu_per_image"] for r in rounds[name])
        rows[name] = {
            **ordered[len(ordered) // 2],
            "min": ordered[0]["ips"],
            "max": ordered[-1]["ips"],
            "cpu_per_image": cpu,
        }
    print_table(rows, args.batch)


def print_table(rows: dict[str, dict[str, float]], batch: int) -> None:
    """Wall-clock figures, and the serving process's CPU time per image, which other jobs on a
    shared machine disturb far less than wall-clock time (one torch thread: CPU time ~ work)."""
    seq = (
        rows["server, concurrency 1"]
        if "server, concurrency 1" in rows
        else rows["direct sequential (batch 1)"]
    )
    best = rows[f"direct batched (batch {batch})"]
    print()
    print(
        "| mode | images/s (median) | min-max over rounds | p50 latency (s) | p95 latency (s) | mean batch "
        "| CPU ms per image | x server sequential (wall / CPU) | % of direct batched (wall / CPU) |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name, r in rows.items():
        mean_batch = (
            f"{r['mean_batch']:.1f}" if "mean_batch" in r else ("1" if "sequential" in name else str(batch))
        )
        vs_seq = f"{r['ips'] / seq['ips']:.2f}x / {seq['cpu_per_image'] / r['cpu_per_image']:.2f}x"
        vs_best = (
            f"{100 * r['ips'] / best['ips']:.0f}% / {100 * best['cpu_per_image'] / r['cpu_per_image']:.0f}%"
        )
        print(
            f"| {name} | {r['ips']:.2f} | {r['min']:.2f}-{r['max']:.2f} | {r['p50']:.3f} | {r['p95']:.3f} "
            f"| {mean_batch} | {1000 * r['cpu_per_image']:.0f} | {vs_seq} | {vs_best} |"
        )
    print()
    print(f"load average after: {', '.join(f'{x:.1f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
