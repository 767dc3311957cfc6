"""Inference backends: the project's server, Hugging Face Inference Providers, an in-process fake.

`build_backend(config, env)` is the one place that picks and builds the backend from `[backends]`.
Implementations are imported lazily so that choosing one never imports the others' dependencies.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from bot.settings import ConfigError, load_section

from .base import (
    BackendError,
    BackendEvent,
    BackendRejected,
    BackendUnavailable,
    EventCallback,
    GeneratedImage,
    GenerationParams,
    InferenceBackend,
    UnsupportedTask,
)
from .config import BackendsConfig

log = logging.getLogger(__name__)

__all__ = [
    "BackendError",
    "BackendEvent",
    "BackendRejected",
    "BackendUnavailable",
    "BackendsConfig",
    "EventCallback",
    "GeneratedImage",
    "GenerationParams",
    "InferenceBackend",
    "UnsupportedTask",
    "build_backend",
    "load_backends_config",
]


def load_backends_config(
    config: Mapping[str, Any] | str | Path | None, env: Mapping[str, str]
) -> BackendsConfig:
    """`[backends]` as a validated frozen dataclass (env `IMAGINE_BACKENDS_<KEY>` overrides)."""
    return load_section(config, "backends", BackendsConfig, environ=env)


def build_backend(
    config: Mapping[str, Any] | str | Path | None,
    env: Mapping[str, str],
    *,
    dotenv_path: str | Path | None = ".env",
) -> InferenceBackend:
    """Build the backend `[backends] kind` names. Raises `ConfigError` naming what is wrong.

    Secrets come from `env`, else from `dotenv_path` (main() normally loads .env into the
    environment already; this covers callers that pass a bare mapping). Must be awaited-closed
    with `backend.close()`; the HTTP session is created on first use, so this is safe to call
    before the event loop runs.
    """
    cfg = load_backends_config(config, env)
    if cfg.kind == "fake":
        from .fake import FakeBackend

        return FakeBackend(delay_s=cfg.fake_delay_s)
    if cfg.kind == "inference_server":
        from .inference_server import InferenceServerBackend

        token = _secret("INFERENCE_API_TOKEN", env, dotenv_path)
        if token is None:
            # Not fatal: a server started with allow_no_auth needs none; one that does will answer
            # 401 and the job fails with a message naming INFERENCE_API_TOKEN.
            log.warning("INFERENCE_API_TOKEN is not set: requests to %s carry no token", ", ".join(cfg.urls))
        return InferenceServerBackend(
            cfg.urls,
            token=token,
            connect_timeout_s=cfg.connect_timeout_s,
            request_timeout_s=cfg.request_timeout_s,
            max_retries=cfg.max_retries,
            backoff_base_s=cfg.backoff_base_s,
            backoff_max_s=cfg.backoff_max_s,
            retry_after_max_s=cfg.retry_after_max_s,
            server_cooloff_s=cfg.server_cooloff_s,
            outage_horizon_s=cfg.outage_horizon_s,
            routing=cfg.routing,
            stream=cfg.stream,
        )
    if cfg.kind == "huggingface":
        from huggingface_hub import is_offline_mode

        from .huggingface import TOKEN_ENVS, HuggingFaceBackend

        token = next(filter(None, (_secret(name, env, dotenv_path) for name in TOKEN_ENVS)), None)
        if token is None:
            raise ConfigError(
                f'[backends] kind = "huggingface" needs a Hugging Face token: set {" or ".join(TOKEN_ENVS)} '
                'in the environment or in .env (a fine-grained token with the "Make calls to Inference '
                'Providers" permission, from https://huggingface.co/settings/tokens)'
            )
        if is_offline_mode():
            raise ConfigError(
                '[backends] kind = "huggingface" cannot work with HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) '
                "set: huggingface_hub then refuses every request, inference calls included. Unset it "
                "for the bot (the inference server may keep it)"
            )
        return HuggingFaceBackend(
            token,
            model=cfg.hf_model,
            provider=cfg.hf_provider,
            image_to_image_model=cfg.hf_image_to_image_model,
            base_url=cfg.hf_base_url,
            timeout_s=cfg.hf_timeout_s,
            retry_after_max_s=cfg.retry_after_max_s,
        )
    raise ConfigError(f"[backends] kind: unknown backend {cfg.kind!r}")  # Literal makes this unreachable


def _secret(name: str, env: Mapping[str, str], dotenv_path: str | Path | None) -> str | None:
    value = env.get(name)
    if not value and dotenv_path is not None and Path(dotenv_path).is_file():
        from dotenv import dotenv_values

        value = dotenv_values(dotenv_path).get(name)
    return value.strip() if value and value.strip() else None
