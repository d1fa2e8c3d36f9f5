"""A real OCI registry for tests: the CNCF distribution registry (Debian's ``docker-registry``, 2.8) on a
free 127.0.0.1 port, with htpasswd (bcrypt) auth and its storage in a tmp dir.

``scripts/setup-registry.sh`` installs the package; without it the tests that need a registry skip,
saying so. Use the ``oci_registry`` fixture (session scope) and ``docker_config`` (a config.json with
the test user's credentials, written per test).
"""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests

from tests.conftest import free_port, stop_group

USER = "finetune"
PASSWORD = "s3cret-" + "registry-pw"  # a test-only password; tests assert it never appears in output


def bcrypt_hash(password: str) -> str:
    """A bcrypt hash for htpasswd: Python ``bcrypt`` if installed, else libcrypt's (``crypt``), else
    ``htpasswd -B`` (apache2-utils)."""
    try:
        import bcrypt

        return bcrypt.hashpw(password.encode(), bcrypt.gensalt(rounds=5)).decode()
    except ImportError:
        pass
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            import crypt

        hashed = crypt.crypt(password, crypt.mksalt(crypt.METHOD_BLOWFISH, rounds=32))
        if hashed and hashed.startswith("$2"):
            return hashed
    except (ImportError, AttributeError, OSError):
        pass
    if shutil.which("htpasswd"):
        out = subprocess.run(
            ["htpasswd", "-nbB", "-C", "5", USER, password], capture_output=True, text=True, check=True
        ).stdout
        return out.strip().split(":", 1)[1]
    raise RuntimeError("no bcrypt: pip install bcrypt, or apt-get install apache2-utils")


@dataclass
class Registry:
    root: Path
    port: int
    proc: subprocess.Popen | None = None

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def storage(self) -> Path:
        return self.root / "data"

    def ref(self, repository: str, tag: str) -> str:
        return f"oci://{self.host}/{repository}:{tag}"

    def blob_path(self, digest: str) -> Path:
        """Where the filesystem driver keeps a blob's bytes (to damage the registry on purpose)."""
        hexd = digest.split(":", 1)[1]
        return self.storage / "docker/registry/v2/blobs/sha256" / hexd[:2] / hexd / "data"

    def docker_config(self, path: Path, password: str = PASSWORD) -> Path:
        token = base64.b64encode(f"{USER}:{password}".encode()).decode()
        path.mkdir(parents=True, exist_ok=True)
        (path / "config.json").write_text(json.dumps({"auths": {self.host: {"auth": token}}}))
        return path / "config.json"

    def start(self) -> None:
        (self.root / "htpasswd").write_text(f"{USER}:{bcrypt_hash(PASSWORD)}\n")
        config = {
            "version": 0.1,
            "log": {"level": "warn", "accesslog": {"disabled": True}},
            "storage": {"filesystem": {"rootdirectory": str(self.storage)}, "delete": {"enabled": True}},
            "http": {"addr": self.host},
            "auth": {"htpasswd": {"realm": "finetune-tests", "path": str(self.root / "htpasswd")}},
        }
        (self.root / "config.yml").write_text(json.dumps(config))  # YAML is a superset of JSON
        log = open(self.root / "registry.log", "wb")  # noqa: SIM115 - the server's lifetime
        self.proc = subprocess.Popen(
            ["docker-registry", "serve", str(self.root / "config.yml")],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = time.monotonic() + 20
        while True:  # answers 401 (auth) once up
            if self.proc.poll() is not None:
                tail = (self.root / "registry.log").read_text()[-800:]
                raise RuntimeError(f"docker-registry exited: {tail}")
            try:
                requests.get(f"http://{self.host}/v2/", timeout=2)
                return
            except requests.ConnectionError:
                if time.monotonic() > deadline:
                    raise TimeoutError("docker-registry did not answer within 20 s") from None
                time.sleep(0.05)

    def stop(self) -> None:
        if self.proc is not None:
            stop_group(self.proc)


@pytest.fixture(scope="session")
def oci_registry(tmp_path_factory):
    if shutil.which("docker-registry") is None:
        pytest.skip("no docker-registry binary (scripts/setup-registry.sh installs Debian's docker-registry)")
    registry = Registry(tmp_path_factory.mktemp("registry"), free_port())
    try:
        registry.start()
    except Exception:
        registry.stop()
        raise
    yield registry
    registry.stop()


@pytest.fixture()
def docker_config(oci_registry, tmp_path, monkeypatch):
    """$DOCKER_CONFIG pointed at a config.json with the test user's credentials for the registry."""
    path = oci_registry.docker_config(tmp_path / "docker")
    monkeypatch.setenv("DOCKER_CONFIG", str(path.parent))
    return path
