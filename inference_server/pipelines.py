"""Model loading and the pipeline worker thread. Never imports aiohttp.

One `PipelineRunner` per device owns the diffusers pipelines (text-to-image, and image-to-image and
inpainting built with `from_pipe`, so all three share one set of weights) and a single-thread
executor. Loading reads the model index first (components saved as null, such as SD 3's T5, load as
None; `[model] drop_t5`; the dtype for the pipeline class), then detects the model's family
(`families.py`), which the rest of the server validates requests against, and loads only once. Every pipeline call runs on that thread: diffusers schedulers and the CLIP tokenizer are
not thread-safe, and one thread per device also keeps the event loop free. Each call gets a fresh
scheduler built from the model's scheduler config, so no scheduler state leaks between calls.

torch and diffusers are imported inside functions: importing this module is cheap.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path, PureWindowsPath
from typing import TYPE_CHECKING, Any, Protocol

from inference_server.config import EMBEDDED_WEIGHTS, SINGLE_FILE_SUFFIXES, ModelConfig
from inference_server.config_loader import ConfigError
from inference_server.engine import EngineInfo, GenerationFailed, GenerationRequest, OutOfMemory
from inference_server.families import SAMPLERS, ModelFamily, UnsupportedModel, detect_family
from inference_server.loras import LoraLibrary, LoraTarget, model_target
from inference_server.previews import Previewer, due, pipeline_latents_to_vae, previewer_for, safe_pngs
from inference_server.step_cache import step_cache

if TYPE_CHECKING:
    from PIL import Image

log = logging.getLogger(__name__)


def scheduler_factory(base: Any) -> Callable[[str | None], Any]:
    """Fresh scheduler instances by the API's names (None: "default"), configured like `base`.

    Schedulers are stateful (`set_timesteps` resets them), so every call gets its own instance:
    one configured instance per name is kept and deep-copied, a third of the cost of `from_config`
    (which inspects signatures). Shared by both engines.
    """
    import copy

    import diffusers

    base_class, base_config = type(base), base.config
    prototypes: dict[str, Any] = {}

    def make(name: str | None) -> Any:
        key = name or "default"
        prototype = prototypes.get(key)
        if prototype is None:
            class_name, extra = SAMPLERS[key]
            cls = getattr(diffusers, class_name) if class_name else base_class
            prototype = prototypes[key] = cls.from_config(base_config, **extra)
        return copy.deepcopy(prototype)

    return make


def public_model_name(path: str) -> str:
    """The model's name as clients see it: a local folder's own name, a Hugging Face id as it is.

    A full path says how the machine is laid out (user names, mount points) to anyone who can reach
    `/health`, which needs no token; the folder name is what identifies the model.
    """
    if path == "embedded":
        return path
    if path.lower().endswith(SINGLE_FILE_SUFFIXES):  # one checkpoint file: its name without suffix
        return PureWindowsPath(path).stem if "\\" in path else Path(path).stem
    if "\\" in path or ":" in path:  # a Windows path ("C:\\models\\sd", "C:/models/sd")
        return PureWindowsPath(path).name or path
    local = Path(path).expanduser()
    # A Hugging Face id has at most one slash ("org/name") and names no existing folder.
    if path.startswith((".", "/", "~")) or path.count("/") > 1 or local.exists():
        return local.name or path
    return path


class ModelLoadError(RuntimeError):
    """The configured model cannot be loaded; the message says why and what to do."""


def check_model_source(config: ModelConfig, *, allow_ckpt: bool = False, section: str = "model") -> None:
    """Fail fast (before the server starts) when the configured model plainly isn't there."""
    if config.single_file:
        check_single_file(config, allow_ckpt=allow_ckpt, section=section)
        return
    if config.path == "embedded" and not (EMBEDDED_WEIGHTS / "model_index.json").is_file():
        raise ModelLoadError(
            f'[model] path = "embedded" but {EMBEDDED_WEIGHTS} holds no trained pipeline '
            "(model_index.json missing). Train it with `make train-model`, or set [model] path "
            "(or $IMAGINE_MODEL_PATH) to a diffusers folder or a cached Hugging Face model id."
        )
    p = Path(config.path).expanduser()
    looks_like_path = config.path.startswith((".", "/", "~")) or p.exists()
    if config.path != "embedded" and looks_like_path and not (p / "model_index.json").is_file():
        raise ModelLoadError(
            f"[{section}] path: {p} is not a diffusers pipeline folder (no model_index.json)"
        )


