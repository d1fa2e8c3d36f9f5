"""run_conf.determinism: full gives bit-identical losses across runs (and turns deterministic kernels
on), half is seeded (identical on the CPU, kernels untouched), and a different seed differs."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from finetune_engine.cli.finetuning import main as finetuning
from tests.engine.conftest import make_config

ENV = ("CUDA_LAUNCH_BLOCKING", "CUBLAS_WORKSPACE_CONFIG", "FLASH_ATTENTION_DETERMINISTIC")


@pytest.fixture()
def restore_determinism(monkeypatch):
    """full sets process-wide switches; put them back for the tests that run after this one."""
    for var in ENV:
        if var in os.environ:
            monkeypatch.setenv(var, os.environ[var])
        else:
            monkeypatch.setenv(var, "x")
            monkeypatch.delenv(var)  # recorded as absent: removed again at teardown
    was = torch.are_deterministic_algorithms_enabled()
    cudnn = (torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
    yield
    torch.use_deterministic_algorithms(was)
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = cudnn


def _losses(
    tmp_path: Path, name: str, model: Path, data: Path, determinism: str, seed: int = 42
) -> list[tuple[float, float]]:
    work = tmp_path / name
    work.mkdir()
    config = make_config(
        work,
        model,
        data,
        run_conf={"model": str(model), "determinism": determinism},
        peft_conf={
            "peft_type": "LORA",
            "peft_kwargs": {"r": 8, "lora_alpha": 16, "lora_dropout": 0.1, "target_modules": "all-linear"},
        },
        training_args={
            "output_dir": str(work / "out"),
            "max_steps": 4,
            "save_steps": 4,
            "learning_rate": 0.003,
            "seed": seed,
        },
        sft_args={"max_seq_length": 128, "packing": True},
    )
    assert finetuning(["sft", str(config), "--num-preprocess-workers", "1"]) == 0
    state = json.loads((work / "out" / "checkpoint-4" / "trainer_state.json").read_text())
    out = [(e["loss"], e["grad_norm"]) for e in state["log_history"] if "loss" in e]
    assert len(out) == 4
    return out


def test_full_determinism_identical_losses(tiny_model, chat_data, tmp_path, restore_determinism):
    first = _losses(tmp_path, "a", tiny_model, chat_data, "full")
    assert torch.are_deterministic_algorithms_enabled() and os.environ.get("CUBLAS_WORKSPACE_CONFIG") in (
        ":16:8",
        ":4096:8",
    )
    second = _losses(tmp_path, "b", tiny_model, chat_data, "full")
    assert first == second  # exact, not approximately
    other_seed = _losses(tmp_path, "c", tiny_model, chat_data, "full", seed=7)
    assert other_seed != first, "a different seed must change the run (else the comparison proves nothing)"


def test_half_is_seeded_without_deterministic_kernels(tiny_model, chat_data, tmp_path, restore_determinism):
    torch.use_deterministic_algorithms(False)
    first = _losses(tmp_path, "a", tiny_model, chat_data, "half")
    assert not torch.are_deterministic_algorithms_enabled()
    assert _losses(tmp_path, "b", tiny_model, chat_data, "half") == first
