"""This machine's cost curves for the discrete-event model, measured on the embedded model.

Everything runs with one torch thread, as the bench's engines do, and is timed in **CPU time of the
thread doing the work** (`time.thread_time`): with one torch thread that is the work itself, and
other jobs on a shared machine, which stretch wall-clock time by tens of percent, barely move it.
The curves are what the work costs on an idle core; the measured latencies the model is compared
with include whatever else the machine was doing. Every figure is a median of interleaved timings
after an untimed call of the same shape:

- `c(n)`, one classifier-free-guided UNet step of n = 1..max_batch images (2n rows, 16x16 latents,
  one timestep per row as the continuous engine passes them), fitted as a + b n (least squares);
- the request-level pipeline call (diffusers' `StableDiffusionPipeline`, as the runner calls it) of
  n = 1, 2, 4 and max_batch images at 20 steps: its cost per step (the median gap between the step
  callbacks) and per call (text encoding, latents, VAE decode, images: the rest of the call);
- the continuous engine's own loop (`ContinuousEngine`, its worker thread's CPU clock read at every
  `on_iteration`) with n = 1, 2, 4 and max_batch images running: the cost of an iteration, and of
  admitting an image (the first iteration of a run also admits the run's n images);
- the VAE decode and image conversion of k = 1, 2, 4 and max_batch latents (the continuous engine
  decodes the images that finish at one iteration together, on its second thread).

The request-level and continuous costs beyond c(n) become the model's `rl_step_extra`,
`rl_call_fixed` and `cont_step_extra` curves (piecewise linear through the measured sizes).
"""

from __future__ import annotations

import itertools
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from tests.bench.des_model import Costs, Curve

PROMPT = "a red circle on a white background"


def interleaved(fns: dict[int, Callable[[], object]], reps: int) -> dict[int, float]:
    """Median CPU seconds of each function by key, after one untimed call each (kernels are
    prepared per shape on first use); the keys take turns in every repetition."""
    times: dict[int, list[float]] = {k: [] for k in fns}
    for rep in range(reps + 1):
        for k, fn in fns.items():
            t = time.thread_time()
            fn()
            if rep:
                times[k].append(time.thread_time() - t)
    return {k: statistics.median(v) for k, v in times.items()}


