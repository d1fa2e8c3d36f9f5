"""Directory transfers with verification: parallel over files (and parts, via boto3's managed
transfers), manifest uploaded last, hashes checked on download, keys confined to the target."""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from finetune_engine.manifest import (
    MANIFEST_NAME,
    build_manifest,
    read_manifest,
    sha256_file,
    verify_directory,
)
from finetune_engine.storage import s3
from finetune_engine.storage.uri import UnsafeKeyError, join, parse_uri, safe_local_path

log = logging.getLogger(__name__)
PROGRESS_MIN_BYTES = 64 * 2**20


class Progress:
    """Bytes transferred: a tqdm bar on a terminal, a log line every ~10% otherwise."""

    def __init__(self, total: int, desc: str, enabled: bool | None):
        self.total = total
        self.desc = desc
        self.done = 0
        self.started = time.monotonic()
        self._lock = threading.Lock()
        self._next_log = 0.1
        show = total >= PROGRESS_MIN_BYTES if enabled is None else enabled
        self.bar = None
        self.log_lines = show and not sys.stderr.isatty()
        if show and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=desc)

    def __call__(self, n: int) -> None:
        with self._lock:
            self.done += n
            if self.bar is not None:
                self.bar.update(n)
            elif self.log_lines and self.total and self.done / self.total >= self._next_log:
                self._next_log += 0.1
                log.info("%s: %.0f%% of %.1f MiB (%.1f MiB/s)", self.desc, 100 * self.done / self.total,
                         self.total / 2**20, self.rate / 2**20)

    @property
    def rate(self) -> float:
        return self.done / max(time.monotonic() - self.started, 1e-9)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _check_symlinks(root: Path) -> None:
    root_resolved = root.resolve()
    for path in root.rglob("*"):
        if path.is_symlink():
            target = path.resolve()
            if root_resolved not in target.parents:
                raise UnsafeKeyError(f"refusing to upload {path}: symlink points outside {root} (to {target})")


def _local_manifest(local_dir: Path) -> dict:
    """A valid manifest of the directory: the existing one if it still matches, else a new one."""
    ok, _ = verify_directory(local_dir)
    manifest = read_manifest(local_dir) if ok else None
    if manifest is not None:
        from finetune_engine.manifest import list_files

        if sorted(f["path"] for f in manifest["files"]) == list_files(local_dir):
            return manifest
    from finetune_engine.manifest import write_manifest

    return write_manifest(local_dir)


def upload_dir(local_dir: str | Path, uri: str, workers: int = 8, progress: bool | None = None) -> dict:
    """Upload a directory to prefix ``uri``; the manifest object is written last.

    The remote manifest is removed first, so during the upload the prefix reads as incomplete.
    """
    local_dir = Path(local_dir)
    if not local_dir.is_dir():
        raise FileNotFoundError(f"{local_dir} is not a directory")
    parse_uri(uri)
    _check_symlinks(local_dir)
    manifest = _local_manifest(local_dir)
    bucket, prefix = parse_uri(uri)
    client = s3.make_client()
    s3._call(uri, "delete manifest of", client.delete_object, Bucket=bucket, Key=f"{prefix}/{MANIFEST_NAME}".lstrip("/"))
    bar = Progress(sum(f["size"] for f in manifest["files"]), f"upload {uri}", progress)
    try:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            futures = [pool.submit(s3.upload_file, local_dir / f["path"], join(uri, f["path"]), bar) for f in manifest["files"]]
            for fut in futures:
                fut.result()
        s3.upload_file(local_dir / MANIFEST_NAME, join(uri, MANIFEST_NAME))
    finally:
        bar.close()
    log.info("uploaded %d files (%.1f MiB) to %s at %.1f MiB/s", len(manifest["files"]), bar.total / 2**20, uri, bar.rate / 2**20)
    return manifest


def download_dir(uri: str, local_dir: str | Path, workers: int = 8, progress: bool | None = None,
                 require_complete: bool = True, verify_hashes: bool = True) -> dict | None:
    """Download prefix ``uri`` into ``local_dir`` and verify it against the manifest.

    Refuses a prefix without a valid manifest (IncompleteError). Files already present with the
    right size and hash are kept (an interrupted download resumes); others are replaced; the local
    manifest is written last, so a half-finished local copy never reads as complete.
    """
    local_dir = Path(local_dir)
    manifest = s3.read_manifest(uri)
    if manifest is None and require_complete:
        raise s3.IncompleteError(f"{uri} is not complete (no valid {MANIFEST_NAME}); it may still be uploading")
    if manifest is not None:
        entries = [(f["path"], f["size"], f.get("sha256")) for f in manifest["files"]]
        objects = s3.list_objects(uri)
        missing = [rel for rel, size, _ in entries if objects.get(rel) != size]
        if missing:
            raise s3.IncompleteError(f"{uri} is not complete: {len(missing)} object(s) named by its manifest are missing or differ in size (e.g. {missing[0]!r})")
    else:
        entries = [(k, size, None) for k, size in s3.list_objects(uri).items()]
    targets = {rel: safe_local_path(local_dir, rel) for rel, _, _ in entries}  # all keys checked before any write
    local_dir.mkdir(parents=True, exist_ok=True)
    (local_dir / MANIFEST_NAME).unlink(missing_ok=True)
    todo = []
    for rel, size, digest in entries:
        path = targets[rel]
        if path.is_file() and path.stat().st_size == size and (digest is None or sha256_file(path) == digest):
            continue
        todo.append((rel, size, digest))
    bar = Progress(sum(size for _, size, _ in todo), f"download {uri}", progress)

    def fetch(rel: str, size: int, digest: str | None) -> None:
        path = targets[rel]
        s3.download_file(join(uri, rel), path, bar)
        if path.stat().st_size != size:
            raise s3.StorageError(f"{join(uri, rel)}: size {path.stat().st_size} != manifest {size}")
        if verify_hashes and digest and sha256_file(path) != digest:
            path.unlink()
            raise s3.StorageError(f"{join(uri, rel)}: sha256 does not match the manifest; the object changed or is corrupt")

    try:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            for fut in [pool.submit(fetch, *e) for e in todo]:
                fut.result()
    finally:
        bar.close()
    if manifest is not None:
        wanted = {rel for rel, _, _ in entries}
        for path in sorted(local_dir.rglob("*"), reverse=True):
            rel = path.relative_to(local_dir).as_posix()
            if path.is_file() and rel not in wanted and rel != MANIFEST_NAME:
                path.unlink()  # stale files from an older version of this prefix
        tmp = local_dir / (MANIFEST_NAME + ".tmp")
        import json

        tmp.write_text(json.dumps(manifest, indent=1))
        os.replace(tmp, local_dir / MANIFEST_NAME)
    log.info("downloaded %d of %d files (%.1f MiB) from %s at %.1f MiB/s", len(todo), len(entries), bar.total / 2**20, uri, bar.rate / 2**20)
    return manifest


__all__ = ["upload_dir", "download_dir", "build_manifest"]
