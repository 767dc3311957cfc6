"""The `[backends]` section of config.toml: which backend the bot uses and how it talks to it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal
from urllib.parse import urlsplit

from inference_server.config_loader import ConfigError

BackendKind = Literal["inference_server", "huggingface", "fake"]


@dataclass(frozen=True)
class BackendsConfig:
    # Which backend turns jobs into images: the project's server, the HF Inference API, or the
    # in-process fake (demos and benches of the bot without any model).
    kind: BackendKind = "inference_server"
    # Inference servers, tried in turn (round-robin start, fail-over when one is down).
    urls: tuple[str, ...] = ("http://127.0.0.1:8080",)
    # A server on the same network accepts a connection in milliseconds; 5 s without one means it
    # is down, and failing over beats waiting.
    connect_timeout_s: float = 5.0
    # Whole request, queueing included, when the job itself has no deadline: a CPU server can take
    # minutes for a batch of large images, longer than that is a stuck server.
    request_timeout_s: float = 600.0
    # Extra rounds over all servers after the first when they are unreachable or overloaded.
    max_retries: int = 4
    # Exponential backoff between rounds: base * 2^round, capped, with jitter so that bots
    # restarted together do not retry in lock-step.
    backoff_base_s: float = 0.5
    backoff_max_s: float = 15.0
    # A server's Retry-After is honoured up to this cap, so a misconfigured server cannot park jobs.
    retry_after_max_s: float = 30.0
    # After a connection failure a server is tried last for this long.
    server_cooloff_s: float = 30.0
    # Ask the server to stream queue position and step progress (NDJSON) so users see progress.
    stream: bool = True
    # Hugging Face Inference API (kind = "huggingface"): model id and API base URL.
    hf_model: str = "stabilityai/stable-diffusion-xl-base-1.0"
    hf_base_url: str = "https://api-inference.huggingface.co"
    # One HF call makes one image; hosted GPUs answer in seconds, two minutes means it is stuck.
    hf_timeout_s: float = 120.0
    # Total time to wait for a cold HF model to load (503 "currently loading") before giving up.
    hf_max_loading_wait_s: float = 300.0
    # kind = "fake": seconds each job takes (0 = instant), to watch progress in a demo.
    fake_delay_s: float = 0.0

    def __post_init__(self) -> None:
        if not self.urls:
            raise ConfigError("[backends] urls: at least one inference server URL is required")
        for i, url in enumerate(self.urls):
            _check_url(url, f"[backends] urls[{i}]")
        _check_url(self.hf_base_url, "[backends] hf_base_url")
        if not self.hf_model.strip():
            raise ConfigError("[backends] hf_model: must not be empty")
        for name in (
            "connect_timeout_s",
            "request_timeout_s",
            "backoff_max_s",
            "hf_timeout_s",
        ):
            if getattr(self, name) <= 0:
                raise ConfigError(f"[backends] {name}: must be > 0, got {getattr(self, name)!r}")
        for name in (
            "max_retries",
            "backoff_base_s",
            "retry_after_max_s",
            "server_cooloff_s",
            "hf_max_loading_wait_s",
            "fake_delay_s",
        ):
            if getattr(self, name) < 0:
                raise ConfigError(f"[backends] {name}: must be >= 0, got {getattr(self, name)!r}")


def _check_url(url: str, where: str) -> None:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ConfigError(f"{where}: expected an http(s) URL like http://127.0.0.1:8080, got {url!r}")
