"""Step-caching benchmark: `python -m tests.bench.cache_bench` (part of `make bench`).

The embedded model through the server's own `PipelineRunner` (the code a request runs), 64x64,
20 steps, guidance 7.5, measured side by side in one run for caching off and each level
(`inference_server/step_cache.py`): single requests one after another, and batches of 8 images in
one call. Images/s and the median (p50) latency per call, and each level's images/s as a ratio of
"off" in the same run; the CPU seconds per image of single requests and of the batches (process
CPU time, which a busy shared machine disturbs far less than wall time); how many of the steps run
the whole UNet. Every round runs every level once in a shuffled order so that load from
other jobs on a shared machine hits all of them alike; each figure is the median over rounds.
`--compile` adds the uncached model with `[model] compile` and with `[model] channels_last`.
`--continuous` (or `--continuous-only`) adds the continuous engine (`inference_server/continuous/`, each image with its own
cache state) over the same pipeline: 8 single-image requests submitted at once (they share every
iteration), per round for caching off, each level, and half off / half "fast" in one batch;
images/s, the p50 request latency and CPU seconds per image, side by side.

The verdict: images/s at the recommended level >= 1.8x "off" (issue 22's goal). Not a test: timings
on shared machines are noisy, so nothing is asserted; the load average is printed with the figures.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import statistics
import time
from typing import Any

from inference_server.config import ModelConfig
from inference_server.engine import GenerationRequest
from inference_server.pipelines import PipelineRunner
from inference_server.step_cache import CACHE_LEVELS, RECOMMENDED_LEVEL, full_steps, unet_full_step
from tests.bench.stats import percentile

GOAL = 1.8
PROMPTS = ["a red circle on a blue background", "a green square on a white background"]


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--rounds", type=int, default=3, help="rounds of every variant (default 3)")
    p.add_argument("--singles", type=int, default=4, help="single requests per round and variant")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--quick", action="store_true", help="1 round, 2 singles: a smoke run")
    p.add_argument("--compile", action="store_true", help="also torch.compile and channels-last, uncached")
    p.add_argument("--continuous", action="store_true", help="also the continuous engine, off vs each level")
    p.add_argument("--continuous-only", action="store_true", help="only the continuous engine's figures")
    return p.parse_args()


def request(level: str, seeds: tuple[int, ...], steps: int) -> GenerationRequest:
    return GenerationRequest(
        task="txt2img",
        prompt=PROMPTS[seeds[0] % 2],
        negative_prompt="",
        seeds=seeds,
        width=64,
        height=64,
        steps=steps,
        guidance=7.5,
        cache=level,
    )


async def load(config: ModelConfig) -> PipelineRunner:
    runner = PipelineRunner(config)
    started = time.monotonic()
    await runner.load()
    print(
        f"  loaded {config.path} (compile={config.compile}, channels_last={config.channels_last}) "
        f"with warm-up in {time.monotonic() - started:.1f} s"
    )
    return runner


# CPU seconds this process spent per call (every torch thread): on a shared machine wall time
# mostly measures the other jobs, while the work a call needs changes little with load.
CPU_SECONDS: list[float] = []


async def timed_call(runner: PipelineRunner, req: GenerationRequest) -> float:
    cpu = time.process_time()
    started = time.perf_counter()
    report = await runner.run([req], None, lambda: False)
    elapsed = time.perf_counter() - started
    CPU_SECONDS.append(time.process_time() - cpu)
    error = report.outcomes[0].error
    if error is not None:
        raise error
    return elapsed


async def main() -> None:
    args = parse_args()
    if args.quick:
        args.rounds, args.singles = 1, 2
    base = ModelConfig(path="embedded", device="cpu", cpu_threads=args.threads)
    runners: dict[str, tuple[PipelineRunner, str]] = {}
    plain = await load(base)
    if args.continuous_only:
        continuous(plain, args)
        plain.close()
        return
    for level in CACHE_LEVELS:
        runners[level] = (plain, level)
    if args.compile:
        runners["compile"] = (await load(ModelConfig(**{**base.__dict__, "compile": True})), "off")
        runners["channels_last"] = (
            await load(ModelConfig(**{**base.__dict__, "channels_last": True})),
            "off",
        )
    # A batch-of-8 warm-up per variant (a compiled model compiles each new shape on first use).
    for runner, level in runners.values():
        await timed_call(runner, request(level, tuple(range(args.batch)), args.steps))
    single: dict[str, list[float]] = {name: [] for name in runners}
    batched: dict[str, list[float]] = {name: [] for name in runners}
    cpu_per_image: dict[str, list[float]] = {name: [] for name in runners}
    cpu_single: dict[str, list[float]] = {name: [] for name in runners}
    single_rate: dict[str, list[float]] = {name: [] for name in runners}
    batch_rate: dict[str, list[float]] = {name: [] for name in runners}
    rng = random.Random(1)
    seed = 0
    for _ in range(args.rounds):
        order = list(runners)
        rng.shuffle(order)
        for name in order:
            runner, level = runners[name]
            times = []
            for _ in range(args.singles):
                seed += 1
                times.append(await timed_call(runner, request(level, (seed,), args.steps)))
                cpu_single[name].append(CPU_SECONDS[-1])
            single[name] += times
            single_rate[name].append(len(times) / sum(times))
            seed += args.batch
            t = await timed_call(runner, request(level, tuple(range(seed, seed + args.batch)), args.steps))
            batched[name].append(t)
            batch_rate[name].append(args.batch / t)
            cpu_per_image[name].append(CPU_SECONDS[-1] / args.batch)
    load_avg = os.getloadavg()
    print(
        f"\nstep caching, embedded model 64x64, {args.steps} steps, guidance 7.5, {args.threads} threads, "
        f"{args.rounds} rounds ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; "
        f"load average {load_avg[0]:.2f} {load_avg[1]:.2f} {load_avg[2]:.2f} on {os.cpu_count()} CPUs)"
    )
    print(
        f"{'variant':<14} {'1 image/s':>10} {'p50 s':>7} {'x off':>6}   {'8 images/s':>10} {'p50 s':>7} "
        f"{'x off':>6}   {'CPU s/image (1, 8)':>18} {'x off':>11}   full UNet steps"
    )
    off_cpu = statistics.median(cpu_per_image["off"])
    off_cpu_single = statistics.median(cpu_single["off"])
    off_single = statistics.median(single_rate["off"])
    off_batch = statistics.median(batch_rate["off"])
    level_of = {name: level for name, (_, level) in runners.items()}
    for name in runners:
        s_rate, b_rate = statistics.median(single_rate[name]), statistics.median(batch_rate[name])
        print(
            f"{name:<14} {s_rate:>10.2f} {percentile(single[name], 50):>7.3f} {s_rate / off_single:>6.2f}   "
            f"{b_rate:>10.2f} {percentile(batched[name], 50):>7.3f} {b_rate / off_batch:>6.2f}   "
            f"{statistics.median(cpu_single[name]):>8.3f} {statistics.median(cpu_per_image[name]):>9.3f} "
            f"{off_cpu_single / statistics.median(cpu_single[name]):>5.2f} "
            f"{off_cpu / statistics.median(cpu_per_image[name]):>5.2f}   "
            f"{full_steps(level_of[name], args.steps)}/{args.steps}"
        )
    for label, rates, off in (("single", single_rate, off_single), ("batch of 8", batch_rate, off_batch)):
        ratio = statistics.median(rates[RECOMMENDED_LEVEL]) / off
        verdict = "MET" if ratio >= GOAL else "NOT MET"
        print(
            f"verdict ({label}): {RECOMMENDED_LEVEL} = {ratio:.2f}x images/s of off; goal >= {GOAL}x: {verdict}"
        )
    if args.continuous:
        continuous(plain, args)
    for runner in {id(r): r for r, _ in runners.values()}.values():
        runner.close()


def continuous(runner: PipelineRunner, args: argparse.Namespace) -> None:
    """The continuous engine over the runner's pipeline: `args.batch` single-image requests at once
    per variant and round (a full running batch; every request shares every iteration)."""
    from inference_server.continuous.core import ContinuousEngine, ContinuousRequest
    from inference_server.continuous.engine import scheduler_factory

    pipe = runner.pipeline("inpaint")
    engine = ContinuousEngine(
        pipe, max_batch_size=args.batch, scheduler_factory=scheduler_factory(pipe), decode_thread=False
    )
    engine.start()
    half = args.batch // 2
    variants: dict[str, list[str]] = {level: [level] * args.batch for level in CACHE_LEVELS}
    variants["off+fast"] = ["off"] * half + ["fast"] * (args.batch - half)
    seed = 10_000

    def run_batch(levels: list[str]) -> tuple[float, float, list[float]]:
        nonlocal seed
        reqs = []
        for level in levels:
            seed += 1
            r = request(level, (seed,), args.steps)
            reqs.append(
                ContinuousRequest(
                    task="txt2img", prompt=r.prompt, negative_prompt=r.negative_prompt, seeds=r.seeds,
                    width=r.width, height=r.height, steps=r.steps, guidance=r.guidance, cache=level,
                )
            )  # fmt: skip
        cpu, started = time.process_time(), time.perf_counter()
        tickets = [engine.submit(r) for r in reqs]
        latencies = [t.future.result(600).total_s for t in tickets]
        return time.perf_counter() - started, time.process_time() - cpu, latencies

    try:
        for levels in variants.values():  # warm-up: first iterations of each batch shape
            run_batch(levels)
        rates: dict[str, list[float]] = {name: [] for name in variants}
        latency: dict[str, list[float]] = {name: [] for name in variants}
        cpu_per_image: dict[str, list[float]] = {name: [] for name in variants}
        rng = random.Random(2)
        for _ in range(args.rounds):
            order = list(variants)
            rng.shuffle(order)
            for name in order:
                wall, cpu, latencies = run_batch(variants[name])
                rates[name].append(args.batch / wall)
                latency[name] += latencies
                cpu_per_image[name].append(cpu / args.batch)
    finally:
        engine.stop()
    load_avg = os.getloadavg()
    print(
        f"\ncontinuous engine, {args.batch} single-image requests at once, embedded model 64x64, "
        f"{args.steps} steps, {args.threads} threads, {args.rounds} rounds "
        f"({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; load average "
        f"{load_avg[0]:.2f} {load_avg[1]:.2f} {load_avg[2]:.2f} on {os.cpu_count()} CPUs)"
    )
    print(f"{'cache':<10} {'images/s':>9} {'x off':>6} {'p50 s':>7}   {'CPU s/image':>11} {'x off':>6}")
    off_rate, off_cpu = statistics.median(rates["off"]), statistics.median(cpu_per_image["off"])
    for name in variants:
        rate, cpu = statistics.median(rates[name]), statistics.median(cpu_per_image[name])
        print(
            f"{name:<10} {rate:>9.2f} {rate / off_rate:>6.2f} {percentile(latency[name], 50):>7.3f}   "
            f"{cpu:>11.3f} {off_cpu / cpu:>6.2f}"
        )
    print(f"  sample-steps reused / run in full: {engine.cache_reused_steps} / {engine.cache_full_steps}")
    costs = unet_call_costs(pipe, 2 * args.batch)
    full_s, shallow_s = costs["full"], costs["shallow"]
    print(
        f"  one UNet call over {2 * args.batch} rows ({args.batch} images with guidance), least CPU s of 30: "
        f"full {full_s:.4f}, shallow path {shallow_s:.4f} ({full_s / shallow_s:.2f}x cheaper); so the UNet's"
        " share of an image falls at most:"
    )
    for level in CACHE_LEVELS:
        full_steps = sum(unet_full_step(level, i, args.steps) for i in range(args.steps))
        cost = full_steps * full_s + (args.steps - full_steps) * shallow_s
        print(
            f"    {level:<7} {full_steps} full + {args.steps - full_steps} shallow steps: {args.steps * full_s / cost:.2f}x"
        )
    linear = (full_s + shallow_s) / 2
    print(
        f"  a mixed iteration, half the rows full and half shallow as two calls: {costs['split']:.4f} CPU s, "
        f"against {linear:.4f} at one call's per-row rate ({costs['split'] / linear - 1:+.0%})"
    )


def unet_call_costs(pipe: Any, rows: int) -> dict[str, float]:
    """CPU seconds of UNet calls over `rows` rows of 64x64's latents: "full", "shallow" (DeepCache's
    path) and "split" (half the rows in full, the other half shallow: two calls, as a mixed
    iteration makes them); the least of 30 tries, the figure least disturbed by other jobs."""
    import torch

    from inference_server.step_cache import LEVELS, deep_cache, shallow_forward

    # The levels' cache depth (all cached levels share one; step_cache.py)
    depth = LEVELS["fast"].unet_depth

    unet = pipe.unet
    side = 64 // pipe.vae_scale_factor
    x = torch.randn(rows, unet.config.in_channels, side, side)
    context = torch.randn(rows, pipe.tokenizer.model_max_length, unet.config.cross_attention_dim)
    t = torch.full((rows,), 500.0)
    half = rows // 2
    with torch.inference_mode():
        with deep_cache(unet, lambda step: True, depth) as state:
            unet(x, t, encoder_hidden_states=context)  # keeps this call's deep features
        deep = state.deep
        calls = {
            "full": lambda: unet(x, t, encoder_hidden_states=context),
            "shallow": lambda: shallow_forward(unet, deep, x, t, context, depth=depth),
            "split": lambda: (
                unet(x[:half], t[:half], encoder_hidden_states=context[:half]),
                shallow_forward(unet, deep[half:], x[half:], t[half:], context[half:], depth=depth),
            ),
        }
        best = dict.fromkeys(calls, float("inf"))
        for _ in range(30):
            for name, call in calls.items():
                cpu = time.process_time()
                call()
                best[name] = min(best[name], time.process_time() - cpu)
    return best


def run() -> Any:
    return asyncio.run(main())


if __name__ == "__main__":
    run()
