"""Model, adapter and dataset directories as OCI artifacts in a container registry (ORAS conventions).

``oci://REGISTRY/REPOSITORY:TAG`` (or ``@sha256:DIGEST``) names an artifact; a ``#PATH`` suffix picks
one file of it where a file is expected (a dataset). An artifact holds one layer per file, titled with
the file's relative path (``org.opencontainers.image.title``, as ``oras push`` writes it, so ``oras
pull`` reads it too), plus the directory's completion manifest (``_finetune_manifest.json``: sizes and
sha256 of every file), so a pull is verified byte for byte.

- Push uploads every blob first and the manifest last: a push cut off midway leaves no tag, and a
  tag never points at an incomplete artifact. A tag that already holds other content is refused
  unless ``force``; pushing the same content again is a no-op.
- Pull downloads into a temporary directory beside the destination, checks every blob's digest and
  size and the completion manifest, and only then renames it into place: a missing blob fails naming
  the file and writes nothing into the destination.
- Credentials come from a Docker config (``--docker-config``, ``$DOCKER_CONFIG/config.json`` or
  ``~/.docker/config.json``; in pods a ``kubernetes.io/dockerconfigjson`` Secret mounted as a file).
  The password is never printed or logged.
- Network errors and 429/5xx answers are retried with backoff; an authentication failure is not.

The wire protocol is the OCI distribution API through the ``oras`` package's registry client (auth
challenges, bearer tokens, manifests). Blobs are streamed from and to disk here rather than through
``oras``' push/pull, which hold a whole file in memory on upload, do not verify downloaded digests
and write straight into the output directory.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from finetune_engine.manifest import MANIFEST_NAME, build_manifest, list_files, read_manifest, sha256_file
from finetune_engine.storage.s3 import StorageError

log = logging.getLogger(__name__)

SCHEME = "oci://"
MANIFEST_MEDIA_TYPE = "application/vnd.oci.image.manifest.v1+json"
CONFIG_MEDIA_TYPE = "application/vnd.finetune.artifact.config.v1+json"
LAYER_MEDIA_TYPE = "application/vnd.oci.image.layer.v1.tar"  # what `oras push FILE` writes
TITLE = "org.opencontainers.image.title"
PLAIN_HTTP_ENV = "FINETUNE_OCI_PLAIN_HTTP"
# A Docker config's JSON text (a kubernetes.io/dockerconfigjson Secret's .dockerconfigjson key, passed to
# the pod as a secretKeyRef: engine pods mount no Secret)
AUTH_ENV = "FINETUNE_OCI_AUTH"
_CHUNK = 4 * 1024 * 1024

# https://github.com/opencontainers/distribution-spec/blob/main/spec.md#pulling-manifests
_COMPONENT = re.compile(r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*\Z")
_TAG = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,127}\Z")
_DIGEST = re.compile(r"sha256:[a-f0-9]{64}\Z")
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?"
_HOST = re.compile(rf"{_LABEL}(?:\.{_LABEL})*\Z")


class OciError(StorageError):
    """A registry operation failed (network, server, a missing blob); the message names what."""


class OciInputError(OciError, ValueError):
    """Bad input: a malformed reference, credentials refused, an unknown tag, a tag already taken."""


class OciAuthError(OciInputError):
    """The registry refused the credentials (or none were found)."""


class OciNotFoundError(OciInputError):
    """No such repository, tag or digest."""


class OciTagExistsError(OciInputError):
    """The tag already holds different content (push with force to move it)."""


class OciBlobMissingError(OciError):
    """A blob the artifact's manifest lists is missing from the registry."""


@dataclass(frozen=True)
class OciRef:
    registry: str
    repository: str
    tag: str | None = None
    digest: str | None = None
    path: str | None = None  # the '#PATH' suffix: one file inside the artifact

    @property
    def reference(self) -> str:
        """The tag or digest, as the distribution API takes it."""
        return self.digest or self.tag or "latest"

    def __str__(self) -> str:
        at = f"@{self.digest}" if self.digest else f":{self.tag or 'latest'}"
        return f"{SCHEME}{self.registry}/{self.repository}{at}" + (f"#{self.path}" if self.path else "")

    def without_path(self) -> OciRef:
        return OciRef(self.registry, self.repository, self.tag, self.digest)


