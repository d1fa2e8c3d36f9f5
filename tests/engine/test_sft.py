"""SFT on the tiny model, for real: weights move, outputs load, resume after a kill, MLflow."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from finetune_engine.checkpoints import mark_writing
from finetune_engine.cli.finetuning import main as finetuning
from tests.engine.conftest import make_config

# Every key of an SFT run's result.json (the train job and the Airflow operators read them).
RESULT_KEYS = {
    "status",
    "method",
    "global_step",
    "planned_steps",
    "final_train_loss",
    "train_loss",
    "final_eval_loss",
    "tokens_seen",
    "train_seconds",
    "num_train_examples",
    "num_eval_examples",
    "filtered_examples",
    "truncated_examples",
    "per_device_train_batch_size",
    "gradient_accumulation_steps",
    "learning_rate",
    "text_data",
    "resumed_from",
    "output_dir",
    "final_checkpoint",
    "final_adapter",
    "grown_base",
    "mlflow_run_id",
    "mlflow_tracking_uri",
    "versions",
}


def _run(config: Path, *extra: str) -> dict:
    result = config.parent / "result.json"
    assert (
        finetuning(
            ["sft", str(config), "--result-file", str(result), "--num-preprocess-workers", "1", *extra]
        )
        == 0
    )
    return json.loads(result.read_text())


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path / "model.safetensors"))


def _assert_inference_tokenizer(model_dir: Path, end_marker: str):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    ids = tok("hello there")["input_ids"]
    assert ids[0] == tok.bos_token_id, "inference tokenizer must add BOS"
    assert ids[-1] != tok.convert_tokens_to_ids(end_marker), "inference tokenizer must not add EOS"
    assert tok.eos_token == end_marker


def _assert_generates(model_dir: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    enc = tok.apply_chat_template(
        [{"role": "user", "content": "What is 1 plus 2?"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    out = model.generate(**enc, max_new_tokens=8, do_sample=False)
    assert out.shape[1] > enc["input_ids"].shape[1]


@pytest.mark.parametrize(
    "peft,packing,completions_only",
    [
        ("lora", True, True),
        ("lora", False, False),
        ("full", True, False),
        ("full", False, True),
    ],
)
def test_sft_trains_and_saves(tiny_model, chat_data, tmp_path, peft, packing, completions_only):
    sections = {
        "sft_args": {"max_seq_length": 128, "packing": packing, "train_on_completions_only": completions_only}
    }
    if peft == "lora":
        sections["peft_conf"] = {
            "peft_type": "LORA",
            "peft_kwargs": {"r": 8, "lora_alpha": 16, "target_modules": "all-linear"},
        }
    config = make_config(tmp_path, tiny_model, chat_data, **sections)
    before = _weights(tiny_model)
    result = _run(config)

    assert result["status"] == "completed" and result["method"] == "sft"
    assert set(result) == RESULT_KEYS and set(result["versions"]) == {"transformers", "torch"}
    assert result["global_step"] == result["planned_steps"] == 6
    assert all(
        x is not None and x == x and x < 20 for x in (result["final_train_loss"], result["final_eval_loss"])
    )
    assert result["tokens_seen"] > 0
    final = Path(result["final_checkpoint"])
    after = _weights(final)
    # chat-ml added two tokens: the vocabulary grew, and the old rows moved (trained).
    emb = "model.embed_tokens.weight"
    assert after[emb].shape[0] == before[emb].shape[0] + 2
    moved = [
        k
        for k in before
        if k in after and before[k].shape == after[k].shape and not torch.equal(before[k], after[k])
    ]
    assert any("layers.0.self_attn.q_proj" in k for k in moved), "attention weights did not move"
    assert (final / "_finetune_manifest.json").exists()
    if peft == "lora":
        adapter = Path(result["final_adapter"])
        assert (adapter / "adapter_model.safetensors").exists() and (
            adapter / "_finetune_manifest.json"
        ).exists()
        meta = json.loads((adapter / "finetune_meta.json").read_text())
        assert meta["trained_embeddings"] and meta["added_tokens"] == ["<|im_start|>", "<|im_end|>"]
        assert not any(k.startswith("base_model") for k in after), "merged model must be plain weights"
        grown = _weights(Path(result["grown_base"]))
        assert grown[emb].shape == after[emb].shape  # the base the adapter belongs to
        assert torch.equal(
            grown[emb][: before[emb].shape[0]], before[emb]
        )  # old rows untouched before training
        _assert_inference_tokenizer(Path(result["grown_base"]), "<|im_end|>")
    else:
        assert result["final_adapter"] is None
    _assert_inference_tokenizer(final, "<|im_end|>")
    # as in the Silogen engine, every tokenizer save writes the inference settings: checkpoints too
    checkpoints = sorted((tmp_path / "out").glob("checkpoint-*"))
    assert checkpoints, "save_steps 3 of 6 should have left checkpoints"
    for checkpoint in checkpoints:
        _assert_inference_tokenizer(checkpoint, "<|im_end|>")
    _assert_generates(final)


def test_finished_run_is_not_retrained(tiny_model, chat_data, tmp_path):
    config = make_config(tmp_path, tiny_model, chat_data)
    first = _run(config)
    stamp = (Path(first["final_checkpoint"]) / "model.safetensors").stat().st_mtime_ns
    second = _run(config)
    assert second["status"] == "skipped" and second["global_step"] == first["global_step"]
    assert (Path(first["final_checkpoint"]) / "model.safetensors").stat().st_mtime_ns == stamp


def test_dora_rslora_and_set_overrides(tiny_model, chat_data, tmp_path):
    config = make_config(
        tmp_path,
        tiny_model,
        chat_data,
        data_conf={
            "training_data": {"type": "CONCATENATION", "datasets": [{"path": str(chat_data)}]},
            "validation_data": {"type": "NONE"},
            "chat_template_name": "keep-original",
        },
        peft_conf={"peft_type": "LORA", "peft_kwargs": {"r": 4, "target_modules": ["q_proj", "v_proj"]}},
    )
    result = _run(
        config,
        "--set",
        "peft_conf.peft_kwargs.use_dora=true",
        "--set",
        "peft_conf.peft_kwargs.use_rslora=true",
        "--set",
        "peft_conf.peft_kwargs.r=12",
        "--set",
        "training_args.max_steps=2",
    )
    assert result["global_step"] == 2 and result["final_eval_loss"] is None
    adapter_cfg = json.loads((Path(result["final_adapter"]) / "adapter_config.json").read_text())
    assert adapter_cfg["use_dora"] and adapter_cfg["use_rslora"] and adapter_cfg["r"] == 12
    assert sorted(adapter_cfg["target_modules"]) == ["q_proj", "v_proj"]
    # keep-original added no tokens: no embedding copies in the adapter
    assert (
        json.loads((Path(result["final_adapter"]) / "finetune_meta.json").read_text())["added_tokens"] == []
    )


def test_qlora_4bit_on_cpu(tiny_model, chat_data, tmp_path):
    config = make_config(
        tmp_path,
        tiny_model,
        chat_data,
        peft_conf={"peft_type": "LORA", "peft_kwargs": {"r": 8, "target_modules": "all-linear"}},
        quant_conf={
            "quantization_type": "bits-and-bytes",
            "load_in_4bit": True,
            "bnb_4bit_compute_dtype": "float32",
        },
        training_args={
            "output_dir": str(tmp_path / "out"),
            "max_steps": 3,
            "save_steps": 10,
            "learning_rate": 0.003,
        },
    )
    result = _run(config)
    assert result["global_step"] == 3
    merged = _weights(Path(result["final_checkpoint"]))
    # merged into a dequantized base: plain float weights, no 4-bit leftovers
    assert all(t.dtype in (torch.float32, torch.bfloat16) for t in merged.values())
    assert not any("absmax" in k or "quant" in k for k in merged)
    assert json.loads((Path(result["final_adapter"]) / "finetune_meta.json").read_text())["quantized"] is True


def test_resume_after_kill_uses_last_complete_checkpoint(tiny_model, chat_data, tmp_path):
    out = tmp_path / "out"
    config = make_config(
        tmp_path,
        tiny_model,
        chat_data,
        training_args={
            "output_dir": str(out),
            "max_steps": 60,
            "save_steps": 5,
            "logging_steps": 5,
            "learning_rate": 0.001,
        },
        batchsize_conf={"total_train_batch_size": 2, "max_per_device_train_batch_size": 2},
    )
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "finetune_engine.cli.finetuning",
            "sft",
            str(config),
            "--num-preprocess-workers",
            "1",
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and not (out / "checkpoint-10" / "_finetune_manifest.json").exists():
        assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    proc.stderr.close()
    assert not (out / "checkpoint-final").exists()
    # Whatever the kill interrupted, plus a planted half-written checkpoint, must not be resumed from.
    fake = out / "checkpoint-9999"  # not this engine's (no mark of ours): left in place
    fake.mkdir()
    (fake / "model.safetensors").write_bytes(b"partial")
    ours = out / "checkpoint-9998"  # one this engine started writing and never finished: removed
    mark_writing(ours)
    (ours / "model.safetensors").write_bytes(b"partial")
    complete = sorted(
        int(p.parent.name.split("-")[1]) for p in out.glob("checkpoint-*/_finetune_manifest.json")
    )
    result = _run(config)
    assert result["resumed_from"] == f"checkpoint-{complete[-1]}"
    assert result["global_step"] == 60
    assert (fake / "model.safetensors").read_bytes() == b"partial" and not ours.exists()


def test_mlflow_run_has_params_metrics_and_loss_curve(tiny_model, chat_data, tmp_path, monkeypatch):
    monkeypatch.delenv("DISABLE_MLFLOW_INTEGRATION", raising=False)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    config = make_config(tmp_path, tiny_model, chat_data, tracking={"experiment_name": "from-config"})
    result = _run(config, "--mlflow-server-uri", uri, "--experiment-name", "from-cli")
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=uri)
    run = client.get_run(result["mlflow_run_id"])
    assert client.get_experiment(run.info.experiment_id).name == "from-cli"  # CLI beats config
    assert run.data.params["batchsize_conf.total_train_batch_size"] == "8"
    assert run.data.params["data_conf.chat_template_name"] == "chat-ml"
    losses = client.get_metric_history(run.info.run_id, "loss")
    assert [m.step for m in losses] == list(range(1, 7))
    assert abs(run.data.metrics["eval_loss"] - result["final_eval_loss"]) < 1e-6
    assert run.info.status == "FINISHED"


def test_tracking_disabled_cleanly_when_not_configured(tiny_model, chat_data, tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("DISABLE_MLFLOW_INTEGRATION", raising=False)
    result = _run(
        make_config(
            tmp_path, tiny_model, chat_data, training_args={"output_dir": str(tmp_path / "o"), "max_steps": 1}
        )
    )
    assert result["mlflow_run_id"] is None and not (tmp_path / "o" / "mlflow_run.json").exists()


def test_filtering_everything_names_max_seq_length(tiny_model, chat_data, tmp_path, caplog):
    config = make_config(tmp_path, tiny_model, chat_data, sft_args={"max_seq_length": 12})
    assert finetuning(["sft", str(config)]) == 2
    assert "raise sft_args.max_seq_length (now 12)" in caplog.text
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_auto_split_that_leaves_nothing_to_train_stops_before_the_model_loads(
    tiny_model, tmp_path, caplog, monkeypatch
):
    import finetune_engine.modeling

    def no_model(*args, **kwargs):
        raise AssertionError("the model must not load")

    monkeypatch.setattr(finetune_engine.modeling, "load_model", no_model)
    data = tmp_path / "one.jsonl"
    data.write_text(
        json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]})
        + "\n"
    )
    config = make_config(
        tmp_path, tiny_model, data, data_conf={"validation_data": {"type": "AUTO_SPLIT", "ratio": 0.5}}
    )
    assert finetuning(["sft", str(config)]) == 2
    assert "data_conf.validation_data: AUTO_SPLIT with ratio 0.5" in caplog.text
    assert "lower data_conf.validation_data.ratio" in caplog.text
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_progress_and_memory_lines_logged(tiny_model, chat_data, tmp_path, caplog):
    import logging

    caplog.set_level(logging.INFO)
    _run(make_config(tmp_path, tiny_model, chat_data))
    text = caplog.text
    assert "memory at start: rss" in text
    assert "step 6/6 (100%)" in text and "eta" in text
    assert "batch: 1 process(es) x 4 per device x 2 accumulation = 8" in text


def test_real_mlflow_server_gets_run_and_checkpoint_artifacts(
    tiny_model, chat_data, tmp_path, monkeypatch, mlflow_server
):
    monkeypatch.delenv("DISABLE_MLFLOW_INTEGRATION", raising=False)
    config = make_config(tmp_path, tiny_model, chat_data)
    result = _run(
        config,
        "--mlflow-server-uri",
        mlflow_server,
        "--experiment-name",
        "server-test",
        "--hf-mlflow-log-artifacts",
        "true",
    )
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=mlflow_server)
    run = client.get_run(result["mlflow_run_id"])
    assert run.info.status == "FINISHED" and "loss" in run.data.metrics
    assert result["mlflow_tracking_uri"] == mlflow_server
    names = {a.path for a in client.list_artifacts(run.info.run_id, "checkpoints")}
    assert {"checkpoints/checkpoint-3", "checkpoints/checkpoint-6"} <= names


def test_mlflow_unreachable_never_stops_training(tiny_model, chat_data, tmp_path, monkeypatch, caplog):
    import logging

    from tests.conftest import free_port

    monkeypatch.delenv("DISABLE_MLFLOW_INTEGRATION", raising=False)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    caplog.set_level(logging.WARNING)
    result = _run(
        make_config(tmp_path, tiny_model, chat_data), "--mlflow-server-uri", f"http://127.0.0.1:{free_port()}"
    )
    assert result["status"] == "completed" and result["global_step"] == 6
    assert result["mlflow_run_id"] is None
    assert "training continues" in caplog.text


def test_tracking_one_source_wins_whole_cli_then_config_then_env():
    """As the Silogen engine: --mlflow-server-uri takes all settings from the command line, else a
    tracking section with a URI takes all from the config, else the environment; never key by key."""
    from finetune_engine.config.schema import Tracking
    from finetune_engine.tracking import resolve_tracking

    env = {
        "MLFLOW_TRACKING_URI": "file:///env",
        "MLFLOW_EXPERIMENT_NAME": "env-exp",
        "HF_MLFLOW_LOG_ARTIFACTS": "TRUE",
    }
    s = resolve_tracking(Tracking(), env=env)
    assert (s.uri, s.experiment, s.log_artifacts) == ("file:///env", "env-exp", True)
    cfg = Tracking(mlflow_server_uri="http://config", experiment_name="cfg-exp")
    s = resolve_tracking(cfg, cli_experiment="cli-exp", cli_log_artifacts="True", env=env)
    assert (s.uri, s.experiment, s.log_artifacts) == ("http://config", "cfg-exp", False)
    s = resolve_tracking(
        cfg, cli_uri="http://cli", cli_experiment="cli-exp", cli_log_artifacts="False", env=env
    )
    assert (s.uri, s.experiment, s.log_artifacts) == ("http://cli", "cli-exp", False)
    s = resolve_tracking(cfg, cli_uri="http://cli", env=env)  # the Silogen CLI's defaults
    assert (s.uri, s.experiment, s.log_artifacts) == ("http://cli", "default", False)
    # a section without a URI (the operator's experiment override) names the experiment of the env's server
    s = resolve_tracking(Tracking(experiment_name="dag-exp"), env=env)
    assert (s.uri, s.experiment) == ("file:///env", "dag-exp")
    assert not resolve_tracking(cfg, env={"DISABLE_MLFLOW_INTEGRATION": "TRUE"}).enabled
    assert not resolve_tracking(cfg, cli_uri="http://cli", env={"DISABLE_MLFLOW_INTEGRATION": "TRUE"}).enabled
    assert not resolve_tracking(Tracking(), env={}).enabled


def test_learning_rate_scaling():
    from finetune_engine.config import parse_config
    from finetune_engine.recipes.sft import scaled_learning_rate
    from tests.engine.test_config import BASE, _with

    assert scaled_learning_rate(parse_config(BASE), 1e-4, 64) == 1e-4
    lin = parse_config(
        _with(
            "overrides.lr_batch_size_scaling=linear",
            "overrides.reference_batch_size=16",
            "overrides.lr_multiplier=0.5",
        )
    )
    assert abs(scaled_learning_rate(lin, 1e-4, 64) - 1e-4 * 0.5 * 4) < 1e-12
    sq = parse_config(_with("overrides.lr_batch_size_scaling=sqrt", "overrides.reference_batch_size=16"))
    assert abs(scaled_learning_rate(sq, 1e-4, 64) - 2e-4) < 1e-12
