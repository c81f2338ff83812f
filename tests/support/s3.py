"""An S3 endpoint on this machine for the object-store tests and benchmark: moto's server, a
separate process answering real HTTP on a loopback port.

    with bucket_session("kdcache-test") as env:    # all three below, for the block
    with s3_endpoint() as endpoint:                # "http://127.0.0.1:PORT"
        os.environ.update(s3_env(endpoint))        # the AWS_* variables a user sets (dummy credentials)
        make_bucket("kdcache-test")
        bucket_objects("s3://kdcache-test/t.zarr")  # key under the prefix -> bytes

``s3_env`` isolates the clients from the machine's own AWS configuration (no ~/.aws, no instance
metadata). ``forget_clients`` drops the cached S3 filesystems (and the buckets found reachable),
for tests that change the variables.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from typing import Iterator


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def s3_endpoint(*, env: dict[str, str] | None = None) -> Iterator[str]:
    """moto's S3 server on a free loopback port, for the duration of the block (``env``: extra
    variables of the server process, e.g. ``INITIAL_NO_AUTH_ACTION_COUNT`` to enforce IAM)."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ, **(env or {})})
    endpoint = f"http://127.0.0.1:{port}"
    try:
        for _ in range(300):
            try:
                urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=1).close()
                break
            except OSError:
                if proc.poll() is not None:
                    raise RuntimeError(f"moto's server exited with status {proc.returncode}") from None
                time.sleep(0.1)
        else:
            raise RuntimeError(f"moto's server did not answer at {endpoint} within 30 s")
        yield endpoint
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def s3_env(endpoint: str, *, key: str = "testing", secret: str = "testing") -> dict[str, str]:
    """What a user of an S3-compatible store sets: credentials and the endpoint (and nothing of
    this machine's own AWS setup is read)."""
    return {"AWS_ACCESS_KEY_ID": key, "AWS_SECRET_ACCESS_KEY": secret, "AWS_ENDPOINT_URL": endpoint,
            "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true",
            "AWS_SHARED_CREDENTIALS_FILE": os.devnull, "AWS_CONFIG_FILE": os.devnull}


@contextmanager
def bucket_session(bucket: str) -> Iterator[dict[str, str]]:
    """moto's server, a user's AWS_* variables pointing at it (in ``os.environ`` for the block, so
    subprocesses and dask workers started inside it see them) and the bucket ``bucket``; yields the variables."""
    with s3_endpoint() as endpoint:
        variables = s3_env(endpoint)
        before = {key: os.environ.get(key) for key in variables}
        os.environ.update(variables)
        try:
            forget_clients()
            make_bucket(bucket)
            yield variables
        finally:
            for key, value in before.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value
            forget_clients()


def forget_clients() -> None:
    """Drop cached S3 filesystems and reachability, so the next one reads the variables again."""
    from s3fs import S3FileSystem

    from pipeline.store import location
    S3FileSystem.clear_instance_cache()
    location._REACHED.clear()
    location._EXCLUSIVE.clear()


def make_bucket(name: str) -> None:
    import boto3
    boto3.client("s3").create_bucket(Bucket=name)


def bucket_objects(url: str) -> dict[str, bytes]:
    """Every object under ``url`` (s3://bucket/prefix) by its key relative to the prefix."""
    import fsspec
    fs, root = fsspec.url_to_fs(url, use_listings_cache=False)
    return {key[len(root) + 1:]: fs.cat_file(key) for key in sorted(fs.find(root))}


def local_objects(store) -> dict[str, bytes]:
    """Every file of a local store by its key, the group's zarr.json included: what ``bucket_objects``
    gives for the same store in a bucket."""
    from pathlib import Path
    return {str(p.relative_to(store)): p.read_bytes() for p in sorted(Path(store).rglob("*")) if p.is_file()}