# diffusers' name for a single file's model type (`infer_diffusers_model_type`) -> our family.
SINGLE_FILE_FAMILIES = {
    "v1": "sd",
    "v2": "sd-v",
    "xl_base": "sdxl",
    "playground-v2-5": "sdxl",
    "sd3": "sd3",
    "sd35_medium": "sd3",
    "sd35_large": "sd3",
    "flux-dev": "flux-dev",
    "flux-schnell": "flux-schnell",
}
# Our family -> the diffusers pipeline class that loads a single file of it.
FAMILY_PIPELINES = {
    "sd": "StableDiffusionPipeline",
    "sd-v": "StableDiffusionPipeline",
    "sdxl": "StableDiffusionXLPipeline",
    "sd3": "StableDiffusion3Pipeline",
    "flux-dev": "FluxPipeline",
    "flux-schnell": "FluxPipeline",
}


def check_single_file(config: ModelConfig, *, allow_ckpt: bool, section: str) -> None:
    p = Path(config.path).expanduser()
    if not p.is_file():
        raise ModelLoadError(f"[{section}] path: {p} is not a file")
    if p.suffix.lower() == ".ckpt" and not allow_ckpt:
        raise ModelLoadError(
            f"[{section}] path: {p} is a .ckpt (a pickle, which can run code when loaded); convert it to "
            ".safetensors, or set [registry] allow_ckpt = true if you trust the file"
        )
    if not config.config:
        raise ModelLoadError(
            f"[{section}] config: {p.name} is a single-file checkpoint; set config to a local folder with "
            "the configs of a diffusers pipeline of its family (the server never downloads them)"
        )
    folder = Path(config.config).expanduser()
    if not (folder / "model_index.json").is_file():
        raise ModelLoadError(
            f"[{section}] config: {folder} is not a diffusers pipeline folder (no model_index.json)"
        )


def single_file_family(path: Path, configured: str | None) -> str:
    """The family of a single-file checkpoint: the configured one, else read from its keys."""
    if configured:
        return configured
    from diffusers.loaders.single_file_utils import infer_diffusers_model_type

    shapes = _checkpoint_shapes(path)
    try:
        kind = infer_diffusers_model_type(shapes)
    except Exception as e:  # a file diffusers can't read at all
        raise ModelLoadError(f"cannot tell what model {path} is ({e}); set family for it") from None
    family = SINGLE_FILE_FAMILIES.get(kind)
    if family in ("sd", "sd-v", "sdxl") and not any(k.startswith("model.diffusion_model.") for k in shapes):
        # diffusers reads any file without the keys it looks for as SD 1.x ("v1"): with no UNet in
        # the original layout either, it is no checkpoint we can tell.
        kind, family = "no UNet in the original layout (model.diffusion_model.*)", None
    if family is None:
        raise ModelLoadError(
            f"cannot tell the family of {path}: diffusers reads it as {kind!r}, which this server doesn't "
            f"serve as one of {', '.join(FAMILY_PIPELINES)}; set family for it if it is one of them"
        )
    return family


def _checkpoint_shapes(path: Path) -> dict[str, Any]:
    """The checkpoint's tensors as shape-only (meta) tensors: enough to tell its kind, no weights read."""
    import torch

    if path.suffix.lower() != ".safetensors":
        from diffusers.models.model_loading_utils import load_state_dict

        return dict(load_state_dict(str(path)))
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return {key: torch.empty(f.get_slice(key).get_shape(), device="meta") for key in f.keys()}  # noqa: SIM118


def choose_device(preference: str) -> str:
    import torch

    if preference == "auto":
        if torch.cuda.is_available():
            return "cuda"
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return "mps"
        return "cpu"
    if preference.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(f'[model] device: "{preference}" requested but torch sees no CUDA device')
        index = int(preference.partition(":")[2] or 0)
        if index >= torch.cuda.device_count():
            raise ConfigError(
                f'[model] device: "{preference}" requested but torch sees {torch.cuda.device_count()} '
                "CUDA device(s), numbered from 0"
            )
    if preference == "mps" and not torch.backends.mps.is_available():
        raise ConfigError('[model] device: "mps" requested but MPS is not available')
    return preference


