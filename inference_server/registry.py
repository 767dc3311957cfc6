"""The model registry: every model a server holds (`[model]` and `[models.NAME]`), loaded lazily or
at start, unloaded least-recently-used under `[registry] memory_budget_mb`. Never imports aiohttp.

`ModelRegistry` is what the request-level engine runs batches on: it has the `PipelineRunner`
interface the engines use (`load`, `run`, `info`, `pipeline`, `close`), and routes each batch to the
runner of the batch's model (a batch holds one model and one LoRA set: both are in the batch key),
loading it first when it isn't. The default model loads at start and is never unloaded; every
model's runner shares one worker thread per device, so the device still sees one call at a time.

With the continuous engine the step-level scheduler owns the default model's pipeline on its own
thread; requests for another model, or with LoRAs, go to a request-level engine over this registry
(`routing.py`). LoRA adapters change the model's layers for every caller, so with
`exclusive_default` a request for the default model with LoRAs runs on a second copy of it (loaded
on the first such request, counted in the budget like any other model) instead of the scheduler's.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from inference_server.config import Config, ModelConfig
from inference_server.engine import EngineError, EngineInfo, GenerationRequest
from inference_server.errors import RequestError
from inference_server.families import ModelFamily
from inference_server.loras import LoraLibrary, LoraTarget, folder_target
from inference_server.metrics import Metrics
from inference_server.pipelines import BatchReport, Outcome, PipelineRunner, ProgressCallback, choose_device

log = logging.getLogger(__name__)

# The suffix of the second copy of the default model that LoRA requests use beside the continuous
# engine (see the module docstring); never a configurable name (those can't hold "+").
LORA_COPY = "+loras"


class ModelUnavailable(EngineError):
    """The requested model failed to load; the message says why (the traceback is in the log)."""

    kind = "model_unavailable"


@dataclass
class _Entry:
    name: str  # the registry's name (with LORA_COPY for the default's second copy)
    config: ModelConfig
    runner: PipelineRunner
    family: ModelFamily | None = None  # known once loaded, kept after an unload
    target: LoraTarget | None = None
    last_used: float = 0.0
    busy: int = 0  # batches running on it now: never unloaded then
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)


class ModelRegistry:
    """Every configured model by name; see the module docstring."""

    def __init__(self, config: Config, metrics: Metrics, *, exclusive_default: bool = False) -> None:
        self.settings = config.registry
        self.metrics = metrics
        self.default_name = config.default_model()
        self.exclusive_default = exclusive_default
        self.loras = LoraLibrary(self.settings.loras_dir)
        self._executors: dict[str, ThreadPoolExecutor] = {}
        self._configs = config.model_entries()
        self._named = set(config.models)  # from [models.NAME] tables (the rest is [model])
        self._entries: dict[str, _Entry] = {}
        for name, model in self._configs.items():
            self._entries[name] = self._make_entry(name, model)
        metrics.gauge(
            "inference_models_loaded",
            "Models (and copies) whose weights are in memory now.",
            lambda: sum(1 for e in self._entries.values() if e.runner.loaded),
        )
        metrics.gauge(
            "inference_models_loaded_bytes",
            "Bytes of model weights in memory now (what [registry] memory_budget_mb limits).",
            lambda: self.loaded_bytes(),
        )

    def _make_entry(self, name: str, model: ModelConfig) -> _Entry:
        base = name.removesuffix(LORA_COPY)
        section = f"models.{base}" if base in self._named else "model"
        device = choose_device(model.device)
        # One worker thread per device, shared by the models on it; the registry closes them.
        executor = self._executors.get(device)
        if executor is None:
            executor = self._executors[device] = ThreadPoolExecutor(
                max_workers=1, thread_name_prefix=f"pipeline-{device}"
            )
        runner = PipelineRunner(
            model,
            name=base,
            executor=executor,
            loras=self.loras,
            allow_ckpt=self.settings.allow_ckpt,
            section=section,
        )
        return _Entry(name=name, config=model, runner=runner)

    # -- names and what they hold ------------------------------------------------------------------

    @property
    def names(self) -> list[str]:
        return list(self._configs)

    def resolve(self, value: Any, *, field_name: str = "model") -> str:
        """A request's `model` -> a registry name (None: the default); 400 "unknown_model" otherwise."""
        if value is None:
            return self.default_name
        if isinstance(value, str) and value in self._configs:
            return value
        shown = repr(value[:64]) if isinstance(value, str) else f"a {type(value).__name__}"
        raise RequestError(
            400,
            "unknown_model",
            field_name,
            f"no model named {shown}; this server has: {', '.join(self.names)} (default {self.default_name})",
        )

    def entry(self, name: str, *, loras: bool = False) -> _Entry:
        if loras and self.exclusive_default and name == self.default_name:
            key = name + LORA_COPY
            if key not in self._entries:
                self._entries[key] = self._make_entry(key, self._configs[name])
            return self._entries[key]
        return self._entries[name]

    def is_loaded(self, name: str) -> bool:
        return self._entries[name].runner.loaded

    def family(self, name: str) -> ModelFamily | None:
        """The model's family if it has been loaded (it is kept after an unload), else None."""
        return self._entries[name].family or self._entries[name].runner.family

    def target(self, name: str) -> LoraTarget | None:
        """What the model offers a LoRA: from the loaded pipeline, else from its config files."""
        entry = self._entries[name]
        if entry.target is not None or entry.runner.lora_target is not None:
            return entry.target or entry.runner.lora_target
        model = entry.config
        folder = model.config if model.single_file else model.resolved_path()
        return folder_target(Path(folder).expanduser()) if folder else None

    def family_name(self, name: str) -> str | None:
        """The model's family name: the loaded family's, else read from its config files (so
        `/v1/models` says it before a lazy model's first request), else None."""
        family = self.family(name)
        if family is not None:
            return family.name
        model = self._entries[name].config
        if model.family:
            return model.family
        folder = model.config if model.single_file else model.resolved_path()
        return folder_family(Path(folder).expanduser()) if folder else None

    def lora_names(self, name: str) -> list[str]:
        self.loras.refresh()
        return self.loras.names_for(self.target(name))

    def loaded_bytes(self) -> int:
        return sum(e.runner.size_bytes for e in self._entries.values() if e.runner.loaded)

    async def family_for(self, name: str) -> ModelFamily:
        """The model's family, loading the model first if it never was (validation needs it)."""
        family = self.family(name)
        if family is not None:
            return family
        runner = await self.ensure(name)
        assert runner.family is not None
        return runner.family

    # -- loading and unloading ---------------------------------------------------------------------

    async def ensure(self, name: str, *, loras: bool = False) -> PipelineRunner:
        """The model's runner, loaded (unloading others first when the budget says so)."""
        entry = self.entry(name, loras=loras)
        entry.last_used = time.monotonic()
        if entry.runner.loaded:
            return entry.runner
        async with entry.lock:
            if entry.runner.loaded:
                return entry.runner
            await self._make_room(entry, _disk_bytes(entry.config))
            started = time.monotonic()
            try:
                await entry.runner.load()
            except asyncio.CancelledError:
                raise
            except Exception as e:
                self.metrics.model_load_failures.labels(entry.name).inc()
                log.exception("model %s failed to load", entry.name)
                raise ModelUnavailable(f"model {entry.name!r} failed to load: {e}") from e
            seconds = time.monotonic() - started
            self.metrics.model_load_seconds.labels(entry.name).observe(seconds)
            entry.family, entry.target = entry.runner.family, entry.runner.lora_target
            log.info(
                "model %s loaded in %.2f s (%.0f MB of weights; %.0f MB loaded in all)",
                entry.name,
                seconds,
                entry.runner.size_bytes / 2**20,
                self.loaded_bytes() / 2**20,
            )
            entry.last_used = time.monotonic()
            await self._make_room(entry, 0)  # its real size is known now
        return entry.runner

    async def _make_room(self, incoming: _Entry, incoming_bytes: int) -> None:
        """Unload least-recently-used idle models (never the default, never `incoming`) until the
        loaded weights plus `incoming_bytes` fit the budget, or nothing more can go."""
        budget = int(self.settings.memory_budget_mb * 2**20)
        if not budget:
            return
        while self.loaded_bytes() + incoming_bytes > budget:
            candidates = [
                e
                for e in self._entries.values()
                if e.runner.loaded and e.busy == 0 and e is not incoming and e.name != self.default_name
            ]
            if not candidates:
                log.warning(
                    "[registry] memory_budget_mb = %g: %.0f MB loaded and nothing idle to unload; going over",
                    self.settings.memory_budget_mb,
                    (self.loaded_bytes() + incoming_bytes) / 2**20,
                )
                return
            victim = min(candidates, key=lambda e: e.last_used)
            log.info("unloading model %s (least recently used) to stay within the memory budget", victim.name)
            await victim.runner.unload()
            self.metrics.model_evictions.labels(victim.name).inc()

    # -- the runner interface the engines use ------------------------------------------------------

    @property
    def default_runner(self) -> PipelineRunner:
        return self._entries[self.default_name].runner

    @property
    def info(self) -> EngineInfo:
        return self.default_runner.info

    @property
    def model_name(self) -> str:
        return self.default_name

    @property
    def device(self) -> str:
        return self.default_runner.device

    @property
    def dtype(self) -> str:
        return self.default_runner.dtype

    @property
    def config(self) -> ModelConfig:
        return self.default_runner.config

    @property
    def loaded(self) -> bool:
        return self.default_runner.loaded

    @property
    def family_of_default(self) -> ModelFamily | None:
        return self.default_runner.family

    def pipeline(self, task: str) -> Any:
        return self.default_runner.pipeline(task)

    def generate_arrays(self, batch: Sequence[GenerationRequest]) -> Any:
        return self.default_runner.generate_arrays(batch)

    async def load(self) -> None:
        """The default model (and, with `load = "start"`, every other) loaded and warmed."""
        await self.ensure(self.default_name)
        if self.settings.load == "start":
            for name in self.names:
                await self.ensure(name)

    async def run(
        self,
        batch: Sequence[GenerationRequest],
        on_progress: ProgressCallback | None,
        should_stop: Callable[[], bool],
    ) -> BatchReport:
        first = batch[0]
        name = first.model or self.default_name
        try:
            runner = await self.ensure(name, loras=bool(first.loras))
        except ModelUnavailable as e:
            return BatchReport(outcomes=[Outcome(error=e) for _ in batch])
        entry = self.entry(name, loras=bool(first.loras))
        entry.busy += 1
        try:
            return await runner.run(batch, on_progress, should_stop)
        finally:
            entry.busy -= 1
            entry.last_used = time.monotonic()

    def close(self) -> None:
        for entry in self._entries.values():
            entry.runner.close()
        for executor in self._executors.values():
            executor.shutdown(wait=False, cancel_futures=True)


