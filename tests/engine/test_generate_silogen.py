"""generate with the Silogen engine's generation config (open-input and eval-data prompts, an
adapter, hf_gen_params) writes that engine's output records; config mistakes are one readable line
each, with file:line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from finetune_engine.generate import OPEN_PROMPT_DATASET, main

RECORD_KEYS = [
    "dataset",
    "id",
    "prompt",
    "answer",
    "correct_answers",
    "test_type",
    "data_collection",
    "truncated",
    "all_text_raw",
    "gen_params",
]


def _run(tmp_path: Path, cfg: dict) -> list[dict]:
    path, out = tmp_path / "gen.yaml", tmp_path / "out.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    assert main([str(path), str(out)]) == 0
    return yaml.safe_load(out.read_text())


def _greedy(model_dir: Path, ids: list[int], n: int, adapter: Path | None = None) -> list[int]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    if adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter)
    with torch.no_grad():
        out = model.eval().generate(
            input_ids=torch.tensor([ids]),
            attention_mask=torch.ones(1, len(ids), dtype=torch.long),
            max_new_tokens=n,
            do_sample=False,
            pad_token_id=0,
        )
    return out[0, len(ids) :].tolist()


def test_open_input(tiny_model_dir, tmp_path):
    from transformers import AutoTokenizer

    records = _run(
        tmp_path,
        {
            "model_conf": {"model": str(tiny_model_dir)},
            "prompt_conf": {"type": "open-input", "input": "The cat", "num_samples": 2},
            "hf_gen_params": {"max_new_tokens": 4, "do_sample": False},
        },
    )
    assert len(records) == 2 and all(list(r) == RECORD_KEYS for r in records)
    first = records[0]
    assert [r["id"] for r in records] == ["0", "1"]
    assert first["dataset"] == first["data_collection"] == OPEN_PROMPT_DATASET
    assert (
        first["prompt"] == "The cat"
        and first["correct_answers"] == [""]
        and first["test_type"] == "open-ended"
    )
    assert first["truncated"] is False
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    ids = tok("The cat")["input_ids"]
    assert first["answer"] == tok.decode(_greedy(tiny_model_dir, ids, 4), skip_special_tokens=True)
    assert first["all_text_raw"].startswith("The cat")
    params = first["gen_params"]
    assert params["max_new_tokens"] == 4 and params["max_length"] == 2048 and params["do_sample"] is False
    assert params["eos_token_id"][0] == tok.eos_token_id and params["bos_token_id"] == tok.bos_token_id
    assert params["quant_conf"] == {}
    assert params["model_conf"] == {"model": str(tiny_model_dir), "tokenizer": str(tiny_model_dir)}
    assert records[1]["gen_params"] == params


@pytest.fixture()
def adapter(tiny_model_dir, tmp_path) -> Path:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    peft = get_peft_model(
        AutoModelForCausalLM.from_pretrained(tiny_model_dir),
        LoraConfig(r=4, target_modules=["q_proj", "v_proj"]),
    )
    with torch.no_grad():
        for name, param in peft.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)
    out = tmp_path / "adapter"
    peft.save_pretrained(out)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(out)
    return out


def test_eval_data_with_an_adapter(tiny_model_dir, adapter, tmp_path):
    from transformers import AutoTokenizer

    q = [{"role": "user", "content": "What is one plus one?"}]
    rows = [
        {"dataset": "arith", "id": "a-1", "prompt_messages": q, "response": "Two."},
        {"messages": [*q, {"role": "assistant", "content": "It is two."}]},  # a chat row
        {
            "prompt_messages": q,
            "chosen_messages": [{"role": "assistant", "content": "2"}],
            "rejected_messages": [{"role": "assistant", "content": "3"}],
        },  # a preference row
    ]
    data = tmp_path / "eval.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    records = _run(
        tmp_path,
        {
            "prompt_conf": {"type": "eval-data", "data": {"path": str(data)}},
            "hf_gen_params": {"max_new_tokens": 3, "max_length": 12},
            "model_conf": {
                "model": str(tiny_model_dir),
                "adapter": str(adapter),
                "model_args": {"torch_dtype": "float32"},
            },
        },
    )
    tok = AutoTokenizer.from_pretrained(adapter)
    prompt = tok.apply_chat_template(q, tokenize=False, add_generation_prompt=True)
    assert [r["prompt"] for r in records] == [prompt] * 3
    assert [r["correct_answers"] for r in records] == [["Two."], ["It is two."], ["2"]]
    assert (records[0]["dataset"], records[0]["id"], records[0]["data_collection"]) == (
        "arith",
        "a-1",
        "arith",
    )
    assert records[1]["id"] == 1 and records[1]["dataset"] == "unknown"
    # max_length 12 - max_new_tokens 3: the prompt keeps its first 9 tokens
    ids = tok(prompt, add_special_tokens=False)["input_ids"]
    assert len(ids) > 9 and all(r["truncated"] is True for r in records)
    assert records[0]["answer"] == tok.decode(
        _greedy(tiny_model_dir, ids[:9], 3, adapter), skip_special_tokens=True
    )
    assert records[0]["answer"] != tok.decode(
        _greedy(tiny_model_dir, ids[:9], 3), skip_special_tokens=True
    ), "the adapter must be applied"
    conf = records[0]["gen_params"]["model_conf"]
    assert conf["adapter"] == str(adapter) and conf["tokenizer"] == str(adapter)
    assert conf["model_args"] == {"dtype": "float32", "device_map": "auto"}


@pytest.mark.parametrize(
    "cfg,expected",
    [
        (
            {"model_conf": {"model": "m"}, "prompt_conf": {"type": "open-input", "inputs": "x"}},
            "prompt_conf.inputs (gen.yaml:5): unknown key; did you mean 'input'?",
        ),
        (
            {"model_conf": {"model": "m"}, "prompt_conf": {"type": "evaldata"}},
            "prompt_conf (gen.yaml:3): type 'evaldata' is not one of open-input, eval-data",
        ),
        (
            {"model_conf": {"adapter": "a"}, "prompt_conf": {"type": "open-input"}},
            "model_conf.model (gen.yaml:1): required key is missing",
        ),
        (
            {
                "model_conf": {"model": "m"},
                "prompt_conf": {"type": "eval-data", "data": {"path": "x"}},
                "quant_conf": {
                    "quantization_type": "bits-and-bytes",
                    "load_in_4bit": True,
                    "bnb_4bit_quant_typ": "nf4",
                },
            },
            "quant_conf.bnb_4bit_quant_typ (gen.yaml:10): unknown key; did you mean 'bnb_4bit_quant_type'?",
        ),
    ],
)
def test_config_errors_name_the_key_and_line(tmp_path, capsys, cfg, expected):
    path = tmp_path / "gen.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    assert main([str(path), str(tmp_path / "out.yaml")]) == 2
    err = capsys.readouterr().err
    assert expected in err.replace(str(tmp_path) + "/", "")
    assert "validation error" not in err and "pydantic" not in err
    assert not (tmp_path / "out.yaml").exists()


def test_bad_eval_rows_name_file_and_line(tiny_model_dir, tmp_path, capsys):
    data = tmp_path / "eval.jsonl"
    data.write_text(
        json.dumps({"prompt_messages": [{"role": "user", "content": "hi"}]})
        + "\n"
        + json.dumps({"question": "hi"})
        + "\n"
    )
    path = tmp_path / "gen.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "model_conf": {"model": str(tiny_model_dir)},
                "prompt_conf": {"type": "eval-data", "data": {"path": str(data)}},
            }
        )
    )
    assert main([str(path), str(tmp_path / "out.yaml")]) == 2
    assert f"{data}:2: no prompt_messages (or messages) list" in capsys.readouterr().err
    assert not (tmp_path / "out.yaml").exists()