def is_oci(value: Any) -> bool:
    return isinstance(value, str) and value.startswith(SCHEME)


def parse_oci(value: str, allow_path: bool = False) -> OciRef:
    """Parse ``oci://REGISTRY[:PORT]/REPO[/...][:TAG|@sha256:HEX][#PATH]``; OciInputError names the
    malformed part and the expected form."""
    form = "expected oci://REGISTRY[:PORT]/REPOSITORY[:TAG|@sha256:DIGEST]"
    if not is_oci(value):
        raise OciInputError(f"{value!r}: not an OCI reference; {form}")
    rest = value[len(SCHEME) :]
    path = None
    if "#" in rest:
        rest, path = rest.split("#", 1)
        if not allow_path:
            raise OciInputError(
                f"{value}: '#{path}' (a file inside the artifact) is not allowed here; {form}"
            )
        parts = path.split("/")
        if not path or path.startswith("/") or "\\" in path or any(p in ("", ".", "..") for p in parts):
            raise OciInputError(f"{value}: file part '#{path}' must be a relative path inside the artifact")
    if "/" not in rest:
        raise OciInputError(f"{value}: no repository after the registry; {form}")
    registry, name = rest.split("/", 1)
    host, _, port = registry.partition(":")
    if not host or not _HOST.match(host) or (port and not (port.isdigit() and 0 < int(port) < 65536)):
        raise OciInputError(f"{value}: registry {registry!r} is not a host name or host:port; {form}")
    digest = tag = None
    if "@" in name:
        name, digest = name.split("@", 1)
        if not _DIGEST.match(digest):
            raise OciInputError(f"{value}: digest {digest!r} is not sha256: and 64 lowercase hex digits")
    elif ":" in name.rsplit("/", 1)[-1]:
        name, tag = name.rsplit(":", 1)
        if not _TAG.match(tag):
            raise OciInputError(
                f"{value}: tag {tag!r} is not valid (letters, digits, '_', '.', '-'; at most 128; "
                "not starting with '.' or '-')"
            )
    for component in name.split("/"):
        if not _COMPONENT.match(component):
            raise OciInputError(
                f"{value}: repository part {component!r} is not valid (lowercase letters and digits, "
                "separated by '.', '_', '__' or '-')"
            )
    if len(f"{registry}/{name}") > 255:
        raise OciInputError(f"{value}: repository name longer than 255 characters")
    return OciRef(registry, name, tag, digest, path)


def plain_http_default() -> bool:
    return os.environ.get(PLAIN_HTTP_ENV, "").strip().lower() in ("1", "true", "yes", "on")


# --- credentials ---------------------------------------------------------------------------------


def docker_config_path(explicit: str | os.PathLike | None = None) -> Path | str | None:
    """The Docker config to read: ``explicit`` (a file, or a directory holding ``config.json``, which
    is how a dockerconfigjson Secret is mounted), ``$DOCKER_CONFIG/config.json``, then
    ``~/.docker/config.json``; ``$FINETUNE_OCI_AUTH`` (JSON text) before those. None when there is none."""
    if explicit:
        path = Path(explicit)
        if path.is_dir():
            for name in ("config.json", ".dockerconfigjson"):
                if (path / name).is_file():
                    return path / name
            raise OciInputError(f"{path}: no config.json or .dockerconfigjson in this directory")
        if not path.is_file():
            raise OciInputError(f"{path}: no such Docker config file; check the path")
        return path
    if os.environ.get(AUTH_ENV):
        return f"${AUTH_ENV}"
    if os.environ.get("DOCKER_CONFIG"):
        return docker_config_path(os.environ["DOCKER_CONFIG"])
    home = Path.home() / ".docker" / "config.json"
    return home if home.is_file() else None


