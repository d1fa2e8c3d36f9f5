"""Merging adapters (LoRA, grown vocabulary, QLoRA), vLLM-ready adapters, generate, and real vLLM."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from finetune_engine.adapters import create_vllm_compatible_adapter, vllm_preflight
from finetune_engine.cli.finetuning import main as finetuning
from finetune_engine.merge import merge_adapter
from tests.airflow_env import EAGER_VLLM, VLLM_PY
from tests.engine.conftest import make_config
from tests.registry import oci_registry  # noqa: F401 - the fixture, asked for by name

ROOT = Path(__file__).resolve().parents[2]
PROMPT = [{"role": "user", "content": "What is the capital of Peru?"}]


def _train(tmp_path, model, data, template="keep-original", quant=None, rank=8, steps=6) -> dict:
    sections = {
        "data_conf": {
            "training_data": {"type": "CONCATENATION", "datasets": [{"path": str(data)}]},
            "validation_data": {"type": "NONE"},
            "chat_template_name": template,
        },
        "peft_conf": {
            "peft_type": "LORA",
            "peft_kwargs": {"r": rank, "lora_alpha": 2 * rank, "target_modules": "all-linear"},
        },
        "training_args": {
            "output_dir": str(tmp_path / "out"),
            "learning_rate": 0.01,
            "max_steps": steps,
            "save_steps": 100,
            "logging_steps": 1,
            "lr_scheduler_type": "constant",
        },
    }
    if quant:
        sections["quant_conf"] = quant
    tmp_path.mkdir(parents=True, exist_ok=True)
    cfg = make_config(tmp_path, model, data, **sections)
    assert finetuning(["sft", str(cfg), "--result-file", str(tmp_path / "r.json")]) == 0
    return json.loads((tmp_path / "r.json").read_text())


def _logits(model, tok_dir) -> torch.Tensor:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tok_dir)
    enc = tok.apply_chat_template(PROMPT, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        return model(**enc).logits[0]


def _peft_logits(base: str, adapter: str) -> torch.Tensor:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(adapter)
    if model.get_input_embeddings().weight.shape[0] < len(tok):
        model.resize_token_embeddings(len(tok))
    return _logits(PeftModel.from_pretrained(model, adapter).eval(), adapter)


def _merged_logits(path) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    return _logits(AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval(), path)


def test_lora_merge_equals_base_plus_adapter(tiny_model, chat_data, tmp_path):
    result = _train(tmp_path, tiny_model, chat_data)
    out = merge_adapter(str(tiny_model), result["final_adapter"], tmp_path / "merged")
    merged, unmerged = _merged_logits(out), _peft_logits(str(tiny_model), result["final_adapter"])
    assert torch.allclose(merged, unmerged, atol=1e-4)
    base = _merged_logits(tiny_model)
    assert not torch.allclose(merged, base, atol=1e-3), "the adapter changed nothing"
    # the merge the training run wrote agrees too
    assert torch.allclose(_merged_logits(result["final_checkpoint"]), merged, atol=1e-4)


def test_merge_with_added_tokens_uses_the_grown_base(tiny_model, chat_data, tmp_path):
    result = _train(tmp_path, tiny_model, chat_data, template="chat-ml")
    assert result["grown_base"]
    # asked with the original base, merge_adapter picks the run's grown-vocabulary base
    out = merge_adapter(str(tiny_model), result["final_adapter"], tmp_path / "merged")
    assert torch.allclose(_merged_logits(out), _merged_logits(result["final_checkpoint"]), atol=1e-4)
    cli = subprocess.run(
        [
            str(Path(sys.executable).parent / "merge_adapter"),
            str(tiny_model),
            result["final_adapter"],
            str(tmp_path / "cli-merged"),
        ],
        capture_output=True,
        text=True,
    )
    assert cli.returncode == 0, cli.stderr[-2000:]
    assert (tmp_path / "cli-merged" / "_finetune_manifest.json").exists()


SPARE = 40  # rows past the tokenizer, as real checkpoints pad theirs (Qwen2.5: 151936 for 151665)


def _padded_base(tiny_model, out: Path, tied: bool = False) -> Path:
    """The tiny model with its embedding matrix padded by SPARE rows past its tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(tiny_model)
    model.resize_token_embeddings(len(tok) + SPARE, mean_resizing=False)
    if tied:
        model.config.tie_word_embeddings = True
        model.tie_weights()
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def _rows(path) -> tuple[int, int]:
    """(vocab_size in config.json, rows of the saved input embedding matrix)."""
    weights = load_file(str(Path(path) / "model.safetensors"))
    return (
        json.loads((Path(path) / "config.json").read_text())["vocab_size"],
        weights["model.embed_tokens.weight"].shape[0],
    )


