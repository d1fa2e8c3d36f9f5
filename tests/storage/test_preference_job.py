"""train-job with a preference method against a real S3 server: the model and the preference data
come from the bucket, checkpoints go up as they are saved, the final outputs are completed by
their markers, the result JSON is in the bucket, and a relaunch trains nothing."""

from __future__ import annotations

import json

import pytest
import yaml

from finetune_engine.config.training_args import METHODS
from finetune_engine.jobs.deliver_model import deliver_model
from finetune_engine.jobs.train import main as train_job
from finetune_engine.storage import (
    download_file,
    is_complete,
    join,
    list_complete_children,
    list_objects,
    upload_file,
)
from finetune_engine.tiny import write_preference_dataset
from tests.storage.conftest import train_config

pytestmark = pytest.mark.s3


def _dpo_config(tmp_path, model_uri: str, data_uri: str):
    """The storage tests' train config, turned into a DPO one: no sft_args, no new tokens."""
    path = train_config(
        tmp_path,
        model_uri,
        data_uri,
        max_steps=4,
        save_steps=2,
        beta=0.1,
        loss_type="ipo",
        max_prompt_length=64,
    )
    cfg = yaml.safe_load(path.read_text())
    cfg.pop("sft_args")
    cfg["data_conf"]["chat_template_name"] = "keep-original"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_dpo_train_job_end_to_end_then_skips(s3_env, tiny_model_dir, tmp_path):
    model_uri = join(s3_env["uri"], "models", "tiny")
    deliver_model(str(tiny_model_dir), model_uri)
    data_uri = join(s3_env["uri"], "datasets", "pref.jsonl")
    upload_file(write_preference_dataset(tmp_path / "pref.jsonl", examples=24, seed=3), data_uri)
    config = _dpo_config(tmp_path, model_uri, data_uri)
    ckpt = join(s3_env["uri"], "experiments", "dpo", "run-1")
    result_file = tmp_path / "result.json"
    argv = [
        "--config",
        str(config),
        "--method",
        "dpo",
        "--checkpoint-uri",
        ckpt,
        "--result-file",
        str(result_file),
    ]

    assert train_job([*argv, "--workdir", str(tmp_path / "w1")]) == 0
    result = json.loads(result_file.read_text())
    assert result["status"] == "completed" and result["method"] == "dpo" and result["global_step"] == 4
    assert result["loss_type"] == ["ipo"] and result["reference"] == "the base with the adapter disabled"
    assert "eval_rewards/margins" in result["final_eval_metrics"] and result["final_eval_loss"] is not None
    assert result["final_checkpoint_uri"] == join(ckpt, "checkpoint-final")
    assert result["final_adapter_uri"] == join(ckpt, "checkpoint-final-adapter")
    assert result["checkpoint_upload_failures"] == 0
    # Checkpoints uploaded as saved, and the final outputs each completed by its marker.
    assert sorted(list_complete_children(ckpt)) == [
        "checkpoint-2",
        "checkpoint-4",
        "checkpoint-final",
        "checkpoint-final-adapter",
    ]
    assert is_complete(join(ckpt, "checkpoint-final")) and is_complete(join(ckpt, "checkpoint-final-adapter"))
    objects = list_objects(ckpt)
    assert "logs/train.log" in objects and "result.json" in objects
    download_file(join(ckpt, "result.json"), tmp_path / "stored.json")
    stored = json.loads((tmp_path / "stored.json").read_text())
    assert (
        stored["method"] == "dpo"
        and stored["global_step"] == 4
        and stored["final_checkpoint_uri"] == result["final_checkpoint_uri"]
    )
    download_file(join(ckpt, "checkpoint-final-adapter", "finetune_meta.json"), tmp_path / "meta.json")
    meta = json.loads((tmp_path / "meta.json").read_text())
    assert meta["method"] == "dpo" and meta["added_tokens"] == []

    # A relaunch (fresh pod, empty workdir) finds the final marker and trains nothing.
    assert train_job([*argv, "--workdir", str(tmp_path / "w2")]) == 0
    again = json.loads(result_file.read_text())
    assert again["status"] == "skipped" and again["method"] == "dpo" and again["global_step"] == 4
    assert not (tmp_path / "w2" / "output").exists()


def test_train_job_and_operator_accept_the_same_methods(tmp_path, capsys):
    """Every engine method is a train-job --method choice and passes the operator's check; others
    are refused by both before anything runs."""
    from airflow_provider_finetune.exceptions import FinetuneConfigError
    from airflow_provider_finetune.operators import FinetuneKubernetesOperator

    assert set(METHODS) == {"sft", "dpo", "kto", "orpo", "cpo"}
    with pytest.raises(SystemExit):
        train_job(["--method", "ppo", "--checkpoint-uri", "s3://bucket/x", "--workdir", str(tmp_path / "w")])
    assert "invalid choice: 'ppo'" in capsys.readouterr().err and not (tmp_path / "w").exists()
    config = {
        "data_conf": {
            "training_data": {
                "type": "CONCATENATION",
                "datasets": [{"path": "s3://finetune/datasets/p.jsonl"}],
            }
        },
        "batchsize_conf": {"total_train_batch_size": 8},
        "run_conf": {"model": "s3://finetune/models/org/tiny"},
    }
    ctx = {
        "ti": type("TI", (), {"dag_id": "d", "task_id": "t", "map_index": -1, "try_number": 1})(),
        "run_id": "r",
    }
    for method in METHODS:
        FinetuneKubernetesOperator(task_id="t", config=config, method=method).validate(ctx)
    with pytest.raises(FinetuneConfigError, match="method 'ppo': use one of sft, dpo, kto, orpo, cpo"):
        FinetuneKubernetesOperator(task_id="t", config=config, method="ppo").validate(ctx)
