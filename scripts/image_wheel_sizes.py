"""The download size of each image lock: the wheels pip would fetch for Linux x86_64 / CPython 3.12.

    .venv/bin/python scripts/image_wheel_sizes.py images/requirements-*.txt

For every ``name==version --hash=sha256:...`` entry it asks PyPI's JSON simple index (PEP 691) for the
file sizes, and counts the one locked file that fits the images' platform. A lock that is not
generated yet (no entries) prints 0.
"""

from __future__ import annotations

import json
import sys
import urllib.request
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from lock_images import blocks, hashes, version  # noqa: E402 - the lock parser of the script that writes them

INDEX = "https://pypi.org/simple"
PYTHON_TAGS = ("cp312", "abi3", "py312-none", "py3-none", "py2.py3-none")


def fits(filename: str) -> bool:
    """A wheel pip installs on Linux x86_64 / CPython 3.12."""
    if not filename.endswith(".whl"):
        return False
    platform_ok = filename.endswith("-any.whl") or ("manylinux" in filename and "x86_64" in filename)
    return platform_ok and any(tag in filename for tag in PYTHON_TAGS)


def index_files(name: str) -> list[dict]:
    request = urllib.request.Request(
        f"{INDEX}/{name}/", headers={"Accept": "application/vnd.pypi.simple.v1+json"}
    )
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.load(response)["files"]


def lock_size(text: str, files_of: Callable[[str], list[dict]] = index_files) -> tuple[int, list[str]]:
    """(bytes of the locked wheels, the entries no fitting locked file was found for)."""
    total, missing = 0, []
    for name, block in blocks(text).items():
        allowed = hashes(block)
        sizes = [
            f["size"]
            for f in files_of(name)
            if f.get("hashes", {}).get("sha256") in allowed and fits(f["filename"])
        ]
        if sizes:
            total += max(sizes)
        else:
            missing.append(f"{name}=={version(block)}")
    return total, missing


def main(argv: list[str]) -> int:
    status = 0
    for path in argv:
        total, missing = lock_size(Path(path).read_text())
        print(f"{path}: {total / 2**30:.2f} GiB of wheels")
        for entry in missing:
            print(f"  no locked Linux x86_64 / cp312 wheel for {entry}", file=sys.stderr)
            status = 1
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
