"""Per-family quick comparison of the engines on the tiny pipelines (SDXL, SD 3.x, FLUX.1).

    python -m tests.bench.family_bench --quick                       # every family, short (~10 min)
    python -m tests.bench.family_bench --families sdxl flux_schnell  # some of them
    python -m tests.bench.family_bench --admission always efficient  # both admission rules
    python -m tests.bench.family_bench --parity-only                 # parity per task and sampler (~2 min)

For each family, on its tiny random-weight pipeline (`inference_server/tiny_families.py`) at 32x32,
one torch thread per engine thread, engines driven through the server's `Engine` interface:

1. Parity: every image of the continuous engine against the family's own diffusers pipeline call
   (every task and sampler, all submitted at once so that they share iterations): the largest
   difference, pixels in [0, 1].
2. Saturation, closed loop (as `continuous_bench`): sequential (max batch 1), request-level (max
   batch 8, max wait 50 ms) and continuous (max batch 8; one engine per admission rule asked for).
   Request-level over sequential is what request-level batching buys on this CPU.
3. Load points: Poisson arrivals at 50/70/90% of the **request-level engine's** saturation measured
   in step 2, the same arrivals for every batching engine; p95 latency and its ratio.

Tiny models on a shared 2-core CPU: a step costs about the same per image at any batch size (the
cores are the limit), so expect little from batching here; the GPU-like picture for SDXL and FLUX
comes from the discrete-event model (`python -m tests.bench.des_model`). Every table is printed with
the load average beside it.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from inference_server.config import ModelConfig
from inference_server.engine import GenerationRequest
from inference_server.tiny_families import TinyFamily, save_tiny_family
from tests.bench import des_model as des
from tests.bench import engines as variants
from tests.bench.continuous_bench import (
    PROMPTS,
    PointResult,
    closed_loop_rate,
    commit,
    load_averages,
    run_point,
)
from tests.bench.stats import percentile

SIZE = 32
MAX_BATCH = variants.MAX_BATCH
MAX_WAIT_MS = variants.MAX_WAIT_MS
FAMILIES: tuple[TinyFamily, ...] = ("sdxl", "sd3", "sd3_no_t5", "flux_dev", "flux_schnell")
# Steps and guidance per family: the family's own kind of request, short enough for a quick run.
STEPS = {"flux_schnell": 4}
GUIDANCE = {"sdxl": 5.0, "sd3": 7.0, "sd3_no_t5": 7.0, "flux_dev": 3.5, "flux_schnell": 0.0}
DEFAULT_STEPS = 10


def make_request(family: TinyFamily, rng: random.Random) -> GenerationRequest:
    return GenerationRequest(
        task="txt2img",
        prompt=rng.choice(PROMPTS),
        negative_prompt="",
        seeds=(rng.randrange(2**32),),
        width=SIZE,
        height=SIZE,
        steps=STEPS.get(family, DEFAULT_STEPS),
        guidance=GUIDANCE[family],
    )


def make_engine(kind: str, path: Path) -> Any:
    model = ModelConfig(path=str(path), width=SIZE, height=SIZE, cpu_threads=1)
    return variants.make_engine(kind, model, MAX_BATCH, MAX_WAIT_MS)


async def saturation(engine: Any, family: TinyFamily, clients: int, total: int, stagger: float) -> float:
    rng = random.Random(54321)
    return await closed_loop_rate(engine, lambda: make_request(family, rng), clients, total, stagger)


def parity(family: TinyFamily) -> dict[str, float]:
    """The largest |continuous - diffusers| per task / sampler over the family's parity requests."""
    import numpy as np

    from inference_server.continuous.core import ContinuousEngine
    from inference_server.continuous.engine import scheduler_factory
    from tests.server_continuous.family_parity import family_pipes, family_requests
    from tests.server_continuous.parity import reference

    pipes = family_pipes(family)
    factory = scheduler_factory(pipes["inpaint"])
    engine = ContinuousEngine(pipes["inpaint"], max_batch_size=4, scheduler_factory=factory)
    engine.start()
    try:
        reqs = family_requests(family)
        results = [t.future.result(600) for t in [engine.submit(r) for r in reqs]]
    finally:
        engine.stop()
    worst: dict[str, float] = {}
    for req, result in zip(reqs, results, strict=True):
        key = f"{req.task} / {req.scheduler}"
        for seed, array in zip(req.seeds, result.arrays, strict=True):
            diff = float(np.abs(reference(pipes, factory, req, seed) - array).max())
            worst[key] = max(worst.get(key, 0.0), diff)
    return worst


def parity_table(families: list[TinyFamily]) -> list[str]:
    """Family x task x sampler: the largest difference (pixels in [0, 1])."""
    lines = ["| family | task / sampler | max abs difference |", "| --- | --- | --- |"]
    overall = 0.0
    for family in families:
        worst = parity(family)
        lines += [f"| {family} | {key} | {diff:.2e} |" for key, diff in worst.items()]
        overall = max(overall, *worst.values())
    lines.append(f"| **all** | | **{overall:.2e}** |")
    return lines


