"""Resume selection over local checkpoints, and what it logs (no torch)."""

from __future__ import annotations

import logging

import pytest

from finetune_engine.checkpoints import ResumeError, resolve_resume
from finetune_engine.manifest import MANIFEST_NAME, write_manifest


def _checkpoint(root, step, complete=True):
    d = root / f"checkpoint-{step}"
    d.mkdir(parents=True)
    (d / "adapter_model.safetensors").write_bytes(b"w" * (step + 1))
    if complete:
        write_manifest(d, extra={"global_step": step})
    return d


def test_auto_resumes_from_newest_complete_and_logs_what_it_ignores(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="finetune_engine.checkpoints")
    _checkpoint(tmp_path, 2)
    newest = _checkpoint(tmp_path, 4)
    cut = _checkpoint(tmp_path, 6, complete=False)  # killed mid-save: no manifest
    corrupt = _checkpoint(tmp_path, 8)
    (corrupt / "adapter_model.safetensors").write_bytes(b"short")  # size no longer matches its manifest
    (tmp_path / "runs").mkdir()  # e.g. tensorboard logs
    (tmp_path / "checkpoint-final").mkdir()
    (tmp_path / "mlflow_run.json").write_text("{}")

    assert resolve_resume("auto", tmp_path) == newest
    text = caplog.text
    assert f"ignoring incomplete checkpoint {cut} (no valid {MANIFEST_NAME}); removing it" in text
    assert f"ignoring incomplete checkpoint {corrupt} (size mismatch for adapter_model.safetensors); removing it" in text
    assert f"skipping {tmp_path / 'runs'}: not a checkpoint directory" in text
    assert f"skipping {tmp_path / 'checkpoint-final'}: not a checkpoint directory" in text
    assert f"resuming from the newest complete checkpoint {newest}" in text
    assert not cut.exists() and not corrupt.exists()
    assert (tmp_path / "runs").is_dir() and (tmp_path / "checkpoint-final").is_dir()  # others' dirs untouched


def test_auto_without_complete_checkpoint_starts_fresh_and_says_so(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="finetune_engine.checkpoints")
    _checkpoint(tmp_path, 3, complete=False)
    assert resolve_resume("auto", tmp_path) is None
    assert "ignoring incomplete checkpoint" in caplog.text and "starting from step 0" in caplog.text


def test_true_and_false_refuse_silent_restarts(tmp_path):
    with pytest.raises(ResumeError, match="no complete checkpoint"):
        resolve_resume(True, tmp_path)
    _checkpoint(tmp_path, 2)
    with pytest.raises(ResumeError, match="holds complete checkpoints"):
        resolve_resume(False, tmp_path)
    with pytest.raises(ResumeError, match="not a complete checkpoint"):
        resolve_resume(str(_checkpoint(tmp_path, 5, complete=False)), tmp_path)
