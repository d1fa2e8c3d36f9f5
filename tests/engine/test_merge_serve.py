"""Merging adapters (LoRA, grown vocabulary, QLoRA), vLLM-ready adapters, generate, and real vLLM."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from finetune_engine.adapters import AdapterError, create_vllm_compatible_adapter, vllm_preflight
from finetune_engine.cli.finetuning import main as finetuning
from finetune_engine.merge import merge_adapter
from tests.engine.conftest import make_config

ROOT = Path(__file__).resolve().parents[2]
PROMPT = [{"role": "user", "content": "What is the capital of Peru?"}]


def _train(tmp_path, model, data, template="keep-original", quant=None, rank=8, steps=6) -> dict:
    sections = {
        "data_conf": {"training_data": {"type": "CONCATENATION", "datasets": [{"path": str(data)}]},
                      "validation_data": {"type": "NONE"}, "chat_template_name": template},
        "peft_conf": {"peft_type": "LORA", "peft_kwargs": {"r": rank, "lora_alpha": 2 * rank, "target_modules": "all-linear"}},
        "training_args": {"output_dir": str(tmp_path / "out"), "learning_rate": 0.01, "max_steps": steps, "save_steps": 100,
                          "logging_steps": 1, "lr_scheduler_type": "constant"},
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
    if model.get_input_embeddings().weight.shape[0] != len(tok):
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
    cli = subprocess.run([str(Path(sys.executable).parent / "merge_adapter"), str(tiny_model), result["final_adapter"],
                          str(tmp_path / "cli-merged")], capture_output=True, text=True)
    assert cli.returncode == 0, cli.stderr[-2000:]
    assert (tmp_path / "cli-merged" / "_finetune_manifest.json").exists()


def test_qlora_merges_into_a_dequantized_base(tiny_model, chat_data, tmp_path):
    quant = {"quantization_type": "bits-and-bytes", "load_in_4bit": True, "bnb_4bit_compute_dtype": "float32"}
    result = _train(tmp_path, tiny_model, chat_data, quant=quant)
    merged = load_file(str(Path(result["final_checkpoint"]) / "model.safetensors"))
    assert all(t.dtype == torch.float32 for t in merged.values()) and not any("quant" in k or "absmax" in k for k in merged)
    # merged weights == unquantized base + the adapter, applied unmerged
    assert torch.allclose(_merged_logits(result["final_checkpoint"]), _peft_logits(str(tiny_model), result["final_adapter"]), atol=1e-4)


def test_vllm_compatible_adapter_keeps_only_lora_and_refuses_trained_embeddings(tiny_model, chat_data, tmp_path):
    result = _train(tmp_path / "pure", tiny_model, chat_data)
    adapter = Path(result["final_adapter"])
    tensors = load_file(str(adapter / "adapter_model.safetensors"))
    tensors["base_model.model.model.norm.extra_bias"] = torch.zeros(4)
    save_file(tensors, str(adapter / "adapter_model.safetensors"))
    first = create_vllm_compatible_adapter(adapter)
    assert first["dropped"] == ["base_model.model.model.norm.extra_bias"]
    kept = load_file(str(adapter / "adapter_model.safetensors"))
    assert kept and all(".lora_A." in k or ".lora_B." in k for k in kept)
    assert create_vllm_compatible_adapter(adapter)["dropped"] == []  # idempotent
    assert vllm_preflight(adapter, max_lora_rank=16) == []
    assert vllm_preflight(adapter, max_lora_rank=4)[0].startswith("rank 8 > --max-lora-rank 4")

    grown = _train(tmp_path / "grown", tiny_model, chat_data, template="chat-ml")
    with pytest.raises(AdapterError, match="Merge it instead"):
        create_vllm_compatible_adapter(grown["final_adapter"])
    cli = subprocess.run([str(Path(sys.executable).parent / "create_vllm_compatible_adapter"), grown["final_adapter"]],
                         capture_output=True, text=True)
    assert cli.returncode == 2 and "merge_adapter" in cli.stderr


def test_generate_over_prompts_and_eval_file(tiny_model_dir, chat_data, tmp_path):
    cfg = tmp_path / "gen.yaml"
    eval_file = tmp_path / "eval.jsonl"
    eval_file.write_text("\n".join(chat_data.read_text().splitlines()[:3]) + "\n")
    cfg.write_text(yaml.safe_dump({"model": str(tiny_model_dir), "prompts": ["What is 1 plus 1?"], "eval_file": str(eval_file),
                                   "max_new_tokens": 5, "batch_size": 2}))
    out = tmp_path / "answers.yaml"
    proc = subprocess.run([str(Path(sys.executable).parent / "generate"), str(cfg), str(out)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    answers = yaml.safe_load(out.read_text())
    assert len(answers) == 4 and answers[0]["prompt"] == "What is 1 plus 1?" and answers[0]["correct_answers"] == []
    assert all(set(a) == {"prompt", "answer", "correct_answers"} for a in answers)
    assert answers[1]["correct_answers"] and isinstance(answers[1]["answer"], str)


VLLM_PY = ROOT / ".venv-vllm" / "bin" / "python"


@pytest.mark.vllm
@pytest.mark.slow
def test_real_vllm_serves_merged_model_and_base_plus_adapter(tiny_model, chat_data, tmp_path):
    if not VLLM_PY.exists():
        pytest.skip(f"vLLM CPU venv missing at {VLLM_PY}: run `make vllm` (scripts/test.sh installs it)")
    from openai import OpenAI

    from airflow_provider_finetune.operators.deploy import start_vllm, stop_local

    # a pure LoRA adapter (no new tokens) and the merged model of the same run
    result = _train(tmp_path, tiny_model, chat_data, steps=30)
    served = {}
    for name, kwargs in {
        "merged": {"model_dir": Path(result["final_checkpoint"])},
        "base+adapter": {"model_dir": tiny_model, "adapters": {"tuned": Path(result["final_adapter"])}, "max_lora_rank": 8},
    }.items():
        work = tmp_path / name.replace("+", "_")
        work.mkdir()
        _, base_url = start_vllm(VLLM_PY, kwargs["model_dir"], "tiny", work, kwargs.get("adapters"), kwargs.get("max_lora_rank"),
                                 ready_timeout=300)
        try:
            client = OpenAI(base_url=f"{base_url}/v1", api_key="unused")
            models = ["tiny", "tuned"] if name == "base+adapter" else ["tiny"]
            replies = [client.chat.completions.create(model=m, messages=PROMPT, max_tokens=12, temperature=0)
                       for m in models]
            served[name] = dict(zip(["base", "tuned"], [r.choices[0].message.content for r in replies], strict=False))
        finally:
            stop_local(work)
    assert all(isinstance(v, str) for replies in served.values() for v in replies.values())
    # the adapter changes the answers of the base, and base+adapter answers like the merged model
    assert served["base+adapter"]["tuned"] != served["base+adapter"]["base"]
    assert served["base+adapter"]["tuned"] == served["merged"]["base"]