def _host_of(key: str) -> str:
    return urlsplit(key if "://" in key else f"//{key}").netloc or key


def registry_credentials(registry: str, config: Path | str | None) -> tuple[str, str] | None:
    """(username, password) for ``registry`` from a Docker config's ``auths``; None when it has none.
    Keys may be ``host[:port]`` or URLs (``https://index.docker.io/v1/``). ``config`` is a file, or
    ``$FINETUNE_OCI_AUTH`` (the JSON text itself, as a pod gets a dockerconfigjson Secret's key)."""
    if config is None:
        return None
    try:
        text = os.environ[AUTH_ENV] if config == f"${AUTH_ENV}" else Path(config).read_text(encoding="utf-8")
        data = json.loads(text)
    except (OSError, UnicodeError, json.JSONDecodeError) as err:
        raise OciInputError(f"{config}: not a readable Docker config JSON ({type(err).__name__})") from None
    auths = data.get("auths") if isinstance(data, dict) else None
    if not isinstance(auths, dict):
        raise OciInputError(f"{config}: no 'auths' object (a Docker config.json or .dockerconfigjson)")
    names = {registry}
    if registry.startswith("localhost"):
        names.add(registry.replace("localhost", "127.0.0.1", 1))
    elif registry.startswith("127.0.0.1"):
        names.add(registry.replace("127.0.0.1", "localhost", 1))
    for key, entry in auths.items():
        if _host_of(key) not in names or not isinstance(entry, dict):
            continue
        if entry.get("auth"):
            try:
                user, _, password = base64.b64decode(entry["auth"]).decode("utf-8").partition(":")
            except (ValueError, UnicodeError):
                raise OciInputError(f"{config}: auths[{key!r}].auth is not base64 of USER:PASSWORD") from None
            return user, password
        if entry.get("username") and entry.get("password"):
            return str(entry["username"]), str(entry["password"])
    return None


def write_docker_config(path: Path, registry: str, username: str, password: str) -> Path:
    """A Docker config (mode 0600) holding one registry's credentials, e.g. from an Airflow connection."""
    path.parent.mkdir(parents=True, exist_ok=True)
    token = base64.b64encode(f"{username}:{password}".encode()).decode()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump({"auths": {registry: {"auth": token}}}, f)
    return path


# --- registry client -----------------------------------------------------------------------------

_RETRY_STATUS = (408, 429, 500, 502, 503, 504)
RETRY_BACKOFF_S = 0.5  # first wait between tries; doubled each time


