"""Fixtures shared by the integration tests, besides the session Ray of tests/conftest.py: the localhost S3
server (moto in server mode, a separate process), used by tests/integration/s3/ and test_multinode.py, and the
tiny memorised demo checkpoint (trainer/tiny_demo.py), trained once per session for the inference and
serving tests (they only read it)."""
from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tests.helpers.ray_nodes import free_port


@pytest.fixture(scope="session")
def s3_server():
    """A moto S3 server on a free 127.0.0.1 port; yields its endpoint URL. Dummy credentials are exported
    so the AWS SDK never probes instance metadata."""
    port = free_port()
    env = {**os.environ, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    endpoint = f"http://127.0.0.1:{port}"
    saved = {k: os.environ.get(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                                             "AWS_EC2_METADATA_DISABLED")}
    os.environ.update({"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                       "AWS_EC2_METADATA_DISABLED": "true"})
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=2).read()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("moto S3 server did not start (pip install 'moto[server]')")
                time.sleep(0.2)
        yield endpoint
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture(scope="session")
def tiny_demo_ckpt(tmp_path_factory) -> Path:
    """400 steps, then on in 200-step chunks until both memorised answers lead by trainer.tiny_demo.MARGIN
    logits (600-800 steps for seeds 0-2): a few minutes of CPU, so once per session."""
    from trainer.tiny_demo import train_tiny_demo

    return train_tiny_demo(tmp_path_factory.mktemp("tiny_demo"), log=lambda s: None)
