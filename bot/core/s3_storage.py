"""`S3ImageStorage`: the content-addressed image store in an S3-compatible bucket (AWS S3, MinIO,
Ceph, R2...), so that bot processes on several hosts see the same images.

Same keys and layout as the local folder (`<prefix>ab/abcdef....png`, the sha256 of the bytes), so a
folder can be copied into a bucket as it is. The client is aiobotocore's (botocore's requests over
aiohttp, which the bot already uses): no thread pool, and the AWS SDK's credential chain.
Credentials come from the environment only, never from config.toml.

Every failure of the store surfaces as `StorageError` (the dispatcher fails the job at once with a
message naming storage and refunds it: retrying a full or forbidden bucket would fail the same way),
an absent key as `KeyError`; the cause goes to the log with the bucket and key.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Mapping
from typing import Any

import aiohttp
from aiobotocore.session import get_session
from botocore.config import Config
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    HTTPClientError,
    NoCredentialsError,
)
from botocore.exceptions import ConnectionError as BotoConnectionError

from bot.config import StorageConfig
from bot.core.api import StorageError
from bot.core.storage import _KEY_RE, READ_FAILED, WRITE_FAILED, content_key

log = logging.getLogger("bot.core.storage")

# Seconds to connect and to wait for an answer. A store that takes longer is failing, and a job
# waiting on it holds a dispatch slot; the SDK retries transient errors (below) within this.
CONNECT_TIMEOUT_S = 5.0
READ_TIMEOUT_S = 30.0
# The SDK's "standard" retry mode: 3 attempts with jittered backoff on throttling and 5xx.
MAX_ATTEMPTS = 3
# Written (and read back) at start-up to prove the bucket is writable; overwritten each time, so no
# delete permission is needed and nothing accumulates.
PROBE_NAME = ".imagine-probe"

# What reaching the store can raise besides the SDK's own errors (aiobotocore lets some of aiohttp's
# through, and a socket error or timeout may come from below both).
_TRANSPORT_ERRORS = (BotoCoreError, ClientError, aiohttp.ClientError, OSError, TimeoutError)


def _code(e: Exception) -> str:
    if isinstance(e, ClientError):
        return str(e.response.get("Error", {}).get("Code", "")) or str(
            e.response.get("ResponseMetadata", {}).get("HTTPStatusCode", "")
        )
    return type(e).__name__


def _is_missing(e: Exception) -> bool:
    return isinstance(e, ClientError) and _code(e) in ("NoSuchKey", "404", "NotFound")


class S3ImageStorage:
    """An `ImageStorage` over an open aiobotocore S3 client (see `open_s3_storage`)."""

    def __init__(self, client: Any, config: StorageConfig):
        self._client = client
        self.bucket = config.bucket
        self.prefix = config.prefix
        self.endpoint = config.endpoint_url or "AWS S3"

    def object_key(self, key: str) -> str:
        if not _KEY_RE.fullmatch(key):
            raise KeyError(f"not a storage key: {key!r}")
        return f"{self.prefix}{key[:2]}/{key}.png"

    async def check_writable(self) -> None:
        """At start-up: write a probe object and read it back, so that a bucket the bot cannot use
        stops it with an error naming the key to fix instead of failing every job."""
        probe_key = f"{self.prefix}{PROBE_NAME}"
        try:
            await self._client.put_object(Bucket=self.bucket, Key=probe_key, Body=b"ok")
            got = await self._client.get_object(Bucket=self.bucket, Key=probe_key)
            async with got["Body"] as body:
                await body.read()
        except _TRANSPORT_ERRORS as e:
            raise StorageError(self._describe(e)) from e

    def _describe(self, e: Exception) -> str:
        where = f"bucket {self.bucket!r} at {self.endpoint}"
        code = _code(e)
        if isinstance(e, (BotoConnectionError, HTTPClientError, aiohttp.ClientError, OSError, TimeoutError)):
            return f"[storage] endpoint_url: cannot reach {self.endpoint} ({e})"
        if isinstance(e, NoCredentialsError):
            return (
                '[storage] backend = "s3": no credentials found; set AWS_ACCESS_KEY_ID and '
                "AWS_SECRET_ACCESS_KEY in the environment (or configure the AWS SDK's credential chain)"
            )
        if code in ("NoSuchBucket", "404", "NotFound"):
            return f"[storage] bucket: {where} does not exist"
        if code in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "InvalidToken", "ExpiredToken"):
            return (
                f"[storage] bucket: the store refused the credentials ({code}) for {where}; "
                "check AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"
            )
        if code in ("AccessDenied", "403", "AllAccessDisabled"):
            return (
                f"[storage] bucket: access denied to {where}: the credentials need s3:PutObject and "
                f"s3:GetObject on {self.prefix or ''}*"
            )
        return f"[storage] bucket: {where} is not usable ({code}: {e})"

    async def put(self, data: bytes) -> str:
        key = content_key(data)
        name = self.object_key(key)
        try:
            # Content-addressed: writing the same bytes again under the same key changes nothing,
            # so no existence check (one request instead of two).
            await self._client.put_object(Bucket=self.bucket, Key=name, Body=data, ContentType="image/png")
        except _TRANSPORT_ERRORS as e:
            log.error("image storage: cannot write s3://%s/%s: %s", self.bucket, name, self._describe(e))
            raise StorageError(WRITE_FAILED) from e
        return key

    async def get(self, key: str) -> bytes:
        name = self.object_key(key)
        try:
            got = await self._client.get_object(Bucket=self.bucket, Key=name)
            async with got["Body"] as body:
                data: bytes = await body.read()
        except _TRANSPORT_ERRORS as e:
            if _is_missing(e):
                raise KeyError(key) from None
            log.error("image storage: cannot read s3://%s/%s: %s", self.bucket, name, self._describe(e))
            raise StorageError(READ_FAILED) from e
        return data

    async def exists(self, key: str) -> bool:
        name = self.object_key(key)
        try:
            await self._client.head_object(Bucket=self.bucket, Key=name)
        except _TRANSPORT_ERRORS as e:
            if _is_missing(e):
                return False
            log.error("image storage: cannot look up s3://%s/%s: %s", self.bucket, name, self._describe(e))
            raise StorageError(READ_FAILED) from e
        return True


@contextlib.asynccontextmanager
async def open_s3_storage(config: StorageConfig, env: Mapping[str, str]) -> AsyncIterator[S3ImageStorage]:
    """An `S3ImageStorage` with its client open for the block. Credentials: AWS_ACCESS_KEY_ID and
    AWS_SECRET_ACCESS_KEY (and AWS_SESSION_TOKEN) from `env` when set, else the AWS SDK's chain
    (its config files, a container or instance role)."""
    session = get_session()
    credentials: dict[str, str] = {}
    if env.get("AWS_ACCESS_KEY_ID") and env.get("AWS_SECRET_ACCESS_KEY"):
        credentials = {
            "aws_access_key_id": env["AWS_ACCESS_KEY_ID"],
            "aws_secret_access_key": env["AWS_SECRET_ACCESS_KEY"],
        }
        if env.get("AWS_SESSION_TOKEN"):
            credentials["aws_session_token"] = env["AWS_SESSION_TOKEN"]
    # A custom endpoint still needs a region to sign requests; S3-compatible stores accept any.
    region = config.region or env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION") or "us-east-1"
    client_config = Config(
        connect_timeout=CONNECT_TIMEOUT_S,
        read_timeout=READ_TIMEOUT_S,
        retries={"max_attempts": MAX_ATTEMPTS, "mode": "standard"},
        s3={"addressing_style": config.addressing_style},
    )
    async with session.create_client(
        "s3",
        region_name=region,
        endpoint_url=config.endpoint_url or None,
        config=client_config,
        **credentials,
    ) as client:
        yield S3ImageStorage(client, config)
