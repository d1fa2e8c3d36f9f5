"""Resume selection over local checkpoints, and what it logs (no torch)."""

from __future__ import annotations

import json
import logging

import pytest

from finetune_engine.checkpoints import WRITING_MARKER, ResumeError, mark_writing, resolve_resume
from finetune_engine.manifest import write_manifest


def _checkpoint(root, step, complete=True):
    """A checkpoint this engine wrote (manifest) or, with complete=False, one cut off mid-save by
    someone else (no trainer_state.json, no mark of ours)."""
    d = root / f"checkpoint-{step}"
    d.mkdir(parents=True)
    (d / "adapter_model.safetensors").write_bytes(b"w" * (step + 1))
    if complete:
        (d / "trainer_state.json").write_text(json.dumps({"global_step": step}))
        write_manifest(d, extra={"global_step": step})
    return d


def _foreign(root, step, shards=None):
    """A checkpoint written by a plain transformers Trainer (e.g. the Silogen engine): no manifest."""
    d = root / f"checkpoint-{step}"
    d.mkdir(parents=True)
    if shards is None:
        (d / "model.safetensors").write_bytes(b"w")
    else:
        (d / "model.safetensors.index.json").write_text(
            json.dumps({"weight_map": {f"w{i}": s for i, s in enumerate(shards)}})
        )
        (d / shards[0]).write_bytes(b"w")
    (d / "optimizer.pt").write_bytes(b"o")
    (d / "trainer_state.json").write_text(json.dumps({"global_step": step, "log_history": []}))
    return d


def test_auto_resumes_from_newest_complete_and_removes_only_its_own_leftovers(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="finetune_engine.checkpoints")
    _checkpoint(tmp_path, 2)
    newest = _checkpoint(tmp_path, 4)
    cut = _checkpoint(tmp_path, 6, complete=False)  # someone else's save, cut off: no trainer_state.json
    corrupt = _checkpoint(tmp_path, 8)
    (corrupt / "adapter_model.safetensors").write_bytes(b"short")  # size no longer matches its manifest
    ours = tmp_path / "checkpoint-10"
    mark_writing(ours)  # this engine began saving step 10 and was killed
    (ours / "adapter_model.safetensors").write_bytes(b"half")
    (tmp_path / "runs").mkdir()  # e.g. tensorboard logs
    (tmp_path / "checkpoint-final").mkdir()
    (tmp_path / "mlflow_run.json").write_text("{}")

    assert resolve_resume("auto", tmp_path) == newest
    text = caplog.text
    assert (
        f"ignoring incomplete checkpoint {ours} (this engine "
        "started writing it and did not finish); removing it" in text
    )
    assert f"ignoring incomplete checkpoint {cut} (no trainer_state.json" in text and "left as it is" in text
    assert f"ignoring incomplete checkpoint {corrupt} (its manifest does not match: size mismatch" in text
    assert f"skipping {tmp_path / 'runs'}: not a checkpoint directory" in text
    assert f"skipping {tmp_path / 'checkpoint-final'}: not a checkpoint directory" in text
    assert f"resuming from the newest complete checkpoint {newest}" in text
    assert not ours.exists()
    assert (
        cut.is_dir() and (corrupt / "adapter_model.safetensors").read_bytes() == b"short"
    )  # not ours to delete
    assert (tmp_path / "runs").is_dir() and (tmp_path / "checkpoint-final").is_dir()


