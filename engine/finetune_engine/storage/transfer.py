"""Verified directory transfers: parallel over files (and over parts, via boto3 managed transfers),
manifest object uploaded last, sizes and sha256 checked on download, keys confined to the target."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import sys
import threading
import time
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from pathlib import Path

from finetune_engine.manifest import MANIFEST_NAME, build_manifest, list_files, read_manifest, sha256_file
from finetune_engine.storage import s3
from finetune_engine.storage.uri import UnsafeKeyError, check_relative_key, join, parse_uri, safe_local_path

log = logging.getLogger(__name__)
PROGRESS_MIN_BYTES = 64 * 2**20


PROGRESS_ENV = "FINETUNE_PROGRESS"  # auto (default): a bar on a terminal, log lines otherwise; bar; log; off
PROGRESS_INTERVAL_ENV = "FINETUNE_PROGRESS_INTERVAL"  # seconds between progress log lines (default 30)


class Progress:
    """Byte counter for transfer callbacks, shown for big transfers (>= 64 MiB) with throughput: a tqdm
    bar (bytes, rate) on a terminal, else a log line every ``$FINETUNE_PROGRESS_INTERVAL`` s (pod logs
    are not terminals). ``$FINETUNE_PROGRESS`` = bar | log | off forces a mode."""

    def __init__(self, total: int, desc: str, enabled: bool = True):
        self.total, self.desc, self.done = total, desc, 0
        self.started = time.monotonic()
        self._lock = threading.Lock()
        self.bar = None
        self.log_every: float | None = None
        self._logged_at = self.started
        mode = os.environ.get(PROGRESS_ENV, "auto").strip().lower()
        if not enabled or mode == "off" or total < PROGRESS_MIN_BYTES:
            return
        if mode == "bar" or (mode == "auto" and sys.stderr.isatty()):
            from tqdm import tqdm

            self.bar = tqdm(
                total=total,
                unit="B",
                unit_scale=True,
                unit_divisor=1024,
                desc=desc,
                leave=True,
                file=sys.stderr,
                mininterval=0.2,
            )
        else:
            self.log_every = float(os.environ.get(PROGRESS_INTERVAL_ENV, "30"))

    def __call__(self, n: int) -> None:
        with self._lock:
            self.done += n
            if self.bar is not None:
                self.bar.update(n)
            elif self.log_every is not None and (now := time.monotonic()) - self._logged_at >= self.log_every:
                self._logged_at = now
                log.info("%s", self.line())

    def line(self) -> str:
        rate = self.rate
        eta = (self.total - self.done) / rate if rate else float("nan")
        return (
            f"{self.desc}: {self.done / 2**20:.0f} of {self.total / 2**20:.0f} MiB "
            f"({100 * self.done / max(self.total, 1):.0f}%) at {rate / 2**20:.1f} MiB/s, eta {eta:.0f} s"
        )

    @property
    def rate(self) -> float:
        return self.done / max(time.monotonic() - self.started, 1e-9)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def retrying(fn, *args, **kwargs):
    """``fn(*args)``, retried with backoff (1, 2, 4, ... 30 s) on TransientStorageError.

    botocore already retries each request; this outer loop rides out longer outages (a server restart)
    that exhaust botocore's attempts or its shared retry quota.
    """
    attempts = int(os.environ.get("FINETUNE_S3_FILE_ATTEMPTS", "6"))
    delay = 1.0
    for attempt in range(1, attempts + 1):
        try:
            return fn(*args, **kwargs)
        except s3.TransientStorageError as err:
            if attempt == attempts:
                raise
            log.warning("%s; retrying in %.0f s (%d of %d)", err, delay, attempt, attempts - 1)
            time.sleep(delay)
            delay = min(delay * 2, 30.0)


def _run_parallel(fn, items: list, workers: int) -> None:
    """Run ``fn(*item)`` on a thread pool; on the first failure cancel the rest and raise it."""
    if not items:
        return
    pool = ThreadPoolExecutor(max_workers=max(1, min(workers, len(items))), thread_name_prefix="s3-transfer")
    try:
        futures = [pool.submit(fn, *item) for item in items]
        done, _ = wait(futures, return_when=FIRST_EXCEPTION)
        for fut in done:
            if fut.exception() is not None:
                raise fut.exception()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def check_symlinks(root: Path) -> None:
    """UnsafeKeyError when a symlink under ``root`` points outside it (or dangles)."""
    root_resolved = root.resolve()
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath, name)
            if path.is_symlink():
                target = path.resolve()
                if root_resolved not in target.parents:
                    raise UnsafeKeyError(
                        f"refusing to upload {path}: symlink points outside {root} (to {target}); "
                        "copy the file into the directory instead"
                    )


def local_manifest(local_dir: Path) -> dict:
    """The directory's manifest: the existing local one if it still lists exactly these files with these
    sizes and no file is newer than it, else a freshly hashed one (not written to the source dir)."""
    manifest = read_manifest(local_dir)
    if manifest is not None:
        stamp = (local_dir / MANIFEST_NAME).stat().st_mtime_ns
        listed = {f["path"]: f["size"] for f in manifest["files"]}
        files = sorted(list_files(local_dir))
        if sorted(listed) == files and all(
            (st := (local_dir / rel).stat()).st_size == listed[rel] and st.st_mtime_ns <= stamp
            for rel in files
        ):
            return manifest
    return build_manifest(local_dir)


def upload_dir(
    local_dir: str | Path,
    uri: str,
    *,
    workers: int = 8,
    progress: bool = True,
    after_file=None,
    client=None,
    other_files: list[dict] | None = None,
    write_manifest: bool = True,
) -> dict:
    """Upload a directory to prefix ``uri`` in parallel; the manifest object is written last.

    The remote manifest is deleted first, so while files upload the prefix reads as incomplete.
    ``after_file(rel_path)`` runs (in the worker thread) after each file is stored. Returns the manifest.
    ``client``: an explicit S3 client (:func:`~finetune_engine.storage.s3.session_client`), else the
    environment's.

    Several nodes writing one checkpoint: each other node uploads its own files with
    ``write_manifest=False`` (its manifest entries are returned); the node that writes the manifest
    passes those entries as ``other_files``. They are listed in the manifest beside its own files and,
    like them, must be on the server with their sizes before the manifest is written.
    """
    local_dir = Path(local_dir)
    if not local_dir.is_dir():
        raise FileNotFoundError(f"cannot upload {local_dir} to {uri}: not a directory")
    parse_uri(uri)
    check_symlinks(local_dir)
    manifest = local_manifest(local_dir)
    own = manifest["files"]
    if other_files:
        mine = {e["path"] for e in own}
        manifest = {
            **manifest,
            "files": sorted(own + [e for e in other_files if e["path"] not in mine], key=lambda e: e["path"]),
        }
    for entry in manifest["files"]:
        check_relative_key(entry["path"])
    bucket, manifest_key = parse_uri(join(uri, MANIFEST_NAME))
    client = s3._use(client)
    retrying(s3._call, uri, "delete the manifest of", client.delete_object, Bucket=bucket, Key=manifest_key)
    bar = Progress(sum(f["size"] for f in own), f"upload {uri}", progress)

    def put(entry: dict) -> None:
        path = local_dir / entry["path"]
        if path.stat().st_size != entry["size"]:
            raise s3.StorageError(f"{path} changed size while uploading to {uri}; retry when it is stable")
        retrying(s3.upload_file, path, join(uri, entry["path"]), bar, 8, entry["sha256"], client=client)
        if after_file is not None:
            after_file(entry["path"])

    try:
        _run_parallel(put, [(e,) for e in own], workers)
        if not write_manifest:
            return manifest
        missing = s3.missing_objects(manifest, retrying(s3.list_objects, uri, client=client))
        if missing:  # the server lost or truncated something: no manifest, the prefix stays incomplete
            raise s3.StorageError(
                f"{uri}: {len(missing)} uploaded object(s) missing or truncated on the server "
                f"(e.g. {missing[0]!r}); retry the upload"
            )
        retrying(
            s3.put_bytes,
            join(uri, MANIFEST_NAME),
            json.dumps(manifest, indent=1).encode(),
            "application/json",
            client=client,
        )
    finally:
        bar.close()
    log.info(
        "uploaded %d files (%.1f MiB) to %s at %.1f MiB/s",
        len(own),
        bar.total / 2**20,
        uri,
        bar.rate / 2**20,
    )
    return manifest


def _entries(
    uri: str, require_complete: bool, client=None
) -> tuple[dict | None, list[tuple[str, int, str | None]]]:
    manifest = s3.read_manifest(uri, client=client)
    objects = s3.list_objects(uri, client=client)
    if manifest is None:
        if require_complete:
            raise s3.IncompleteError(
                f"{uri} is not complete: no valid {MANIFEST_NAME} (still uploading, interrupted, or not "
                "written by upload_dir); re-run the upload, or pass "
                "require_complete=False to fetch whatever is there"
            )
        # Without a manifest: every object except directory markers and a malformed manifest.
        return None, [
            (k, size, None)
            for k, size in sorted(objects.items())
            if k != MANIFEST_NAME and not (k.endswith("/") and size == 0)
        ]
    missing = s3.missing_objects(manifest, objects)
    if missing:
        raise s3.IncompleteError(
            f"{uri} is not complete: {len(missing)} object(s) named by its manifest are missing or differ in "
            f"size (e.g. {missing[0]!r}); re-run the upload"
        )
    return manifest, [(f["path"], f["size"], f["sha256"]) for f in manifest["files"]]


def _matches(path: Path, size: int, digest: str | None) -> bool:
    return (
        path.is_file()
        and not path.is_symlink()
        and path.stat().st_size == size
        and (digest is None or sha256_file(path) == digest)
    )


_PART = re.compile(r"^\..+\.part-\d+-\d+$")


def _remove_stale(root: Path, wanted: set[str], owned: set[str] | None) -> None:
    """Remove files not in ``wanted``: all of them in our staging dir (``owned`` None), else only leftover
    temporaries and files an older local manifest listed (never unrelated files of an existing dir)."""
    for path in sorted(root.rglob("*"), reverse=True):
        rel = path.relative_to(root).as_posix()
        if path.is_file() or path.is_symlink():
            if rel not in wanted and (owned is None or rel in owned or _PART.match(path.name)):
                path.unlink()
        elif owned is None and path.is_dir() and not any(path.iterdir()):
            path.rmdir()


def download_dir(
    uri: str,
    local_dir: str | Path,
    *,
    workers: int = 8,
    progress: bool = True,
    require_complete: bool = True,
    verify_hashes: bool = True,
    client=None,
) -> dict | None:
    """Download prefix ``uri`` into ``local_dir``, verified against its manifest; returns the manifest.

    Refuses a prefix without a valid manifest (IncompleteError) unless ``require_complete=False``, and any
    key that could land outside ``local_dir`` (UnsafeKeyError, before anything is written). A new
    ``local_dir`` is assembled in a hidden sibling and renamed into place; an existing one is repaired in
    place with its local manifest removed until the end. Files present with the right size and sha256
    are kept, so an interrupted download resumes. ``client``: an explicit S3 client, else the environment's.
    """
    local_dir = Path(local_dir)
    client = s3._use(client)
    manifest, entries = retrying(_entries, uri, require_complete, client)
    for rel, _, _ in entries:
        check_relative_key(rel)  # every key, before any write
    if local_dir.exists() and not local_dir.is_dir():
        raise FileExistsError(f"cannot download {uri} into {local_dir}: it exists and is not a directory")
    in_place = local_dir.is_dir()
    work = local_dir if in_place else local_dir.parent / f".{local_dir.name}.partial"
    if not in_place and work.is_symlink():
        work.unlink()
    targets = {rel: safe_local_path(work, rel) for rel, _, _ in entries}  # resolves symlinks in ``work``
    previous = read_manifest(work) if in_place else None
    work.mkdir(parents=True, exist_ok=True)
    (work / MANIFEST_NAME).unlink(missing_ok=True)  # incomplete until the end
    todo = [
        (rel, size, digest)
        for rel, size, digest in entries
        if not _matches(targets[rel], size, digest if verify_hashes else None)
    ]
    bar = Progress(sum(size for _, size, _ in todo), f"download {uri}", progress)

    def fetch(rel: str, size: int, digest: str | None) -> None:
        path, source = targets[rel], join(uri, rel)
        if path.is_symlink() or path.is_dir():
            raise UnsafeKeyError(f"refusing to overwrite {path} (a symlink or directory) with {source}")
        got = retrying(
            s3.download_file, source, path, bar, 4, size, client=client
        )  # sha256 while streaming, if one GET
        if path.stat().st_size != size:
            path.unlink()
            raise s3.StorageError(
                f"{source}: downloaded {path.stat().st_size} bytes, the manifest says {size}; "
                "the object changed during the download, retry"
            )
        if verify_hashes and digest and (got or sha256_file(path)) != digest:
            path.unlink()
            raise s3.StorageError(
                f"{source}: sha256 does not match the manifest; the object is corrupt or was "
                "replaced without a new manifest - re-upload the directory"
            )

    try:
        _run_parallel(fetch, todo, workers)
    finally:
        bar.close()
    if manifest is not None:
        owned = None if not in_place else {f["path"] for f in (previous or {}).get("files", [])}
        _remove_stale(work.resolve(), {rel for rel, _, _ in entries}, owned)
        tmp = work / (MANIFEST_NAME + ".tmp")
        tmp.write_text(json.dumps(manifest, indent=1), encoding="utf-8")
        os.replace(tmp, work / MANIFEST_NAME)  # local completion marker, last
    if not in_place:
        try:
            os.rename(work, local_dir)
        except OSError:
            if not local_dir.is_dir():
                raise
            shutil.rmtree(work, ignore_errors=True)  # a concurrent download finished first
            log.info("%s appeared while downloading %s; kept the existing copy", local_dir, uri)
    log.info(
        "downloaded %d of %d files (%.1f MiB) from %s at %.1f MiB/s",
        len(todo),
        len(entries),
        bar.total / 2**20,
        uri,
        bar.rate / 2**20,
    )
    return manifest


__all__ = ["Progress", "check_symlinks", "download_dir", "local_manifest", "upload_dir"]