def folder_family(folder: Path) -> str | None:
    """A diffusers folder's family from its config files alone (no weights read); None if unsure.
    The loaded model's family (`families.detect_family`) is the authority; this only names it early."""
    import json

    def read(*parts: str) -> dict[str, Any]:
        try:
            return dict(json.loads((folder.joinpath(*parts)).read_text(encoding="utf-8")))
        except (OSError, ValueError, TypeError):
            return {}

    pipeline = read("model_index.json").get("_class_name")
    if pipeline == "StableDiffusionXLPipeline":
        return "sdxl"
    if pipeline == "StableDiffusion3Pipeline":
        return "sd3"
    if pipeline == "FluxPipeline":
        return "flux-dev" if read("transformer", "config.json").get("guidance_embeds") else "flux-schnell"
    if pipeline == "StableDiffusionPipeline":
        v = read("scheduler", "scheduler_config.json").get("prediction_type") == "v_prediction"
        return "sd-v" if v else "sd"
    return None


def _disk_bytes(model: ModelConfig) -> int:
    """What a model will take in memory, guessed before loading from its weight files' sizes."""
    path = Path(model.resolved_path()).expanduser()
    if path.is_file():
        return path.stat().st_size
    if not path.is_dir():
        return 0
    return sum(p.stat().st_size for p in path.rglob("*.safetensors"))


__all__ = ["ModelRegistry", "ModelUnavailable", "ProgressCallback"]