class RegistryClient:
    """One registry, one repository: the distribution API calls a push and a pull need."""

    def __init__(
        self,
        ref: OciRef,
        plain_http: bool | None = None,
        docker_config: str | os.PathLike | None = None,
        attempts: int = 4,
        backoff: float | None = None,
    ):
        import oras.provider
        import requests

        self._requests = requests
        self.ref = ref
        self.plain_http = plain_http_default() if plain_http is None else plain_http
        self.attempts = max(1, attempts)
        self.backoff = RETRY_BACKOFF_S if backoff is None else backoff
        self.base = f"{'http' if self.plain_http else 'https'}://{ref.registry}/v2/{ref.repository}"
        config = docker_config_path(docker_config)
        self.credentials = registry_credentials(ref.registry, config)
        self.config_path = config
        backend = self._auth_backend()
        self.oras = oras.provider.Registry(
            hostname=ref.registry, insecure=self.plain_http, auth_backend=backend
        )
        self._raw = oras.provider.Registry.do_request.__wrapped__  # oras' retry waits minutes; ours below
        if self.credentials:
            self.oras.auth.set_basic_auth(*self.credentials)
        elif backend == "basic":  # nothing to answer a Basic challenge with: the 401 is reported as is

            def plain(registry, url, method, **kwargs):
                return registry.session.request(method, url, **kwargs)

            self._raw = plain

    def _auth_backend(self) -> str:
        """'basic' when the registry challenges with Basic (htpasswd), else 'token' (bearer tokens)."""
        scheme = "http" if self.plain_http else "https"
        response = self._send(lambda: self._requests.get(f"{scheme}://{self.ref.registry}/v2/", timeout=30))
        challenge = response.headers.get("Www-Authenticate", "")
        return "basic" if challenge.lower().startswith("basic") else "token"

    def _send(self, call, what: str = ""):
        """``call()`` with retries on network errors and 408/429/5xx answers."""
        last: Exception | None = None
        for attempt in range(self.attempts):
            if attempt:
                time.sleep(self.backoff * 2 ** (attempt - 1))
            try:
                response = call()
            except (self._requests.ConnectionError, self._requests.Timeout) as err:
                last = err
                log.warning(
                    "registry %s: %s (try %d of %d)",
                    self.ref.registry,
                    type(err).__name__,
                    attempt + 1,
                    self.attempts,
                )
                continue
            except ValueError as err:
                if "authentication" in str(err):
                    raise self._auth_error() from None
                raise
            if response.status_code in _RETRY_STATUS and attempt + 1 < self.attempts:
                log.warning(
                    "registry %s answered %s%s (try %d of %d)",
                    self.ref.registry,
                    response.status_code,
                    f" to {what}" if what else "",
                    attempt + 1,
                    self.attempts,
                )
                continue
            return response
        raise OciError(
            f"registry {self.ref.registry} unreachable{f' ({what})' if what else ''} after {self.attempts} "
            f"tries: {type(last).__name__}; check the address"
            + ("" if self.plain_http else " (a registry without TLS needs --plain-http)")
        )

    def _auth_error(self) -> OciAuthError:
        if self.credentials:
            source = f"the credentials for {self.ref.registry} in {self.config_path}"
            return OciAuthError(
                f"registry {self.ref.registry} refused {source} (user {self.credentials[0]!r}); "
                "fix the user or password there"
            )
        where = self.config_path or "$DOCKER_CONFIG/config.json or ~/.docker/config.json"
        return OciAuthError(
            f"registry {self.ref.registry} needs credentials and {where} has none for it; "
            "add them (docker login / a dockerconfigjson Secret)"
        )

    def request(self, method: str, url: str, what: str = "", **kwargs):
        response = self._send(lambda: self._raw(self.oras, url, method, **kwargs), what)
        if response.status_code in (401, 403):
            raise self._auth_error()
        return response

    def auth_headers(self) -> dict:
        try:
            return dict(self.oras.auth.get_auth_header())
        except (AttributeError, TypeError):
            return {}

    # manifests
    def get_manifest(self, reference: str | None = None) -> tuple[dict, str] | None:
        """(manifest, digest) or None when the tag/digest does not exist."""
        reference = reference or self.ref.reference
        response = self.request(
            "GET",
            f"{self.base}/manifests/{reference}",
            f"manifest {reference}",
            headers={"Accept": MANIFEST_MEDIA_TYPE},
        )
        if response.status_code == 404:
            return None
        self._check(response, f"reading manifest {reference}")
        body = response.content
        digest = "sha256:" + hashlib.sha256(body).hexdigest()
        try:
            manifest = json.loads(body)
        except json.JSONDecodeError:
            raise OciError(f"{self.ref}: the registry returned a manifest that is not JSON") from None
        return manifest, digest

    def put_manifest(self, body: bytes, reference: str) -> str:
        response = self.request(
            "PUT",
            f"{self.base}/manifests/{reference}",
            f"manifest {reference}",
            data=body,
            headers={"Content-Type": MANIFEST_MEDIA_TYPE},
        )
        self._check(response, f"writing manifest {reference}")
        return response.headers.get("Docker-Content-Digest") or "sha256:" + hashlib.sha256(body).hexdigest()

    def tags(self) -> list[str] | None:
        response = self.request("GET", f"{self.base}/tags/list", "tag list")
        if response.status_code != 200:
            return None
        return list((response.json() or {}).get("tags") or [])

    # blobs
    def blob_exists(self, digest: str) -> bool:
        return self.request("HEAD", f"{self.base}/blobs/{digest}", f"blob {digest}").status_code == 200

    def upload_blob(self, source: Path | bytes, digest: str, size: int, name: str) -> None:
        """POST an upload session, then one streamed PUT of the content (retried from the start)."""
        for attempt in range(self.attempts):
            if attempt:
                time.sleep(self.backoff * 2 ** (attempt - 1))
            start = self.request(
                "POST",
                f"{self.base}/blobs/uploads/",
                f"upload of {name}",
                headers={"Content-Length": "0"},
            )
            self._check(start, f"starting the upload of {name}")
            location = start.headers.get("Location", "")
            if not location.startswith("http"):
                scheme = "http" if self.plain_http else "https"
                location = f"{scheme}://{self.ref.registry}{location}"
            sep = "&" if "?" in location else "?"
            headers = {"Content-Type": "application/octet-stream", "Content-Length": str(size)}
            headers.update(self.auth_headers())
            try:
                if isinstance(source, bytes):
                    response = self.oras.session.put(
                        f"{location}{sep}digest={digest}", data=source, headers=headers, timeout=600
                    )
                else:
                    with open(source, "rb") as f:
                        response = self.oras.session.put(
                            f"{location}{sep}digest={digest}", data=f, headers=headers, timeout=600
                        )
            except (self._requests.ConnectionError, self._requests.Timeout) as err:
                log.warning(
                    "upload of %s: %s (try %d of %d)", name, type(err).__name__, attempt + 1, self.attempts
                )
                continue
            if response.status_code in (401, 403):
                raise self._auth_error()
            if response.status_code in _RETRY_STATUS:
                continue
            self._check(response, f"uploading {name} ({digest})")
            return
        raise OciError(f"uploading {name} to {self.ref.registry} failed after {self.attempts} tries")

    def download_blob(self, digest: str, size: int, target: Path, name: str) -> None:
        """Stream a blob into ``target``, checking its size and sha256; retried from the start."""
        for attempt in range(self.attempts):
            if attempt:
                time.sleep(self.backoff * 2 ** (attempt - 1))
            response = self.request("GET", f"{self.base}/blobs/{digest}", f"blob of {name}", stream=True)
            with response:
                if response.status_code == 404:
                    raise OciBlobMissingError(
                        f"{self.ref}: blob {digest} of {name} is missing from the registry; the artifact is "
                        "damaged: push it again"
                    )
                self._check(response, f"downloading {name}")
                h, written = hashlib.sha256(), 0
                try:
                    with open(target, "wb") as f:
                        for chunk in response.iter_content(_CHUNK):
                            h.update(chunk)
                            written += len(chunk)
                            f.write(chunk)
                except (self._requests.ConnectionError, self._requests.Timeout) as err:
                    log.warning(
                        "download of %s: %s (try %d of %d)",
                        name,
                        type(err).__name__,
                        attempt + 1,
                        self.attempts,
                    )
                    continue
            if written != size or "sha256:" + h.hexdigest() != digest:
                raise OciError(
                    f"{self.ref}: {name} arrived with {written} bytes, sha256:{h.hexdigest()}; the manifest "
                    f"says {size} bytes, {digest}"
                )
            return
        raise OciError(f"downloading {name} from {self.ref.registry} failed after {self.attempts} tries")

    def _check(self, response, what: str) -> None:
        if response.status_code < 300:
            return
        codes = ""
        try:
            errors = response.json().get("errors") or []
            codes = "; ".join(f"{e.get('code')}: {e.get('message')}" for e in errors if isinstance(e, dict))
        except (ValueError, AttributeError):
            pass
        raise OciError(
            f"{self.ref}: {what} failed: HTTP {response.status_code}{f' ({codes})' if codes else ''}"
        )


