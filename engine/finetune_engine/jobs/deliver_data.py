"""``finetune-engine deliver-data``: produce JSONL datasets and put them into the bucket.

Either a user's data script (the seed's contract: it writes JSONL files into the directory named by
``$FINETUNE_DATA_DIR``) runs in a subprocess that gets no credentials and a time limit, or files are
fetched from http(s) URLs (loopback, private, link-local, metadata and other non-public
addresses refused unless allowed) or pulled from OCI artifacts (``oci://REGISTRY/REPO:TAG#FILE``,
verified; the registry's address is checked like a URL's). Every file is validated before anything
is uploaded; one bad file uploads nothing.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import http.client
import ipaddress
import logging
import os
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import urllib.parse
from pathlib import Path

log = logging.getLogger(__name__)
DATA_DIR_ENV = "FINETUNE_DATA_DIR"
SCRIPT_ENV = "FINETUNE_DATA_SCRIPT"
# What a data script may see of the job's environment: no credentials of any kind.
SCRIPT_ENV_ALLOWED = ("PATH", "LANG", "LC_ALL", "TZ", "HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "PYTHONPATH")
MAX_URL_BYTES = 20 * 2**30


class DeliveryError(ValueError):
    pass


PR_SET_DUMPABLE = 4
PR_SET_CHILD_SUBREAPER = 36


def _prctl(option: int, value: int) -> bool:
    """prctl(option, value) on Linux; False where it is unavailable or refused."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(option, value, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def make_non_dumpable() -> bool:
    """Make this process non-dumpable: its /proc/<pid>/environ, mem and maps become unreadable to
    other processes of the same user (a data script reading its parent's environment for the bucket
    keys gets a permission error), and it cannot be ptrace-attached. Linux only; False elsewhere."""
    return _prctl(PR_SET_DUMPABLE, 0)


def _children() -> set[int]:
    """Pids whose parent is this process (Linux /proc; empty elsewhere)."""
    me, out = os.getpid(), set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        if ppid == me:
            out.add(int(stat.parent.name))
    return out


