"""An S3-compatible server on loopback for the storage tests: moto's server mode (real HTTP, the real
S3 wire protocol and its errors), one per test session on a free port of 127.0.0.1.

`s3_server` yields its endpoint; `s3_bucket` makes a fresh bucket per test and returns the
`[storage]` section and the environment (credentials) that point a core at it.
"""

from __future__ import annotations

import json
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import boto3
import pytest
from moto.server import ThreadedMotoServer

# moto accepts any credentials while its authentication is off (the default); these are the ones
# the tests' cores use. With authentication on (`access_denied_keys`) only IAM users' keys work.
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing-key", "AWS_SECRET_ACCESS_KEY": "testing-secret"}
REGION = "us-east-1"


@dataclass(frozen=True)
class S3Bucket:
    endpoint: str
    name: str

    def storage_section(self, **overrides: Any) -> dict[str, Any]:
        return {
            "backend": "s3",
            "bucket": self.name,
            "prefix": "imagine/",
            "endpoint_url": self.endpoint,
            "region": REGION,
            **overrides,
        }

    def client(self, **credentials: str) -> Any:
        """A plain (synchronous) client for the test's own checks and set-up."""
        return admin_client(self.endpoint, **credentials)


def admin_client(endpoint: str, service: str = "s3", **credentials: str) -> Any:
    creds = credentials or {
        "aws_access_key_id": CREDENTIALS["AWS_ACCESS_KEY_ID"],
        "aws_secret_access_key": CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
    }
    return boto3.client(service, endpoint_url=endpoint, region_name=REGION, **creds)


def set_moto_auth(endpoint: str, *, on: bool) -> None:
    """Turn moto's IAM authentication on (every request must be signed by an IAM user's key and be
    allowed by its policies) or off (anything goes)."""
    body = b"0" if on else b"inf"
    # text/plain: a form content type would make the server parse the body as a form and lose it.
    request = urllib.request.Request(
        f"{endpoint}/moto-api/reset-auth", data=body, method="POST", headers={"Content-Type": "text/plain"}
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        json.loads(response.read())


@pytest.fixture(scope="session")
def s3_server() -> Iterator[str]:
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()


@pytest.fixture
def s3_bucket(s3_server: str) -> S3Bucket:
    name = f"imagine-test-{uuid.uuid4().hex[:12]}"
    admin_client(s3_server).create_bucket(Bucket=name)
    return S3Bucket(s3_server, name)


def read_only_keys(bucket: S3Bucket) -> dict[str, str]:
    """Credentials of an IAM user that may read the bucket but not write to it."""
    iam = admin_client(bucket.endpoint, "iam")
    user = f"reader-{uuid.uuid4().hex[:8]}"
    iam.create_user(UserName=user)
    policy = {
        "Version": "2012-10-17",
        "Statement": [
            {
                "Effect": "Allow",
                "Action": ["s3:GetObject", "s3:ListBucket"],
                "Resource": [f"arn:aws:s3:::{bucket.name}", f"arn:aws:s3:::{bucket.name}/*"],
            }
        ],
    }
    iam.put_user_policy(UserName=user, PolicyName="read-only", PolicyDocument=json.dumps(policy))
    key = iam.create_access_key(UserName=user)["AccessKey"]
    return {"AWS_ACCESS_KEY_ID": key["AccessKeyId"], "AWS_SECRET_ACCESS_KEY": key["SecretAccessKey"]}