# bfloat16 for these pipelines on CUDA: FLUX.1 was trained in it and overflows in float16.
BF16_PIPELINES = frozenset({"FluxPipeline"})


def choose_dtype(preference: str, device: str, pipeline_class: str | None = None) -> str:
    """The dtype to load in: the configured one, or for "auto" what suits the device and model."""
    if preference != "auto":
        if preference == "float16" and device == "cpu":
            # Many CPU kernels lack fp16; a config asking for it is most likely a copy-paste from a GPU box.
            raise ConfigError("[model] dtype: float16 is not supported on the CPU; use float32 or bfloat16")
        return preference
    if device.startswith("cuda"):
        # Half precision halves memory and doubles tensor-core throughput on CUDA.
        return "bfloat16" if pipeline_class in BF16_PIPELINES else "float16"
    return "float32"  # elsewhere fp32 is the safe choice


def model_index(source: str) -> dict[str, Any]:
    """The pipeline's `model_index.json` (a local folder, or a model in the Hugging Face cache)."""
    from diffusers import DiffusionPipeline

    try:
        index = DiffusionPipeline.load_config(source, local_files_only=True)
    except (OSError, ValueError) as e:
        hint = (
            ""
            if Path(source).exists()
            else " A Hugging Face id must already be in the local cache (`huggingface-cli download "
            "<id>`); the server never downloads."
        )
        raise ModelLoadError(f"cannot read the model index of {source!r}: {e}{hint}") from e
    return dict(index)


def absent_components(index: dict[str, Any], config: ModelConfig) -> dict[str, None]:
    """Components to load as None: those the folder was saved without (`[null, null]` in its model
    index, which diffusers won't infer by itself), and SD3's T5 when `[model] drop_t5` says so."""
    absent = {
        name: None
        for name, value in index.items()
        if not name.startswith("_") and isinstance(value, list | tuple) and value and value[0] is None
    }
    if config.drop_t5:
        if index.get("_class_name") != "StableDiffusion3Pipeline":
            raise ConfigError(
                f"[model] drop_t5: only SD 3.x pipelines can run without their T5 encoder; "
                f"this model is a {index.get('_class_name')}"
            )
        absent |= {"text_encoder_3": None, "tokenizer_3": None}
    return absent


@dataclass
class Outcome:
    """What happened to one request of a batch."""

    images: list[Image.Image] | None = None
    error: Exception | None = None
    batch_images: int = 0  # images in the pipeline call that produced (or failed) this request


@dataclass
class BatchReport:
    outcomes: list[Outcome]
    call_sizes: list[int] = field(default_factory=list)  # images per pipeline call actually made
    run_s: float = 0.0


# A preview: the request it belongs to (by identity) and one PNG per image of it, in seed order.
RequestPreviews = list[tuple[GenerationRequest, list[bytes]]]


class ProgressCallback(Protocol):
    def __call__(self, step: int, total: int, previews: RequestPreviews | None = None) -> None: ...


# What a client hears when the model fails on its request; the exception goes to the log only.
MODEL_FAILED = "the model failed on this request (see the server log)"


