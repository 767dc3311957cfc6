"""The image storage's contract on both backends (a local folder; an S3 bucket on a loopback
S3-compatible server, moto's server mode: real HTTP and the real S3 errors), a job through the core
with S3 storage read back by a second bot process, and the failures an operator meets: the server
unreachable, the bucket missing, access denied, the bucket gone while jobs run."""

from __future__ import annotations

import hashlib
import socket
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from bot.backends.fake import FakeBackend
from bot.config import StorageConfig, load_core_config
from bot.core.api import StorageError
from bot.core.s3_storage import open_s3_storage
from bot.core.storage import WRITE_FAILED, ImageStorage, open_storage
from bot.settings import ConfigError
from tests.core.helpers import ALICE, GUILD, running_core
from tests.core.s3_server import (
    CREDENTIALS,
    S3Bucket,
    read_only_keys,
    set_moto_auth,
)

PNG_LIKE = b"\x89PNG\r\n\x1a\n not really an image, storage does not care"


@pytest.fixture(params=["local", "s3"])
async def storage(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[ImageStorage]:
    if request.param == "local":
        config = StorageConfig(dir=str(tmp_path / "images"))
    else:
        bucket: S3Bucket = request.getfixturevalue("s3_bucket")
        config = StorageConfig(**bucket.storage_section())
    async with open_storage(config, CREDENTIALS) as opened:
        yield opened


async def test_storage_is_content_addressed_idempotent_and_keyed(storage: ImageStorage):
    key = await storage.put(PNG_LIKE)
    assert key == hashlib.sha256(PNG_LIKE).hexdigest()
    assert await storage.put(PNG_LIKE) == key  # the same bytes again: the same key, no error
    assert await storage.get(key) == PNG_LIKE
    assert await storage.exists(key)
    other = await storage.put(b"other bytes")
    assert other != key and await storage.get(other) == b"other bytes"
    assert not await storage.exists("0" * 64)
    with pytest.raises(KeyError):
        await storage.get("0" * 64)
    for bad in ("../../etc/passwd", "ab", key.upper(), key + "0"):
        with pytest.raises(KeyError):
            await storage.get(bad)
    await storage.check_writable()  # again, with images present


async def test_s3_objects_use_the_prefix_and_the_local_layout(s3_bucket: S3Bucket):
    async with open_storage(StorageConfig(**s3_bucket.storage_section()), CREDENTIALS) as storage:
        key = await storage.put(PNG_LIKE)
    listed = s3_bucket.client().list_objects_v2(Bucket=s3_bucket.name)["Contents"]
    names = sorted(o["Key"] for o in listed)
    assert names == ["imagine/.imagine-probe", f"imagine/{key[:2]}/{key}.png"]
    head = s3_bucket.client().head_object(Bucket=s3_bucket.name, Key=f"imagine/{key[:2]}/{key}.png")
    assert head["ContentType"] == "image/png"


async def test_a_job_with_s3_storage_is_followed_up_by_another_bot_process(db_url, tmp_path, s3_bucket):
    """Process A makes the image; process B (another core, its own local folder, the same database
    and bucket) makes a variation of it: B reads A's image from the bucket."""
    section = s3_bucket.storage_section()
    env_sections = {"storage": section}
    async with running_core(db_url, tmp_path / "a", env=CREDENTIALS, **env_sections) as (core_a, delivery_a):
        parent = await core_a.service.imagine(ALICE, GUILD, "a fox --n 2 --seed 3", idempotency_key="p")
        done = await core_a.service.wait_for_job(parent.id, 30)
        assert done.state == "succeeded"
        await delivery_a.wait_for(lambda: parent.id in delivery_a.succeeded)
    backend_b = FakeBackend()
    async with running_core(db_url, tmp_path / "b", backend=backend_b, env=CREDENTIALS, **env_sections) as (
        core_b,
        delivery_b,
    ):
        variation = await core_b.service.variation(ALICE, GUILD, 1, job_id=parent.id, idempotency_key="v")
        finished = await core_b.service.wait_for_job(variation.id, 30)
        assert finished.state == "succeeded"
        await delivery_b.wait_for(lambda: variation.id in delivery_b.succeeded)
        [(_, images)] = delivery_b.succeeded[variation.id]
        assert await core_b.service.image_bytes(images[0].info.storage_key) == images[0].png
    [call] = backend_b.calls
    assert call.params.task == "img2img"
    assert hashlib.sha256(call.params.image or b"").hexdigest() == done.images[1].storage_key
    stored = {
        o["Key"]
        for o in s3_bucket.client().list_objects_v2(Bucket=s3_bucket.name, Prefix="imagine/")["Contents"]
    }
    for image in (*done.images, *finished.images):
        assert f"imagine/{image.storage_key[:2]}/{image.storage_key}.png" in stored
    for local in (tmp_path / "a" / "images", tmp_path / "b" / "images"):
        assert not local.exists()  # nothing went to a local folder


async def test_bucket_gone_while_running_fails_the_job_at_once_and_refunds(db_url, tmp_path, s3_bucket):
    backend = FakeBackend()
    # A 10-minute lease: a job left to lease expiry would not finish within this test.
    async with running_core(
        db_url,
        tmp_path,
        backend=backend,
        env=CREDENTIALS,
        storage=s3_bucket.storage_section(),
        bot={"lease_s": 600.0},
    ) as (core, delivery):
        client = s3_bucket.client()
        for obj in client.list_objects_v2(Bucket=s3_bucket.name).get("Contents", []):
            client.delete_object(Bucket=s3_bucket.name, Key=obj["Key"])
        client.delete_bucket(Bucket=s3_bucket.name)
        job = await core.service.imagine(ALICE, GUILD, "a lighthouse --n 2", idempotency_key="s1")
        await delivery.wait_for(lambda: job.id in delivery.failed, within_s=30)
        view = await core.service.get_job(job.id)
        assert (view.state, view.attempts) == ("failed", 1)
        assert "storage" in view.error and "refunded" in view.error
        assert len(backend.calls) == 1  # generated once, not again after a lease
        assert (await core.service.quota(ALICE, GUILD)).used_today == 0


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def test_unreachable_server_stops_the_start_naming_the_endpoint(s3_bucket):
    endpoint = f"http://127.0.0.1:{_closed_port()}"
    config = StorageConfig(**s3_bucket.storage_section(endpoint_url=endpoint))
    with pytest.raises(ConfigError) as err:
        async with open_storage(config, CREDENTIALS):
            pass
    assert str(err.value).startswith("[storage] endpoint_url: cannot reach " + endpoint)


async def test_missing_bucket_stops_the_start_naming_the_bucket(s3_server):
    bucket = S3Bucket(s3_server, "no-such-bucket-here")
    with pytest.raises(ConfigError) as err:
        async with open_storage(StorageConfig(**bucket.storage_section()), CREDENTIALS):
            pass
    assert str(err.value) == f"[storage] bucket: bucket 'no-such-bucket-here' at {s3_server} does not exist"


async def test_access_denied_stops_the_start_and_fails_writes(s3_bucket):
    keys = read_only_keys(s3_bucket)
    set_moto_auth(s3_bucket.endpoint, on=True)
    try:
        config = StorageConfig(**s3_bucket.storage_section())
        with pytest.raises(ConfigError) as err:
            async with open_storage(config, keys):
                pass
        assert str(err.value).startswith(f"[storage] bucket: access denied to bucket '{s3_bucket.name}'")
        # Denied after start-up (a policy changed under a running bot): the write is a StorageError
        # with the user's message, reading still works.
        async with open_s3_storage(config, keys) as storage:
            with pytest.raises(StorageError) as denied:
                await storage.put(PNG_LIKE)
            assert denied.value.message == WRITE_FAILED
            assert not await storage.exists("0" * 64)
        # Credentials the store does not know at all are named as such.
        unknown = {"AWS_ACCESS_KEY_ID": "AKIAUNKNOWN000000000", "AWS_SECRET_ACCESS_KEY": "x"}
        with pytest.raises(ConfigError) as err:
            async with open_storage(config, unknown):
                pass
        assert "refused the credentials (InvalidAccessKeyId)" in str(err.value)
    finally:
        set_moto_auth(s3_bucket.endpoint, on=False)


@pytest.mark.parametrize(
    ("section", "needle"),
    [
        ({"backend": "s3"}, '[storage] bucket: must be set when backend = "s3"'),
        ({"backend": "s3", "bucket": "Bad_Name"}, "[storage] bucket: must be an S3 bucket name"),
        ({"backend": "s3", "bucket": "ok-bucket", "endpoint_url": "minio:9000"}, "[storage] endpoint_url"),
        ({"backend": "s3", "bucket": "ok-bucket", "prefix": "/abs"}, "[storage] prefix"),
        ({"backend": "s3", "bucket": "ok-bucket", "region": "US East"}, "[storage] region"),
        ({"backend": "gcs"}, "[storage] backend"),
        ({"backend": "s3", "bucket": "ok-bucket", "addressing_style": "dns"}, "[storage] addressing_style"),
    ],
)
def test_storage_config_errors_name_the_key(section, needle):
    with pytest.raises(ConfigError) as err:
        load_core_config({"storage": section}, {})
    assert needle in str(err.value)


def test_storage_keys_from_the_environment():
    cfg = load_core_config(
        {},
        {"IMAGINE_STORAGE_BACKEND": "s3", "IMAGINE_STORAGE_BUCKET": "fleet-images", "AWS_ACCESS_KEY_ID": "k"},
    )
    assert (cfg.storage.backend, cfg.storage.bucket, cfg.storage.prefix) == ("s3", "fleet-images", "")
