"""A real S3-protocol server on 127.0.0.1 for remote cache tests: moto's, as s3fs's own tests use.

``serving()`` runs it in a thread of this process (tests); ``process()`` as a process of its own
(the benchmark, so its CPU is its own, and its priority can be lowered). Either yields an S3
whose ``env`` points boto (s3fs, and any ane-build or doit started with it) at the server, with a
fresh bucket.
"""

import contextlib
import logging
import os
import socket
import subprocess
import sys
import time
import urllib.request

BUCKET = "ane-build-cache"


class S3:
    def __init__(self, endpoint):
        self.endpoint = endpoint
        self.env = {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
                    "AWS_DEFAULT_REGION": "us-east-1", "AWS_CONFIG_FILE": os.devnull,
                    "AWS_SHARED_CREDENTIALS_FILE": os.devnull}

    def url(self, prefix="cache"):
        return f"s3://{BUCKET}/{prefix}"

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id="test",
                            aws_secret_access_key="test", region_name="us-east-1")

    def keys(self, prefix=""):
        """Every object key in the bucket under ``prefix``."""
        pages = self.client().get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
        return sorted(obj["Key"] for page in pages for obj in page.get("Contents", ()))


@contextlib.contextmanager
def serving():
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # a line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        s3 = S3("http://127.0.0.1:%d" % server.get_host_and_port()[1])
        s3.client().create_bucket(Bucket=BUCKET)
        yield s3
    finally:
        server.stop()


@contextlib.contextmanager
def process(niceness=0):
    """The server as a process of its own, at ``niceness`` (19: it runs when nothing else wants the CPU)."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            preexec_fn=(lambda: os.nice(niceness)) if niceness else None)
    try:
        s3 = S3(f"http://127.0.0.1:{port}")
        _wait_until_up(s3.endpoint, proc)
        s3.client().create_bucket(Bucket=BUCKET)
        s3.pid = proc.pid
        yield s3
    finally:
        proc.kill()
        proc.wait()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_until_up(endpoint, proc, seconds=30):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            urllib.request.urlopen(endpoint + "/moto-api/", timeout=1).close()
            return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"moto server at {endpoint} did not start")
