"""The engines the benches compare, built one way for every bench.

A variant is named as the benches' tables name it:

- `"sequential"`: the request-level engine with max batch 1 and no wait (one request at a time);
- `"request-level"`: the request-level engine (`batcher.py`), max batch `max_batch`, max wait
  `max_wait_ms`;
- `"continuous"`: the continuous engine, `admission = "always"`; `"continuous <admission>"` with that
  admission rule (`"continuous efficient"`, `"continuous capped"`); `DECODE_INLINE` (the ablation) with
  decoding on the denoising thread.
"""

from __future__ import annotations

import dataclasses
from typing import Any, get_args, get_type_hints

from inference_server.config import BatchingConfig, ModelConfig
from inference_server.metrics import Metrics
from inference_server.pipelines import PipelineRunner

MAX_BATCH = 8
MAX_WAIT_MS = 50.0
DECODE_INLINE = "continuous, decode inline"
ADMISSIONS: tuple[str, ...] = get_args(get_type_hints(BatchingConfig)["admission"])


def continuous_variant(admission: str) -> str:
    return "continuous" if admission == "always" else f"continuous {admission}"


def make_engine(
    variant: str, model: ModelConfig, max_batch: int = MAX_BATCH, max_wait_ms: float = MAX_WAIT_MS
) -> Any:
    """An engine of `variant` (see the module docstring) over its own runner of `model`."""
    from inference_server.batcher import DynamicBatchingEngine
    from inference_server.continuous import ContinuousBatchingEngine

    runner = PipelineRunner(model)
    if variant == "sequential":
        return DynamicBatchingEngine(
            runner, BatchingConfig(max_batch_size=1, max_wait_ms=0.0, max_queue=10_000), Metrics()
        )
    batching = BatchingConfig(max_batch_size=max_batch, max_wait_ms=max_wait_ms, max_queue=10_000)
    if variant == "request-level":
        return DynamicBatchingEngine(runner, batching, Metrics())
    if variant == DECODE_INLINE:
        engine = ContinuousBatchingEngine(runner, batching, Metrics())
        engine.decode_thread = False
        return engine
    kind, _, admission = variant.partition(" ")
    admission = admission or "always"
    if kind != "continuous" or admission not in ADMISSIONS:
        raise ValueError(f"unknown engine variant {variant!r}")
    return ContinuousBatchingEngine(runner, dataclasses.replace(batching, admission=admission), Metrics())
