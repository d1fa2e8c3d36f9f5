"""``finetune-engine deliver-data``: produce JSONL datasets and put them into the bucket.

Either a user's data script (the seed's contract: it writes JSONL files into the directory named by
``$FINETUNE_DATA_DIR``) runs in a subprocess that gets no credentials and a time limit, or files are
fetched from http(s) URLs (loopback, private, link-local and metadata addresses refused unless
allowed). Every file is validated before anything is uploaded; one bad file uploads nothing.
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import urllib.parse
import urllib.request
from pathlib import Path

log = logging.getLogger(__name__)
DATA_DIR_ENV = "FINETUNE_DATA_DIR"
SCRIPT_ENV = "FINETUNE_DATA_SCRIPT"
# What a data script may see of the job's environment: no credentials of any kind.
SCRIPT_ENV_ALLOWED = ("PATH", "LANG", "LC_ALL", "TZ", "HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "PYTHONPATH")
MAX_URL_BYTES = 20 * 2**30


class DeliveryError(ValueError):
    pass


def run_script(script: str, out_dir: Path, timeout: float, python: str = sys.executable) -> None:
    """Run ``script`` (Python source) with only a scrubbed environment; kill its group on timeout."""
    script_file = out_dir.parent / "data_script.py"
    script_file.write_text(script, encoding="utf-8")
    home = out_dir.parent / "home"
    home.mkdir(exist_ok=True)
    env = {k: os.environ[k] for k in SCRIPT_ENV_ALLOWED if k in os.environ}
    env.update({DATA_DIR_ENV: str(out_dir), "HOME": str(home), "TMPDIR": str(home), "PYTHONUNBUFFERED": "1"})
    proc = subprocess.Popen([python, str(script_file)], cwd=out_dir.parent, env=env, start_new_session=True)
    try:
        rc = proc.wait(timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        raise DeliveryError(f"data script did not finish within {timeout:.0f}s and was stopped; nothing was uploaded") from None
    if rc != 0:
        raise DeliveryError(f"data script exited with {rc}; nothing was uploaded")


def check_url(url: str, allow_private: bool = False) -> None:
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise DeliveryError(f"{url}: only http(s) URLs can be fetched")
    if allow_private:
        return
    try:
        infos = socket.getaddrinfo(parts.hostname, parts.port or (443 if parts.scheme == "https" else 80))
    except socket.gaierror as err:
        raise DeliveryError(f"{url}: cannot resolve {parts.hostname} ({err})") from None
    for info in infos:
        ip = ipaddress.ip_address(info[4][0])
        if ip.is_loopback or ip.is_private or ip.is_link_local or ip.is_multicast or ip.is_reserved or ip.is_unspecified:
            raise DeliveryError(
                f"{url}: {parts.hostname} resolves to {ip}, a loopback/private/link-local/metadata address; "
                "pass --allow-private-urls if this is intended"
            )


def fetch_urls(urls: list[str], out_dir: Path, allow_private: bool, timeout: float) -> None:
    for url in urls:
        check_url(url, allow_private)
        name = Path(urllib.parse.urlsplit(url).path).name
        if not name:
            raise DeliveryError(f"{url}: the URL names no file")
        log.info("fetching %s", url)
        with urllib.request.urlopen(url, timeout=timeout) as resp, open(out_dir / name, "wb") as f:  # noqa: S310 - scheme checked
            total = 0
            while chunk := resp.read(1 << 20):
                total += len(chunk)
                if total > MAX_URL_BYTES:
                    raise DeliveryError(f"{url}: larger than {MAX_URL_BYTES >> 30} GiB")
                f.write(chunk)


def deliver_data(destination: str, script: str | None = None, urls: list[str] | None = None, method: str = "sft",
                 timeout: float = 3600, allow_private_urls: bool = False, workdir: Path | None = None) -> dict:
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
            fetch_urls(urls or [], out_dir, allow_private_urls, timeout)
        files = sorted(p for p in out_dir.rglob("*") if p.is_file())
        if not files:
            raise DeliveryError(f"no files were produced in ${DATA_DIR_ENV}; nothing was uploaded")
        not_jsonl = [p.name for p in files if p.suffix != ".jsonl"]
        if not_jsonl:
            raise DeliveryError(f"only .jsonl files are delivered; found {not_jsonl}; nothing was uploaded")
        reports = validate_files([str(p) for p in files], method=method)
        uploaded = []
        for path in files:
            uri = join(destination, path.relative_to(out_dir).as_posix())
            upload_file(path, uri)
            uploaded.append(uri)
    log.info("uploaded %d dataset file(s) to %s", len(uploaded), destination)
    return {"status": "delivered", "files": uploaded, "examples": {Path(r.file).name: r.examples for r in reports}}


def main(argv: list[str] | None = None) -> int:
    from finetune_engine.cli.finetuning import setup_logging
    from finetune_engine.data.validate import DataValidationError
    from finetune_engine.jobs.common import write_result

    parser = argparse.ArgumentParser(prog="finetune-engine deliver-data", description=__doc__.splitlines()[0])
    parser.add_argument("destination", help="s3://bucket/datasets/ (files keep their names)")
    src = parser.add_mutually_exclusive_group()
    src.add_argument("--script", default=None, help=f"Python data script file (default: source text in ${SCRIPT_ENV}).")
    src.add_argument("--url", action="append", default=[], help="http(s) URL of a JSONL file (repeatable).")
    parser.add_argument("--method", default="sft", choices=["sft", "dpo", "kto"], help="Validate for this method.")
    parser.add_argument("--timeout", type=float, default=3600, help="Seconds the script or downloads may take.")
    parser.add_argument("--allow-private-urls", action="store_true")
    parser.add_argument("--result-file", default=None)
    parser.add_argument("--logging-level", default="INFO")
    args = parser.parse_args(argv)
    setup_logging(args.logging_level)
    script = Path(args.script).read_text(encoding="utf-8") if args.script else (None if args.url else os.environ.get(SCRIPT_ENV))
    try:
        result = deliver_data(args.destination, script, args.url, args.method, args.timeout, args.allow_private_urls)
    except (DeliveryError, DataValidationError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    write_result(result, args.result_file)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
