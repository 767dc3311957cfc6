"""`ModelRoutingEngine`: the continuous engine for the default model, a request-level engine for the rest.

The step-level scheduler (`continuous/`) runs one pipeline: the default model's, without LoRAs, at
any step-cache level (each image keeps its own cache state: `continuous/caching.py`). Requests for
another model or with LoRAs go to a `DynamicBatchingEngine` over the model registry,
which groups them by (model, LoRA set) like any request-level batch and, for LoRAs on the default
model, uses a second copy of it (see `registry.py`). `/health` and `/ready` follow the continuous
engine: it serves the default model, which is what a server without `model` in its requests uses.
"""

from __future__ import annotations

import asyncio

from inference_server.batcher import DynamicBatchingEngine
from inference_server.engine import (
    Engine,
    EngineInfo,
    EngineLoad,
    EngineState,
    EventCallback,
    GenerationRequest,
    Job,
)
from inference_server.registry import ModelRegistry


class ModelRoutingEngine:
    """An `Engine` that sends each request to the engine serving its model and LoRA set."""

    def __init__(self, primary: Engine, secondary: DynamicBatchingEngine, registry: ModelRegistry) -> None:
        self.primary = primary
        self.secondary = secondary
        self.registry = registry

    def _engine_for(self, request: GenerationRequest) -> Engine:
        default = not request.model or request.model == self.registry.default_name
        return self.primary if default and not request.loras else self.secondary

    @property
    def runner(self) -> object:
        """The default model's runner (tests reach its pipeline through it)."""
        return getattr(self.primary, "runner", self.registry)

    @property
    def name(self) -> str:
        return self.primary.name

    @property
    def state(self) -> EngineState:
        return self.primary.state

    @property
    def ready(self) -> bool:
        return self.primary.ready

    @property
    def queue_depth(self) -> int:
        return self.primary.queue_depth + self.secondary.queue_depth

    @property
    def max_batch_size(self) -> int:
        return self.primary.max_batch_size

    @property
    def load(self) -> EngineLoad:
        """Both engines' requests; the capacity of the primary (the secondary serves the odd
        request on another model or LoRA set, on the same device)."""
        a, b = self.primary.load, self.secondary.load
        return EngineLoad(a.queued + b.queued, a.running + b.running, self.max_batch_size)

    @property
    def info(self) -> EngineInfo:
        return self.primary.info

    async def start(self) -> None:
        await self.primary.start()
        await self.secondary.start()

    async def wait_ready(self) -> None:
        await self.primary.wait_ready()
        await self.secondary.wait_ready()

    def submit(
        self, request: GenerationRequest, *, timeout_s: float, on_event: EventCallback | None = None
    ) -> Job:
        return self._engine_for(request).submit(request, timeout_s=timeout_s, on_event=on_event)

    async def stop(self, grace_s: float) -> None:
        await asyncio.gather(self.primary.stop(grace_s), self.secondary.stop(grace_s))