# --- push / pull ---------------------------------------------------------------------------------


def _safe_title(title: Any, ref: OciRef) -> str:
    parts = str(title or "").split("/")
    if (
        not title
        or str(title).startswith("/")
        or "\\" in str(title)
        or any(p in ("", ".", "..") for p in parts)
    ):
        raise OciError(f"{ref}: layer title {title!r} is not a safe relative path; refusing to write it")
    return str(title)


def _directory_manifest(directory: Path) -> tuple[dict, bytes]:
    """The completion manifest of ``directory`` and its bytes: the one there when it still matches the
    files, else one built now (the directory is not written to)."""
    from finetune_engine.storage.transfer import check_symlinks

    check_symlinks(directory)
    fresh = build_manifest(directory)
    stored = read_manifest(directory)
    if stored is None:
        return fresh, json.dumps(fresh, indent=1).encode()
    want = {(e["path"], e["size"], e["sha256"]) for e in stored["files"]}
    have = {(e["path"], e["size"], e["sha256"]) for e in fresh["files"]}
    if want != have:
        changed = sorted({p for p, _, _ in want ^ have})
        raise OciInputError(
            f"{directory}: files differ from its {MANIFEST_NAME} ({', '.join(changed[:5])}); the "
            f"directory changed after it was written: remove {MANIFEST_NAME} to push what is there now"
        )
    return stored, (directory / MANIFEST_NAME).read_bytes()


