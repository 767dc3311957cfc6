"""Typed configuration of the inference server: `[inference_server]`, `[model]` and `[batching]`.

Each section is a frozen dataclass filled by `config_loader.load_section`, so unknown keys, wrong
types and `IMAGINE_<SECTION>_<KEY>` overrides behave as everywhere else in the project. The
`__post_init__` checks catch values that are well-typed but meaningless, naming the key.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from inference_server.config_loader import ConfigError, config_path, load_section, read_toml
from inference_server.limits import MAX_GUIDANCE
from inference_server.step_cache import level_problem

# Where `[model] path = "embedded"` points: the project's own tiny model, shipped in the package.
EMBEDDED_WEIGHTS = Path(__file__).resolve().parent / "embedded" / "weights"


def _require(ok: bool, section: str, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"[{section}] {key}: {message}")


@dataclass(frozen=True)
class ServerConfig:
    """`[inference_server]`: the HTTP side."""

    host: str = "127.0.0.1"
    port: int = 8080
    allow_no_auth: bool = False
    max_body_bytes: int = 16 * 1024 * 1024
    max_image_pixels: int = 4096 * 4096
    max_prompt_chars: int = 1000
    min_side: int = 8
    max_side: int = 1024
    max_steps: int = 150
    max_images_per_request: int = 4
    default_timeout_s: float = 300.0
    max_timeout_s: float = 3600.0
    shutdown_grace_s: float = 30.0
    progress_interval_s: float = 0.2
    # Streaming clients get a cheap preview of each image every this many steps (0 = off). A preview
    # is a linear latent-to-RGB projection and a 256-px PNG (inference_server/previews.py), no VAE
    # decode; the PNG encode is most of its cost, on the thread that runs the model, so a preview
    # every step would slow streaming requests. 5 gives a chat status message a few pictures over a
    # typical 20-30 step run without flooding it (the bot throttles edits anyway).
    preview_every_steps: int = 5
    log_level: str = "INFO"
    # Slow clients: a complete request header must arrive within header_timeout_s of connecting (or
    # of the previous response on a keep-alive connection), and the whole body within body_timeout_s
    # of the header. A client on the same network needs milliseconds for either.
    header_timeout_s: float = 10.0
    body_timeout_s: float = 60.0
    # The base URL clients reach this server at, put in front of the links the server hands out
    # (OpenAI `url` images). "" = the address the client's connection arrived on, never the Host
    # header (which any client can set).
    public_url: str = ""
    # OpenAI-compatible API (inference_server/openai_api.py): lifetime of `url` images.
    openai_url_ttl_s: float = 3600.0

    def __post_init__(self) -> None:
        s = "inference_server"
        _require(0 < self.port < 65536 or self.port == 0, s, "port", f"must be 0-65535, got {self.port}")
        _require(self.max_body_bytes >= 1024, s, "max_body_bytes", "must be at least 1024")
        _require(self.max_image_pixels >= 64 * 64, s, "max_image_pixels", "must be at least 4096")
        _require(self.max_prompt_chars >= 1, s, "max_prompt_chars", "must be at least 1")
        _require(
            8 <= self.min_side <= self.max_side and self.min_side % 8 == 0 and self.max_side % 8 == 0,
            s,
            "min_side/max_side",
            "must be multiples of 8 with 8 <= min_side <= max_side",
        )
        _require(1 <= self.max_steps <= 1000, s, "max_steps", "must be 1-1000")
        _require(1 <= self.max_images_per_request <= 16, s, "max_images_per_request", "must be 1-16")
        _require(self.default_timeout_s > 0, s, "default_timeout_s", "must be > 0")
        _require(
            self.max_timeout_s >= self.default_timeout_s, s, "max_timeout_s", "must be >= default_timeout_s"
        )
        _require(self.shutdown_grace_s >= 0, s, "shutdown_grace_s", "must be >= 0")
        _require(self.progress_interval_s >= 0, s, "progress_interval_s", "must be >= 0")
        _require(0 <= self.preview_every_steps <= 1000, s, "preview_every_steps", "must be 0-1000 (0 = off)")
        _require(self.openai_url_ttl_s > 0, s, "openai_url_ttl_s", "must be > 0")
        _require(
            self.log_level.upper() in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"),
            s,
            "log_level",
            f"must be DEBUG, INFO, WARNING, ERROR or CRITICAL, got {self.log_level!r}",
        )
        _require(self.header_timeout_s > 0, s, "header_timeout_s", "must be > 0")
        _require(self.body_timeout_s > 0, s, "body_timeout_s", "must be > 0")
        problem = _public_url_problem(self.public_url)
        _require(problem is None, s, "public_url", f"{problem}, got {self.public_url!r}")


def _public_url_problem(url: str) -> str | None:
    """Why `url` can't be the base of the server's links, or None (also for "": not set)."""
    if url == "":
        return None
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 (raises ValueError on a bad port)
    except ValueError:
        return "must be a URL such as https://images.example.com"
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return "must start with http:// or https:// and name a host"
    if parts.query or parts.fragment or parts.username or parts.password or url != url.strip():
        return "must be scheme, host, optional port and path only (no query, fragment, credentials or spaces)"
    return None


# `[model] device`: "auto", "cpu", "mps", "cuda" or "cuda:N" (one server per GPU is one line).
_DEVICE = re.compile(r"^(auto|cpu|mps|cuda(:\d{1,3})?)$")


@dataclass(frozen=True)
class ModelConfig:
    """`[model]`: which weights, on which device, with which defaults.

    The defaults a request falls back to (size, steps, guidance, strength) are the model family's
    (`families.py`) unless set here; they are checked against the family once the model is loaded.
    """

    path: str = "embedded"
    device: str = "auto"
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"
    attention: Literal["auto", "xformers", "sdpa"] = "auto"
    scheduler: str = "default"
    width: int | None = None
    height: int | None = None
    steps: int | None = None
    guidance: float | None = None
    strength: float | None = None
    warmup: bool = True
    cpu_threads: int = 0
    vae_slicing: Literal["auto", "on", "off"] = "auto"
    # Decode (and encode) large images tile by tile: bounded VAE memory at big sizes, at the cost of
    # faint tile seams. Images no larger than the VAE's tile are not tiled either way.
    vae_tiling: bool = False
    # Memory on GPUs that can't hold the weights: "model" keeps each whole model on the GPU only
    # while it runs (a little slower); "sequential" moves layer by layer (much slower, least memory).
    offload: Literal["none", "model", "sequential"] = "none"
    # SD 3.x only: load without the T5 text encoder (text_encoder_3), most of the model's memory,
    # at some cost in prompt adherence. A pipeline folder saved without it loads without it anyway.
    drop_t5: bool = False
    # Single-file checkpoints (`path` = a .safetensors file): the model's family when it can't be
    # told from the file's keys, and a local folder holding the configs of a diffusers pipeline of
    # that family (model_index.json and each component's config; weights not needed): the server
    # never downloads, so diffusers can't fetch them itself. See docs/models.md.
    family: Literal["sd", "sd-v", "sdxl", "sd3", "flux-dev", "flux-schnell"] | None = None
    config: str = ""
    # In a `[models.NAME]` table: this entry is the default model (at most one may say so).
    default: bool = False
    # Step caching for requests that don't ask (inference_server/step_cache.py, docs/performance.md):
    # "off", "fast" or "faster". A request's `cache` field overrides it.
    cache: str = "off"
    # torch.compile the denoiser (compile time logged; a warm-up compiles each batch shape as it
    # comes) and channels-last memory layout: they pay on CUDA, not on a small model on the CPU.
    compile: bool = False
    channels_last: bool = False

    def __post_init__(self) -> None:
        s = "model"
        cache_problem = level_problem(self.cache)
        _require(cache_problem is None, s, "cache", str(cache_problem))
        _require(bool(self.path.strip()), s, "path", "must not be empty")
        _require(
            bool(_DEVICE.match(self.device)),
            s,
            "device",
            f'must be "auto", "cpu", "mps", "cuda" or "cuda:N" (a GPU index), got {self.device!r}',
        )
        for key in ("width", "height"):
            v = getattr(self, key)
            _require(v is None or (v >= 8 and v % 8 == 0), s, key, f"must be a multiple of 8, got {v}")
        _require(self.steps is None or self.steps >= 1, s, "steps", "must be >= 1")
        _require(
            self.guidance is None or 0 <= self.guidance <= MAX_GUIDANCE,
            s,
            "guidance",
            f"must be 0-{MAX_GUIDANCE:g}",
        )
        _require(self.strength is None or 0 < self.strength <= 1, s, "strength", "must be in (0, 1]")
        _require(0 <= self.cpu_threads <= 4096, s, "cpu_threads", "must be 0-4096")
        _require(
            self.offload == "none" or self.device == "auto" or self.device.startswith("cuda"),
            s,
            "offload",
            f'offloads to a CUDA device, but device = "{self.device}"',
        )

    def resolved_path(self) -> str:
        """A folder path for "embedded" and local folders; otherwise the Hugging Face model id."""
        if self.path == "embedded":
            return str(EMBEDDED_WEIGHTS)
        p = Path(self.path).expanduser()
        return str(p) if p.exists() else self.path

    @property
    def single_file(self) -> bool:
        """Whether `path` names one checkpoint file (the original layout) rather than a folder."""
        return self.path.lower().endswith(SINGLE_FILE_SUFFIXES)


# Checkpoints in the original (not diffusers) layout, loaded with `from_single_file`. `.ckpt` is a
# pickle: loading one runs code it carries unless torch's weights-only unpickler refuses it, so it
# needs `[registry] allow_ckpt = true` as well.
SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt")


@dataclass(frozen=True)
class RegistryConfig:
    """`[registry]`: the models a server holds (`[model]` and `[models.NAME]`), and its LoRAs."""

    # The model requests without `model` get: a `[models.NAME]` name, or "" for the entry with
    # `default = true`, else `[model]`.
    default_model: str = ""
    # "lazy": a model loads on its first request (the default model always loads at start);
    # "start": every model loads at start.
    load: Literal["lazy", "start"] = "lazy"
    # Weights held in memory (all models, in MB); past it the least recently used model other than
    # the default is unloaded before another loads. 0 = no limit.
    memory_budget_mb: float = 0.0
    # A folder of LoRAs: `NAME.safetensors`, or `NAME/` holding `pytorch_lora_weights.safetensors`
    # (what diffusers' `save_lora_weights` writes). "" = no LoRAs.
    loras_dir: str = ""
    # Each active adapter adds two small matrix products to every layer it targets, and a request
    # with many is more likely a mistake than a style; 4 covers a style plus a character or two.
    max_loras_per_request: int = 4
    # `.ckpt` checkpoints are pickles (see SINGLE_FILE_SUFFIXES): off unless the files are trusted.
    allow_ckpt: bool = False

    def __post_init__(self) -> None:
        s = "registry"
        _require(self.memory_budget_mb >= 0, s, "memory_budget_mb", "must be >= 0 (0 = no limit)")
        _require(1 <= self.max_loras_per_request <= 16, s, "max_loras_per_request", "must be 1-16")


@dataclass(frozen=True)
class BatchingConfig:
    """`[batching]`: how requests are grouped into pipeline calls."""

    engine: Literal["dynamic", "continuous"] = "dynamic"
    max_batch_size: int = 8
    max_wait_ms: float = 50.0
    adaptive_wait: bool = True
    max_batch_pixels: int = 8 * 512 * 512
    max_queue: int = 64
    retry_after_s: int = 5
    # Continuous engine: "always" fills free slots at every step; "efficient" lets a joiner in only
    # when the wait it saves pays for the slower steps it causes; "capped" stops the batch growing
    # where a bigger one buys no throughput (see docs/continuous-batching.md#admission).
    admission: Literal["always", "efficient", "capped"] = "always"

    def __post_init__(self) -> None:
        s = "batching"
        _require(1 <= self.max_batch_size <= 256, s, "max_batch_size", "must be 1-256")
        _require(self.max_wait_ms >= 0, s, "max_wait_ms", "must be >= 0")
        _require(self.max_batch_pixels >= 64, s, "max_batch_pixels", "must be >= 64 (one 8x8 image)")
        _require(self.max_queue >= 1, s, "max_queue", "must be >= 1")
        _require(self.retry_after_s >= 1, s, "retry_after_s", "must be >= 1")


@dataclass(frozen=True)
class Config:
    """Everything the server reads, loaded once in `main()` and passed to `create_app`."""

    server: ServerConfig = field(default_factory=ServerConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    batching: BatchingConfig = field(default_factory=BatchingConfig)
    registry: RegistryConfig = field(default_factory=RegistryConfig)
    # `[models.NAME]` tables, by name (`[model]` is `model`; `model_entries()` joins them).
    models: Mapping[str, ModelConfig] = field(default_factory=dict)
    # Whether the file had a `[model]` section: with `[models.NAME]` tables and no `[model]`, the
    # registry holds only the named models (no implicit embedded one).
    model_section: bool = True

    def model_entries(self) -> dict[str, ModelConfig]:
        """Every model this server holds, by the name requests use (`model`)."""
        from inference_server.pipelines import public_model_name

        entries: dict[str, ModelConfig] = {}
        if self.model_section or not self.models:
            entries[public_model_name(self.model.path)] = self.model
        for name, entry in self.models.items():
            if name in entries:
                raise ConfigError(
                    f"[models.{name}]: the name is taken by [model] (path {self.model.path!r}); rename one"
                )
            entries[name] = entry
        return entries

    def default_model(self) -> str:
        """The name of the model a request without `model` gets (checked at start-up)."""
        entries = self.model_entries()
        if self.registry.default_model:
            if self.registry.default_model not in entries:
                raise ConfigError(
                    f"[registry] default_model: no model named {self.registry.default_model!r} "
                    f"(models: {', '.join(entries)})"
                )
            return self.registry.default_model
        flagged = [name for name, entry in entries.items() if entry.default]
        if len(flagged) > 1:
            raise ConfigError(f"default = true on several models ({', '.join(flagged)}); keep one")
        return flagged[0] if flagged else next(iter(entries))

    def replace(self, **sections: Any) -> Config:
        """A copy with some fields of some sections changed: `cfg.replace(model={"path": p})`."""
        updated = {
            name: dataclasses.replace(getattr(self, name), **values) for name, values in sections.items()
        }
        return dataclasses.replace(self, **updated)


def load_config(
    source: Mapping[str, Any] | str | os.PathLike[str] | None = None,
    *,
    environ: Mapping[str, str] | None = None,
) -> Config:
    """Read the three server sections from a TOML file (default: `config_path()`) or a mapping."""
    if source is None:
        source = config_path()
    data = source if isinstance(source, Mapping) else read_toml(source)
    tables = data.get("models", {})
    if not isinstance(tables, Mapping) or not all(isinstance(t, Mapping) for t in tables.values()):
        raise ConfigError("[models] holds one table per model: [models.NAME] with path = ...")
    models = {name: _model_table(data, name, environ) for name in tables}
    config = Config(
        server=load_section(data, "inference_server", ServerConfig, environ=environ),
        model=load_section(data, "model", ModelConfig, environ=environ),
        batching=load_section(data, "batching", BatchingConfig, environ=environ),
        registry=load_section(data, "registry", RegistryConfig, environ=environ),
        models=models,
        model_section="model" in data,
    )
    config.default_model()  # names a model, and only one says default = true
    return config


# A model name goes into URLs (/v1/models/NAME) and chat commands: no spaces or slashes.
_MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


def _model_table(data: Mapping[str, Any], name: str, environ: Mapping[str, str] | None) -> ModelConfig:
    section = f"models.{name}"
    if not _MODEL_NAME.match(name):
        raise ConfigError(f"[{section}]: a model name is 1-64 letters, digits, '.', '_' or '-'")
    try:
        return load_section({section: data["models"][name]}, section, ModelConfig, environ=environ)
    except ConfigError as e:
        # ModelConfig's own checks name the section [model]; here it is this table.
        raise ConfigError(str(e).replace("[model]", f"[{section}]")) from None