class PipelineRunner:
    """Loads the model and runs batches on its own thread. Construct cheaply; `load()` does the work."""

    def __init__(
        self,
        config: ModelConfig,
        *,
        name: str | None = None,
        executor: ThreadPoolExecutor | None = None,
        loras: LoraLibrary | None = None,
        allow_ckpt: bool = False,
        section: str = "model",
    ) -> None:
        self.config = config
        self.device = choose_device(config.device)
        self.dtype = choose_dtype(config.dtype, self.device)
        self.attention = "sdpa"
        # What responses and /health call the model: never a file-system path (see `public_model_name`).
        self.model_name = name or public_model_name(config.path)
        self.loaded = False
        self.allow_ckpt = allow_ckpt
        self.section = section  # "model" or "models.NAME": where its config errors point
        # One worker thread per device: see the module docstring. The registry passes one shared by
        # every model on the device, so the device still sees one call at a time.
        self._owns_executor = executor is None
        self._executor = executor or ThreadPoolExecutor(
            max_workers=1, thread_name_prefix=f"pipeline-{self.device}"
        )
        # LoRAs: the library they come from, the adapters loaded into this model (they stay loaded
        # and are switched with set_adapters), and the set active now ((name, weight), ...).
        self.loras = loras
        self.lora_target: LoraTarget | None = None
        self._adapters: set[str] = set()
        self._active_loras: tuple[tuple[str, float], ...] = ()
        # Bytes of weights the loaded model holds (the registry's memory budget counts them).
        self.size_bytes = 0
        self._pipes: dict[str, Any] = {}
        self._make_scheduler: Callable[[str | None], Any] | None = None
        self._previewer: Previewer | None = None  # made on the first preview (it may fit one)
        # What the loaded model is and accepts (None until loaded); see families.py.
        self.family: ModelFamily | None = None
        # Which pipeline __call__ takes width/height (SD/SDXL img2img take the image's size instead).
        self._takes_size: dict[str, bool] = {}
        self._load_lock = asyncio.Lock()

    @property
    def info(self) -> EngineInfo:
        return EngineInfo(
            device=self.device,
            dtype=self.dtype,
            model=self.model_name,
            attention=self.attention,
            family=self.family,
        )

    def pipeline(self, task: str) -> Any:
        """The loaded diffusers pipeline for a task (tests use it to inject faults)."""
        return self._pipes[task]

    # -- loading -----------------------------------------------------------------------------

    async def load(self) -> None:
        """Load the weights and warm up, on the worker thread. Once: an engine that hands the runner
        to another (the continuous engine's request-level fallback) doesn't load it again."""
        async with self._load_lock:
            if self.loaded:
                return
            loop = asyncio.get_running_loop()
            await loop.run_in_executor(self._executor, self._load_sync)
            if self.config.warmup:
                await loop.run_in_executor(self._executor, self._warmup_sync)
            self.loaded = True

    def _load_sync(self) -> None:
        import torch
        from diffusers import AutoPipelineForImage2Image, AutoPipelineForInpainting, AutoPipelineForText2Image

        if self.config.cpu_threads:
            torch.set_num_threads(self.config.cpu_threads)
        check_model_source(self.config, allow_ckpt=self.allow_ckpt, section=self.section)
        started = time.monotonic()
        if self.config.single_file:
            base = self._load_single_file()
        else:
            source = self.config.resolved_path()
            index = model_index(source)
            self.dtype = choose_dtype(self.config.dtype, self.device, index.get("_class_name"))
            absent = absent_components(index, self.config)
            try:
                base = AutoPipelineForText2Image.from_pretrained(
                    source, dtype=getattr(torch, self.dtype), local_files_only=True, **absent
                )
            except (OSError, ValueError) as e:
                raise ModelLoadError(f"cannot load model {self.config.path!r} ({source}): {e}") from e
        try:
            family = detect_family(base)
        except UnsupportedModel as e:
            raise ModelLoadError(f"[{self.section}] path: {e}") from None
        self.lora_target = model_target(base)
        self.size_bytes = pipeline_bytes(base)
        base.set_progress_bar_config(disable=True)
        # Decoding a whole batch at once is the memory peak of a call on a GPU; slicing flattens it.
        # On the CPU memory is plentiful and per-image decoding only costs throughput.
        slicing = self.config.vae_slicing == "on" or (
            self.config.vae_slicing == "auto" and self.device != "cpu"
        )
        if slicing and hasattr(base.vae, "enable_slicing"):
            base.vae.enable_slicing()
        if self.config.vae_tiling:
            base.vae.enable_tiling()
        self.attention = self._configure_attention(base)
        pipes: dict[str, Any] = {"txt2img": base}
        for task, auto in (("img2img", AutoPipelineForImage2Image), ("inpaint", AutoPipelineForInpainting)):
            try:
                pipes[task] = auto.from_pipe(base)  # shares base's modules: no extra memory
            except ValueError as e:  # diffusers has no pipeline of this kind for the model
                log.warning("%s: no %s pipeline for %s (%s)", self.config.path, task, type(base).__name__, e)
                continue
            pipes[task].set_progress_bar_config(disable=True)
        # After from_pipe: offloading hooks go on the shared modules once and serve every pipeline.
        self._place(base)
        self._speed_up(base)
        self._pipes = pipes
        self._takes_size = {
            task: {"width", "height"} <= set(inspect.signature(pipe.__call__).parameters)
            for task, pipe in pipes.items()
        }
        self.family = family.with_tasks(list(pipes)).with_config(self.config)
        self._make_scheduler = scheduler_factory(base.scheduler)
        log.info(
            "loaded %s (%s, family %s) on %s as %s with %s attention%s in %.1f s",
            self.config.path,
            type(base).__name__,
            family.name,
            self.device,
            self.dtype,
            self.attention,
            "" if self.config.offload == "none" else f", {self.config.offload} offload",
            time.monotonic() - started,
        )

    def _load_single_file(self) -> Any:
        """A checkpoint in the original layout, through diffusers' `from_single_file`, offline: the
        component configs come from `config` (a local diffusers folder of the same family)."""
        import diffusers
        import torch

        path = Path(self.config.path).expanduser()
        family = single_file_family(path, self.config.family)
        cls = getattr(diffusers, FAMILY_PIPELINES[family])
        folder = str(Path(self.config.config).expanduser())
        index = model_index(folder)
        self.dtype = choose_dtype(self.config.dtype, self.device, cls.__name__)
        absent = absent_components(index, self.config)
        try:
            return cls.from_single_file(
                str(path), config=folder, local_files_only=True, dtype=getattr(torch, self.dtype), **absent
            )
        except Exception as e:  # diffusers raises many kinds here (SingleFileComponentError, ...)
            raise ModelLoadError(
                f"cannot load {path} as {family} with the configs of {folder}: {type(e).__name__}: {e}"
            ) from e

    def _place(self, pipe: Any) -> None:
        """Put the weights on the device, or set up offloading to it."""
        if self.config.offload != "none" and not self.device.startswith("cuda"):
            raise ConfigError(
                f'[model] offload: offloading needs a CUDA device; the model runs on "{self.device}"'
            )
        if self.config.offload == "none":
            pipe.to(self.device)
        elif self.config.offload == "model":
            pipe.enable_model_cpu_offload(device=self.device)
        else:
            pipe.enable_sequential_cpu_offload(device=self.device)

    def _speed_up(self, pipe: Any) -> None:
        """`[model] channels_last` and `[model] compile` on the denoiser (docs/performance.md)."""
        import torch

        denoiser = getattr(pipe, "unet", None) or getattr(pipe, "transformer", None)
        if denoiser is None:
            return
        if self.config.channels_last:
            denoiser.to(memory_format=torch.channels_last)
        if self.config.compile:
            # In place, so the pipelines built with from_pipe share the compiled module. The
            # compilation itself happens on the first call of each input shape: the warm-up pays
            # it for the default size, and the log says how long it took.
            denoiser.compile()

    def _configure_attention(self, pipe: Any) -> str:
        wanted = self.config.attention
        if wanted == "sdpa":
            return "sdpa"
        if self.device == "cuda":
            try:
                import xformers  # noqa: F401

                pipe.enable_xformers_memory_efficient_attention()
                return "xformers"
            except Exception as e:  # ImportError, or ValueError/RuntimeError when its kernels don't load
                if wanted == "xformers":
                    raise ConfigError(f"[model] attention: xformers requested but unusable: {e}") from e
                log.info("xformers not usable (%s); using PyTorch SDPA", e)
                return "sdpa"
        if wanted == "xformers":
            raise ConfigError("[model] attention: xformers needs a CUDA device")
        return "sdpa"

    def _warmup_sync(self) -> None:
        from PIL import Image as PILImage

        started = time.monotonic()
        family = self.family
        assert family is not None, "load() first"
        task = family.tasks[0]  # txt2img, except for inpainting checkpoints
        size = (family.default_width, family.default_height)
        req = GenerationRequest(
            task=task,
            prompt="warm-up",
            negative_prompt="",
            seeds=(0,),
            width=family.default_width,
            height=family.default_height,
            steps=2,  # enough to touch every module once; the aim is lazy init, not a picture
            guidance=family.default_guidance,
            strength=None if task == "txt2img" else 1.0,
            image=None if task == "txt2img" else PILImage.new("RGB", size, (128, 128, 128)),
            mask=PILImage.new("L", size, 255) if task == "inpaint" else None,
        )
        self._call(self._pipes[task], [req], _no_progress, lambda: False)
        log.info(
            "warm-up generation took %.2f s%s",
            time.monotonic() - started,
            " (including torch.compile of the denoiser for this shape)" if self.config.compile else "",
        )

    # -- running -----------------------------------------------------------------------------

    async def run(
        self,
        batch: Sequence[GenerationRequest],
        on_progress: ProgressCallback | None,
        should_stop: Callable[[], bool],
    ) -> BatchReport:
        """Run requests sharing a batch key as one pipeline call (split on OOM), off the event loop.

        `on_progress(step, total)` (if given) is called on the event loop; `should_stop()` is polled on the
        worker thread after each step and, when true, interrupts the call (nobody wants it any more).
        """
        loop = asyncio.get_running_loop()

        def post_progress(step: int, total: int, previews: RequestPreviews | None = None) -> None:
            if on_progress is None:
                return
            try:
                loop.call_soon_threadsafe(on_progress, step, total, previews)
            except RuntimeError:  # the loop closed while the call was finishing
                pass

        return await loop.run_in_executor(
            self._executor, self._run_sync, list(batch), post_progress, should_stop
        )

    def _run_sync(
        self, batch: list[GenerationRequest], on_progress: ProgressCallback, should_stop: Callable[[], bool]
    ) -> BatchReport:
        started = time.monotonic()
        report = BatchReport(outcomes=[Outcome() for _ in batch])
        try:
            self._use_loras(batch[0].loras)
        except Exception as e:  # a LoRA file that won't load fails this batch, not the server
            log.exception("applying LoRAs %s failed", batch[0].loras)
            for outcome in report.outcomes:
                outcome.error = GenerationFailed(
                    f"the LoRAs {[n for n, _ in batch[0].loras]} could not be applied: {e}"
                )
            return report
        self._run_split(batch, list(range(len(batch))), report, on_progress, should_stop)
        report.run_s = time.monotonic() - started
        return report

    def _run_split(
        self,
        batch: list[GenerationRequest],
        index: list[int],
        report: BatchReport,
        on_progress: ProgressCallback,
        should_stop: Callable[[], bool],
    ) -> None:
        """One pipeline call; if it fails with several requests in it, retry them as two halves.

        Out of memory: smaller calls may fit. Any other error may come from one request's input (a
        prompt the tokenizer can't take, an image a processor rejects), and validation can't foresee
        every such case: halving until each failing call holds one request fails only the request
        whose input fails, at the cost of about 2 log2(n) extra calls. A fault that isn't any
        request's (a broken device) fails every half too, and so every request, as it should.
        """
        size = sum(r.n for r in batch)
        report.call_sizes.append(size)
        try:
            images = self._call(self._pipes[batch[0].task], batch, on_progress, should_stop)
        except Exception as e:
            oom = _is_oom(e)
            if oom:
                self._empty_cache()
            if len(batch) == 1:
                if oom:
                    log.warning("out of memory on a single request of %d images; failing it alone", size)
                    error: Exception = OutOfMemory(
                        f"out of device memory generating {size} image(s) at this size"
                    )
                else:
                    log.exception("pipeline call failed for one request (%d images); failing it alone", size)
                    error = GenerationFailed(MODEL_FAILED)
                report.outcomes[index[0]] = Outcome(error=error, batch_images=size)
                return
            half = len(batch) // 2
            if oom:
                log.warning("out of memory on a batch of %d images; retrying as two smaller batches", size)
            else:
                log.warning(
                    "pipeline call failed on a batch of %d requests (%s: %s); retrying as two halves so "
                    "that only a request whose input fails it fails",
                    len(batch),
                    type(e).__name__,
                    e,
                )
            self._run_split(batch[:half], index[:half], report, on_progress, should_stop)
            self._run_split(batch[half:], index[half:], report, on_progress, should_stop)
            return
        pos = 0
        for req, i in zip(batch, index, strict=True):
            report.outcomes[i] = Outcome(images=images[pos : pos + req.n], batch_images=size)
            pos += req.n

    def _use_loras(self, loras: tuple[tuple[str, float], ...]) -> None:
        """Make `loras` ((name, weight), ...) the active adapters of this model, on the worker thread.

        An adapter is loaded once (`load_lora_weights(adapter_name=...)`) and stays loaded; after
        that a request with another set only switches (`set_adapters`), which costs a fraction of
        a generation (tests/bench/lora_bench.py). Without LoRAs the adapters are disabled, so the
        model computes exactly what it did before any was loaded."""
        if loras == self._active_loras:
            return
        base = self._pipes["txt2img"]
        if not loras:
            base.disable_lora()
            self._active_loras = ()
            return
        for name, _ in loras:
            if name not in self._adapters:
                lora = self.loras.get(name) if self.loras is not None else None
                if lora is None:
                    raise ValueError(f"no LoRA named {name!r}")
                started = time.monotonic()
                base.load_lora_weights(str(lora.path.parent), weight_name=lora.path.name, adapter_name=name)
                self._adapters.add(name)
                log.info(
                    "LoRA %s loaded into %s in %.2f s", name, self.model_name, time.monotonic() - started
                )
        if not self._active_loras:
            base.enable_lora()
        base.set_adapters([n for n, _ in loras], adapter_weights=[w for _, w in loras])
        self._active_loras = loras

    async def unload(self) -> None:
        """Drop the pipelines (the registry evicts a model this way); `load()` brings them back."""
        async with self._load_lock:
            await asyncio.get_running_loop().run_in_executor(self._executor, self._unload_sync)

    def _unload_sync(self) -> None:
        import gc

        self._pipes = {}
        self._adapters = set()
        self._active_loras = ()
        self._make_scheduler = None
        self._previewer = None
        self.loaded = False
        gc.collect()
        self._empty_cache()

    def generate_arrays(self, batch: Sequence[GenerationRequest]) -> Any:
        """One pipeline call's raw float output (N, H, W, 3) in [0, 1], before the inpaint paste-back.

        For determinism checks and benchmarks; runs on the worker thread like every other call.
        """
        future = self._executor.submit(
            self._call, self._pipes[batch[0].task], list(batch), _no_progress, lambda: False, "np"
        )
        return future.result()

    def _call(
        self,
        pipe: Any,
        batch: list[GenerationRequest],
        on_progress: ProgressCallback,
        should_stop: Callable[[], bool],
        output_type: str = "pil",
    ) -> Any:
        import torch
        from PIL import Image as PILImage

        first = batch[0]
        # Only this thread touches the pipelines, so swapping the scheduler here is safe.
        assert self._make_scheduler is not None, "load() first"
        pipe.scheduler = self._make_scheduler(first.scheduler)

        def on_step_end(p: Any, step: int, timestep: Any, callback_kwargs: dict[str, Any]) -> dict[str, Any]:
            total = int(getattr(p, "num_timesteps", first.steps) or first.steps)
            on_progress(step + 1, total, self._previews(p, batch, step + 1, total, callback_kwargs))
            if should_stop():
                p._interrupt = True  # diffusers' own flag: skip the remaining steps
            return callback_kwargs

        # One CPU generator per image, seeded from the request: the noise of image i depends only on
        # its own seed, so an image is the same alone or in any batch (and across devices).
        generators = [torch.Generator("cpu").manual_seed(seed) for r in batch for seed in r.seeds]
        kwargs: dict[str, Any] = {
            "prompt": [r.prompt for r in batch for _ in r.seeds],
            "generator": generators,
            "num_inference_steps": first.steps,
            "guidance_scale": first.guidance,
            "output_type": output_type,
            "callback_on_step_end": on_step_end,
        }
        family = self.family
        assert family is not None, "load() first"
        if family.negative_prompt == "true_cfg":
            # FLUX: a negative prompt only acts through true CFG, whose scale the batch shares
            # (`true_cfg` is in the batch key); without it, no negative prompt reaches the model.
            if first.true_cfg is not None and first.true_cfg > 1:
                kwargs["negative_prompt"] = [r.negative_prompt for r in batch for _ in r.seeds]
                kwargs["true_cfg_scale"] = first.true_cfg
        else:
            kwargs["negative_prompt"] = [r.negative_prompt for r in batch for _ in r.seeds]
        if self._takes_size.get(first.task, False):
            # Every pipeline that takes a size gets the request's (FLUX img2img would otherwise make
            # its native 1024x1024); SD/SDXL img2img take the input image's, which validation made
            # the requested size.
            kwargs["width"] = first.width
            kwargs["height"] = first.height
        if first.task in ("img2img", "inpaint"):
            kwargs["image"] = [r.image for r in batch for _ in r.seeds]
            kwargs["strength"] = first.strength
        if first.task == "inpaint":
            kwargs["mask_image"] = [r.mask for r in batch for _ in r.seeds]
        # Step caching (step_cache.py): a batch shares one level, which is in the batch key.
        steps = int(first.steps * first.strength) if first.strength is not None else first.steps
        with torch.inference_mode(), step_cache(pipe, first.cache, steps):
            images = pipe(**kwargs).images
        if first.task == "inpaint" and output_type == "pil":
            # A 4-channel UNet inpaints by latent blending, which also alters pixels outside the mask
            # (the VAE round trip): paste the original back where the mask is black ("keep").
            originals = [_image_and_mask(r) for r in batch for _ in r.seeds]
            images = [
                PILImage.composite(img, orig.convert(img.mode), mask.convert("L"))
                for img, (orig, mask) in zip(images, originals, strict=True)
            ]
        return images

    def _previews(
        self, pipe: Any, batch: list[GenerationRequest], step: int, total: int, kwargs: dict[str, Any]
    ) -> RequestPreviews | None:
        """Previews after `step` for the requests of `batch` that want one now (streaming clients, every
        `preview_every` steps); None when none does or making them failed (logged: never fatal)."""
        wanting = [r for r in batch if due(step, total, r.preview_every)]
        if not wanting or "latents" not in kwargs:
            return None
        try:
            if self._previewer is None:
                self._previewer = previewer_for(pipe.vae)
                log.info("previews: %s latent-to-RGB projection", self._previewer.source)
            first = batch[0]
            latents = pipeline_latents_to_vae(pipe, kwargs["latents"], first.height, first.width)
        except Exception:
            log.warning("making a preview failed; skipping it", exc_info=True)
            return None
        out: RequestPreviews = []
        offset = 0
        for r in batch:
            if any(r is w for w in wanting):
                pngs = safe_pngs(self._previewer, latents[offset : offset + r.n])
                if pngs is None:
                    return None
                out.append((r, pngs))
            offset += r.n
        return out

    def _empty_cache(self) -> None:
        import torch

        if self.device == "cuda":
            torch.cuda.empty_cache()
        elif self.device == "mps":
            torch.mps.empty_cache()

    def close(self) -> None:
        if self._owns_executor:
            self._executor.shutdown(wait=False, cancel_futures=True)


def _no_progress(step: int, total: int, previews: RequestPreviews | None = None) -> None:
    pass


def pipeline_bytes(pipe: Any) -> int:
    """Bytes of the weights (parameters and buffers) of a pipeline's torch modules."""
    import torch

    seen: set[int] = set()
    total = 0
    for component in pipe.components.values():
        if not isinstance(component, torch.nn.Module):
            continue
        for tensor in [*component.parameters(), *component.buffers()]:
            if id(tensor) not in seen:
                seen.add(id(tensor))
                total += tensor.numel() * tensor.element_size()
    return total


def _image_and_mask(request: GenerationRequest) -> tuple[Image.Image, Image.Image]:
    if request.image is None or request.mask is None:
        # Validation gives every inpaint request both; one without them fails alone (isolation).
        raise ValueError("an inpaint request without its image or mask")
    return request.image, request.mask


def _is_oom(e: BaseException) -> bool:
    import torch

    if isinstance(e, torch.OutOfMemoryError):
        return True
    # MPS and some CUDA paths raise a plain RuntimeError.
    return isinstance(e, RuntimeError) and "out of memory" in str(e).lower()
