"""Local checkpoints: which are complete, where to resume, cleaning up what an interruption left.

No torch here: the train job and the storage layer use it too.
"""

from __future__ import annotations

import logging
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from finetune_engine.manifest import verify_directory

log = logging.getLogger(__name__)
CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")


@dataclass
class CheckpointScan:
    complete: list[tuple[int, Path]] = field(default_factory=list)  # ascending by step
    incomplete: list[tuple[Path, str]] = field(default_factory=list)

    @property
    def newest(self) -> Path | None:
        return self.complete[-1][1] if self.complete else None


def scan_checkpoints(output_dir: str | Path) -> CheckpointScan:
    scan = CheckpointScan()
    root = Path(output_dir)
    if not root.is_dir():
        return scan
    for child in sorted(root.iterdir()):
        m = CHECKPOINT_RE.match(child.name)
        if not child.is_dir():
            continue
        if not m:
            log.info("skipping %s: not a checkpoint directory (checkpoint-<step>); left as it is", child)
            continue
        ok, reason = verify_directory(child)
        if ok:
            scan.complete.append((int(m.group(1)), child))
        else:
            scan.incomplete.append((child, reason))
    scan.complete.sort()
    return scan


class ResumeError(ValueError):
    pass


def resolve_resume(setting: bool | str, output_dir: str | Path, clean_incomplete: bool = True) -> Path | None:
    """The checkpoint to resume from, per run_conf.resume_from_checkpoint.

    Incomplete checkpoint directories (no valid manifest) are never resumed from; they are logged
    and removed so a new save of the same step starts clean.
    """
    scan = scan_checkpoints(output_dir)
    for path, reason in scan.incomplete:
        log.warning("ignoring incomplete checkpoint %s (%s)%s", path, reason, "; removing it" if clean_incomplete else "")
        if clean_incomplete:
            shutil.rmtree(path, ignore_errors=True)
    if setting is False or setting == "false":
        if scan.complete:
            raise ResumeError(
                f"run_conf.resume_from_checkpoint is false but {output_dir} holds complete "
                f"checkpoints (newest {scan.newest.name}); set it to auto to resume, or use a new "
                "training_args.output_dir"
            )
        return None
    if setting in (True, "true", "auto"):
        if scan.newest is not None:
            log.info("resuming from the newest complete checkpoint %s", scan.newest)
            return scan.newest
        if setting != "auto":
            raise ResumeError(
                f"run_conf.resume_from_checkpoint is true but {output_dir} has no complete "
                "checkpoint; use auto to start fresh when there is none"
            )
        log.info("no complete checkpoint in %s: starting from step 0", output_dir)
        return None
    path = Path(str(setting))
    ok, reason = verify_directory(path)
    if not ok:
        raise ResumeError(f"run_conf.resume_from_checkpoint {path} is not a complete checkpoint ({reason})")
    return path
