"""LoRA switch cost: `python -m tests.bench.lora_bench` (part of `make bench`; `--quick` for a smoke run).

The server keeps every LoRA it has loaded into a model as a PEFT adapter and switches between them
with `set_adapters` (`PipelineRunner._use_loras`). This measures, on one model and one thread, side
by side in one run:

- switch: making adapter A active after adapter B (and back), both already loaded: what a batch
  with a different LoRA set than the previous one pays before its pipeline call;
- first load: `load_lora_weights` of an adapter the model doesn't hold yet (paid once per model);
- generation: one 20-step image at the model's default size, with no LoRA and with one active
  (unfused adapters add two small matrix products per targeted layer at every step);

and prints the switch cost as a fraction of one generation (goal: under 10%). The model is the
embedded one (`--model tiny`: a tiny random SD 1.5); the LoRAs are made here with PEFT
(tests/models/loras.py), rank `--rank` on every attention projection of the UNet.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from inference_server.config import EMBEDDED_WEIGHTS, ModelConfig
from inference_server.engine import GenerationRequest
from inference_server.loras import LoraLibrary
from inference_server.pipelines import PipelineRunner
from inference_server.tiny_families import save_tiny_family
from tests.bench.stats import percentile
from tests.models.loras import make_lora


def timed(runner: PipelineRunner, work: Callable[[], object]) -> float:
    """Seconds `work` takes on the runner's worker thread (where every pipeline call runs)."""

    def measure() -> float:
        started = time.perf_counter()
        work()
        return time.perf_counter() - started

    return runner._executor.submit(measure).result()


def generation(runner: PipelineRunner, request: GenerationRequest) -> float:
    """Seconds of one pipeline call (`generate_arrays` runs it on the worker thread and waits)."""
    started = time.perf_counter()
    runner.generate_arrays([request])
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", choices=("embedded", "tiny"), default="embedded")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--steps", type=int, default=20)
    # One thread: on a shared machine a second one mostly waits at barriers (far slower under load).
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="fewer repetitions (a smoke run)")
    args = parser.parse_args()
    switches, generations = (10, 2) if args.quick else (60, 7)

    with tempfile.TemporaryDirectory() as tmp:
        folder = (
            EMBEDDED_WEIGHTS if args.model == "embedded" else save_tiny_family("sd15", Path(tmp) / "sd15")
        )
        loras = Path(tmp) / "loras"
        for name, seed in (("a", 1), ("b", 2)):
            make_lora(folder, loras / name, seed=seed, rank=args.rank)
        runner = PipelineRunner(
            ModelConfig(path=str(folder), warmup=True, cpu_threads=args.threads),
            loras=LoraLibrary(str(loras)),
        )
        import asyncio

        asyncio.run(runner.load())
        family = runner.family
        assert family is not None
        request = GenerationRequest(
            task="txt2img",
            prompt="a red circle",
            negative_prompt="",
            seeds=(0,),
            width=family.default_width,
            height=family.default_height,
            steps=args.steps,
            guidance=family.default_guidance,
        )

        def use(*names: str) -> Callable[[], object]:
            return lambda: runner._use_loras(tuple((n, 1.0) for n in names))

        first_loads = [timed(runner, use("a")), timed(runner, use("b"))]
        switch = [timed(runner, use("a" if i % 2 else "b")) for i in range(switches)]
        # Interleaved, so that a change in the machine's load hits both columns alike.
        plain, with_lora = [], []
        for _ in range(generations):
            timed(runner, use())  # off
            plain.append(generation(runner, request))
            timed(runner, use("a"))
            with_lora.append(generation(runner, request))
        runner.close()

    gen = statistics.median(plain)
    sw = statistics.median(switch)
    print(
        f"lora_bench: model {args.model} ({folder.name if args.model == 'tiny' else 'embedded'}), "
        f"{family.default_width}x{family.default_height}, {args.steps} steps, LoRA rank {args.rank} on the UNet's "
        f"attention projections, {args.threads} threads; cores {os.cpu_count()}; "
        f"load average before: {', '.join(f'{x:.1f}' for x in os.getloadavg())}"
    )
    print(f"{'':34} {'median ms':>10} {'p90 ms':>10}")
    rows = [
        ("switch between two loaded LoRAs", switch),
        ("first load of a LoRA", first_loads),
        ("generation, no LoRA", plain),
        ("generation, one LoRA active", with_lora),
    ]
    for label, values in rows:
        print(f"{label:34} {statistics.median(values) * 1000:10.2f} {percentile(values, 90) * 1000:10.2f}")
    print(f"switch / generation: {sw / gen:.2%} (goal < 10%)")
    print(f"generation with a LoRA / without: {statistics.median(with_lora) / gen:.2f}x")


if __name__ == "__main__":
    main()
