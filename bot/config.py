"""The bot's typed configuration: [bot], [database], [storage], [quotas], [moderation].

Loaded with `bot.settings.load_section`, so every key can be overridden by
`IMAGINE_<SECTION>_<KEY>`; values are validated here at start-up and errors name the key.
Secrets are not here: `DATABASE_URL` (environment or .env) overrides `[database] url`.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from bot.settings import ConfigError, load_section, read_toml


def _check(cond: bool, key: str, message: str) -> None:
    if not cond:
        raise ConfigError(f"{key}: {message}")


# Upper bounds of durations: a day is longer than any sensible wait, and the bound keeps "inf" or a
# typo (1e30) from reaching datetime arithmetic, which overflows.
DAY_S = 86_400.0


def _seconds(value: float, key: str, *, lo: float, hi: float = DAY_S, lo_open: bool = False) -> None:
    ok = math.isfinite(value) and (value > lo if lo_open else value >= lo) and value <= hi
    _check(ok, key, f"must be {'>' if lo_open else '>='} {lo:g} and <= {hi:g} seconds, got {value!r}")


@dataclass(frozen=True)
class BotConfig:
    # Unset (None): the model's, as the inference server reports it (its default size, steps and
    # guidance, its largest step count); without a report (Hugging Face, the fake, a server not up
    # yet) 64, 20, 7.5 and 150. Set: the bot's own choice (max_steps can only lower the server's).
    # --ar keeps roughly base_size**2 pixels.
    base_size: int | None = None
    default_steps: int | None = None
    max_steps: int | None = None
    default_guidance: float | None = None
    default_n: int = 1
    # Prompts longer than this are refused: CLIP reads 77 tokens anyway, and rows stay small.
    max_prompt_chars: int = 1000
    # Jobs sent to the backend at once by one process; the backend batches them. Unset: twice the
    # servers' reported capacity (sum of their batch sizes; 4 while unknown), see bot/core/concurrency.py.
    dispatch_concurrency: int | None = None
    # The most that capacity-following concurrency goes to (each job in flight is a task and an
    # open request; 64 is sixteen servers of batch 2, or four of batch 8).
    max_dispatch_concurrency: int = 64
    # How often an idle dispatcher looks for work submitted by other processes (it is woken at once
    # for work submitted in its own process).
    poll_interval_s: float = 0.5
    # A claimed job whose holder stops renewing its lease for this long is taken over.
    lease_s: float = 60.0
    # Backend attempts per job before it fails (only retryable backend errors are retried).
    max_attempts: int = 3
    retry_backoff_s: float = 5.0
    job_timeout_s: float = 600.0
    # On a clean stop (SIGTERM), jobs whose outcome is being delivered get this long to finish
    # before the adapters close (the rest goes to the next start). 5 s: within `docker stop`'s 10 s
    # with the adapters' own shutdown after it; a chat post takes well under a second.
    shutdown_grace_s: float = 5.0
    progress_interval_s: float = 2.0
    # At most one live preview (the server's `preview` events) per job this often: each is a status
    # message edit with an image upload, heavier than a progress line. 0 = no previews.
    preview_interval_s: float = 2.0
    # Global admission limit: beyond this many queued jobs submissions get "overloaded".
    max_queued_jobs: int = 1000
    # How often a process counts the queue for that limit (between counts it adds the jobs it
    # queued itself): a count per submission would grow with the queue. Other processes'
    # submissions of the last interval may overshoot the limit by that much.
    queue_depth_check_s: float = 0.25
    # img2img strength of V1-V4, the variation reactions and Vary (Strong); Vary (Subtle) uses the
    # second, lower one (it keeps the composition and changes details).
    variation_strength: float = 0.6
    subtle_variation_strength: float = 0.3
    inpaint_strength: float = 1.0
    # Default --strength of /imagine with an image to start from (0 keeps it, 1 ignores it).
    image_strength: float = 0.6
    # Upscale (U1-U4): the image resized 2x, then image-to-image at this low strength on the same
    # model (a "hires fix": detail is added, the composition stays).
    upscale_strength: float = 0.3
    # A server model that upscales, sent as the request's `model`; "" = the model that made the
    # image. Needs a server that serves several models (the models registry).
    upscaler_model: str = ""
    # The largest width/height the backend accepts (the inference server's [inference_server]
    # max_side). Bigger upscales are made in overlapping tiles of at most this size; zoom-out and
    # pan canvases are scaled down to fit it.
    max_side: int = 1024
    # The largest side an upscale may reach: each doubling of the side is four times the tiles.
    max_upscale_side: int = 2048
    # 10 MiB: Discord's default attachment limit; larger uploads are refused before decoding.
    max_upload_bytes: int = 10 * 1024 * 1024
    # /metrics, /readyz and /healthz on a port of their own, for a process without an HTTP surface
    # (the Discord bot; the Slack runner in HTTP mode and the playground serve them on theirs).
    # 0: none.
    metrics_port: int = 0
    # 0.0.0.0 in a container, so that Prometheus and the orchestrator's probes reach it.
    metrics_host: str = "127.0.0.1"

    def __post_init__(self) -> None:
        _check(
            self.base_size is None or (self.base_size >= 8 and self.base_size % 8 == 0),
            "[bot] base_size",
            "must be a positive multiple of 8",
        )
        # 1000: the inference server's own largest `max_steps`.
        _check(
            self.max_steps is None or 1 <= self.max_steps <= 1000, "[bot] max_steps", "must be from 1 to 1000"
        )
        _check(
            self.default_steps is None or 1 <= self.default_steps <= (self.max_steps or 1000),
            "[bot] default_steps",
            "must be from 1 to max_steps",
        )
        # 30: the inference server's largest guidance (beyond it guidance only burns the image).
        _check(
            self.default_guidance is None or 0 <= self.default_guidance <= 30,
            "[bot] default_guidance",
            "must be from 0 to 30",
        )
        _check(1 <= self.default_n <= 4, "[bot] default_n", "must be from 1 to 4")
        # 4096: the largest side the core accepts for an input image; past it no job could run.
        _check(self.base_size is None or self.base_size <= 4096, "[bot] base_size", "must be at most 4096")
        # 10000: far beyond what a text encoder reads (77 tokens), and prompts stay small rows.
        _check(1 <= self.max_prompt_chars <= 10_000, "[bot] max_prompt_chars", "must be from 1 to 10000")
        _check(
            self.dispatch_concurrency is None or 1 <= self.dispatch_concurrency <= 256,
            "[bot] dispatch_concurrency",
            "must be from 1 to 256",
        )
        _check(
            1 <= self.max_dispatch_concurrency <= 256,
            "[bot] max_dispatch_concurrency",
            "must be from 1 to 256",
        )
        _seconds(self.poll_interval_s, "[bot] poll_interval_s", lo=0, hi=3600, lo_open=True)
        _seconds(self.lease_s, "[bot] lease_s", lo=1)
        _check(1 <= self.max_attempts <= 100, "[bot] max_attempts", "must be from 1 to 100")
        _seconds(self.retry_backoff_s, "[bot] retry_backoff_s", lo=0, hi=3600)
        _seconds(self.job_timeout_s, "[bot] job_timeout_s", lo=0, lo_open=True)
        _seconds(self.shutdown_grace_s, "[bot] shutdown_grace_s", lo=0, hi=600)
        _seconds(self.progress_interval_s, "[bot] progress_interval_s", lo=0, hi=3600)
        _seconds(self.preview_interval_s, "[bot] preview_interval_s", lo=0, hi=3600)
        _check(1 <= self.max_queued_jobs <= 1_000_000, "[bot] max_queued_jobs", "must be from 1 to 1000000")
        _seconds(self.queue_depth_check_s, "[bot] queue_depth_check_s", lo=0, hi=60)
        _check(0 < self.variation_strength <= 1, "[bot] variation_strength", "must be in (0, 1]")
        _check(0 < self.inpaint_strength <= 1, "[bot] inpaint_strength", "must be in (0, 1]")
        for key in ("subtle_variation_strength", "image_strength", "upscale_strength"):
            _check(0 < getattr(self, key) <= 1, f"[bot] {key}", "must be in (0, 1]")
        _check(
            self.subtle_variation_strength <= self.variation_strength,
            "[bot] subtle_variation_strength",
            "must not be above variation_strength (subtle changes less than strong)",
        )
        _check(
            len(self.upscaler_model) <= 200 and self.upscaler_model == self.upscaler_model.strip(),
            "[bot] upscaler_model",
            "must be a model name of at most 200 characters without surrounding spaces",
        )
        # 64: the smallest tile worth a diffusion pass; 4096: the largest side the core decodes.
        _check(
            64 <= self.max_side <= 4096 and self.max_side % 8 == 0,
            "[bot] max_side",
            "must be a multiple of 8 from 64 to 4096",
        )
        _check(
            self.max_side <= self.max_upscale_side <= 4096,
            "[bot] max_upscale_side",
            "must be from max_side to 4096",
        )
        _check(
            self.base_size is None or self.base_size <= self.max_side,
            "[bot] base_size",
            "must be at most max_side",
        )
        _check(
            0 <= self.metrics_port <= 65535,
            "[bot] metrics_port",
            "must be a TCP port (1-65535) or 0 for none",
        )
        _check(bool(self.metrics_host.strip()), "[bot] metrics_host", "must be a host name or address")
        # 100 MiB: every upload is read into memory and decoded; chat platforms cap theirs lower.
        _check(
            1024 <= self.max_upload_bytes <= 100 * 1024 * 1024,
            "[bot] max_upload_bytes",
            "must be from 1024 to 104857600 (100 MiB)",
        )


@dataclass(frozen=True)
class DatabaseConfig:
    # SQLAlchemy async URL; empty = SQLite file `data/imagine.db`. $DATABASE_URL overrides it.
    url: str = ""
    # Upgrade the schema at start-up instead of refusing to start on an old database.
    auto_migrate: bool = False
    # Connections per process (PostgreSQL); each dispatcher slot and each concurrent command uses one.
    pool_size: int = 10
    echo: bool = False
    # SQLite waits this long for the write lock before failing with "database is locked".
    sqlite_busy_timeout_s: float = 30.0
    # PostgreSQL: a submission NOTIFYs and every dispatcher LISTENs (one more connection per
    # process), so a job queued in one process starts at once in another; the poll
    # ([bot] poll_interval_s) stays as the fallback. Off behind a pooler that cannot LISTEN
    # (PgBouncer in transaction mode). Ignored on SQLite.
    notify: bool = True

    def __post_init__(self) -> None:
        _check(1 <= self.pool_size <= 200, "[database] pool_size", "must be from 1 to 200")
        _seconds(self.sqlite_busy_timeout_s, "[database] sqlite_busy_timeout_s", lo=0, hi=3600, lo_open=True)
        if self.url:
            _check(
                self.url.startswith(
                    (
                        "sqlite+aiosqlite://",
                        "postgresql+asyncpg://",
                        "postgresql://",
                        "postgres://",
                        "sqlite://",
                    )
                ),
                "[database] url",
                f"must be a sqlite+aiosqlite:// or postgresql+asyncpg:// URL, got {self.url.split(':', 1)[0]!r}",
            )


# S3's rules for a bucket name (3-63 lowercase letters, digits, dots and hyphens, starting and ending
# with a letter or digit): checked here so that a typo is a start-up error naming the key, not an
# opaque 400 from the object store later.
_BUCKET_RE = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")


@dataclass(frozen=True)
class StorageConfig:
    # "local": files under `dir` (one host, or a shared file system); "s3": an S3-compatible object
    # store (AWS S3, MinIO, Ceph, R2...), which bots on several hosts share. Credentials of "s3" come
    # from the environment only (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, or the AWS SDK's chain).
    backend: Literal["local", "s3"] = "local"
    dir: str = "data/images"
    bucket: str = ""
    # Prepended to every object key ("imagine/" keeps the bot's images apart in a shared bucket).
    prefix: str = ""
    # Empty: AWS's own endpoint for `region`; set it for MinIO and other S3-compatible stores.
    endpoint_url: str = ""
    region: str = ""
    # "path" for stores that have no per-bucket host names (MinIO, most self-hosted ones).
    addressing_style: Literal["auto", "path", "virtual"] = "auto"

    def __post_init__(self) -> None:
        _check(bool(self.dir.strip()) and "\x00" not in self.dir, "[storage] dir", "must be a directory path")
        if self.backend == "s3":
            _check(bool(self.bucket), "[storage] bucket", 'must be set when backend = "s3"')
            _check(
                _BUCKET_RE.fullmatch(self.bucket) is not None and ".." not in self.bucket,
                "[storage] bucket",
                f"must be an S3 bucket name (3-63 lowercase letters, digits, dots, hyphens), got {self.bucket!r}",
            )
        # 200: object keys are at most 1024 bytes; the prefix is a folder name, not a path of its own.
        _check(
            len(self.prefix) <= 200 and not self.prefix.startswith("/") and "\x00" not in self.prefix,
            "[storage] prefix",
            f"must be at most 200 characters and not start with '/', got {self.prefix!r}",
        )
        if self.endpoint_url:
            url = urlsplit(self.endpoint_url)
            _check(
                url.scheme in ("http", "https") and bool(url.netloc),
                "[storage] endpoint_url",
                f"must be an http:// or https:// URL, got {self.endpoint_url!r}",
            )
        _check(
            re.fullmatch(r"[a-z0-9-]{0,40}", self.region) is not None,
            "[storage] region",
            f"must be a region name such as us-east-1, got {self.region!r}",
        )


@dataclass(frozen=True)
class QuotaConfig:
    # Images per user per period when neither the user nor the guild has its own limit.
    daily_limit: int = 25
    period: Literal["daily"] = "daily"
    # The hour (UTC) at which the daily period starts.
    reset_hour_utc: int = 0

    def __post_init__(self) -> None:
        _check(self.daily_limit >= 0, "[quotas] daily_limit", "must be >= 0")
        _check(0 <= self.reset_hour_utc <= 23, "[quotas] reset_hour_utc", "must be from 0 to 23")


@dataclass(frozen=True)
class ModerationConfig:
    enabled: bool = True
    # Words or phrases refused in prompts (not in --no negative prompts), case- and accent-insensitive.
    banned_terms: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for i, term in enumerate(self.banned_terms):
            _check(bool(term.strip()), f"[moderation] banned_terms[{i}]", "must not be empty")
            _check(len(term) <= 200, f"[moderation] banned_terms[{i}]", "must be at most 200 characters")


@dataclass(frozen=True)
class CoreConfig:
    bot: BotConfig
    database: DatabaseConfig
    storage: StorageConfig
    quotas: QuotaConfig
    moderation: ModerationConfig
    database_url: str  # resolved: $DATABASE_URL > [database] url > SQLite under data/


DEFAULT_SQLITE_PATH = Path("data") / "imagine.db"


def normalize_database_url(url: str) -> str:
    """Accept the common spellings and return an async SQLAlchemy URL."""
    if url.startswith("postgres://"):
        url = "postgresql://" + url[len("postgres://") :]
    if url.startswith("postgresql://"):
        url = "postgresql+asyncpg://" + url[len("postgresql://") :]
    if url.startswith("sqlite://"):
        url = "sqlite+aiosqlite://" + url[len("sqlite://") :]
    return url


def load_core_config(
    source: Mapping[str, Any] | str | os.PathLike[str] | None, env: Mapping[str, str] | None = None
) -> CoreConfig:
    env = os.environ if env is None else env
    if source is not None and not isinstance(source, Mapping):
        source = read_toml(source)  # read the file once for all five sections
    database = load_section(source, "database", DatabaseConfig, environ=env)
    url = env.get("DATABASE_URL") or database.url
    if url:
        url = normalize_database_url(url)
        if not url.startswith(("sqlite+aiosqlite://", "postgresql+asyncpg://")):
            raise ConfigError(f"DATABASE_URL / [database] url: unsupported database {url.split(':', 1)[0]!r}")
    else:
        url = f"sqlite+aiosqlite:///{DEFAULT_SQLITE_PATH}"
    return CoreConfig(
        bot=load_section(source, "bot", BotConfig, environ=env),
        database=database,
        storage=load_section(source, "storage", StorageConfig, environ=env),
        quotas=load_section(source, "quotas", QuotaConfig, environ=env),
        moderation=load_section(source, "moderation", ModerationConfig, environ=env),
        database_url=url,
    )