async def bench_family(family: TinyFamily, args: argparse.Namespace, folder: Path) -> list[str]:
    path = save_tiny_family(family, folder / family)
    kinds = ["sequential", "request-level"] + [variants.continuous_variant(a) for a in args.admission]
    engines = {k: make_engine(k, path) for k in kinds}
    rng = random.Random(7)
    for engine in engines.values():
        await engine.start()
        await engine.wait_ready()
        for k in range(1, MAX_BATCH + 1):  # every batch shape once before anything is timed
            await asyncio.gather(
                *(engine.submit(make_request(family, rng), timeout_s=3600).wait() for _ in range(k))
            )
    t = time.perf_counter()
    await engines["sequential"].submit(make_request(family, rng), timeout_s=3600).wait()
    stagger = (time.perf_counter() - t) / 4
    sat: dict[str, float] = {}
    for kind in kinds:
        sequential = kind == "sequential"
        clients = 2 if sequential else 2 * MAX_BATCH
        total = args.saturation_requests // (4 if sequential else 1)
        sat[kind] = await saturation(engines[kind], family, clients, total, stagger)
    lines = [
        f"### {family} ({load_averages()})",
        "",
        "| engine | saturation (req/s) | vs request-level | vs sequential |",
        "| --- | --- | --- | --- |",
    ]
    lines += [
        f"| {k} | {sat[k]:.2f} | {sat[k] / sat['request-level']:.2f}x | {sat[k] / sat['sequential']:.2f}x |"
        for k in kinds
    ]
    batching = [k for k in kinds if k != "sequential"]
    lines += [
        "",
        "| load | rate (req/s) | "
        + " | ".join(f"{k} p95 (s)" for k in batching)
        + " | "
        + " | ".join(f"{k} / request-level" for k in batching[1:])
        + " | load average |",
        "| --- | --- | "
        + " | ".join("---" for _ in batching)
        + " | "
        + " | ".join("---" for _ in batching[1:])
        + " | --- |",
    ]
    for load in args.loads:
        rate = load * sat["request-level"]
        times = des.poisson(rate, args.requests, lambda r: 0, seed=round(load * 100))
        arrivals = [(at, make_request(family, random.Random(i))) for i, (at, _) in enumerate(times)]
        res: dict[str, PointResult] = {}
        for kind in batching:
            res[kind] = await run_point(engines[kind], arrivals)
        p95 = {k: percentile(r.latencies, 95) for k, r in res.items()}
        lines.append(
            f"| {load:.0%} | {rate:.2f} | "
            + " | ".join(f"{p95[k]:.3f}" for k in batching)
            + " | "
            + " | ".join(f"**{p95[k] / p95['request-level']:.2f}x**" for k in batching[1:])
            + f" | {max(r.load_average for r in res.values()):.2f} |"
        )
    for engine in engines.values():
        await engine.stop(5.0)
    if not args.skip_parity:
        worst = max(parity(family).values())
        lines += ["", f"parity: largest |continuous - diffusers| = {worst:.2e} (pixels in [0, 1])"]
    return lines


async def main_async(args: argparse.Namespace) -> None:
    started = time.perf_counter()
    print(
        f"# family_bench: {' '.join(sys.argv[1:]) or '(defaults)'}; commit {commit()}; "
        f"{time.strftime('%Y-%m-%d %H:%M %Z')}; {load_averages()}",
        flush=True,
    )
    print(
        f"tiny pipelines at {SIZE}x{SIZE}, 1 torch thread per engine; steps {DEFAULT_STEPS} "
        f"(flux_schnell {STEPS['flux_schnell']}); {args.requests} requests per load point; "
        f"{args.saturation_requests} per saturation run\n",
        flush=True,
    )
    if args.parity_only:
        print("\n".join(parity_table(args.families)), flush=True)
        print(f"\n(took {(time.perf_counter() - started) / 60:.1f} min; {load_averages()})")
        return
    with tempfile.TemporaryDirectory() as tmp:
        for family in args.families:
            print("\n".join(await bench_family(family, args, Path(tmp))) + "\n", flush=True)
    print(f"(took {(time.perf_counter() - started) / 60:.1f} min; {load_averages()})")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="fewer requests per point and saturation run")
    parser.add_argument("--families", nargs="+", choices=FAMILIES, default=list(FAMILIES))
    parser.add_argument("--admission", nargs="+", choices=variants.ADMISSIONS, default=["always"])
    parser.add_argument("--loads", type=float, nargs="+", default=[0.5, 0.7, 0.9])
    parser.add_argument("--requests", type=int, default=60, help="requests per load point (default 60)")
    parser.add_argument("--saturation-requests", type=int, default=64)
    parser.add_argument("--skip-parity", action="store_true")
    parser.add_argument(
        "--parity-only", action="store_true", help="only the parity table, per family, task and sampler"
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.requests, args.saturation_requests = 30, 40
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    asyncio.run(main_async(args))


if __name__ == "__main__":
    main()
