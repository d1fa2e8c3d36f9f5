"""Local checkpoints: which are complete, where to resume, cleaning up what an interruption left.

A checkpoint directory (checkpoint-<step>) is complete when
- this engine wrote it and its manifest matches (the manifest is written after the Trainer's
  save), or
- it has no manifest of ours (written by the Silogen engine or any transformers Trainer) and holds
  what the Trainer needs to resume: trainer_state.json (the Trainer writes it last) and the model or
  adapter weights (every shard an index names).

This engine marks a checkpoint as being written before the Trainer saves it (``WRITING_MARKER``)
and removes the mark when the manifest is written, so a directory it started and never finished
is known to be its own: only those are removed. Anything else is left where it is.

No torch here: the train job and the storage layer use it too.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from finetune_engine.manifest import MANIFEST_NAME, verify_directory

log = logging.getLogger(__name__)
CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
WRITING_MARKER = "_finetune_writing"
TRAINER_STATE = "trainer_state.json"
_WEIGHTS = ("model.safetensors", "pytorch_model.bin", "adapter_model.safetensors", "adapter_model.bin")
_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")


@dataclass
class CheckpointScan:
    complete: list[tuple[int, Path]] = field(default_factory=list)  # ascending by step
    own_incomplete: list[tuple[Path, str]] = field(default_factory=list)  # this engine started them
    unusable: list[tuple[Path, str]] = field(default_factory=list)  # not resumable; left in place

    @property
    def newest(self) -> Path | None:
        return self.complete[-1][1] if self.complete else None

    @property
    def incomplete(self) -> list[tuple[Path, str]]:
        return self.own_incomplete + self.unusable


def trainer_complete(path: Path) -> tuple[bool, str]:
    """Whether a checkpoint without our manifest holds what the Trainer needs to resume from it."""
    state = path / TRAINER_STATE
    try:
        data = json.loads(state.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return False, f"no {TRAINER_STATE} (the Trainer writes it last: the save was cut off)"
    except (OSError, ValueError) as err:
        return False, f"unreadable {TRAINER_STATE} ({err.__class__.__name__})"
    if not isinstance(data, dict) or not isinstance(data.get("global_step"), int):
        return False, f"{TRAINER_STATE} has no global_step"
    if any((path / name).is_file() for name in _WEIGHTS):
        return True, "complete (trainer_state.json and weights)"
    for name in _INDEXES:
        index = path / name
        if index.is_file():
            try:
                shards = set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values())
            except (OSError, ValueError, KeyError, AttributeError):
                return False, f"unreadable {name}"
            missing = sorted(s for s in shards if not (path / s).is_file())
            return (
                (False, f"missing shards {missing[:3]}") if missing else (True, "complete (sharded weights)")
            )
    children = [c for c in path.iterdir() if c.is_dir()]
    if any("pytorch_model_fsdp" in c.name for c in children) or (path / "pytorch_model_fsdp.bin").is_file():
        return True, "complete (FSDP state)"
    if any(c.name.startswith("global_step") for c in children):
        return True, "complete (DeepSpeed state)"
    if any(
        (c / "adapter_model.safetensors").is_file() or (c / "adapter_model.bin").is_file() for c in children
    ):
        return True, "complete (adapters in subdirectories)"
    return False, "no model or adapter weights"


def classify(path: Path) -> tuple[str, str]:
    """('complete' | 'own_incomplete' | 'unusable', reason) of one checkpoint directory."""
    path = Path(path)
    if (path / WRITING_MARKER).exists():
        return "own_incomplete", "this engine started writing it and did not finish"
    if (path / MANIFEST_NAME).exists():
        ok, reason = verify_directory(path)
        return ("complete", reason) if ok else ("unusable", f"its manifest does not match: {reason}")
    ok, reason = trainer_complete(path)
    return ("complete" if ok else "unusable"), reason


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
        kind, reason = classify(child)
        if kind == "complete":
            scan.complete.append((int(m.group(1)), child))
        else:
            getattr(scan, kind).append((child, reason))
    scan.complete.sort()
    return scan


def mark_writing(ckpt: Path) -> None:
    """Before the Trainer saves into ``ckpt``: mark it as this engine's, unfinished; an earlier
    manifest of ours there no longer describes it."""
    ckpt.mkdir(parents=True, exist_ok=True)
    (ckpt / MANIFEST_NAME).unlink(missing_ok=True)
    (ckpt / WRITING_MARKER).write_text("")


def clear_writing(ckpt: Path) -> None:
    (Path(ckpt) / WRITING_MARKER).unlink(missing_ok=True)


class ResumeError(ValueError):
    pass


def resolve_resume(setting: bool | str, output_dir: str | Path, clean_incomplete: bool = True) -> Path | None:
    """The checkpoint to resume from, per run_conf.resume_from_checkpoint.

    Incomplete checkpoints are never resumed from. Those this engine started writing are logged and
    removed (so a new save of the same step starts clean); others are logged and left in place.
    """
    scan = scan_checkpoints(output_dir)
    for path, reason in scan.own_incomplete:
        log.warning(
            "ignoring incomplete checkpoint %s (%s)%s",
            path,
            reason,
            "; removing it" if clean_incomplete else "",
        )
        if clean_incomplete:
            shutil.rmtree(path, ignore_errors=True)
    for path, reason in scan.unusable:
        log.warning(
            "ignoring incomplete checkpoint %s (%s); not written by this engine or damaged: left as it is",
            path,
            reason,
        )
    if setting is False or setting == "false":
        if scan.complete:
            log.warning(
                "run_conf.resume_from_checkpoint is false: training starts from step 0 although %s holds %d "
                "complete checkpoint(s) (newest %s). They are left in place; new checkpoints of the same "
                "step overwrite them and training_args.save_total_limit rotation counts them. Set auto to "
                "resume, or use a new training_args.output_dir to keep runs apart.",
                output_dir,
                len(scan.complete),
                scan.newest.name,
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
    if not path.is_dir():
        raise ResumeError(
            f"run_conf.resume_from_checkpoint {path} is not a complete checkpoint (no such directory)"
        )
    kind, reason = classify(path)
    if kind != "complete":
        raise ResumeError(f"run_conf.resume_from_checkpoint {path} is not a complete checkpoint ({reason})")
    return path
