"""Completion manifests: a directory counts as complete only when its manifest exists and matches.

The manifest lists every file with its size and sha256 and is written last (atomically), so a
directory cut off mid-write has no manifest and readers treat it as absent. The same format marks
local checkpoints and bucket prefixes (the manifest object is uploaded last).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

MANIFEST_NAME = "_finetune_manifest.json"
FORMAT_VERSION = 1
_CHUNK = 8 * 1024 * 1024


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def list_files(directory: Path) -> list[str]:
    """Relative POSIX paths of the regular files under ``directory`` except the manifest."""
    out = []
    for root, dirs, files in os.walk(directory):
        dirs.sort()
        for name in sorted(files):
            rel = Path(root, name).relative_to(directory).as_posix()
            if rel != MANIFEST_NAME:
                out.append(rel)
    return out


@dataclass(frozen=True)
class FileEntry:
    path: str
    size: int
    sha256: str


def build_manifest(directory: Path, extra: dict | None = None) -> dict:
    directory = Path(directory)
    files = []
    for rel in list_files(directory):
        p = directory / rel
        files.append({"path": rel, "size": p.stat().st_size, "sha256": sha256_file(p)})
    return {
        "format": FORMAT_VERSION,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "files": files,
        **({"extra": extra} if extra else {}),
    }


def write_manifest(directory: Path, extra: dict | None = None) -> dict:
    """Hash every file and write the manifest last, atomically (fsync + rename)."""
    directory = Path(directory)
    manifest = build_manifest(directory, extra)
    tmp = directory / (MANIFEST_NAME + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, directory / MANIFEST_NAME)
    return manifest


def read_manifest(directory: Path) -> dict | None:
    path = Path(directory) / MANIFEST_NAME
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (FileNotFoundError, NotADirectoryError, json.JSONDecodeError, UnicodeDecodeError):
        return None
    if (
        not isinstance(data, dict)
        or data.get("format") != FORMAT_VERSION
        or not isinstance(data.get("files"), list)
    ):
        return None
    return data


def verify_directory(directory: Path, check_hashes: bool = False) -> tuple[bool, str]:
    """(complete, reason). Sizes are always checked; hashes when ``check_hashes``."""
    directory = Path(directory)
    manifest = read_manifest(directory)
    if manifest is None:
        return False, f"no valid {MANIFEST_NAME}"
    for entry in manifest["files"]:
        p = directory / entry["path"]
        if not p.is_file():
            return False, f"missing {entry['path']}"
        if p.stat().st_size != entry["size"]:
            return False, f"size mismatch for {entry['path']}"
        if check_hashes and sha256_file(p) != entry["sha256"]:
            return False, f"sha256 mismatch for {entry['path']}"
    return True, "complete"