def test_a_padded_base_keeps_its_rows_through_training_and_merge(tiny_model, chat_data, tmp_path):
    """No token added: training and merge leave the padded matrix as it is (never shrunk to the
    tokenizer), and the merged model still answers like base + adapter."""
    base = _padded_base(tiny_model, tmp_path / "padded")
    rows = _rows(base)[0]
    result = _train(tmp_path / "run", base, chat_data)
    assert _rows(result["final_checkpoint"]) == (rows, rows)
    out = merge_adapter(str(base), result["final_adapter"], tmp_path / "merged")
    assert _rows(out) == (rows, rows)
    assert torch.allclose(_merged_logits(out), _peft_logits(str(base), result["final_adapter"]), atol=1e-4)


def test_added_tokens_take_the_spare_rows_of_a_padded_base(tiny_model, chat_data, tmp_path):
    """chat-ml adds its markers: on a padded base they take spare rows (mean-initialised), the matrix
    keeps its size in the grown base, the adapter and the merge, and the merge loads and agrees."""
    from transformers import AutoTokenizer

    base = _padded_base(tiny_model, tmp_path / "padded")
    rows = _rows(base)[0]
    before = len(AutoTokenizer.from_pretrained(base))
    result = _train(tmp_path / "run", base, chat_data, template="chat-ml")
    tok = AutoTokenizer.from_pretrained(result["final_adapter"])
    assert before < len(tok) <= rows, "the template added tokens that fit the spare rows"
    grown = Path(result["final_adapter"]).parent / result["grown_base"]
    assert _rows(grown) == (rows, rows)
    embedding = load_file(str(grown / "model.safetensors"))["model.embed_tokens.weight"]
    new = list(range(before, len(tok)))
    assert torch.allclose(embedding[new], embedding[:before].mean(0).expand(len(new), -1), atol=1e-6)
    saved = load_file(str(Path(result["final_adapter"]) / "adapter_model.safetensors"))
    assert {t.shape[0] for k, t in saved.items() if "embed_tokens" in k or "lm_head" in k} == {rows}
    out = merge_adapter(str(base), result["final_adapter"], tmp_path / "merged")
    assert _rows(out) == (rows, rows)
    assert torch.allclose(_merged_logits(out), _merged_logits(result["final_checkpoint"]), atol=1e-4)


