"""Real storage servers on 127.0.0.1 for DVC remotes: moto's S3 server and OpenSSH's sshd.

Each fixture starts its server on a free port, waits until it answers, and stops it afterwards. Import the
fixtures into a test module (``from tests.servers import s3_server, sshd_server``) to use them.
"""

from __future__ import annotations

import logging
import os
import secrets
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

SSHD = "/usr/sbin/sshd"
SERVER_START_TIMEOUT_S = 20


@dataclass(frozen=True)
class S3Server:
    endpoint_url: str
    bucket: str
    access_key_id: str
    secret_access_key: str

    def client(self):
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint_url,
            region_name="us-east-1",
            aws_access_key_id=self.access_key_id,
            aws_secret_access_key=self.secret_access_key,
        )

    def keys(self, prefix: str = "") -> set[str]:
        paginator = self.client().get_paginator("list_objects_v2")
        return {
            obj["Key"]
            for page in paginator.paginate(Bucket=self.bucket, Prefix=prefix)
            for obj in page.get("Contents", [])
        }


@pytest.fixture(scope="module")
def s3_server():
    """moto's S3 server in a thread of this process, with one empty bucket."""
    from moto.server import ThreadedMotoServer

    # werkzeug logs every request at INFO: hundreds of lines in a failing test's report.
    request_log = logging.getLogger("werkzeug")
    level = request_log.level
    request_log.setLevel(logging.WARNING)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        # moto accepts any credentials; these are made up so that a test can search for the secret.
        s3 = S3Server(
            endpoint_url=f"http://{host}:{port}",
            bucket="segpipe-team",
            access_key_id="AKIASEGPIPETEST",
            secret_access_key=f"segpipe-secret-{secrets.token_hex(8)}",
        )
        s3.client().create_bucket(Bucket=s3.bucket)
        yield s3
    finally:
        server.stop()
        request_log.setLevel(level)


@dataclass(frozen=True)
class SSHServer:
    host: str
    port: int
    user: str
    keyfile: Path  # the client's private key, authorised on the server

    def url(self, path: Path) -> str:
        return f"ssh://{self.user}@{self.host}:{self.port}{path}"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_for_banner(host: str, port: int, process: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + SERVER_START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"sshd exited with {process.returncode}:\n{log.read_text()}")
        try:
            with socket.create_connection((host, port), timeout=2) as sock:
                if sock.recv(64).startswith(b"SSH-2.0-"):
                    return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"sshd did not answer on {host}:{port} within {SERVER_START_TIMEOUT_S} s:\n{log.read_text()}")


@pytest.fixture(scope="module")
def sshd_server(tmp_path_factory):
    """OpenSSH's sshd on a free loopback port, with a throwaway host key and one authorised client key.

    Skipped where sshd is not installed, except under CI (CI=true), where that is a failure: .ci/run
    installs openssh-server."""
    if not os.access(SSHD, os.X_OK):
        message = f"{SSHD} not found: install openssh-server (apt-get install openssh-server) to test SSH remotes"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    d = tmp_path_factory.mktemp("sshd")
    for key in ("host_key", "client_key"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", key, "-f", str(d / key)], check=True)
    shutil.copy(d / "client_key.pub", d / "authorized_keys")
    host, port, user = "127.0.0.1", _free_port(), "root" if os.geteuid() == 0 else os.environ["USER"]
    (d / "sshd_config").write_text(
        f"ListenAddress {host}:{port}\n"
        f"HostKey {d / 'host_key'}\n"
        f"PidFile {d / 'sshd.pid'}\n"
        f"AuthorizedKeysFile {d / 'authorized_keys'}\n"
        "PermitRootLogin prohibit-password\n"  # tests run as root in CI; keys only
        "PasswordAuthentication no\n"
        "KbdInteractiveAuthentication no\n"
        "UsePAM no\n"
        "StrictModes no\n"  # the keys live in a world-readable temporary directory
        "Subsystem sftp internal-sftp\n"  # DVC's SSH file system (sshfs) speaks SFTP
    )
    if os.geteuid() == 0:
        # sshd running as root separates privileges into this directory (Debian's service unit creates it).
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)
    log = d / "sshd.log"
    with log.open("wb") as log_file:
        process = subprocess.Popen(
            [SSHD, "-D", "-e", "-f", str(d / "sshd_config")],
            stdout=log_file,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
    try:
        _wait_for_banner(host, port, process, log)
        yield SSHServer(host=host, port=port, user=user, keyfile=d / "client_key")
    finally:
        process.terminate()
        process.wait(timeout=10)
