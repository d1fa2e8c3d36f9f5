"""The model families people fine-tune, end to end on tiny random-weight models of each (built from
transformers' own config classes with the family's quirks and its real chat template): build,
preset, SFT with LoRA and full, QLoRA, DPO with LoRA, merge and the vLLM-ready adapter."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from finetune_engine.adapters import create_vllm_compatible_adapter, vllm_preflight
from finetune_engine.cli.finetuning import main as finetuning
from finetune_engine.config.architectures import preset_model_type, unmatched_target_modules
from finetune_engine.config.presets import BY_NAME, match_preset
from finetune_engine.data.templates import NAMED_TEMPLATES
from finetune_engine.data.tokenize import IGNORE_INDEX, EncodeSettings, encode_batch
from finetune_engine.merge import merge_adapter
from finetune_engine.tiny import chat_example, preference_example
from finetune_engine.tiny_families import FAMILIES, build_family_model, build_family_tokenizer
from tests.engine.conftest import make_config

NAMES = list(FAMILIES)
PROMPT = [{"role": "user", "content": "What is the capital of Peru?"}]


@pytest.fixture(scope="session")
def family_dirs(tmp_path_factory):
    """Each family's tiny model, built once per session on first use."""
    root, built = tmp_path_factory.mktemp("families"), {}

    def get(name: str) -> Path:
        if name not in built:
            built[name] = build_family_model(name, root / name)
        return built[name]

    return get


@pytest.fixture(scope="session")
def family_data(tmp_path_factory) -> dict[str, Path]:
    """Small chat and preference sets; 'plain' has no system turns (Mistral and Gemma 2 refuse them)."""
    root, rng = tmp_path_factory.mktemp("family-data"), random.Random(3)
    chats = [chat_example(rng) for _ in range(16)]
    plain = [{"messages": [m for m in c["messages"] if m["role"] != "system"]} for c in chats]
    out = {}
    for key, rows in (("chat", chats), ("plain", plain)):
        out[key] = root / f"{key}.jsonl"
        out[key].write_text("".join(json.dumps({**r, "id": f"{key}-{i}"}) + "\n" for i, r in enumerate(rows)))
    pairs = [preference_example(rng) for _ in range(8)]
    out["pref"] = root / "pref.jsonl"
    out["pref"].write_text(
        "".join(
            json.dumps(
                {
                    "prompt_messages": p,
                    "chosen_messages": [{"role": "assistant", "content": good}],
                    "rejected_messages": [{"role": "assistant", "content": bad}],
                    "id": f"pref-{i}",
                }
            )
            + "\n"
            for i, (p, good, bad) in enumerate(pairs)
        )
    )
    return out


def _data(family, family_data) -> Path:
    return family_data["chat" if family.system_role else "plain"]