def test_fit_embeddings_grows_only_and_keeps_a_tie(tiny_model, tmp_path):
    """The one embedding rule: a tokenizer longer than the matrix grows it; a shorter one never
    shrinks it; an added token's spare row of a tied matrix is written once and stays tied."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from finetune_engine.embeddings import embedding_rows, fit_embeddings

    base = _padded_base(tiny_model, tmp_path / "tied", tied=True)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(base)
    rows = embedding_rows(model)
    assert fit_embeddings(model, tok) == "" and embedding_rows(model) == rows  # shorter: untouched
    tok.add_special_tokens({"additional_special_tokens": ["<|new|>"]})
    assert "spare rows" in fit_embeddings(model, tok, ["<|new|>"]) and embedding_rows(model) == rows
    new = tok.convert_tokens_to_ids("<|new|>")
    weight = model.get_input_embeddings().weight
    assert torch.allclose(weight[new], weight[:new].mean(0), atol=1e-6)
    assert model.get_output_embeddings().weight.data_ptr() == weight.data_ptr(), "the tie was kept"
    tok.add_tokens([f"<extra_{i}>" for i in range(SPARE)])
    assert "grown" in fit_embeddings(model, tok, mean_init=False) and embedding_rows(model) == len(tok)
    assert model.get_output_embeddings().weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()


def test_qlora_merges_into_a_dequantized_base(tiny_model, chat_data, tmp_path):
    quant = {"quantization_type": "bits-and-bytes", "load_in_4bit": True, "bnb_4bit_compute_dtype": "float32"}
    result = _train(tmp_path, tiny_model, chat_data, quant=quant)
    merged = load_file(str(Path(result["final_checkpoint"]) / "model.safetensors"))
    assert all(t.dtype == torch.float32 for t in merged.values()) and not any(
        "quant" in k or "absmax" in k for k in merged
    )
    # merged weights == unquantized base + the adapter, applied unmerged
    assert torch.allclose(
        _merged_logits(result["final_checkpoint"]),
        _peft_logits(str(tiny_model), result["final_adapter"]),
        atol=1e-4,
    )


def test_a_base_saved_in_4bit_is_dequantized_before_the_merge(tiny_model, chat_data, tmp_path, caplog):
    """A base checkpoint stored quantized (bnb 4-bit, as pre-quantized Hub repos are): the merge
    dequantizes it first, and the result is dense and equals that dequantized base + the adapter."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    result = _train(tmp_path / "run", tiny_model, chat_data)
    quantized = tmp_path / "base-4bit"
    bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.float32)
    AutoModelForCausalLM.from_pretrained(
        tiny_model, quantization_config=bnb, device_map="cpu"
    ).save_pretrained(quantized)
    AutoTokenizer.from_pretrained(tiny_model).save_pretrained(quantized)
    stored = load_file(str(quantized / "model.safetensors"))
    assert any("absmax" in k or "quant_state" in k for k in stored), "the base was not stored quantized"

    caplog.set_level("INFO", logger="finetune_engine.merge")
    out = merge_adapter(str(quantized), result["final_adapter"], tmp_path / "merged")
    assert "is saved quantized (bitsandbytes): dequantizing it before the merge" in caplog.text
    merged = load_file(str(out / "model.safetensors"))
    assert all(t.is_floating_point() for t in merged.values()) and not any(
        "absmax" in k or "quant" in k for k in merged
    )
    from peft import PeftModel

    dequantized = AutoModelForCausalLM.from_pretrained(quantized, device_map="cpu").dequantize()
    reference = _logits(
        PeftModel.from_pretrained(dequantized, result["final_adapter"]).eval(), result["final_adapter"]
    )
    assert torch.allclose(_merged_logits(out), reference, atol=1e-4)
    # 4-bit rounding: not the full-precision base's merge
    assert not torch.allclose(_merged_logits(out), _merged_logits(result["final_checkpoint"]), atol=1e-4)


def test_vllm_compatible_adapter_keeps_only_lora_and_keeps_trained_embeddings(
    tiny_model, chat_data, tmp_path
):
    result = _train(tmp_path / "pure", tiny_model, chat_data)
    adapter = Path(result["final_adapter"])
    tensors = load_file(str(adapter / "adapter_model.safetensors"))
    tensors["base_model.model.model.norm.extra_bias"] = torch.zeros(4)
    save_file(tensors, str(adapter / "adapter_model.safetensors"))
    first = create_vllm_compatible_adapter(adapter)
    assert first["action"] == "removed" and first["dropped"] == ["base_model.model.model.norm.extra_bias"]
    kept = load_file(str(adapter / "adapter_model.safetensors"))
    assert kept and all(".lora_A." in k or ".lora_B." in k for k in kept)
    # the original stays next to it, under the Silogen engine's backup name
    assert "base_model.model.model.norm.extra_bias" in load_file(
        str(adapter / "old_with_extra_layers_adapter_model.safetensors")
    )
    again = create_vllm_compatible_adapter(adapter)  # idempotent: the backup says it is done
    assert again["action"] == "already-done" and again["dropped"] == []
    assert vllm_preflight(adapter, max_lora_rank=16) == []
    assert vllm_preflight(adapter, max_lora_rank=4)[0].startswith("rank 8 > --max-lora-rank 4")

    # new chat tokens trained the embeddings fully: removing them would serve another model
    grown = _train(tmp_path / "grown", tiny_model, chat_data, template="chat-ml")
    before = (Path(grown["final_adapter"]) / "adapter_model.safetensors").read_bytes()
    out = create_vllm_compatible_adapter(grown["final_adapter"])
    assert out["action"] == "kept" and any("modules_to_save" in r for r in out["reasons"])
    cli = subprocess.run(
        [str(Path(sys.executable).parent / "create_vllm_compatible_adapter"), grown["final_adapter"]],
        capture_output=True,
        text=True,
    )
    assert cli.returncode == 0 and "Keeping non-LoRA layers, they are needed." in cli.stdout, cli.stderr
    assert (Path(grown["final_adapter"]) / "adapter_model.safetensors").read_bytes() == before
    assert not (Path(grown["final_adapter"]) / "old_with_extra_layers_adapter_model.safetensors").exists()


