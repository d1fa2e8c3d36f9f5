"""Sample generations during training: YAML files at every N steps (chat and plain-text prompts,
inline and from files), and the MLflow text artifacts and table on a real tracking server."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from finetune_engine.cli.finetuning import main as finetuning
from tests.engine.conftest import make_config
from tests.engine.test_text_corpus import write_corpus

PROMPTS = ["What is 2 plus 3?", "What is the capital of Peru?"]


def _run(config: Path, *extra: str) -> dict:
    result = config.parent / "result.json"
    assert (
        finetuning(
            ["sft", str(config), "--result-file", str(result), "--num-preprocess-workers", "1", *extra]
        )
        == 0
    )
    return json.loads(result.read_text())


def _samples(out: Path) -> dict[int, list[dict]]:
    return {
        int(p.stem.split("-")[1]): yaml.safe_load(p.read_text())
        for p in (out / "samples").glob("step-*.yaml")
    }


def test_chat_samples_every_n_steps_from_inline_and_file_prompts(tiny_model, chat_data, tmp_path):
    jsonl = tmp_path / "prompts.jsonl"
    jsonl.write_text(
        json.dumps(
            {
                "messages": [
                    {"role": "user", "content": "Describe a red fox."},
                    {"role": "assistant", "content": "The red fox sees the owl."},
                ]
            }
        )
        + "\n"
    )
    config = make_config(
        tmp_path,
        tiny_model,
        chat_data,
        training_args={
            "output_dir": str(tmp_path / "out"),
            "max_steps": 5,
            "learning_rate": 0.003,
            "save_steps": 4,
        },
        batchsize_conf={"total_train_batch_size": 4, "max_per_device_train_batch_size": "auto"},
        tracking={
            "sample_generations": {
                "every_n_steps": 2,
                "prompts": PROMPTS,
                "prompts_file": str(jsonl),
                "max_new_tokens": 12,
            }
        },
    )
    result = _run(config)
    assert (
        result["global_step"] == 5 and result["per_device_train_batch_size"] == 4
    )  # auto: all 4 fit on the CPU
    samples = _samples(tmp_path / "out")
    assert sorted(samples) == [2, 4]
    for step in (2, 4):
        assert [s["prompt"] for s in samples[step]] == PROMPTS + ["Describe a red fox."]
        assert all(isinstance(s["completion"], str) and s["completion"] for s in samples[step]), samples[step]
    # The samples are the greedy output of the weights at that step: checkpoint-4 says the same.
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from finetune_engine.generate import generate_answers

    ckpt = tmp_path / "out" / "checkpoint-4"
    model, tok = AutoModelForCausalLM.from_pretrained(ckpt), AutoTokenizer.from_pretrained(ckpt)
    items = [{"messages": [{"role": "user", "content": p}]} for p in PROMPTS + ["Describe a red fox."]]
    assert generate_answers(model, tok, items, max_new_tokens=12) == [s["completion"] for s in samples[4]]
    # ... and not what the untrained weights say (the samples come from the model being trained).
    base = AutoModelForCausalLM.from_pretrained(tiny_model)
    base.resize_token_embeddings(len(tok))
    assert generate_answers(base, tok, items, max_new_tokens=12) != [s["completion"] for s in samples[4]]


def test_plain_text_samples_for_text_files(tiny_model, tmp_path):
    corpus = tmp_path / "corpus"
    write_corpus(corpus, docs=6)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("The red cat sees\n\n3 plus 4 is\n")
    config = make_config(
        tmp_path,
        tiny_model,
        corpus,
        data_conf={
            "training_data": {
                "type": "TEXT_FILES",
                "datasets": [{"path": str(corpus)}],
                "cache_dir": str(tmp_path / "cache"),
            },
            "validation_data": {"type": "NONE"},
        },
        training_args={
            "output_dir": str(tmp_path / "out"),
            "max_steps": 3,
            "learning_rate": 0.003,
            "save_steps": 10,
        },
        batchsize_conf={"total_train_batch_size": 2, "max_per_device_train_batch_size": 2},
        sft_args={"max_seq_length": 64},
        tracking={
            "sample_generations": {"every_n_steps": 1, "prompts_file": str(prompts), "max_new_tokens": 6}
        },
    )
    _run(config)
    samples = _samples(tmp_path / "out")
    assert sorted(samples) == [1, 2, 3]
    assert [s["prompt"] for s in samples[3]] == ["The red cat sees", "3 plus 4 is"]  # blank line skipped
    assert all(s["completion"] for s in samples[3])


def test_samples_logged_to_mlflow(tiny_model, chat_data, tmp_path, monkeypatch, mlflow_server):
    import mlflow

    monkeypatch.delenv("DISABLE_MLFLOW_INTEGRATION", raising=False)
    config = make_config(
        tmp_path,
        tiny_model,
        chat_data,
        training_args={
            "output_dir": str(tmp_path / "out"),
            "max_steps": 4,
            "learning_rate": 0.003,
            "save_steps": 10,
        },
        tracking={"sample_generations": {"every_n_steps": 2, "prompts": PROMPTS, "max_new_tokens": 8}},
    )
    result = _run(config, "--mlflow-server-uri", mlflow_server, "--experiment-name", "samples-test")
    client = mlflow.MlflowClient(tracking_uri=mlflow_server)
    run_id = result["mlflow_run_id"]
    names = {a.path for a in client.list_artifacts(run_id, "samples")}
    assert {"samples/step-2.yaml", "samples/step-4.yaml", "samples/samples.json"} <= names
    local = Path(client.download_artifacts(run_id, "samples", str(tmp_path / "dl")))
    assert yaml.safe_load((local / "step-4.yaml").read_text()) == _samples(tmp_path / "out")[4]
    table = json.loads((local / "samples.json").read_text())
    rows = [dict(zip(table["columns"], row, strict=True)) for row in table["data"]]
    assert [(r["step"], r["prompt"]) for r in rows] == [
        (2, PROMPTS[0]),
        (2, PROMPTS[1]),
        (4, PROMPTS[0]),
        (4, PROMPTS[1]),
    ]