def calibrate(
    model_path: Path, size: int, guidance: float, max_batch: int = 8, reps: int = 5
) -> tuple[Costs, list[str]]:
    """(the measured `Costs`, lines describing the measurement)."""
    import torch
    from diffusers import StableDiffusionPipeline

    from inference_server.continuous.core import ContinuousEngine, ContinuousRequest

    started = time.perf_counter()
    torch.set_num_threads(1)
    pipe = StableDiffusionPipeline.from_pretrained(model_path, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    latent = size // pipe.vae_scale_factor
    channels = pipe.unet.config.in_channels
    sizes = sorted({1, 2, 4, max_batch})

    with torch.inference_mode():
        cond, uncond = pipe.encode_prompt(PROMPT, "cpu", 1, True, "")

        def unet_step(n: int) -> Callable[[], object]:
            x = torch.randn(2 * n, channels, latent, latent)
            t = torch.full((2 * n,), 500.0)
            emb = torch.cat([uncond] * n + [cond] * n)
            return lambda: pipe.unet(x, t, encoder_hidden_states=emb, return_dict=False)

        unet = interleaved({n: unet_step(n) for n in range(1, max_batch + 1)}, 3 * reps)
        b, a = np.polyfit(list(unet), list(unet.values()), 1)
        step = Curve.affine(float(a), float(b))
        residual = max(abs(step(n) - v) / v for n, v in unet.items())

        def vae(k: int) -> Callable[[], object]:
            z = torch.randn(k, pipe.vae.config.latent_channels, latent, latent)

            def run() -> object:
                image = pipe.vae.decode(z / pipe.vae.config.scaling_factor, return_dict=False)[0]
                return pipe.image_processor.postprocess(image, output_type="pil")

            return run

        decode = interleaved({k: vae(k) for k in sizes}, reps)

    # The request-level call at 20 steps: its cost per step is the median gap between the ends of
    # consecutive steps (diffusers' step callback), robust to a stall in one step; the rest of the
    # call (text encoding, latents, VAE decode, images) is the per-call cost.
    calls: dict[int, list[tuple[float, float]]] = {n: [] for n in sizes}

    def call(n: int) -> tuple[float, float]:
        ends: list[float] = []

        def on_step_end(p: object, i: int, t: object, kwargs: dict) -> dict:
            ends.append(time.thread_time())
            return kwargs

        t0 = time.thread_time()
        pipe(
            prompt=[PROMPT] * n,
            negative_prompt=[""] * n,
            generator=[torch.Generator("cpu").manual_seed(i) for i in range(n)],
            num_inference_steps=20,
            guidance_scale=guidance,
            width=size,
            height=size,
            output_type="pil",
            callback_on_step_end=on_step_end,
        )
        total = time.thread_time() - t0
        per_step = statistics.median(np.diff(ends))
        return per_step, total - 20 * per_step

    call_reps = max(3, reps // 2)
    for rep in range(call_reps + 1):
        for n in sizes:
            measured = call(n)
            if rep:
                calls[n].append(measured)
    rl_step = {n: statistics.median(c[0] for c in v) for n, v in calls.items()}
    rl_fixed = {n: statistics.median(c[1] for c in v) for n, v in calls.items()}

    # The worker thread's CPU clock at the end of every iteration, with the running batch size.
    marks: list[tuple[int, float]] = []
    core = ContinuousEngine(
        pipe, max_batch_size=max_batch, on_iteration=lambda n, dt: marks.append((n, time.thread_time()))
    )
    cycles: dict[int, list[float]] = {n: [] for n in sizes}
    firsts: dict[int, list[tuple[int, float]]] = {n: [] for n in sizes}
    core.start()
    try:
        for rep in range(call_reps + 1):  # the first pass warms every shape and is not kept
            for n in sizes:
                before = len(marks)
                tickets = [
                    core.submit(
                        ContinuousRequest(
                            task="txt2img",
                            prompt=PROMPT,
                            seeds=(i,),
                            width=size,
                            height=size,
                            steps=20,
                            guidance=guidance,
                        )
                    )
                    for i in range(n)
                ]
                for ticket in tickets:
                    ticket.future.result(timeout=600)
                run = marks[max(0, before - 1) :]
                if rep and before:
                    # The worker's clock stands still while it waits for work: the gap to the
                    # previous run's last mark is this run's admissions plus its first iteration.
                    gaps = [(m[0], m[1] - p[1]) for p, m in itertools.pairwise(run)]
                    firsts[n].append((gaps[0][0], gaps[0][1] + gaps[1][1]))
                    cycles[n] += [g for size_, g in gaps[2:] if size_ == n]
    finally:
        core.stop()
    cont = {n: statistics.median(v) for n, v in cycles.items() if v}
    # A run's n requests join at its first iteration, or one there and the rest at the second (the
    # worker woke before they were all submitted): either way its first two cycles hold its n
    # admissions beside two iterations.
    admit = max(
        0.0,
        statistics.median(
            (two - cont.get(first, cont[n]) - cont[n]) / n for n, fs in firsts.items() for first, two in fs
        ),
    )

    def extra(measured: dict[int, float]) -> Curve:
        return Curve(tuple((float(n), max(0.0, v - step(n))) for n, v in sorted(measured.items())))

    costs = Costs(
        name="this CPU (measured)",
        step=step,
        rl_call_fixed=Curve(tuple((float(n), max(0.0, v)) for n, v in sorted(rl_fixed.items()))),
        rl_step_extra=extra(rl_step),
        cont_step_extra=extra(cont),
        decode=Curve(tuple((float(k), v) for k, v in sorted(decode.items()))),
        decode_parallel=True,
        cont_admit=admit,
    )

    def ms(values: dict[int, float]) -> str:
        return ", ".join(f"{n}: {v * 1000:.1f}" for n, v in sorted(values.items()))

    lines = [
        f"calibration ({time.perf_counter() - started:.0f} s; thread CPU time, 1 torch thread; medians of "
        f"{3 * reps} (UNet), {reps} (decode) and {call_reps} (calls, continuous runs) interleaved timings):",
        f"- UNet guided step c(n) = {a * 1000:.2f} + {b * 1000:.2f} n ms (fit over n = 1..{max_batch}, "
        f"largest deviation {residual:.0%}); measured ms by n: {ms(unet)}",
        f"- request-level pipeline call, per step ms by n: {ms(rl_step)}; per call (encode, decode, images) ms: {ms(rl_fixed)}",
        f"- continuous engine iteration ms by n: {ms(cont)}; per joining image {admit * 1000:.1f} ms",
        f"- VAE decode + image conversion ms by k: {ms(decode)}",
    ]
    return costs, lines