def _weights(path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(Path(path).glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def _config_json(path) -> dict:
    return json.loads((Path(path) / "config.json").read_text())


def _run(
    tmp_path, model, data, method="sft", peft=True, quant=None, steps=2, template="keep-original"
) -> dict:
    sections = {
        "data_conf": {
            "training_data": {"type": "CONCATENATION", "datasets": [{"path": str(data)}]},
            "validation_data": {"type": "NONE"},
            "chat_template_name": template,
        },
        "training_args": {
            "output_dir": str(tmp_path / "out"),
            "learning_rate": 0.01,
            "max_steps": steps,
            "save_steps": 100,
            "logging_steps": 1,
            "lr_scheduler_type": "constant",
        },
        "batchsize_conf": {"total_train_batch_size": 4, "max_per_device_train_batch_size": 4},
    }
    # target_modules left out: the family's preset (matched by config.json model_type) fills them
    sections["peft_conf"] = (
        {"peft_type": "LORA", "peft_kwargs": {"r": 8, "lora_alpha": 16}} if peft else {"peft_type": "NO_PEFT"}
    )
    if quant:
        sections["quant_conf"] = quant
    if method != "sft":
        sections["sft_args"] = None
    cfg = make_config(tmp_path, model, data, **sections)
    if method != "sft":
        text = json.loads(json.dumps(__import__("yaml").safe_load(cfg.read_text())))
        text.pop("sft_args", None)
        text["run_conf"]["merge_adapter"] = False
        cfg.write_text(__import__("yaml").safe_dump(text))
    result = tmp_path / "r.json"
    assert finetuning([method, str(cfg), "--result-file", str(result), "--num-preprocess-workers", "1"]) == 0
    return json.loads(result.read_text())


def _logits(model, tok_dir, system_role=True) -> torch.Tensor:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tok_dir)
    enc = tok.apply_chat_template(PROMPT, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        return model(**enc).logits[0].float()


def _load(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def _peft_logits(base, adapter) -> torch.Tensor:
    from peft import PeftModel

    return _logits(PeftModel.from_pretrained(_load(base), adapter).eval(), adapter)


def _assert_shape_kept(base: Path, out: Path, family) -> None:
    """vocab rows, config vocab_size, the tie and the family's config keys as in the base."""
    b, o = _config_json(base), _config_json(out)
    for key in ("model_type", "vocab_size", "tie_word_embeddings", "num_key_value_heads", "head_dim"):
        assert o.get(key) == b.get(key), key
    for key in ("sliding_window", "final_logit_softcapping", "attn_logit_softcapping", "rope_parameters"):
        assert o.get(key) == b.get(key), key
    weights = _weights(out)
    embed = next(v for k, v in weights.items() if k.endswith("embed_tokens.weight"))
    assert embed.shape[0] == b["vocab_size"]
    assert ("lm_head.weight" in weights) == (not family.tied)


# -- build -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_family_model_has_its_quirks(name, family_dirs):
    family = FAMILIES[name]
    path = family_dirs(name)
    cfg = _config_json(path)
    tok = build_family_tokenizer(family)
    assert cfg["model_type"] == family.model_type
    assert cfg["vocab_size"] == len(tok) + family.spare_rows and cfg["tie_word_embeddings"] == family.tied
    assert cfg["hidden_size"] // cfg["num_attention_heads"] >= 32 or cfg.get("head_dim", 0) >= 32
    for token in family.special:  # every special token is one token, as in the real tokenizer
        assert len(tok(token, add_special_tokens=False)["input_ids"]) == 1, token
    model = _load(path)
    names = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
    quirks = {
        "llama3": lambda: (
            cfg["rope_parameters"]["rope_type"] == "llama3"
            and cfg["num_key_value_heads"] < cfg["num_attention_heads"]
        ),
        "qwen2.5": lambda: model.model.layers[0].self_attn.q_proj.bias is not None,
        "qwen3": lambda: {"q_norm", "k_norm"} <= names,
        "qwen3-moe": lambda: {"experts", "gate", "q_norm"} <= names and cfg["num_local_experts"] > 1,
        "mistral": lambda: cfg["sliding_window"] == 64,
        "gemma2": lambda: (
            cfg["final_logit_softcapping"]
            and cfg["attn_logit_softcapping"]
            and "sliding_attention" in cfg["layer_types"]
        ),
        "gemma3": lambda: {"q_norm", "k_norm"} <= names and "sliding_attention" in cfg["layer_types"],
        "phi3": lambda: {"qkv_proj", "gate_up_proj"} <= names and "q_proj" not in names,
    }
    assert quirks[name](), name
    if family.tied:
        assert model.lm_head.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    text = tok.apply_chat_template(PROMPT + [{"role": "assistant", "content": "Lima."}], tokenize=False)
    assert family.end_of_turn in text


# -- presets -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_family_preset_targets_exist_and_template_trains_end_of_turn(name, family_dirs, family_data):
    family = FAMILIES[name]
    path = family_dirs(name)
    preset, why = match_preset(str(path))
    assert preset.name == family.preset and "model_type" in why
    model = _load(path)
    names = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
    assert set(preset.target_modules) <= names, set(preset.target_modules) - names
    assert unmatched_target_modules(preset.target_modules, preset_model_type(preset)) == []
    # every named-size preset of the family targets modules that exist in the family's model too
    for other in BY_NAME.values():
        if preset_model_type(other) == family.model_type:
            assert set(other.target_modules) <= names, (other.name, set(other.target_modules) - names)
    # the preset's template renders the family's format: the generation prompt ends the prompt, and a
    # completions-only example trains the reply and its end-of-turn token, never the prompt
    tok = build_family_tokenizer(family)
    if preset.chat_template == "keep-original":
        end_marker, start_marker = tok.eos_token, None
    else:
        template = NAMED_TEMPLATES[preset.chat_template]
        assert not [t for t in template.new_special_tokens if t not in tok.get_vocab()]
        tok.chat_template = template.jinja
        end_marker, start_marker = template.end_marker(tok.eos_token), template.assistant_start
    record = json.loads(_data(family, family_data).read_text().splitlines()[0])
    prompt = tok.apply_chat_template(record["messages"][:-1], tokenize=False, add_generation_prompt=True)
    full = tok.apply_chat_template(record["messages"], tokenize=False)
    assert full.startswith(prompt)
    settings = EncodeSettings(512, completions_only=True, end_marker=end_marker, start_marker=start_marker)
    (enc,) = encode_batch([record], tok, settings)
    trained = [i for i, label in zip(enc["input_ids"], enc["labels"], strict=True) if label != IGNORE_INDEX]
    eot = tok.convert_tokens_to_ids(family.end_of_turn)
    assert eot in trained
    text = tok.decode(trained)
    assert record["messages"][-1]["content"] in text and record["messages"][-2]["content"] not in text
    n_prompt = len(tok(prompt, add_special_tokens=False)["input_ids"])
    assert all(label == IGNORE_INDEX for label in enc["labels"][: n_prompt - 1])


# -- training -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_family_sft_lora_merge_and_vllm_adapter(name, family_dirs, family_data, tmp_path):
    family = FAMILIES[name]
    base = family_dirs(name)
    result = _run(tmp_path, base, _data(family, family_data))
    assert result["status"] == "completed" and result["grown_base"] is None
    adapter = Path(result["final_adapter"])
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    assert set(cfg["target_modules"]) == set(BY_NAME[family.preset].target_modules)
    out = merge_adapter(str(base), str(adapter), tmp_path / "merged")
    _assert_shape_kept(base, out, family)
    merged, unmerged = _logits(_load(out), out), _peft_logits(str(base), str(adapter))
    assert torch.allclose(merged, unmerged, atol=1e-4), (merged - unmerged).abs().max()
    assert not torch.allclose(merged, _logits(_load(base), base), atol=1e-3), "the adapter changed nothing"
    create_vllm_compatible_adapter(adapter)
    assert vllm_preflight(adapter, max_lora_rank=8) == []
    assert all("lora_" in k for k in load_file(str(adapter / "adapter_model.safetensors")))


@pytest.mark.parametrize("name", NAMES)
def test_family_sft_full(name, family_dirs, family_data, tmp_path):
    family = FAMILIES[name]
    base = family_dirs(name)
    result = _run(tmp_path, base, _data(family, family_data), peft=False)
    assert result["status"] == "completed" and result["final_adapter"] is None
    out = Path(result["final_checkpoint"])
    _assert_shape_kept(base, out, family)
    before, after = _weights(base), _weights(out)
    assert set(before) == set(after)
    moved = [k for k in before if not torch.equal(before[k], after[k])]
    assert any("layers.0" in k for k in moved) and any("embed_tokens" in k for k in moved)


@pytest.mark.parametrize("name", NAMES)
def test_family_qlora(name, family_dirs, family_data, tmp_path):
    """4-bit nf4 base (bitsandbytes' CPU ops), LoRA on the preset's modules, merged into the
    dequantized base: the merged model answers like base + adapter."""
    family = FAMILIES[name]
    base = family_dirs(name)
    quant = {"quantization_type": "bits-and-bytes", "load_in_4bit": True, "bnb_4bit_quant_type": "nf4"}
    result = _run(tmp_path, base, _data(family, family_data), quant=quant)
    assert result["status"] == "completed"
    assert json.loads((Path(result["final_adapter"]) / "finetune_meta.json").read_text())["quantized"]
    out = merge_adapter(str(base), result["final_adapter"], tmp_path / "merged")
    _assert_shape_kept(base, out, family)
    assert "quantization_config" not in _config_json(out)
    merged, unmerged = _logits(_load(out), out), _peft_logits(str(base), result["final_adapter"])
    assert torch.allclose(merged, unmerged, atol=1e-4), (merged - unmerged).abs().max()


@pytest.mark.parametrize("name", NAMES)
def test_family_dpo_lora(name, family_dirs, family_data, tmp_path):
    family = FAMILIES[name]
    base = family_dirs(name)
    result = _run(tmp_path, base, family_data["pref"], method="dpo")
    assert result["status"] == "completed" and result["method"] == "dpo" and result["grown_base"] is None
    adapter = Path(result["final_adapter"])
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    assert set(cfg["target_modules"]) == set(BY_NAME[family.preset].target_modules)
    lora = load_file(str(adapter / "adapter_model.safetensors"))
    assert any(v.abs().sum() > 0 for k, v in lora.items() if "lora_B" in k), "DPO left the adapter at zero"


@pytest.mark.parametrize(("name", "template"), [("qwen2.5", "llama-3"), ("llama3", "chat-ml")])
def test_added_tokens_on_padded_and_tied_family_bases(name, template, family_dirs, family_data, tmp_path):
    """The embedding rules on a padded + tied base (Qwen2.5: the template's new tokens take spare rows,
    nothing grows) and on a tied base without spare rows (Llama 3.2: it grows by the new tokens): the
    tie holds, the adapter's saved embeddings have its base's shape, the merge keeps every row."""
    from transformers import AutoTokenizer

    family = FAMILIES[name]
    base = family_dirs(name)
    rows = _config_json(base)["vocab_size"]
    result = _run(tmp_path, base, family_data["plain"], template=template)
    tok = AutoTokenizer.from_pretrained(result["final_adapter"])
    added = len(tok) - len(build_family_tokenizer(family))
    assert added > 0
    expect = rows if family.spare_rows >= added else len(tok)
    # a new base is written either way: grown, or its spare rows initialised for the new tokens
    assert _config_json(result["grown_base"])["vocab_size"] == expect
    saved = load_file(str(Path(result["final_adapter"]) / "adapter_model.safetensors"))
    embeds = {k: v.shape for k, v in saved.items() if "embed_tokens" in k or "lm_head" in k}
    assert embeds and all(shape[0] == expect for shape in embeds.values()), embeds
    out = merge_adapter(str(base), result["final_adapter"], tmp_path / "merged")
    cfg = _config_json(out)
    assert cfg["vocab_size"] == expect and cfg["tie_word_embeddings"] is True
    weights = _weights(out)
    assert "lm_head.weight" not in weights and weights["model.embed_tokens.weight"].shape[0] == expect
    merged = _load(out)
    new = range(len(tok) - added, len(tok))  # the tokens the template added come last
    assert merged.lm_head.weight.data_ptr() == merged.get_input_embeddings().weight.data_ptr()
    emb = merged.get_input_embeddings().weight
    assert all(emb[i].abs().sum() > 0 for i in new)  # the new rows were initialised and trained
