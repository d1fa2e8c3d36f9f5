"""Engine fixtures: the tiny model (built once per session) and small chat datasets."""

from __future__ import annotations

from pathlib import Path

import yaml


def make_config(tmp_path: Path, model: Path, data: Path, **sections) -> Path:
    """Write a small SFT config; ``sections`` replace/extend top-level sections."""
    cfg = {
        "data_conf": {
            "training_data": {"type": "CONCATENATION", "datasets": [{"path": str(data)}]},
            "validation_data": {"type": "AUTO_SPLIT", "ratio": 0.1, "seed": 1},
            "chat_template_name": "chat-ml",
        },
        "training_args": {
            "output_dir": str(tmp_path / "out"),
            "learning_rate": 0.003,
            "max_steps": 6,
            "logging_steps": 1,
            "save_steps": 3,
            "lr_scheduler_type": "constant",
        },
        "batchsize_conf": {"total_train_batch_size": 8, "max_per_device_train_batch_size": 4},
        # merged outputs and auto resume, as this project's operators ask for them; the engine's own
        # defaults (the Silogen engine's: no merge, resume false) are tested in test_silogen_layout.py
        "run_conf": {
            "model": str(model),
            "determinism": "half",
            "merge_adapter": True,
            "resume_from_checkpoint": "auto",
        },
        "sft_args": {"max_seq_length": 128},
    }
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(cfg.get(key), dict):
            cfg[key] = {**cfg[key], **value}
        else:
            cfg[key] = value
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path
