"""Routing benchmark: `python -m tests.bench.routing_bench` (part of `make bench`).

Two inference servers, one with a quarter of the other's capacity, behind the bot's real
`InferenceServerBackend`; the same open-loop job stream (Poisson arrivals at `--load` of the pair's
combined capacity, the same seed) is routed round-robin and by least outstanding work, side by side
in alternating rounds. Prints p50 / p95 job latency (from arrival until the images are back) of each
policy and the ratio of the p95s.

The servers are capacity-modelled fakes on loopback, not diffusion models: each speaks the server's
API v1 (NDJSON streaming, the load headers X-Queue-Depth / X-Running / X-Max-Batch on every
response, `/health` with `load`) and runs its queue in batches of up to `max_batch` jobs that take
`batch_s` each, whatever their size (a diffusion batch costs about the same per step for 1 or its
full size on an accelerator that is not saturated). This measures routing, not a model: a real pair
(one with max_batch_size 1) shows the same imbalance, only slower to measure on CPUs.

Jobs go straight to the backend (no dispatcher concurrency limit): the routing decides alone where
the stream goes.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import random
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from aiohttp import web
from aiohttp.test_utils import TestServer

from bot.backends.base import BackendEvent, GenerationParams
from bot.backends.inference_server import InferenceServerBackend
from tests.bench.stats import percentile

# A 1x1 PNG: the bench moves jobs, not pixels.
PNG = base64.b64encode(
    bytes.fromhex(
        "89504e470d0a1a0a0000000d4948445200000001000000010802000000907753de"
        "0000000c4944415408d763f8ffff3f0005fe02fea7d6a4b00000000049454e44ae426082"
    )
).decode()


@dataclass
class ModelledServer:
    """A server whose capacity is `max_batch` jobs per `batch_s`, FIFO."""

    max_batch: int
    batch_s: float
    queue: list[asyncio.Future[None]] = field(default_factory=list)
    running: int = 0
    served: int = 0
    url: str = ""
    _wake: asyncio.Event = field(default_factory=asyncio.Event)

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/v1/txt2img", self.txt2img)
        app.router.add_get("/health", self.health)
        app.on_response_prepare.append(self._load_headers)
        app.cleanup_ctx.append(self._worker)
        return app

    async def _worker(self, app: web.Application) -> AsyncIterator[None]:
        task = asyncio.create_task(self._work())
        yield
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    async def _load_headers(self, request: web.Request, response: web.StreamResponse) -> None:
        response.headers["X-Queue-Depth"] = str(len(self.queue))
        response.headers["X-Running"] = str(self.running)
        response.headers["X-Max-Batch"] = str(self.max_batch)

    async def health(self, request: web.Request) -> web.Response:
        load = {"queued": len(self.queue), "running": self.running, "max_batch_size": self.max_batch}
        return web.json_response({"status": "ok", "capabilities": None, "load": load})

    async def txt2img(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.queue.append(done)
        self._wake.set()
        # Headers (with the load, this job counted) go out at once, as the real server's do.
        resp = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
        await resp.prepare(request)
        await resp.write(json.dumps({"event": "queued", "position": len(self.queue) - 1}).encode() + b"\n")
        await done
        seed = body["seeds"][0]
        result = {"event": "result", "images": [{"png_base64": PNG, "seed": seed}], "width": 1, "height": 1}
        await resp.write(json.dumps(result).encode() + b"\n")
        await resp.write_eof()
        return resp

    async def _work(self) -> None:
        while True:
            if not self.queue:
                self._wake.clear()
                await self._wake.wait()
            batch, self.queue = self.queue[: self.max_batch], self.queue[self.max_batch :]
            self.running = len(batch)
            await asyncio.sleep(self.batch_s)
            self.running = 0
            self.served += len(batch)
            for job in batch:
                job.set_result(None)


async def run_policy(
    routing: str, arrivals: list[float], args: argparse.Namespace
) -> tuple[list[float], list[int]]:
    """Latencies of the stream under `routing`, and how many jobs each server took (big, small)."""
    big = ModelledServer(args.max_batch, args.batch_s)
    small = ModelledServer(max(1, args.max_batch // 4), args.batch_s)
    servers = []
    for fake in (big, small):
        server = TestServer(fake.app(), host="127.0.0.1")
        await server.start_server()
        fake.url = str(server.make_url("")).rstrip("/")
        servers.append(server)
    backend = InferenceServerBackend([big.url, small.url], routing=routing, max_retries=0)  # type: ignore[arg-type]
    try:
        await backend.capabilities()  # /health: both loads and batch sizes, as the bot asks at start-up
        latencies: list[float] = []

        async def on_event(event: BackendEvent) -> None:
            pass  # streaming on, as the bot's dispatcher asks for it

        async def one(i: int, at: float, start: float) -> None:
            await asyncio.sleep(max(0.0, start + at - time.monotonic()))
            t0 = time.monotonic()
            await backend.generate(
                GenerationParams("txt2img", f"job {i}", seeds=(i,), timeout_s=None), on_event
            )
            latencies.append(time.monotonic() - t0)

        start = time.monotonic()
        await asyncio.gather(*(one(i, at, start) for i, at in enumerate(arrivals)))
        return latencies, [big.served, small.served]
    finally:
        await backend.close()
        for server in servers:
            await server.close()


async def amain(args: argparse.Namespace) -> int:
    capacity = (args.max_batch + max(1, args.max_batch // 4)) / args.batch_s  # jobs/s of the pair
    rate = args.load * capacity
    print(
        f"routing bench: servers of max batch {args.max_batch} and {max(1, args.max_batch // 4)}, "
        f"{args.batch_s:g} s per batch (capacity {capacity:g} jobs/s together); {args.jobs} jobs per "
        f"round at {args.load:.0%} of it ({rate:g} jobs/s, Poisson), {args.rounds} round(s) per policy"
    )
    results: dict[str, list[float]] = {"round_robin": [], "least_work": []}
    for r in range(args.rounds):
        rng = random.Random(args.seed + r)
        t, arrivals = 0.0, []
        for _ in range(args.jobs):
            t += rng.expovariate(rate)
            arrivals.append(t)
        # Alternate which policy goes first, so a drift in the machine's load favours neither.
        order = ["round_robin", "least_work"] if r % 2 == 0 else ["least_work", "round_robin"]
        for routing in order:
            latencies, split = await run_policy(routing, arrivals, args)
            results[routing] += latencies
            print(
                f"  round {r + 1} {routing:>11}: p50 {percentile(latencies, 50):6.3f} s, "
                f"p95 {percentile(latencies, 95):6.3f} s; jobs big/small {split[0]}/{split[1]}"
            )
    rr, lw = (percentile(results[k], 95) for k in ("round_robin", "least_work"))
    for name in ("round_robin", "least_work"):
        v = results[name]
        print(f"{name:>11}: p50 {percentile(v, 50):6.3f} s  p95 {percentile(v, 95):6.3f} s  ({len(v)} jobs)")
    ratio = rr / lw
    print(f"p95 round-robin / least-work: {ratio:.2f}x (goal: >= 1.5x)")
    return 0 if ratio >= 1.5 else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=200, help="jobs per round and policy")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--load", type=float, default=0.7, help="arrival rate as a fraction of capacity")
    parser.add_argument("--max-batch", type=int, default=4, help="the big server's batch (small: a quarter)")
    parser.add_argument("--batch-s", type=float, default=0.2, help="seconds per batch on either server")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="2 rounds of 100 jobs")
    args = parser.parse_args(argv)
    if args.quick:
        args.jobs, args.rounds = 100, 2
    return asyncio.run(amain(args))


if __name__ == "__main__":
    sys.exit(main())
