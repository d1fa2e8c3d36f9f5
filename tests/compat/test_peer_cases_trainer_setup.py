"""The Silogen engine's tests/test_trainer_setup.py, case by case: run_conf.resume_from_checkpoint
auto (the peer's handle_checkpoint_resume; here finetune_engine.checkpoints.resolve_resume, on real
directories instead of a mocked get_last_checkpoint)."""

from __future__ import annotations

import json

from finetune_engine.checkpoints import resolve_resume


def test_auto_resume_no_checkpoints(tmp_path):
    """Restates test_trainer_setup.py::test_auto_resume_no_checkpoints: auto with no checkpoint in
    the output directory starts fresh (nothing to resume from)."""
    resume = resolve_resume("auto", tmp_path / "direct")
    assert not resume


def test_auto_resume_ckpt_exits(tmp_path):
    """Restates test_trainer_setup.py::test_auto_resume_ckpt_exits: auto resumes from the last
    checkpoint the Trainer finds. The checkpoint here is one the Silogen engine wrote (a Trainer
    checkpoint, no files of this engine); it must be resumed from, and left in place."""
    import torch
    from safetensors.torch import save_file

    ckpt = tmp_path / "checkpoint-5"
    ckpt.mkdir()
    (ckpt / "trainer_state.json").write_text(json.dumps({"global_step": 5, "log_history": []}))
    (ckpt / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 8}))
    save_file(
        {"base_model.model.lm_head.lora_A.weight": torch.zeros(8, 4)}, str(ckpt / "adapter_model.safetensors")
    )
    for name in ("optimizer.pt", "scheduler.pt", "rng_state.pth", "training_args.bin"):
        torch.save({}, ckpt / name)
    resume = resolve_resume("auto", tmp_path)
    assert resume is not None and str(resume) == str(ckpt)
    assert (ckpt / "trainer_state.json").is_file()
