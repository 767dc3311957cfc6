"""The `[backends]` section of config.toml: which backend the bot uses and how it talks to it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args
from urllib.parse import urlsplit

from bot.settings import ConfigError

BackendKind = Literal["inference_server", "huggingface", "fake"]
Routing = Literal["least_work", "round_robin"]


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
    # Where a job starts: the server with the least outstanding work per unit of capacity (its last
    # reported queue and running requests plus this bot's jobs sent since, over its batch size), or
    # the next one in turn. Both fail over the same way.
    routing: Routing = "least_work"
    # While no server is reachable (an outage, a restart) jobs wait this long for one to come back
    # before they fail (refunded): 10 minutes covers a host reboot or a model reload.
    outage_horizon_s: float = 600.0
    # Ask the server to stream queue position and step progress (NDJSON) so users see progress.
    stream: bool = True
    # Hugging Face Inference Providers (kind = "huggingface"), through huggingface_hub's client.
    # "auto" lets Hugging Face pick the provider serving hf_model (in the order set at
    # https://hf.co/settings/inference-providers); or name one: "hf-inference", "fal-ai", ...
    hf_provider: str = "auto"
    # Text-to-image model id on the Hub; the provider must serve it (see README).
    hf_model: str = "black-forest-labs/FLUX.1-schnell"
    # Model for variations (image-to-image); "" = hf_model. Providers map a model to one task, so
    # variations usually need an image-to-image model of their own.
    hf_image_to_image_model: str = ""
    # Send every request to this URL instead of the router (a dedicated Inference Endpoint or a
    # self-hosted server speaking hf-inference's API; the tests' fake). "" = the router.
    hf_base_url: str = ""
    # One HF call makes one image; hosted GPUs answer in seconds, two minutes means it is stuck.
    hf_timeout_s: float = 120.0
    # kind = "fake": seconds each job takes (0 = instant), to watch progress in a demo.
    fake_delay_s: float = 0.0

    def __post_init__(self) -> None:
        if not self.urls:
            raise ConfigError("[backends] urls: at least one inference server URL is required")
        for i, url in enumerate(self.urls):
            _check_url(url, f"[backends] urls[{i}]")
        if self.routing not in get_args(Routing):
            raise ConfigError(
                f"[backends] routing: must be one of {', '.join(get_args(Routing))}, got {self.routing!r}"
            )
        if self.hf_base_url:
            _check_url(self.hf_base_url, "[backends] hf_base_url")
        if not self.hf_model.strip():
            raise ConfigError("[backends] hf_model: must not be empty")
        if self.kind == "huggingface":
            self._check_huggingface()
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
            "outage_horizon_s",
            "fake_delay_s",
        ):
            if getattr(self, name) < 0:
                raise ConfigError(f"[backends] {name}: must be >= 0, got {getattr(self, name)!r}")

    def _check_huggingface(self) -> None:
        # Checked against the installed huggingface_hub's own provider table (only when this
        # backend is used: importing it costs a third of a second).
        from huggingface_hub.inference._providers import PROVIDERS
        from huggingface_hub.utils import HFValidationError, validate_repo_id

        for key in ("hf_model", "hf_image_to_image_model"):
            value = getattr(self, key)
            if key == "hf_image_to_image_model" and not value:
                continue
            try:
                validate_repo_id(value)
            except HFValidationError:
                raise ConfigError(
                    f"[backends] {key}: expected a Hub model id like black-forest-labs/FLUX.1-schnell, "
                    f"got {value!r} (a server URL goes in hf_base_url)"
                ) from None

        usable = sorted(name for name, tasks in PROVIDERS.items() if "text-to-image" in tasks)
        if self.hf_provider != "auto" and self.hf_provider not in usable:
            known = "is not a provider" if self.hf_provider not in PROVIDERS else "has no text-to-image task"
            raise ConfigError(
                f"[backends] hf_provider: {self.hf_provider!r} {known} in huggingface_hub "
                f'{_hub_version()}; use "auto" or one of {", ".join(usable)}'
            )
        if self.hf_base_url and self.hf_provider not in ("auto", "hf-inference"):
            raise ConfigError(
                f"[backends] hf_provider: {self.hf_provider!r} cannot be used with hf_base_url, which "
                'sends requests straight to that URL in hf-inference\'s format; use "auto" or '
                '"hf-inference", or clear hf_base_url'
            )


def _hub_version() -> str:
    from huggingface_hub import __version__

    return __version__


def _check_url(url: str, where: str) -> None:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ConfigError(f"{where}: expected an http(s) URL like http://127.0.0.1:8080, got {url!r}")