def test_auto_resumes_from_a_checkpoint_another_trainer_wrote(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="finetune_engine.checkpoints")
    ours = _checkpoint(tmp_path, 3)
    theirs = _foreign(tmp_path, 5)
    assert resolve_resume("auto", tmp_path) == theirs
    assert resolve_resume(True, tmp_path) == theirs
    assert resolve_resume(str(theirs), tmp_path) == theirs
    # a sharded save missing a shard is not complete; the complete one before it is used, nothing is removed
    sharded = _foreign(
        tmp_path, 7, shards=["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    )
    assert resolve_resume("auto", tmp_path) == theirs
    assert (
        f"ignoring incomplete checkpoint {sharded} (missing shards ['model-00002-of-00002.safetensors'])"
        in caplog.text
    )
    (sharded / "model-00002-of-00002.safetensors").write_bytes(b"w")
    assert resolve_resume("auto", tmp_path) == sharded
    assert ours.is_dir() and theirs.is_dir() and not (theirs / WRITING_MARKER).exists()


def test_auto_without_complete_checkpoint_starts_fresh_and_says_so(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="finetune_engine.checkpoints")
    cut = _checkpoint(tmp_path, 3, complete=False)
    assert resolve_resume("auto", tmp_path) is None
    assert "ignoring incomplete checkpoint" in caplog.text and "starting from step 0" in caplog.text
    assert cut.is_dir()


def test_false_starts_fresh_beside_existing_checkpoints_and_true_needs_one(tmp_path, caplog):
    with pytest.raises(ResumeError, match="no complete checkpoint"):
        resolve_resume(True, tmp_path)
    kept = _foreign(tmp_path, 2)
    caplog.set_level(logging.WARNING, logger="finetune_engine.checkpoints")
    assert resolve_resume(False, tmp_path) is None  # the Silogen engine's default: start from step 0
    assert "training starts from step 0 although" in caplog.text and "left in place" in caplog.text
    assert kept.is_dir() and (kept / "trainer_state.json").exists()
    with pytest.raises(ResumeError, match="not a complete checkpoint .no trainer_state.json"):
        resolve_resume(str(_checkpoint(tmp_path, 5, complete=False)), tmp_path)
    with pytest.raises(ResumeError, match="no such directory"):
        resolve_resume(str(tmp_path / "checkpoint-99"), tmp_path)


class _FakeGroup:
    """torch.distributed as rank 0 of 2 nodes sees it: records the collectives, hands back node 1's
    upload."""

    def __init__(self, node1):
        self.calls: list[str] = []
        self.node1 = node1

    def get_world_size(self) -> int:
        return 2

    def barrier(self) -> None:
        self.calls.append("barrier")

    def all_gather_object(self, out, mine) -> None:
        self.calls.append("all_gather_object")
        out[:] = [mine, self.node1]


def test_manifest_callback_waits_for_every_rank_and_passes_the_nodes_files(tmp_path, monkeypatch):
    """on_save: all ranks meet at a barrier before rank 0 writes the manifest (their rng states are
    written by then); with several nodes the other nodes' uploaded files reach the upload hook."""
    from types import SimpleNamespace

    from finetune_engine import callbacks
    from finetune_engine.manifest import read_manifest

    node1 = [{"path": "rng_state_1.pth", "size": 3, "sha256": "a" * 64}]
    group = _FakeGroup(node1)
    monkeypatch.setattr(callbacks, "_process_group", lambda: group)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    ckpt = tmp_path / "checkpoint-2"
    ckpt.mkdir()
    (ckpt / "rng_state_0.pth").write_bytes(b"abc")
    seen = []
    cb = callbacks.ManifestCallback(
        [lambda c, step, **kw: seen.append((group.calls[:], c, step, kw))],
        node_upload=lambda c, step: pytest.fail("rank 0 does not upload as a node"),
    )
    state = SimpleNamespace(is_world_process_zero=True, global_step=2)
    cb.on_save(SimpleNamespace(output_dir=str(tmp_path)), state, None)
    assert seen == [(["barrier", "all_gather_object"], ckpt, 2, {"node_files": node1})]
    assert [f["path"] for f in read_manifest(ckpt)["files"]] == ["rng_state_0.pth"]  # local: own files
    # a node that could not upload: no hook, the bucket's copy stays incomplete
    group.node1, seen[:] = "node of rank 1: StorageError: down", []
    cb.on_save(SimpleNamespace(output_dir=str(tmp_path)), state, None)
    assert seen == []


@pytest.mark.slow
def test_two_processes_checkpoint_manifest_lists_every_ranks_rng_state(tiny_model_dir, chat_data, tmp_path):
    """torchrun, 2 CPU processes (gloo): each save's manifest is written after both ranks wrote their
    files, so it lists rng_state_0.pth and rng_state_1.pth with their final sizes."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    import yaml

    from finetune_engine.manifest import read_manifest, verify_directory

    cfg = {
        "data_conf": {
            "training_data": {"type": "CONCATENATION", "datasets": [{"path": str(chat_data)}]},
            "validation_data": {"type": "NONE"},
            "chat_template_name": "keep-original",
        },
        "training_args": {
            "output_dir": str(tmp_path / "out"),
            "max_steps": 2,
            "save_steps": 1,
            "logging_steps": 1,
        },
        "batchsize_conf": {"total_train_batch_size": 4, "max_per_device_train_batch_size": 2},
        "run_conf": {"model": str(tiny_model_dir)},
        "sft_args": {"max_seq_length": 64},
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    proc = subprocess.run(
        [
            str(Path(sys.executable).parent / "torchrun"),
            "--standalone",
            "--nproc-per-node=2",
            "-m",
            "finetune_engine.cli.main",
            "finetuning",
            "sft",
            str(path),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"},
        cwd=tmp_path,
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    for step in (1, 2):
        ckpt = tmp_path / "out" / f"checkpoint-{step}"
        listed = {f["path"] for f in read_manifest(ckpt)["files"]}
        assert {"rng_state_0.pth", "rng_state_1.pth", "trainer_state.json"} <= listed, listed
        assert verify_directory(ckpt, check_hashes=True) == (True, "complete")