def _kill_leftovers(pgid: int, before: set[int]) -> None:
    """After the script exits: SIGKILL its process group, then every process it left that was
    reparented to this one (a subreaper), e.g. a daemon that left the group with setsid."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)
    for _ in range(50):
        orphans = _children() - before
        if not orphans:
            return
        for pid in orphans:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)


def run_script(script: str, out_dir: Path, timeout: float, python: str = sys.executable) -> None:
    """Run ``script`` (Python source) with only a scrubbed environment and a time limit.

    This process is made non-dumpable first, so the script cannot read the bucket keys from
    /proc/<parent>/environ; when the script ends (or times out) its whole process group, and any
    process it started outside the group, is killed."""
    script_file = out_dir.parent / "data_script.py"
    script_file.write_text(script, encoding="utf-8")
    home = out_dir.parent / "home"
    home.mkdir(exist_ok=True)
    env = {k: os.environ[k] for k in SCRIPT_ENV_ALLOWED if k in os.environ}
    env.update({DATA_DIR_ENV: str(out_dir), "HOME": str(home), "TMPDIR": str(home), "PYTHONUNBUFFERED": "1"})
    if not make_non_dumpable() and sys.platform.startswith("linux"):
        raise DeliveryError("cannot protect the job's credentials from the data script (prctl failed)")
    before = _children()
    reaping = _prctl(PR_SET_CHILD_SUBREAPER, 1)
    proc = subprocess.Popen([python, str(script_file)], cwd=out_dir.parent, env=env, start_new_session=True)
    try:
        rc = proc.wait(timeout)
    except subprocess.TimeoutExpired:
        rc = None
    finally:
        _kill_leftovers(proc.pid, before | {proc.pid})
        proc.wait()
        if reaping:
            _prctl(PR_SET_CHILD_SUBREAPER, 0)
    if rc is None:
        raise DeliveryError(
            f"data script did not finish within {timeout:.0f}s and was stopped; nothing was uploaded"
        )
    if rc != 0:
        raise DeliveryError(f"data script exited with {rc}; nothing was uploaded")


MAX_REDIRECTS = 5
_REDIRECTS = (301, 302, 303, 307, 308)


def _forbidden(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """Anything but a globally routable unicast address: loopback, private, link-local, shared
    address space (100.64.0.0/10, where some clouds serve instance metadata), documentation,
    benchmarking, multicast, reserved, unspecified."""
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped  # ::ffff:127.0.0.1 is loopback too
    return not ip.is_global or ip.is_multicast


def resolve_url(
    url: str, allow_private: bool = False, allow_networks: list[str] | None = None
) -> tuple[str, str]:
    """Check one URL (or redirect target) and resolve its host once: returns ``(url, address)``.

    The caller connects to ``address`` itself, so a second DNS answer (rebinding) cannot swap in a
    private address after the check. Every resolved address must pass: loopback, private, link-local
    (cloud metadata 169.254.169.254), multicast, reserved and unspecified ones are refused unless
    ``allow_private`` or the address lies in one of ``allow_networks`` (CIDRs, e.g. ``10.0.5.0/24``).
    """
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise DeliveryError(f"{url}: only http(s) URLs can be fetched")
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        raise DeliveryError(f"{url}: bad port") from None
    try:
        infos = socket.getaddrinfo(parts.hostname, port, type=socket.SOCK_STREAM)
    except socket.gaierror as err:
        raise DeliveryError(f"{url}: cannot resolve {parts.hostname} ({err})") from None
    networks = [ipaddress.ip_network(n, strict=False) for n in allow_networks or []]
    addresses = []
    for info in infos:
        ip = ipaddress.ip_address(info[4][0].split("%")[0])
        if not allow_private and _forbidden(ip) and not any(ip in net for net in networks):
            raise DeliveryError(
                f"{url}: {parts.hostname} resolves to {ip}, a loopback/private/link-local/metadata or other "
                "non-public address; "
                "pass --allow-private-urls (or --allow-network CIDR) if this is intended"
            )
        addresses.append(str(ip))
    if not addresses:
        raise DeliveryError(f"{url}: {parts.hostname} has no address")
    return url, addresses[0]


def check_url(url: str, allow_private: bool = False, allow_networks: list[str] | None = None) -> None:
    resolve_url(url, allow_private, allow_networks)


def _open_pinned(
    url: str, address: str, timeout: float
) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
    """GET ``url`` over a connection to the already checked ``address`` (TLS still verifies the
    URL's host name). Environment proxies are not used: they would resolve the name again."""
    parts = urllib.parse.urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    if parts.scheme == "https":
        conn: http.client.HTTPConnection = http.client.HTTPSConnection(
            parts.hostname, port, timeout=timeout, context=ssl.create_default_context()
        )
    else:
        conn = http.client.HTTPConnection(parts.hostname, port, timeout=timeout)
    conn._create_connection = lambda _addr, tmo=timeout, src=None: socket.create_connection(
        (address, port), tmo, src
    )
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    try:
        conn.request(
            "GET",
            target,
            headers={"User-Agent": "finetune-engine deliver-data", "Accept-Encoding": "identity"},
        )
        return conn, conn.getresponse()
    except (OSError, http.client.HTTPException) as err:
        conn.close()
        raise DeliveryError(f"{url}: request failed ({type(err).__name__}: {err})") from None


def fetch_urls(
    urls: list[str],
    out_dir: Path,
    allow_private: bool,
    timeout: float,
    allow_networks: list[str] | None = None,
    max_redirects: int = MAX_REDIRECTS,
) -> None:
    """Download each URL into ``out_dir`` under the file name of the URL as given.

    Redirects are followed by hand, at most ``max_redirects`` hops, and every hop's target is checked
    and resolved like the first URL, so an allowed server cannot redirect the job to a loopback,
    private or metadata address.
    """
    for url in urls:
        if url.startswith("oci://"):
            fetch_oci(url, out_dir, allow_private, allow_networks)
            continue
        name = Path(urllib.parse.urlsplit(url).path).name
        if not name:
            raise DeliveryError(f"{url}: the URL names no file")
        current = url
        for hop in range(max_redirects + 1):
            current, address = resolve_url(current, allow_private, allow_networks)
            log.info("fetching %s (%s)", current, address)
            conn, resp = _open_pinned(current, address, timeout)
            try:
                if resp.status in _REDIRECTS:
                    location = resp.getheader("Location")
                    if not location:
                        raise DeliveryError(f"{current}: HTTP {resp.status} without a Location header")
                    if hop == max_redirects:
                        raise DeliveryError(f"{url}: more than {max_redirects} redirects")
                    current = urllib.parse.urljoin(current, location)
                    log.info("redirected to %s", current)
                    continue
                if resp.status != 200:
                    raise DeliveryError(f"{current}: HTTP {resp.status} {resp.reason}")
                total = 0
                with open(out_dir / name, "wb") as f:
                    while chunk := resp.read(1 << 20):
                        total += len(chunk)
                        if total > MAX_URL_BYTES:
                            raise DeliveryError(f"{url}: larger than {MAX_URL_BYTES >> 30} GiB")
                        f.write(chunk)
                log.info("fetched %s: %d bytes", name, total)
                break
            finally:
                conn.close()


def fetch_oci(
    reference: str, out_dir: Path, allow_private: bool = False, allow_networks: list[str] | None = None
) -> Path:
    """One file of an OCI artifact (``#FILE``, or the artifact's only file) into ``out_dir``, under
    its own name. The artifact is pulled and verified beside ``out_dir`` first; the registry's
    address passes the same checks as a URL's."""
    import shutil

    from finetune_engine.storage.oci import parse_oci, pull_file_or_dir

    ref = parse_oci(reference, allow_path=True)
    probe = f"https://{ref.registry}/v2/"
    try:
        resolve_url(probe, allow_private, allow_networks)
    except DeliveryError as err:
        raise DeliveryError(str(err).replace(probe, reference)) from None
    with tempfile.TemporaryDirectory(dir=out_dir.parent, prefix="oci-") as tmp:
        path = pull_file_or_dir(reference, Path(tmp) / "artifact")
        if path.is_dir():
            raise DeliveryError(f"{reference}: the artifact has several files; name one with '#FILE'")
        target = out_dir / path.name
        shutil.move(path, target)
    log.info("pulled %s: %d bytes", target.name, target.stat().st_size)
    return target


def deliver_data(
    destination: str,
    script: str | None = None,
    urls: list[str] | None = None,
    method: str = "sft",
    timeout: float = 3600,
    allow_private_urls: bool = False,
    workdir: Path | None = None,
    allow_networks: list[str] | None = None,
) -> dict:
    from finetune_engine.data.validate import validate_files
    from finetune_engine.storage import join, upload_file

    if bool(script) == bool(urls):
        raise DeliveryError("give either a data script or URLs")
    with tempfile.TemporaryDirectory(dir=workdir, prefix="deliver-data-") as tmp:
        out_dir = Path(tmp) / "datasets"
        out_dir.mkdir()
        if script:
            run_script(script, out_dir, timeout)
        else:
            fetch_urls(urls or [], out_dir, allow_private_urls, timeout, allow_networks)
        files = sorted(p for p in out_dir.rglob("*") if p.is_file())
        if not files:
            raise DeliveryError(f"no files were produced in ${DATA_DIR_ENV}; nothing was uploaded")
        not_data = [p.name for p in files if p.suffix not in (".jsonl", ".json")]
        if not_data:
            raise DeliveryError(
                f"only .jsonl (or JSON-array .json) files are delivered; found {not_data}; "
                "nothing was uploaded"
            )
        reports = validate_files([str(p) for p in files], method=method)
        uploaded = []
        for path in files:
            uri = join(destination, path.relative_to(out_dir).as_posix())
            upload_file(path, uri)
            uploaded.append(uri)
    log.info("uploaded %d dataset file(s) to %s", len(uploaded), destination)
    return {
        "status": "delivered",
        "files": uploaded,
        "examples": {Path(r.file).name: r.examples for r in reports},
    }


def main(argv: list[str] | None = None) -> int:
    from finetune_engine.cli.finetuning import setup_logging
    from finetune_engine.data.validate import DataValidationError
    from finetune_engine.jobs.common import finish

    parser = argparse.ArgumentParser(prog="finetune-engine deliver-data", description=__doc__.splitlines()[0])
    parser.add_argument("destination", help="s3://bucket/datasets/ (files keep their names)")
    src = parser.add_mutually_exclusive_group()
    src.add_argument(
        "--script", default=None, help=f"Python data script file (default: source text in ${SCRIPT_ENV})."
    )
    src.add_argument(
        "--url",
        action="append",
        default=[],
        help="http(s) URL of a JSONL file, or oci://REGISTRY/REPO:TAG#FILE (repeatable).",
    )
    parser.add_argument(
        "--method", default="sft", choices=["sft", "dpo", "kto"], help="Validate for this method."
    )
    parser.add_argument(
        "--timeout", type=float, default=3600, help="Seconds the script or downloads may take."
    )
    parser.add_argument(
        "--allow-private-urls", action="store_true", help="Allow any private/loopback address."
    )
    parser.add_argument(
        "--allow-network",
        action="append",
        default=[],
        metavar="CIDR",
        help="Allow private addresses in this network only (repeatable), e.g. 10.0.5.0/24.",
    )
    parser.add_argument("--result-file", default=None)
    parser.add_argument("--logging-level", default="INFO")
    args = parser.parse_args(argv)
    setup_logging(args.logging_level)
    script = (
        Path(args.script).read_text(encoding="utf-8")
        if args.script
        else (None if args.url else os.environ.get(SCRIPT_ENV))
    )
    return finish(
        lambda: deliver_data(
            args.destination,
            script,
            args.url,
            args.method,
            args.timeout,
            args.allow_private_urls,
            allow_networks=args.allow_network,
        ),
        args.result_file,
        refused=(DeliveryError, DataValidationError, ValueError),
    )


if __name__ == "__main__":
    raise SystemExit(main())
