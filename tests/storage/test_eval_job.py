"""eval-job: models from the bucket scored on the same held-out data (what champion/challenger
compare), against the real rclone S3 server."""

from __future__ import annotations

import json

import pytest

from finetune_engine.jobs.deliver_model import deliver_model
from finetune_engine.jobs.evaluate import main as eval_job
from finetune_engine.jobs.evaluate import score_model
from finetune_engine.jobs.train import main as train_job
from finetune_engine.storage import download_dir, join, put_bytes, upload_file
from finetune_engine.tiny import write_chat_dataset
from tests.storage.conftest import train_config

pytestmark = pytest.mark.parametrize("s3_server", ["rclone"], indirect=True)


def _config(tmp_path, model_uri, data_uri, steps):
    """The shared training config with a bigger batch and rank, no validation split and no
    intermediate checkpoints: enough learning in few steps for the scores to part clearly."""
    return train_config(
        tmp_path,
        model_uri,
        data_uri,
        max_steps=steps,
        save_steps=100,
        logging_steps=5,
        sections={
            "data_conf": {"validation_data": {"type": "NONE"}},
            "batchsize_conf": {"total_train_batch_size": 8, "max_per_device_train_batch_size": 8},
            "peft_conf": {"peft_kwargs": {"r": 8, "target_modules": "all-linear"}},
        },
    )


def test_trained_model_scores_below_its_base_and_loss_matches_the_model_s_own(
    s3_env, tiny_model_dir, chat_data, tmp_path, capsys
):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from finetune_engine.data.tokenize import EncodeSettings, encode_batch

    model_uri = join(s3_env["uri"], "models", "tiny")
    deliver_model(str(tiny_model_dir), model_uri)
    data_uri = join(s3_env["uri"], "datasets", "train.jsonl")
    upload_file(chat_data, data_uri)
    heldout = write_chat_dataset(tmp_path / "heldout.jsonl", examples=40, seed=99)
    heldout_uri = join(s3_env["uri"], "datasets", "heldout.jsonl")
    upload_file(heldout, heldout_uri)
    ckpt = join(s3_env["uri"], "experiments", "eval", "run")
    assert (
        train_job(
            [
                "--config",
                str(_config(tmp_path, model_uri, data_uri, 30)),
                "--checkpoint-uri",
                ckpt,
                "--workdir",
                str(tmp_path / "w"),
            ]
        )
        == 0
    )
    trained = join(ckpt, "checkpoint-final")
    result_file = tmp_path / "scores.json"
    assert (
        eval_job(
            [
                "--model",
                trained,
                "--model",
                model_uri,
                "--data",
                heldout_uri,
                "--workdir",
                str(tmp_path / "e"),
                "--result-file",
                str(result_file),
            ]
        )
        == 0
    )
    scores = json.loads(result_file.read_text())
    by_uri = {s["model_uri"]: s for s in scores["models"]}
    assert by_uri[trained]["eval_loss"] < by_uri[model_uri]["eval_loss"] - 0.5  # it learned the task
    assert scores["best_model_uri"] == trained
    assert all(s["examples"] == 40 and s["tokens"] > 0 for s in scores["models"])
    # the adapter itself is not a model to score: a clear error, not transformers' size-mismatch dump
    assert (
        eval_job(
            [
                "--model",
                join(ckpt, "checkpoint-final-adapter"),
                "--data",
                heldout_uri,
                "--workdir",
                str(tmp_path / "a"),
            ]
        )
        == 2
    )
    assert "a PEFT adapter, not a model" in capsys.readouterr().err

    # the reduction is the model's own mean cross-entropy over the same labelled tokens
    local = tmp_path / "trained"
    download_dir(trained, local)
    records = [json.loads(line) for line in heldout.read_text().splitlines()[:3]]
    ours = score_model(local, records, max_seq_length=128, batch_size=2)
    tok = AutoTokenizer.from_pretrained(local)
    model = AutoModelForCausalLM.from_pretrained(local, dtype=torch.float32).eval()
    total, count = 0.0, 0
    for item in encode_batch(records, tok, EncodeSettings(128, "truncate", True, tok.eos_token)):
        n = sum(1 for x in item["labels"][1:] if x != -100)
        with torch.no_grad():
            loss = model(
                input_ids=torch.tensor([item["input_ids"]]), labels=torch.tensor([item["labels"]])
            ).loss
        total, count = total + float(loss) * n, count + n
    assert ours["tokens"] == count
    assert ours["eval_loss"] == pytest.approx(total / count, rel=1e-4)


def test_incomplete_models_and_invalid_data_are_refused_before_loading(s3_env, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(
        '{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n'
        '{"messages": [{"role": "robot", "content": "x"}]}\n'
    )
    bad_uri = join(s3_env["uri"], "datasets", "bad.jsonl")
    upload_file(bad, bad_uri)
    good_uri = join(s3_env["uri"], "datasets", "good.jsonl")
    upload_file(write_chat_dataset(tmp_path / "good.jsonl", examples=4), good_uri)
    partial = join(s3_env["uri"], "models", "partial")
    put_bytes(join(partial, "config.json"), b"{}")  # objects but no manifest: an interrupted upload
    assert eval_job(["--model", partial, "--data", bad_uri, "--workdir", str(tmp_path / "a")]) == 2
    err = capsys.readouterr().err
    assert "bad.jsonl:2" in err and "role" in err
    assert eval_job(["--model", partial, "--data", good_uri, "--workdir", str(tmp_path / "b")]) == 2
    assert "not a complete model prefix" in capsys.readouterr().err
    assert not (tmp_path / "b" / "model-0").exists()


def test_a_bucket_outage_is_a_retried_failure_not_an_input_error(s3_env, tmp_path, monkeypatch, capsys):
    """Exit 2 is an input error the provider does not retry ([config]); an unreachable bucket exits 1
    ([failed], retried), whether the data or the model was being fetched."""
    data_uri = join(s3_env["uri"], "datasets", "heldout.jsonl")
    local_data = write_chat_dataset(tmp_path / "heldout.jsonl", examples=4)
    upload_file(local_data, data_uri)
    model_uri = join(s3_env["uri"], "models", "tiny")
    monkeypatch.setenv("FINETUNE_S3_MAX_ATTEMPTS", "1")  # botocore gives up at once
    monkeypatch.setenv("FINETUNE_S3_FILE_ATTEMPTS", "1")  # and so does the per-file retry loop
    server = s3_env["server"]
    server.stop()
    try:
        assert eval_job(["--model", model_uri, "--data", data_uri, "--workdir", str(tmp_path / "a")]) == 1
        assert "cannot reach the S3 endpoint" in capsys.readouterr().err
        assert (
            eval_job(["--model", model_uri, "--data", str(local_data), "--workdir", str(tmp_path / "b")]) == 1
        )
        assert "cannot reach the S3 endpoint" in capsys.readouterr().err
    finally:
        server.start()
    # the server back, a missing object is still an input error
    assert eval_job(["--model", model_uri, "--data", str(local_data), "--workdir", str(tmp_path / "c")]) == 2
    assert "not a complete model prefix" in capsys.readouterr().err
