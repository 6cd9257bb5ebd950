"""A real S3-compatible server on loopback for tests (moto's server, in-process, on a free port).

Use from a test module (pytest puts tests/ on sys.path, as for conftest):

    from s3server import s3_bucket, s3_endpoint, s3_server  # noqa: F401  (fixtures)

- `s3_server` (session): starts the server once, yields its endpoint URL, stops it at the end.
- `s3_endpoint` (function): the endpoint, with AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY=testing,
  AWS_DEFAULT_REGION=us-east-1 and AWS_ENDPOINT_URL=endpoint set for the test and restored after.
- `s3_bucket` (function): a fresh, empty bucket on that server; yields its name.

Needs `moto[server]` (flask) and, to reach it through fsspec, `s3fs[boto3]`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import uuid

import pytest

_ENV_SET = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}
_ENV_CLEARED = ("AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "AWS_PROFILE", "AWS_ENDPOINT_URL_S3")


@contextlib.contextmanager
def moto_s3_server():
    """Start moto's S3-compatible server on 127.0.0.1 (a free port); yield its endpoint URL."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one INFO line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        yield f"http://{host}:{port}"
    finally:
        server.stop()


@contextlib.contextmanager
def s3_environment(endpoint: str):
    """Point AWS clients (boto3, s3fs, memray.catalog.files.open_fs) at `endpoint`; restore after."""
    saved = {key: os.environ.get(key) for key in (*_ENV_SET, *_ENV_CLEARED, "AWS_ENDPOINT_URL")}
    try:
        for key in _ENV_CLEARED:
            os.environ.pop(key, None)
        os.environ.update(_ENV_SET)
        os.environ["AWS_ENDPOINT_URL"] = endpoint
        yield endpoint
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def create_bucket(endpoint: str, name: str | None = None) -> str:
    """Create a bucket on the server; returns its name."""
    import boto3

    name = name or f"memray-test-{uuid.uuid4().hex[:12]}"
    client = boto3.client(
        "s3",
        endpoint_url=endpoint,
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
        region_name="us-east-1",
    )
    client.create_bucket(Bucket=name)
    return name


@pytest.fixture(scope="session")
def s3_server():
    """The endpoint URL of a moto S3 server on loopback, shared by the session."""
    import s3fs  # noqa: F401  (a missing test dependency must fail, not skip)

    with moto_s3_server() as endpoint:
        yield endpoint


@pytest.fixture
def s3_endpoint(s3_server):
    """The server's endpoint, with AWS credentials and AWS_ENDPOINT_URL set for this test."""
    with s3_environment(s3_server) as endpoint:
        yield endpoint


@pytest.fixture
def s3_bucket(s3_endpoint):
    """A fresh bucket on the loopback server (environment set as by `s3_endpoint`)."""
    return create_bucket(s3_endpoint)