def push(
    directory: str | os.PathLike,
    reference: str,
    force: bool = False,
    plain_http: bool | None = None,
    docker_config: str | os.PathLike | None = None,
    attempts: int = 4,
) -> dict:
    """Push ``directory`` as an artifact; every blob first, the manifest (the tag) last.

    Returns ``{"reference", "digest", "files", "bytes", "status"}`` (status ``pushed`` or ``unchanged``).
    """
    ref = parse_oci(reference)
    directory = Path(directory)
    if not directory.is_dir():
        raise OciInputError(f"{directory}: not a directory; give the model, adapter or dataset directory")
    files_manifest, manifest_bytes = _directory_manifest(directory)
    if not files_manifest["files"]:
        raise OciInputError(f"{directory}: no files to push")
    layers = [
        {
            "mediaType": LAYER_MEDIA_TYPE,
            "digest": f"sha256:{e['sha256']}",
            "size": e["size"],
            "annotations": {TITLE: e["path"]},
        }
        for e in files_manifest["files"]
    ]
    layers.append(
        {
            "mediaType": LAYER_MEDIA_TYPE,
            "digest": "sha256:" + hashlib.sha256(manifest_bytes).hexdigest(),
            "size": len(manifest_bytes),
            "annotations": {TITLE: MANIFEST_NAME},
        }
    )
    total = sum(e["size"] for e in files_manifest["files"])
    config = json.dumps(
        {"format": 1, "files": len(files_manifest["files"]), "bytes": total}, sort_keys=True
    ).encode()
    config_desc = {
        "mediaType": CONFIG_MEDIA_TYPE,
        "digest": "sha256:" + hashlib.sha256(config).hexdigest(),
        "size": len(config),
    }
    body = json.dumps(
        {"schemaVersion": 2, "mediaType": MANIFEST_MEDIA_TYPE, "config": config_desc, "layers": layers},
        sort_keys=True,
    ).encode()
    result = {"reference": str(ref), "files": len(files_manifest["files"]), "bytes": total}

    client = RegistryClient(ref, plain_http, docker_config, attempts)
    if ref.tag is None and ref.digest is not None:
        raise OciInputError(f"{ref}: push to a tag (oci://REGISTRY/REPOSITORY:TAG), not a digest")
    existing = client.get_manifest()
    if existing is not None:
        old, old_digest = existing
        same = sorted(
            (d.get("digest"), (d.get("annotations") or {}).get(TITLE)) for d in old.get("layers", [])
        )
        if same == sorted((d["digest"], d["annotations"][TITLE]) for d in layers):
            log.info("%s already holds this content (%s): nothing to push", ref, old_digest)
            return {**result, "digest": old_digest, "status": "unchanged"}
        if not force:
            raise OciTagExistsError(
                f"{ref} already holds other content ({old_digest}); tags are not moved: push to a new tag, "
                "or pass --force to move it"
            )
        log.warning("%s: moving the tag from %s (force)", ref, old_digest)

    by_digest = {}
    for entry in files_manifest["files"]:
        by_digest.setdefault(
            f"sha256:{entry['sha256']}", (directory / entry["path"], entry["size"], entry["path"])
        )
    by_digest.setdefault(layers[-1]["digest"], (manifest_bytes, len(manifest_bytes), MANIFEST_NAME))
    by_digest.setdefault(config_desc["digest"], (config, len(config), "artifact config"))
    sent = 0
    for digest, (source, size, name) in by_digest.items():
        if client.blob_exists(digest):
            continue
        client.upload_blob(source, digest, size, name)
        sent += 1
    digest = client.put_manifest(body, ref.tag or "latest")
    log.info(
        "pushed %s (%s): %d file(s), %d byte(s), %d new blob(s)", ref, digest, result["files"], total, sent
    )
    return {**result, "digest": digest, "status": "pushed"}


