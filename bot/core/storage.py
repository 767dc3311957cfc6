"""Content-addressed image storage: the key of an image is the sha256 hex of its bytes, so the same
image stored twice takes the space once and a key can never point at different bytes. Behind a small
interface so that an object store (S3 and the like) can be added without touching the core."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import re
import tempfile
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Protocol, runtime_checkable

from bot.config import StorageConfig
from bot.core.api import StorageError
from bot.settings import ConfigError

log = logging.getLogger("bot.core.storage")

_KEY_RE = re.compile(r"[0-9a-f]{64}")

WRITE_FAILED = (
    "The bot's image storage is full or not writable right now (the admins can see why in the log)."
)
READ_FAILED = "The bot could not read an image from its storage (the admins can see why in the log)."


@runtime_checkable
class ImageStorage(Protocol):
    async def put(self, data: bytes) -> str:
        """Store `data`; return its key (sha256 hex). Idempotent. StorageError if it cannot."""
        ...

    async def get(self, key: str) -> bytes:
        """The bytes for `key`; KeyError if absent, StorageError if unreadable."""
        ...

    async def exists(self, key: str) -> bool: ...

    async def check_writable(self) -> None:
        """At start-up: StorageError naming the config key when an image could not be stored."""
        ...


def content_key(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class LocalImageStorage:
    """Files under `root/ab/abcdef...png` (two-level fan-out keeps directories small)."""

    def __init__(self, root: str | os.PathLike[str]):
        self.root = Path(root)

    async def check_writable(self) -> None:
        """At start-up: create the directory and write and remove a probe file, so that a storage
        that cannot hold a single image stops the bot with a clear error instead of failing jobs."""

        def probe() -> None:
            self.root.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.root, prefix=".probe-")
            os.close(fd)
            os.unlink(tmp)

        try:
            await asyncio.to_thread(probe)
        except OSError as e:
            raise StorageError(f"[storage] dir: {self.root} is not writable ({e.strerror or e})") from e

    def path_for(self, key: str) -> Path:
        if not _KEY_RE.fullmatch(key):
            raise KeyError(f"not a storage key: {key!r}")
        return self.root / key[:2] / f"{key}.png"

    async def put(self, data: bytes) -> str:
        key = content_key(data)
        try:
            await asyncio.to_thread(self._write, key, data)
        except OSError as e:
            # ENOSPC, EACCES, EROFS...: the operator must act; the caller fails the request at once.
            log.error("image storage: cannot write %s: %s", self.path_for(key), e)
            raise StorageError(WRITE_FAILED) from e
        return key

    def _write(self, key: str, data: bytes) -> None:
        path = self.path_for(key)
        if path.exists():
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        # Write then rename: a crash never leaves a truncated file under a valid key.
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    async def get(self, key: str) -> bytes:
        path = self.path_for(key)
        try:
            return await asyncio.to_thread(path.read_bytes)
        except FileNotFoundError:
            raise KeyError(key) from None
        except OSError as e:
            log.error("image storage: cannot read %s: %s", path, e)
            raise StorageError(READ_FAILED) from e

    async def exists(self, key: str) -> bool:
        try:
            return await asyncio.to_thread(self.path_for(key).exists)
        except OSError as e:
            log.error("image storage: cannot look up %s: %s", key, e)
            raise StorageError(READ_FAILED) from e


@contextlib.asynccontextmanager
async def open_storage(config: StorageConfig, env: Mapping[str, str]) -> AsyncIterator[ImageStorage]:
    """The storage `[storage]` describes, checked writable (ConfigError naming the key if not), open
    for the block."""
    if config.backend == "s3":
        try:
            from bot.core.s3_storage import open_s3_storage
        except ImportError as e:  # a role installed without the extra: say which one
            raise ConfigError(
                f"[storage] backend = \"s3\" needs the s3 extra (pip install 'imagine-bot[s3]'): {e}"
            ) from None
        async with open_s3_storage(config, env) as s3:
            await _checked(s3)
            yield s3
        return
    local = LocalImageStorage(config.dir)
    await _checked(local)
    yield local


async def _checked(storage: ImageStorage) -> None:
    try:
        await storage.check_writable()
    except StorageError as e:
        raise ConfigError(e.message) from e
