"""Fixtures shared by every test directory.

``s3_server`` runs moto's S3-compatible server as a subprocess on loopback for the session;
``s3_url`` gives each test a fresh bucket on it. Tests using them carry ``@pytest.mark.s3``
and are skipped when moto or s3fs is not installed.
"""

from __future__ import annotations

import importlib.util
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import pytest

_S3_START_DEADLINE_S = 60.0
_S3_STOP_GRACE_S = 10.0
_S3_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}
_S3_ENV_CLEARED = ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "AWS_ENDPOINT_URL")


@dataclass(frozen=True)
class S3Server:
    """A running loopback S3 server.

    Attributes:
        endpoint_url: ``http://127.0.0.1:PORT``.
        key: access key id the tests use.
        secret: secret access key the tests use.
    """

    endpoint_url: str
    key: str = _S3_ENV["AWS_ACCESS_KEY_ID"]
    secret: str = _S3_ENV["AWS_SECRET_ACCESS_KEY"]

    def storage_options(self) -> dict[str, Any]:
        """s3fs options for this server.

        Stores opened with them share fsspec's cached s3fs instance (one client for the
        session: creating one costs ~0.3 s). ``s3_url`` empties that instance's listing cache
        before each test; add ``"skip_instance_cache": True`` for a truly separate instance.
        """
        return {
            "key": self.key,
            "secret": self.secret,
            "client_kwargs": {"endpoint_url": self.endpoint_url},
        }


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _answers_http(url: str) -> bool:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # ignore *_PROXY
    try:
        with opener.open(url, timeout=2):
            return True
    except urllib.error.HTTPError:
        return True  # any HTTP status means the server is up
    except OSError:
        return False


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=_S3_STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """moto's S3 server on a free loopback port, with dummy AWS credentials in the env."""
    for module, package in (("moto", "moto[server]"), ("flask", "moto[server]"), ("s3fs", "s3fs")):
        if importlib.util.find_spec(module) is None:  # find, not import: moto is slow to load
            pytest.skip(f"the S3 tests need {package}: pip install -e '.[test]'")
    log_path: Path = tmp_path_factory.mktemp("moto") / "moto.log"
    with pytest.MonkeyPatch.context() as mp, open(log_path, "wb") as log:
        for name, value in _S3_ENV.items():
            mp.setenv(name, value)
        for name in _S3_ENV_CLEARED:
            mp.delenv(name, raising=False)
        for name in ("NO_PROXY", "no_proxy"):  # botocore must not send loopback to a proxy
            mp.setenv(name, ",".join(filter(None, [os.environ.get(name), "127.0.0.1"])))
        port = _free_port()
        endpoint = f"http://127.0.0.1:{port}"
        proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
        try:
            deadline = time.monotonic() + _S3_START_DEADLINE_S
            while not _answers_http(endpoint + "/moto-api/"):
                if proc.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(
                        f"moto S3 server on {endpoint} did not start (exit code "
                        f"{proc.poll()}); its log:\n{log_path.read_text(errors='replace')}"
                    )
                time.sleep(0.1)
            yield S3Server(endpoint_url=endpoint)
        finally:
            _stop(proc)


@pytest.fixture
def s3_url(s3_server: S3Server) -> tuple[str, dict[str, Any]]:
    """A fresh, empty bucket: returns ``("s3://BUCKET/root", storage_options)``.

    Buckets are not deleted: the in-memory server goes away at the end of the session.
    """
    import s3fs

    options = s3_server.storage_options()
    fs = s3fs.S3FileSystem(**options)  # fsspec's cached instance, the one stores will get
    fs.invalidate_cache()  # nothing listed by an earlier test survives into this one
    bucket = f"test-{uuid.uuid4().hex[:20]}"
    fs.mkdir(bucket)
    return f"s3://{bucket}/root", options