def _verify_against(directory: Path, manifest: dict, ref: OciRef) -> None:
    want = {e["path"]: e for e in manifest["files"]}
    have = set(list_files(directory))
    if set(want) != have:
        missing, extra = sorted(set(want) - have), sorted(have - set(want))
        raise OciError(
            f"{ref}: files do not match its {MANIFEST_NAME}"
            + (f"; missing {', '.join(missing[:5])}" if missing else "")
            + (f"; not listed {', '.join(extra[:5])}" if extra else "")
        )
    for path, entry in want.items():
        p = directory / path
        if p.stat().st_size != entry["size"] or sha256_file(p) != entry["sha256"]:
            raise OciError(f"{ref}: {path} differs from its {MANIFEST_NAME} entry (size or sha256)")


def pull(
    reference: str,
    directory: str | os.PathLike,
    plain_http: bool | None = None,
    docker_config: str | os.PathLike | None = None,
    attempts: int = 4,
) -> dict:
    """Pull an artifact into ``directory`` (absent or empty), verified, renamed into place at the end.

    An existing complete copy of the same files is kept (status ``present``). Returns
    ``{"reference", "digest", "files", "bytes", "status"}``."""
    ref = parse_oci(reference, allow_path=True).without_path()
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise OciInputError(f"{directory}: exists and is not a directory")
    client = RegistryClient(ref, plain_http, docker_config, attempts)
    found = client.get_manifest()
    if found is None:
        tags = client.tags()
        known = (
            f"; the repository has no such tag (tags: {', '.join(sorted(tags)[:10]) or 'none'})"
            if tags is not None
            else f"; no repository {ref.repository} in {ref.registry}"
        )
        raise OciNotFoundError(f"{ref}: not found{known}")
    manifest, digest = found
    if manifest.get("mediaType", MANIFEST_MEDIA_TYPE) != MANIFEST_MEDIA_TYPE or "layers" not in manifest:
        raise OciInputError(f"{ref}: not an OCI artifact manifest (mediaType {manifest.get('mediaType')!r})")
    layers = [(_safe_title((d.get("annotations") or {}).get(TITLE), ref), d) for d in manifest["layers"]]
    if len({t for t, _ in layers}) != len(layers):
        raise OciError(f"{ref}: two layers have the same title")
    total = sum(int(d.get("size", 0)) for t, d in layers if t != MANIFEST_NAME)
    result = {"reference": str(ref), "digest": digest, "files": len(layers), "bytes": total}

    if directory.is_dir() and any(directory.iterdir()):
        stored = read_manifest(directory)
        titled = {t: d for t, d in layers}
        if stored is not None and MANIFEST_NAME in titled:
            same = {(e["path"], "sha256:" + e["sha256"]) for e in stored["files"]} == {
                (t, d["digest"]) for t, d in layers if t != MANIFEST_NAME
            }
            if same:
                _verify_against(directory, stored, ref)
                log.info("%s: %s already holds this artifact", ref, directory)
                return {**result, "status": "present"}
        raise OciInputError(
            f"{directory}: not empty and not a copy of {ref}; pull into a new or empty directory"
        )

    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}.oci-", dir=directory.parent))
    try:
        for title, layer in layers:
            target = staging / title
            target.parent.mkdir(parents=True, exist_ok=True)
            client.download_blob(str(layer.get("digest")), int(layer.get("size", -1)), target, title)
        stored = read_manifest(staging)
        if stored is not None:
            _verify_against(staging, stored, ref)
        else:  # pushed by another tool: the layer digests verified every byte; mark it complete
            from finetune_engine.manifest import write_manifest

            write_manifest(staging, extra={"source": str(ref), "digest": digest})
        if directory.is_dir():
            directory.rmdir()  # empty (checked above)
        os.replace(staging, directory)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    log.info("pulled %s (%s) into %s: %d file(s), %d byte(s)", ref, digest, directory, len(layers), total)
    return {**result, "status": "pulled"}