def test_generate_over_prompts_and_eval_file(tiny_model_dir, chat_data, tmp_path):
    cfg = tmp_path / "gen.yaml"
    eval_file = tmp_path / "eval.jsonl"
    eval_file.write_text("\n".join(chat_data.read_text().splitlines()[:3]) + "\n")
    cfg.write_text(
        yaml.safe_dump(
            {
                "model": str(tiny_model_dir),
                "prompts": ["What is 1 plus 1?"],
                "eval_file": str(eval_file),
                "max_new_tokens": 5,
                "batch_size": 2,
            }
        )
    )
    out = tmp_path / "answers.yaml"
    proc = subprocess.run(
        [str(Path(sys.executable).parent / "generate"), str(cfg), str(out)], capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    answers = yaml.safe_load(out.read_text())
    assert (
        len(answers) == 4
        and answers[0]["prompt"] == "What is 1 plus 1?"
        and answers[0]["correct_answers"] == []
    )
    assert all(set(a) == {"prompt", "answer", "correct_answers"} for a in answers)
    assert answers[1]["correct_answers"] and isinstance(answers[1]["answer"], str)


@pytest.mark.vllm
@pytest.mark.slow
def test_real_vllm_serves_merged_model_and_base_plus_adapter(
    tiny_model, chat_data, tmp_path, monkeypatch, request
):
    """Through the operators' local runner, as a DAG runs them: DeployVLLMOperator pulls the merged
    model, or the base and the LoRA adapter, from the embedded S3 server (rclone) by the Airflow
    connection, the adapter from an OCI artifact pushed to the test registry (where one can run),
    starts vLLM (CPU), smoke-tests chat; the `openai` client chats with what it serves;
    UndeployVLLMOperator stops it."""
    if not VLLM_PY.exists():
        pytest.skip(f"vLLM CPU venv missing at {VLLM_PY}: run `make vllm` (scripts/test.sh installs it)")
    import urllib.request

    from openai import OpenAI

    from airflow_provider_finetune.hooks import bucket_connection_json
    from airflow_provider_finetune.operators import DeployVLLMOperator, UndeployVLLMOperator
    from airflow_provider_finetune.operators.deploy import load_lora_adapter
    from airflow_provider_finetune.runners.vllm_local import chat_once
    from finetune_engine.storage import local_server, upload_dir

    # a pure LoRA adapter (no new tokens) and the merged model of the same run, delivered to a bucket
    result = _train(tmp_path, tiny_model, chat_data, steps=30)
    s3 = local_server.ensure_running(tmp_path / "s3")
    try:
        root = f"s3://{s3['FINETUNE_BUCKET']}/serve"
        with monkeypatch.context() as m:
            for key in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
                m.setenv(key, s3[key])
            for name, local in (
                ("merged", result["final_checkpoint"]),
                ("base", tiny_model),
                ("tuned", result["final_adapter"]),
            ):
                upload_dir(local, f"{root}/{name}", progress=False)
        tuned, oci_kwargs = {"tuned": f"{root}/tuned"}, {}
        if shutil.which("docker-registry"):  # the served LoRA: an artifact pushed to a registry
            from finetune_engine.storage.oci import push

            registry = request.getfixturevalue("oci_registry")
            docker = registry.docker_config(tmp_path / "docker")
            tuned = {"tuned": registry.ref("serve/tuned", "v1")}
            push(result["final_adapter"], tuned["tuned"], plain_http=True, docker_config=docker)
            oci_kwargs = {"oci_docker_config": str(docker), "oci_plain_http": True}
        monkeypatch.setenv("AIRFLOW_CONN_AWS_DEFAULT", bucket_connection_json(s3))
        monkeypatch.setenv("AIRFLOW__FINETUNE__RUNNER", "local")
        monkeypatch.setenv("AIRFLOW__FINETUNE__LOCAL_WORKDIR", str(tmp_path / "work"))
        monkeypatch.setenv("AIRFLOW__FINETUNE__VLLM_PYTHON", str(VLLM_PY))
        monkeypatch.setenv("AIRFLOW__FINETUNE__LOCAL_VLLM_ENGINE_ARGS", json.dumps(EAGER_VLLM))
        key = "sk-local-test-3f9a"  # base+adapter: an authenticated server with runtime LoRA loading
        monkeypatch.setenv("FINETUNE_TEST_VLLM_KEY", key)
        served = {}
        for name, kwargs in {
            "merged": {"model_uri": f"{root}/merged"},
            "base+adapter": {
                "model_uri": f"{root}/base",
                "adapters": tuned,
                "adapter_ranks": {"tuned": 8},
                **oci_kwargs,
                "api_key_env": "FINETUNE_TEST_VLLM_KEY",
                "runtime_lora": True,
            },
        }.items():
            deploy = DeployVLLMOperator(
                task_id="serve",
                served_model_name="tiny",
                smoke_question=PROMPT[0]["content"],
                ready_timeout=300,
                **kwargs,
            )
            deploy.validate()
            out = deploy.execute_local({})
            try:
                # the smoke question was answered (a 30-step tiny model may answer with an empty text)
                assert isinstance(out["smoke_reply"], str) and out["adapters"] == sorted(
                    kwargs.get("adapters", {})
                )
                authenticated = "api_key_env" in kwargs
                client = OpenAI(base_url=out["endpoint"], api_key=key if authenticated else "unused")
                models = ["tiny", "tuned"] if name == "base+adapter" else ["tiny"]
                if authenticated:
                    # the key reached vLLM through its environment, never its command line
                    cmdline = Path(f"/proc/{out['pid']}/cmdline").read_bytes()
                    assert key.encode() not in cmdline and b"api-key" not in cmdline
                    assert f"VLLM_API_KEY={key}".encode() in Path(f"/proc/{out['pid']}/environ").read_bytes()
                    with pytest.raises(PermissionError, match="401 Unauthorized"):  # no key: refused
                        chat_once(out["endpoint"].removesuffix("/v1"), "tiny", "hi")
                    # promote an adapter into the running server: no restart
                    load_lora_adapter(
                        out["endpoint"].removesuffix("/v1"), "promoted", result["final_adapter"], api_key=key
                    )
                    models.append("promoted")
                replies = [
                    client.chat.completions.create(model=m, messages=PROMPT, max_tokens=12, temperature=0)
                    for m in models
                ]
                served[name] = dict(
                    zip(
                        ["base", "tuned", "promoted"],
                        [r.choices[0].message.content for r in replies],
                        strict=False,
                    )
                )
            finally:
                assert UndeployVLLMOperator(task_id="stop", served_model_name="tiny").execute({}) is True
            with pytest.raises(OSError):
                urllib.request.urlopen(f"{out['endpoint'].removesuffix('/v1')}/health", timeout=5)
    finally:
        local_server.stop(tmp_path / "s3")
    assert all(isinstance(v, str) for replies in served.values() for v in replies.values())
    # the adapter changes the answers of the base, and base+adapter answers like the merged model
    assert served["base+adapter"]["tuned"] != served["base+adapter"]["base"]
    assert served["base+adapter"]["tuned"] == served["merged"]["base"]
    assert served["base+adapter"]["promoted"] == served["base+adapter"]["tuned"]  # loaded at run time
