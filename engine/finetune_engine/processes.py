"""Which process a recorded pid is: its start time, so that a pid file is trusted only for the
process that wrote it (a later process given the same pid has another start time).

Used by the embedded S3 server (``storage.local_server``) and by the provider's local runners
before they signal a recorded process group. No torch, no Airflow.
"""

from __future__ import annotations

import subprocess
from pathlib import Path


def process_start_time(pid: int) -> str | None:
    """When process ``pid`` started, as text that differs for a later process given the same pid;
    None when there is no such process (or the platform cannot say).

    Linux: field 22 of /proc/<pid>/stat (clock ticks after boot). Elsewhere: ``ps -o lstart=``.
    """
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        if Path("/proc/self/stat").exists():
            return None  # Linux, and no such process
        return ps_start_time(pid)
    except OSError:
        return None
    # the command name (field 2) is in parentheses and may hold spaces or ")": split after its last ")"
    fields = stat.rsplit(")", 1)[1].split()
    return fields[19] if len(fields) > 19 else None  # field 3 (state) is fields[0]


def ps_start_time(pid: int) -> str | None:
    """The start time ``ps -o lstart=`` shows (platforms without /proc); None when there is no such
    process."""
    try:
        out = subprocess.run(
            ["ps", "-o", "lstart=", "-p", str(pid)], capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    return " ".join(out.stdout.split()) or None


__all__ = ["process_start_time", "ps_start_time"]