def pull_file_or_dir(reference: str, directory: Path, **kwargs) -> Path:
    """Pull ``reference`` into ``directory`` and return the path it names: the file after ``#``, else
    the only data file of the artifact, else the directory."""
    ref = parse_oci(reference, allow_path=True)
    pull(reference, directory, **kwargs)
    if ref.path:
        target = directory / ref.path
        if not target.is_file():
            names = ", ".join(list_files(directory)[:10])
            raise OciInputError(f"{ref}: no file {ref.path!r} in the artifact (it has: {names})")
        return target
    files = list_files(directory)
    return directory / files[0] if len(files) == 1 else directory


# --- commands ------------------------------------------------------------------------------------


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--plain-http",
        action="store_true",
        default=None,
        help=f"Talk HTTP, not HTTPS (a loopback test registry; also ${PLAIN_HTTP_ENV}=1).",
    )
    parser.add_argument(
        "--docker-config",
        default=None,
        metavar="PATH",
        help="Docker config with the registry's credentials (a file, or a directory with config.json or a "
        "mounted .dockerconfigjson); default $DOCKER_CONFIG/config.json, then ~/.docker/config.json.",
    )
    parser.add_argument("--retries", type=int, default=4, help="Tries per request on network/5xx errors.")


def push_main(argv: list[str] | None = None) -> int:
    from finetune_engine.cli.finetuning import setup_logging
    from finetune_engine.jobs.common import write_result

    parser = argparse.ArgumentParser(
        prog="finetune-engine oci-push",
        description="Push a model, adapter or dataset directory to a registry as an OCI artifact.",
    )
    parser.add_argument("directory")
    parser.add_argument("reference", help="oci://REGISTRY/REPOSITORY:TAG")
    parser.add_argument("--force", action="store_true", help="Move a tag that holds other content.")
    parser.add_argument("--result-file", default=None, help="Write the result JSON here.")
    _common(parser)
    args = parser.parse_args(argv)
    setup_logging("INFO")
    result = push(
        args.directory, args.reference, args.force, args.plain_http, args.docker_config, args.retries
    )
    print(json.dumps(result, sort_keys=True))
    write_result(result, args.result_file)
    return 0


def pull_main(argv: list[str] | None = None) -> int:
    from finetune_engine.cli.finetuning import setup_logging

    parser = argparse.ArgumentParser(
        prog="finetune-engine oci-pull",
        description="Pull an OCI artifact into a new or empty directory, verified byte for byte.",
    )
    parser.add_argument("reference", help="oci://REGISTRY/REPOSITORY:TAG or @sha256:DIGEST")
    parser.add_argument("directory")
    _common(parser)
    args = parser.parse_args(argv)
    setup_logging("INFO")
    result = pull(args.reference, args.directory, args.plain_http, args.docker_config, args.retries)
    print(json.dumps(result, sort_keys=True))
    return 0
