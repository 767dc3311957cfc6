"""Typed application keys, in one module so route modules (`app.py`, `openai_api.py`) share them."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from aiohttp import web

from inference_server.config import Config
from inference_server.engine import Engine
from inference_server.metrics import Metrics
from inference_server.registry import ModelRegistry


@dataclass
class ServerState:
    """Mutable per-app state: set to draining when shutdown starts so new work gets a 503."""

    draining: bool = False


CONFIG = web.AppKey("config", Config)
ENGINE = web.AppKey("engine", Engine)
METRICS = web.AppKey("metrics", Metrics)
REGISTRY = web.AppKey("registry", ModelRegistry)
STATE = web.AppKey("state", ServerState)
API_TOKEN = web.AppKey("api_token", str)  # "" when auth is disabled for local development
# Called with the exception when the model fails to load; `main()` uses it to exit non-zero.
ON_FATAL: web.AppKey[Callable[[BaseException], None]] = web.AppKey("on_fatal")
