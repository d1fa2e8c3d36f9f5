"""Leader of a local engine run's process group.

``python -m airflow_provider_finetune.runners.group_leader --parent PID --grace S -- COMMAND...``

The local runner starts this in a new session; it runs COMMAND as its child in the same process
group and takes the whole group down (SIGTERM, then SIGKILL after the grace period) when:

- it gets SIGTERM/SIGINT/SIGHUP (the runner's ``kill()``: on_kill or the deadline), or
- the worker process PID dies, even by SIGKILL: Linux tells it at once (``PR_SET_PDEATHSIG``),
  elsewhere a poll of the parent pid notices within a second.

So a killed Airflow task never leaves an engine (or torchrun's workers) writing to the same
checkpoint prefix as the retry. When COMMAND exits, whatever it left running in the group is
killed too. The leader is non-dumpable: its environment holds the job's credentials, and no other
process of the same user (a data script the engine runs) can read /proc/<leader>/environ. It exits
with COMMAND's status, or dies by the same signal.
Standard library only: it starts before, and outlives nothing of, the engine.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

PR_SET_PDEATHSIG = 1
PR_SET_DUMPABLE = 4
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


def set_parent_death_signal(sig: int) -> bool:
    """Ask Linux to send ``sig`` when the parent dies; False where prctl is unavailable."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def make_non_dumpable() -> bool:
    """The leader's environment holds the job's credentials: make /proc/<pid>/environ (and mem)
    unreadable to other processes of the same user, such as a data script the engine runs.
    False where prctl is unavailable."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def group_members() -> list[int]:
    """The other live processes of this process group (Linux /proc; [] elsewhere)."""
    me, pgid, out = os.getpid(), os.getpgid(0), []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        pid = int(stat.parent.name)
        if pid != me and int(fields[2]) == pgid and fields[0] != "Z":
            out.append(pid)
    return out


def kill_stragglers() -> int:
    """SIGKILL what the command left running in the group after it exited; how many there were."""
    if not Path("/proc").is_dir():  # no /proc: the whole group but this process
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        try:
            os.killpg(0, signal.SIGTERM)
        except ProcessLookupError:
            pass
        return 0
    left = group_members()
    for pid in left:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return len(left)


class Leader:
    def __init__(self, command: list[str], parent: int, grace: float):
        self.command = command
        self.parent = parent
        self.grace = grace
        self.stopping = False

    def stop_group(self, *_: object) -> None:
        """SIGTERM to every process of the group but this one; SIGKILL to all after the grace."""
        if self.stopping:
            return
        self.stopping = True
        for sig in STOP_SIGNALS:
            signal.signal(sig, signal.SIG_IGN)
        signal.signal(signal.SIGALRM, lambda *_: os.killpg(0, signal.SIGKILL))
        signal.setitimer(signal.ITIMER_REAL, max(self.grace, 0.1))
        try:
            os.killpg(0, signal.SIGTERM)
        except ProcessLookupError:
            pass

    def watch_parent(self) -> None:
        """The portable fallback of PR_SET_PDEATHSIG: poll whether the worker still lives."""
        while not self.stopping:
            if os.getppid() != self.parent:
                os.kill(os.getpid(), signal.SIGTERM)  # handled in the main thread
                return
            threading.Event().wait(1.0)

    def run(self) -> int:
        for sig in STOP_SIGNALS:
            signal.signal(sig, self.stop_group)
        make_non_dumpable()
        set_parent_death_signal(signal.SIGTERM)
        if os.getppid() != self.parent:  # the worker died before the death signal was armed
            return 128 + signal.SIGTERM
        threading.Thread(target=self.watch_parent, daemon=True).start()
        try:
            child = subprocess.Popen(self.command)  # same process group; stdio inherited
        except OSError as err:
            print(f"cannot start {self.command[0]!r}: {err}", file=sys.stderr, flush=True)
            return 127
        rc = child.wait()
        if not self.stopping:
            left = kill_stragglers()
            if left:
                print(f"stopped {left} process(es) the command left running", file=sys.stderr, flush=True)
        if rc < 0:  # killed by a signal: die by the same one, so the runner sees what happened
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(-rc, signal.SIG_DFL)
            os.kill(os.getpid(), -rc)
        return rc


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="group_leader")
    parser.add_argument(
        "--parent", type=int, required=True, help="pid of the worker process that started this"
    )
    parser.add_argument("--grace", type=float, default=10.0, help="seconds between SIGTERM and SIGKILL")
    parser.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("no command after --")
    return Leader(command, args.parent, args.grace).run()


if __name__ == "__main__":
    sys.exit(main())
