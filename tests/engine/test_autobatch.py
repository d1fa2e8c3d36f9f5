"""Auto batch size: the probe (doubling, binary search, OOM recognition, freeing between tries) under
a simulated memory limit, a real run with max_per_device_train_batch_size auto/-1, and the
learning-rate scaling reaching the trainer."""

from __future__ import annotations

import json
import logging

import pytest
import torch

from finetune_engine.autobatch import BatchTooLargeError, find_max_batch, is_out_of_memory, training_trial
from finetune_engine.cli.finetuning import main as finetuning
from finetune_engine.config import ConfigError, parse_config
from tests.engine.conftest import make_config


def _limited(
    limit: int, error=lambda: torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
):
    calls: list[int] = []

    def try_batch(size: int) -> None:
        calls.append(size)
        if size > limit:
            raise error()

    return try_batch, calls


@pytest.mark.parametrize("limit,upper", [(1, 64), (5, 64), (8, 64), (13, 16), (64, 64), (100, 24), (3, 3)])
def test_largest_fitting_batch_is_found(limit, upper):
    try_batch, calls = _limited(limit)
    released = []
    found, tried = find_max_batch(try_batch, upper, release=lambda: released.append(1))
    assert found == min(limit, upper)
    assert len(released) == len(calls) == len(tried)  # memory freed after every try
    assert max(calls) <= upper
    assert all(ok == (size <= limit) for size, ok in tried)


def test_doubling_then_binary_search_order():
    try_batch, calls = _limited(5)
    found, _ = find_max_batch(try_batch, 64, release=lambda: None)
    assert found == 5 and calls == [1, 2, 4, 8, 6, 5]


def test_oom_kinds_recognised_and_other_errors_propagate():
    assert is_out_of_memory(torch.OutOfMemoryError("x"))
    assert is_out_of_memory(RuntimeError("HIP out of memory. Tried to allocate 20.00 MiB"))
    assert is_out_of_memory(
        RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory")
    )
    assert not is_out_of_memory(RuntimeError("shape mismatch"))
    try_batch, _ = _limited(
        4, error=lambda: RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling cublasCreate")
    )
    assert find_max_batch(try_batch, 16, release=lambda: None)[0] == 4
    try_batch, _ = _limited(2, error=lambda: ValueError("a bug, not memory"))
    with pytest.raises(ValueError, match="a bug"):
        find_max_batch(try_batch, 16, release=lambda: None)


def test_not_even_one_row_fits_says_what_to_change():
    try_batch, _ = _limited(0)
    with pytest.raises(BatchTooLargeError, match="gradient_checkpointing"):
        find_max_batch(try_batch, 8, release=lambda: None)


def test_trial_runs_forward_backward_and_leaves_no_gradients(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    from finetune_engine.data.collate import PaddingCollator

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    seen = []
    model.register_forward_pre_hook(
        lambda m, args, kwargs: seen.append(kwargs["input_ids"].shape), with_kwargs=True
    )
    row = {"input_ids": list(range(5, 45)), "labels": list(range(5, 45))}
    training_trial(model, row, PaddingCollator(0), {})(3)
    assert seen == [torch.Size([3, 40])]
    assert all(p.grad is None for p in model.parameters())


def test_schema_auto_spellings_and_limits():
    base = {
        "data_conf": {"training_data": {"type": "CONCATENATION", "datasets": [{"path": "d.jsonl"}]}},
        "run_conf": {"model": "m", "preset": "none"},
    }
    for value in ("auto", -1):
        cfg = parse_config(
            {
                **base,
                "batchsize_conf": {"total_train_batch_size": 8, "max_per_device_train_batch_size": value},
            }
        )
        assert cfg.batchsize_conf.max_per_device_train_batch_size == "auto"
    with pytest.raises(ConfigError, match="must be a positive integer, auto or -1"):
        parse_config(
            {**base, "batchsize_conf": {"total_train_batch_size": 8, "max_per_device_train_batch_size": 0}}
        )
    with pytest.raises(ConfigError, match="auto is supported by sft only"):
        parse_config(
            {
                **base,
                "batchsize_conf": {"total_train_batch_size": 8, "max_per_device_train_batch_size": "auto"},
            },
            method="dpo",
        )


def test_auto_batch_run_under_a_simulated_memory_limit(tiny_model, chat_data, tmp_path, monkeypatch, caplog):
    """A model that 'runs out of memory' above 3 rows: the probe finds 3, the plan takes the
    largest divisor of 8 that fits (2) with 4 accumulation steps, and training never exceeds it."""
    import finetune_engine.modeling as modeling

    limit = 3
    batches: list[int] = []
    real_load = modeling.load_model

    def load_with_limit(*args, **kwargs):
        model = real_load(*args, **kwargs)

        def hook(module, args, kwargs):
            rows = kwargs["input_ids"].shape[0]
            batches.append(rows)
            if rows > limit:
                raise torch.OutOfMemoryError(f"CUDA out of memory (simulated: {rows} rows > {limit})")

        model.register_forward_pre_hook(hook, with_kwargs=True)
        return model

    monkeypatch.setattr(modeling, "load_model", load_with_limit)
    caplog.set_level(logging.INFO)
    config = make_config(
        tmp_path,
        tiny_model,
        chat_data,
        batchsize_conf={"total_train_batch_size": 8, "max_per_device_train_batch_size": -1},
        training_args={"output_dir": str(tmp_path / "out"), "max_steps": 2, "learning_rate": 0.003},
    )
    result_file = tmp_path / "result.json"
    assert (
        finetuning(["sft", str(config), "--result-file", str(result_file), "--num-preprocess-workers", "1"])
        == 0
    )
    result = json.loads(result_file.read_text())
    assert (result["per_device_train_batch_size"], result["gradient_accumulation_steps"]) == (2, 4)
    assert result["global_step"] == 2
    assert "batch: 1 process(es) x 2 per device x 4 accumulation = 8 (auto: 3 fit per device)" in caplog.text
    probe, training = batches[:4], batches[4:]
    assert probe == [1, 2, 4, 3]  # doubling to the first failure, then the search between 2 and 4
    assert len(training) >= 2 * 4 and max(training) == 2  # train (and eval) batches stay at the plan


def test_scaled_learning_rate_reaches_the_trainer(tiny_model, chat_data, tmp_path):
    config = make_config(
        tmp_path,
        tiny_model,
        chat_data,
        overrides={"lr_batch_size_scaling": "linear", "reference_batch_size": 2, "lr_multiplier": 0.5},
        training_args={
            "output_dir": str(tmp_path / "out"),
            "max_steps": 2,
            "save_steps": 2,
            "learning_rate": 0.003,
            "lr_scheduler_type": "constant",
        },
    )
    result_file = tmp_path / "result.json"
    assert (
        finetuning(["sft", str(config), "--result-file", str(result_file), "--num-preprocess-workers", "1"])
        == 0
    )
    expected = 0.003 * 0.5 * (8 / 2)
    state = json.loads((tmp_path / "out" / "checkpoint-2" / "trainer_state.json").read_text())
    logged = [e["learning_rate"] for e in state["log_history"] if "learning_rate" in e]
    assert len(logged) == 2 and all(abs(lr - expected) < 1e-12 for lr in logged), logged
    assert abs(json.loads(result_file.read_text())["learning_rate"] - expected) < 1e-12
