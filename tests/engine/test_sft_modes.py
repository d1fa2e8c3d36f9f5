"""SFT modes beyond the default run: pad strategies, record formats, continued adapters, 8-bit,
explicit resume paths, added tokens, length counts, the result file and refused model weights."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from finetune_engine.cli.finetuning import main as finetuning
from finetune_engine.config import parse_config
from finetune_engine.data.collate import PaddingCollator
from finetune_engine.data.tokenize import IGNORE_INDEX, EncodeSettings, encode_batch
from finetune_engine.modeling import load_tokenizer
from tests.engine.conftest import make_config

CONVERSATION = {
    "messages": [
        {"role": "user", "content": "What is 2 plus 3?"},
        {"role": "assistant", "content": "2 plus 3 is 5."},
        {"role": "user", "content": "And the capital of Peru?"},
        {"role": "assistant", "content": "The capital of Peru is Lima."},
    ]
}
SHORT = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}
NO_VALIDATION = {"type": "NONE"}


def _cfg(model: Path, template: str = "keep-original", pad: str = "bos-repurpose", **data_conf):
    return parse_config(
        {
            "data_conf": {
                "training_data": {"type": "CONCATENATION", "datasets": [{"path": "x.jsonl"}]},
                "chat_template_name": template,
                "missing_pad_token_strategy": pad,
                **data_conf,
            },
            "batchsize_conf": {"total_train_batch_size": 2},
            "run_conf": {"model": str(model)},
        }
    )


def _run(config: Path, *extra: str) -> dict:
    result = config.parent / "result.json"
    assert (
        finetuning(
            ["sft", str(config), "--result-file", str(result), "--num-preprocess-workers", "1", *extra]
        )
        == 0
    )
    return json.loads(result.read_text())


def _write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


# --- missing_pad_token_strategy ------------------------------------------------------------


@pytest.mark.parametrize(
    "strategy,pad,input_pad",
    [
        ("bos-repurpose", "<s>", "<s>"),
        ("eos-repurpose", "</s>", "</s>"),
        ("unk-repurpose", "<unk>", "<unk>"),
        ("unk-convert-to-eos", "<unk>", "</s>"),  # the pad token stays UNK; padded inputs hold EOS
    ],
)
@pytest.mark.parametrize("completions_only", [True, False])
def test_pad_strategy_sets_pad_and_never_masks_eos(
    tiny_model_dir, strategy, pad, input_pad, completions_only
):
    tok = load_tokenizer(_cfg(tiny_model_dir, pad=strategy), str(tiny_model_dir))
    t = tok.tokenizer
    assert t.pad_token == pad and t.pad_token_id == t.convert_tokens_to_ids(pad)
    assert tok.collate_pad_id == t.convert_tokens_to_ids(input_pad)
    assert tok.end_marker == t.eos_token == "</s>"  # keep-original: EOS ends each assistant turn
    settings = EncodeSettings(512, completions_only=completions_only, end_marker=tok.end_marker)
    items = encode_batch([CONVERSATION, SHORT], t, settings)
    batch = PaddingCollator(tok.collate_pad_id)(items)
    eos = t.eos_token_id
    for row, item in enumerate(items):
        n = len(item["input_ids"])
        assert item["input_ids"].count(eos) == (2 if row == 0 else 1)
        # every EOS of the example is a label after collation, whatever the pad token is
        assert int((batch["labels"][row, :n] == eos).sum()) == item["input_ids"].count(eos)
        assert (batch["labels"][row, n:] == IGNORE_INDEX).all()
        assert (batch["input_ids"][row, n:] == tok.collate_pad_id).all()
        assert not batch["attention_mask"][row, n:].any()
    assert batch["input_ids"].shape[1] > len(items[1]["input_ids"])  # the short row really was padded


def test_pad_strategy_without_the_source_token_names_the_key(tiny_model_dir, tmp_path):
    from transformers import AutoTokenizer

    t = AutoTokenizer.from_pretrained(tiny_model_dir)
    t.unk_token = None
    t.save_pretrained(tmp_path / "tok")
    for strategy in ("unk-repurpose", "unk-convert-to-eos"):
        with pytest.raises(
            ValueError, match=f"missing_pad_token_strategy {strategy}: the tokenizer has no unk token"
        ):
            load_tokenizer(_cfg(tiny_model_dir, pad=strategy), str(tmp_path / "tok"))


def test_unk_convert_to_eos_pads_training_batches_with_eos(tiny_model, chat_data, tmp_path, monkeypatch):
    seen: list[dict] = []
    real_call = PaddingCollator.__call__

    def recording_call(self, features):
        batch = real_call(self, features)
        seen.append(batch)
        return batch

    monkeypatch.setattr(PaddingCollator, "__call__", recording_call)
    config = make_config(
        tmp_path,
        tiny_model,
        chat_data,
        data_conf={
            "training_data": {"type": "CONCATENATION", "datasets": [{"path": str(chat_data)}]},
            "validation_data": NO_VALIDATION,
            "chat_template_name": "keep-original",
            "missing_pad_token_strategy": "unk-convert-to-eos",
        },
        training_args={"output_dir": str(tmp_path / "out"), "max_steps": 2, "learning_rate": 0.003},
    )
    result = _run(config)
    assert result["global_step"] == 2 and result["final_train_loss"] == result["final_train_loss"]
    from transformers import AutoTokenizer

    base = AutoTokenizer.from_pretrained(tiny_model)
    padded = [b for b in seen if not b["attention_mask"].all()]
    assert padded, "no batch needed padding; the test data must vary in length"
    for b in padded:
        pads = b["attention_mask"] == 0
        assert (b["input_ids"][pads] == base.eos_token_id).all()
        assert (b["labels"][pads] == IGNORE_INDEX).all()
        real_eos = (b["input_ids"] == base.eos_token_id) & ~pads
        assert (b["labels"][real_eos] == base.eos_token_id).all() and real_eos.any()


# --- record formats: prompt/completion and text ------------------------------------------------


def _qa_records(n: int) -> list[dict]:
    from finetune_engine.tiny import COUNTRIES

    names = list(COUNTRIES)
    return [
        {
            "prompt": f"What is the capital of {names[i % len(names)]}?",
            "completion": f"The capital of {names[i % len(names)]} is {COUNTRIES[names[i % len(names)]]}.",
        }
        for i in range(n)
    ]


def _text_records(n: int) -> list[dict]:
    return [{"text": f"{i % 20} plus {(3 * i) % 20} is {i % 20 + (3 * i) % 20}."} for i in range(n)]


@pytest.mark.parametrize("template,end", [("chat-ml", "<|im_end|>"), ("keep-original", "</s>")])
def test_prompt_completion_mask_trains_only_the_completion(tiny_model_dir, template, end):
    tok = load_tokenizer(_cfg(tiny_model_dir, template), str(tiny_model_dir))
    t = tok.tokenizer
    record = {"prompt": "What is the capital of Peru?", "completion": "The capital of Peru is Lima."}
    [item] = encode_batch([record], t, EncodeSettings(512, completions_only=True, end_marker=tok.end_marker))
    ids, labels = item["input_ids"], item["labels"]
    trained = [i for i, lab in zip(ids, labels, strict=True) if lab != IGNORE_INDEX]
    assert t.decode(trained) == "The capital of Peru is Lima." + end
    # the trained tokens are one contiguous run: the completion and its end marker, nothing else
    first = next(k for k, lab in enumerate(labels) if lab != IGNORE_INDEX)
    assert labels[first : first + len(trained)] == ids[first : first + len(trained)] == trained
    assert "What is the capital of Peru?" in t.decode(ids[:first])
    # without completions-only, every token but the first is trained
    [full] = encode_batch([record], t, EncodeSettings(512, end_marker=tok.end_marker))
    assert full["input_ids"] == ids and full["labels"] == [IGNORE_INDEX] + ids[1:]


@pytest.mark.parametrize("completions_only", [True, False])
def test_text_records_train_every_token(tiny_model_dir, completions_only):
    tok = load_tokenizer(_cfg(tiny_model_dir, "chat-ml"), str(tiny_model_dir))
    t = tok.tokenizer
    [item] = encode_batch(
        [{"text": "The capital of Peru is Lima."}],
        t,
        EncodeSettings(512, completions_only=completions_only, end_marker=tok.end_marker),
    )
    ids = item["input_ids"]
    assert ids[0] == t.bos_token_id and ids[-1] == t.eos_token_id  # plain text: BOS + text + EOS, no template
    assert t.decode(ids[1:-1]) == "The capital of Peru is Lima."
    assert item["labels"] == [IGNORE_INDEX] + ids[1:]


@pytest.mark.parametrize("kind", ["prompt_completion", "text"])
def test_training_on_prompt_completion_and_text_files(tiny_model, tmp_path, kind):
    records = _qa_records(48) if kind == "prompt_completion" else _text_records(48)
    data = _write_jsonl(tmp_path / f"{kind}.jsonl", records)
    config = make_config(
        tmp_path,
        tiny_model,
        data,
        data_conf={"validation_data": {"type": "AUTO_SPLIT", "ratio": 0.25, "seed": 2}},
        sft_args={"max_seq_length": 64, "train_on_completions_only": kind == "prompt_completion"},
        training_args={"output_dir": str(tmp_path / "out"), "max_steps": 3, "learning_rate": 0.003},
    )
    before = load_file(str(tiny_model / "model.safetensors"))
    result = _run(config)
    assert (
        result["global_step"] == 3
        and result["num_train_examples"] == 36
        and result["num_eval_examples"] == 12
    )
    assert all(0 < result[k] < 20 for k in ("final_train_loss", "final_eval_loss"))
    after = load_file(str(Path(result["final_checkpoint"]) / "model.safetensors"))
    key = "model.layers.1.mlp.down_proj.weight"
    assert not torch.equal(before[key], after[key])


# --- PRETRAINED_PEFT, 8-bit bitsandbytes, resume from an explicit path ---------------------------

LORA = {"peft_type": "LORA", "peft_kwargs": {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]}}


def _sub(tmp_path: Path, name: str) -> Path:
    d = tmp_path / name
    d.mkdir()
    return d


def test_pretrained_peft_continues_the_saved_adapter(tiny_model, chat_data, tmp_path):
    from peft import get_peft_model_state_dict

    from finetune_engine.config import load_config
    from finetune_engine.modeling import load_model

    first_dir, second_dir = _sub(tmp_path, "first"), _sub(tmp_path, "second")
    first = _run(
        make_config(
            first_dir,
            tiny_model,
            chat_data,
            peft_conf=LORA,
            data_conf={"validation_data": NO_VALIDATION},
            training_args={"output_dir": str(first_dir / "out"), "max_steps": 3, "learning_rate": 0.003},
        )
    )
    adapter = Path(first["final_adapter"])
    saved = load_file(str(adapter / "adapter_model.safetensors"))
    assert any("lora_B" in k and v.abs().sum() > 0 for k, v in saved.items())  # the first run trained it

    config = make_config(
        second_dir,
        tiny_model,
        chat_data,
        peft_conf={"peft_type": "PRETRAINED_PEFT", "name_or_path": str(adapter)},
        data_conf={"validation_data": NO_VALIDATION},
        training_args={"output_dir": str(second_dir / "out"), "max_steps": 3, "learning_rate": 0.003},
    )
    # What training starts from: exactly the saved adapter (LoRA and the embedding copies), trainable.
    cfg = load_config(config, method="sft")
    tok = load_tokenizer(cfg, str(tiny_model))
    model = load_model(cfg, str(tiny_model), tok)
    start = get_peft_model_state_dict(model)
    assert set(start) == set(saved)
    assert all(torch.equal(start[k], saved[k]) for k in saved)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any("lora_A" in n for n in trainable) and any("lora_B" in n for n in trainable)
    del model

    second = _run(config)
    assert second["global_step"] == 3
    continued = load_file(str(Path(second["final_adapter"]) / "adapter_model.safetensors"))
    assert set(continued) == set(saved)
    moved = [k for k in saved if "lora_" in k and not torch.equal(saved[k], continued[k])]
    assert moved and all(("lora_A" in k or "lora_B" in k) for k in moved)
    assert json.loads((Path(second["final_adapter"]) / "adapter_config.json").read_text())["r"] == 4


def test_8bit_bitsandbytes_lora_trains_on_cpu(tiny_model, chat_data, tmp_path):
    """bitsandbytes 0.50 has CPU int8 kernels: the base really loads as Linear8bitLt and trains."""
    import bitsandbytes as bnb

    from finetune_engine.config import load_config
    from finetune_engine.modeling import load_model

    config = make_config(
        tmp_path,
        tiny_model,
        chat_data,
        peft_conf=LORA,
        quant_conf={"quantization_type": "bits-and-bytes", "load_in_8bit": True},
        data_conf={"validation_data": NO_VALIDATION},
        training_args={"output_dir": str(tmp_path / "out"), "max_steps": 3, "learning_rate": 0.003},
    )
    cfg = load_config(config, method="sft")
    model = load_model(cfg, str(tiny_model), load_tokenizer(cfg, str(tiny_model)))
    q_proj = model.base_model.model.model.layers[0].self_attn.q_proj
    assert isinstance(q_proj.base_layer, bnb.nn.Linear8bitLt) and q_proj.base_layer.weight.dtype == torch.int8
    del model

    result = _run(config)
    assert result["global_step"] == 3 and 0 < result["final_train_loss"] < 20
    adapter = load_file(str(Path(result["final_adapter"]) / "adapter_model.safetensors"))
    assert any("lora_B" in k and v.abs().sum() > 0 for k, v in adapter.items()), (
        "LoRA B starts at zero and must have moved"
    )
    merged = load_file(str(Path(result["final_checkpoint"]) / "model.safetensors"))
    assert all(t.dtype in (torch.float32, torch.bfloat16, torch.float16) for t in merged.values())
    assert not any("SCB" in k or "weight_format" in k for k in merged)  # no int8 state in the merged model
    assert json.loads((Path(result["final_adapter"]) / "finetune_meta.json").read_text())["quantized"] is True


def test_resume_from_an_explicit_checkpoint_path(tiny_model, chat_data, tmp_path, caplog):
    import shutil

    first_dir, second_dir = _sub(tmp_path, "first"), _sub(tmp_path, "second")
    args = {"max_steps": 6, "save_steps": 3, "learning_rate": 0.003, "lr_scheduler_type": "constant"}
    first = _run(
        make_config(
            first_dir, tiny_model, chat_data, training_args={"output_dir": str(first_dir / "out"), **args}
        )
    )
    checkpoint = first_dir / "out" / "checkpoint-3"
    assert (checkpoint / "_finetune_manifest.json").exists()

    config = make_config(
        second_dir,
        tiny_model,
        chat_data,
        run_conf={"model": str(tiny_model), "determinism": "half", "resume_from_checkpoint": str(checkpoint)},
        training_args={"output_dir": str(second_dir / "out"), **args},
    )
    caplog.set_level(logging.INFO)
    caplog.clear()
    second = _run(config)
    assert second["resumed_from"] == "checkpoint-3" and second["global_step"] == 6
    # only steps 4-6 ran here: training began at step 3 and no checkpoint-3 was written again
    assert "training: step 3 of 6" in caplog.text
    assert sorted(p.name for p in (second_dir / "out").glob("checkpoint-[0-9]*")) == ["checkpoint-6"]
    state = json.loads((second_dir / "out" / "checkpoint-6" / "trainer_state.json").read_text())
    assert [e["step"] for e in state["log_history"] if "loss" in e] == list(range(1, 7))
    # steps 1-3 come from the checkpoint, 4-6 were trained again on the same batches: same model
    a = load_file(str(Path(first["final_checkpoint"]) / "model.safetensors"))
    b = load_file(str(Path(second["final_checkpoint"]) / "model.safetensors"))
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)

    # an explicit path that is not a complete checkpoint is refused, naming the key
    broken = tmp_path / "checkpoint-broken"
    shutil.copytree(checkpoint, broken)
    (broken / "_finetune_manifest.json").unlink()
    (broken / "trainer_state.json").unlink()  # the Trainer writes it last: a save cut off before it
    bad = make_config(
        _sub(tmp_path, "third"),
        tiny_model,
        chat_data,
        run_conf={"model": str(tiny_model), "resume_from_checkpoint": str(broken)},
        training_args={"output_dir": str(tmp_path / "third" / "out"), **args},
    )
    assert finetuning(["sft", str(bad), "--num-preprocess-workers", "1"]) == 2
    assert f"run_conf.resume_from_checkpoint {broken} is not a complete checkpoint" in caplog.text
    assert not (tmp_path / "third" / "out" / "checkpoint-final").exists()


# --- added tokens: mean-resized rows, trained with LoRA, grown base saved ------------------------

EMB, HEAD = "model.embed_tokens.weight", "lm_head.weight"


def test_added_tokens_get_mean_initialised_rows(tiny_model_dir):
    from finetune_engine.modeling import load_model

    cfg = _cfg(tiny_model_dir, "chat-ml")
    tok = load_tokenizer(cfg, str(tiny_model_dir))
    old = load_file(str(tiny_model_dir / "model.safetensors"))
    n = old[EMB].shape[0]
    model = load_model(cfg, str(tiny_model_dir), tok)
    assert len(tok.tokenizer) == n + 2
    for key, module in ((EMB, model.get_input_embeddings()), (HEAD, model.get_output_embeddings())):
        weight = module.weight.detach()
        assert weight.shape[0] == n + 2
        assert torch.equal(weight[:n], old[key])  # old rows untouched
        mean = old[key].mean(0)
        for row in weight[n:]:
            # near the mean of the old rows (default init would be ~0.02 away per entry)
            assert torch.allclose(row, mean, atol=1e-4), (key, (row - mean).abs().max())
        assert (weight[n:] - mean).abs().max() < 0.01 * old[key].std()


def test_lora_with_added_tokens_trains_new_rows_and_saves_grown_base(tiny_model, chat_data, tmp_path):
    config = make_config(
        tmp_path,
        tiny_model,
        chat_data,
        peft_conf=LORA,
        data_conf={"validation_data": NO_VALIDATION},
        training_args={"output_dir": str(tmp_path / "out"), "max_steps": 3, "learning_rate": 0.003},
    )
    old = load_file(str(tiny_model / "model.safetensors"))
    n = old[EMB].shape[0]
    result = _run(config)
    grown_dir = Path(result["grown_base"])
    assert grown_dir.name == "checkpoint-new-basemodel" and (grown_dir / "_finetune_manifest.json").exists()
    grown = load_file(str(grown_dir / "model.safetensors"))
    from transformers import AutoTokenizer

    assert len(AutoTokenizer.from_pretrained(grown_dir)) == n + 2
    adapter = load_file(str(Path(result["final_adapter"]) / "adapter_model.safetensors"))
    merged = load_file(str(Path(result["final_checkpoint"]) / "model.safetensors"))
    for key in (EMB, HEAD):
        # the grown base: old rows as they were, new rows at the old rows' mean
        assert grown[key].shape[0] == n + 2 and torch.equal(grown[key][:n], old[key])
        assert torch.allclose(grown[key][n:], old[key].mean(0).expand(2, -1), atol=1e-4)
        # the adapter carries a trained full copy whose new-token rows moved away from the base
        suffix = "embed_tokens.weight" if key == EMB else "lm_head.weight"
        [copy] = [v for k, v in adapter.items() if k.endswith(suffix)]
        assert copy.shape == grown[key].shape
        for row in (n, n + 1):
            assert not torch.allclose(copy[row], grown[key][row], atol=1e-6), f"{key} row {row} did not train"
        assert torch.equal(merged[key], copy.to(merged[key].dtype))  # merged model uses the trained rows


# --- length handling counts ------------------------------------------------------------------------


@pytest.mark.parametrize("handling", ["filter", "truncate"])
def test_filtered_and_truncated_counts_logged_and_reported(tiny_model, tmp_path, caplog, handling):
    short = [
        {
            "messages": [
                {"role": "user", "content": f"What is {i} plus 1?"},
                {"role": "assistant", "content": f"{i} plus 1 is {i + 1}."},
            ]
        }
        for i in range(20)
    ]
    long = [
        {
            "messages": [
                {"role": "user", "content": "Describe the fox."},
                {"role": "assistant", "content": "The red fox sees the owl. " * (20 + i)},
            ]
        }
        for i in range(5)
    ]
    data = _write_jsonl(tmp_path / "mixed.jsonl", short[:10] + long + short[10:])
    max_len = 64
    # independent count: the chat-ml rendering's token length, as training sees it
    tok = load_tokenizer(_cfg(tiny_model, "chat-ml"), str(tiny_model)).tokenizer
    lengths = [
        len(
            tok(tok.apply_chat_template(r["messages"], tokenize=False), add_special_tokens=False)["input_ids"]
        )
        for r in short + long
    ]
    assert sum(n > max_len for n in lengths) == 5 and max(lengths[:20]) <= max_len

    config = make_config(
        tmp_path,
        tiny_model,
        data,
        data_conf={"validation_data": NO_VALIDATION},
        sft_args={"max_seq_length": max_len, "length_handling": handling},
        training_args={"output_dir": str(tmp_path / "out"), "max_steps": 1},
    )
    caplog.set_level(logging.INFO)
    result = _run(config)
    filtered, truncated = (5, 0) if handling == "filter" else (0, 5)
    assert result["filtered_examples"] == filtered and result["truncated_examples"] == truncated
    assert result["num_train_examples"] == 25 - filtered
    assert (
        f"kept {25 - filtered} train / 0 eval; filtered as too long "
        f"{filtered}, truncated {truncated}, without trained tokens 0" in caplog.text
    )


# --- the README's command and the result file (flag and env) --------------------------------------

ROOT = Path(__file__).resolve().parents[2]


def _readme_command() -> list[str]:
    """The README's ``finetuning sft ...`` example, continuation lines joined."""
    import re
    import shlex

    text = (ROOT / "README.md").read_text()
    match = re.search(r"^finetuning sft (?:.*\\\n)*.*$", text, re.M)
    assert match, "README has no `finetuning sft` example"
    return shlex.split(match.group(0).replace("\\\n", " "))


def _readme_workdir(tmp_path: Path, tiny_model_dir: Path) -> Path:
    """A clean directory laid out as the shipped config's header prepares it (model and data in
    .work/), with the shipped configs where the README's relative path expects them."""
    import shutil

    from finetune_engine.tiny import write_chat_dataset

    work = tmp_path / "repo"
    (work / "engine").mkdir(parents=True)
    (work / "engine" / "configs").symlink_to(ROOT / "engine" / "configs")
    shutil.copytree(tiny_model_dir, work / ".work" / "tiny-model")  # = python -m finetune_engine.tiny model
    write_chat_dataset(work / ".work" / "tiny-chat.jsonl")  # = python -m finetune_engine.tiny data
    return work


def _run_cli(argv: list[str], cwd: Path, env: dict[str, str]):
    import os
    import subprocess
    import sys

    exe = Path(sys.executable).parent / argv[0]
    assert exe.exists(), f"{argv[0]} is not installed next to {sys.executable}"
    return subprocess.run(
        [str(exe), *argv[1:]], cwd=cwd, env={**os.environ, **env}, capture_output=True, text=True, timeout=900
    )


@pytest.mark.slow
def test_readme_command_runs_and_writes_the_result_file_named_by_flag(tiny_model_dir, tmp_path):
    command = _readme_command()
    assert (
        command[:3] == ["finetuning", "sft", "engine/configs/tiny-sft-lora.yaml"]
        and "--result-file" in command
    )
    work = _readme_workdir(tmp_path, tiny_model_dir)
    env_target = tmp_path / "env-result.json"  # the flag beats FINETUNE_RESULT_FILE
    proc = _run_cli(
        [*command, "--set", "training_args.max_steps=3", "--num-preprocess-workers", "1"],
        work,
        {"FINETUNE_RESULT_FILE": str(env_target)},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    target = work / command[command.index("--result-file") + 1]
    result = json.loads(target.read_text())
    assert result["status"] == "completed" and result["global_step"] == 3 and result["train_loss"] > 0
    assert result["final_eval_loss"] is not None  # the config holds out 10% for eval loss
    assert (
        json.loads((Path(work / result["final_adapter"]) / "adapter_config.json").read_text())["r"] == 32
    )  # --set applied
    assert (work / result["final_checkpoint"] / "_finetune_manifest.json").exists()
    assert result["final_checkpoint"] in proc.stderr  # where the result is, in the log
    assert not env_target.exists()


@pytest.mark.slow
def test_result_file_named_by_env(tiny_model_dir, tmp_path):
    command = _readme_command()
    i = command.index("--result-file")
    del command[i : i + 2]
    work = _readme_workdir(tmp_path, tiny_model_dir)
    target = tmp_path / "xcom" / "return.json"  # parent created on demand
    proc = _run_cli(
        [*command, "--set", "training_args.max_steps=2", "--num-preprocess-workers", "1"],
        work,
        {"FINETUNE_RESULT_FILE": str(target)},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(target.read_text())
    assert result["status"] == "completed" and result["global_step"] == 2
    stored = work / ".work" / "experiments" / "tiny-sft-lora" / "result.json"
    assert json.loads(stored.read_text()) == result


# --- model loading safety ---------------------------------------------------------------------------


def test_pickle_only_weights_refused_unless_allowed(tiny_model, chat_data, tmp_path, caplog, monkeypatch):
    from transformers import AutoModelForCausalLM

    weights = load_file(str(tiny_model / "model.safetensors"))
    torch.save(weights, tiny_model / "pytorch_model.bin")
    (tiny_model / "model.safetensors").unlink()
    config = make_config(
        tmp_path,
        tiny_model,
        chat_data,
        data_conf={"validation_data": NO_VALIDATION},
        training_args={"output_dir": str(tmp_path / "out"), "max_steps": 1},
    )
    caplog.set_level(logging.ERROR)
    assert finetuning(["sft", str(config), "--num-preprocess-workers", "1"]) == 2
    assert f"{tiny_model} has only pickle weights (.bin/.pt)" in caplog.text
    assert "run_conf.model_args.use_safetensors: false" in caplog.text
    assert not (tmp_path / "out" / "checkpoint-final").exists()

    # explicitly allowed: loads the .bin (never with remote code) and trains
    calls: list[dict] = []
    real = AutoModelForCausalLM.from_pretrained.__func__

    def recording(cls, path, *args, **kwargs):
        calls.append(kwargs)
        return real(cls, path, *args, **kwargs)

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", classmethod(recording))
    result = _run(config, "--set", "run_conf.model_args.use_safetensors=false")
    assert result["global_step"] == 1
    assert calls and calls[0]["use_safetensors"] is False and calls[0]["trust_remote_code"] is False
    trained = load_file(str(Path(result["final_checkpoint"]) / "model.safetensors"))
    assert (
        trained["model.layers.0.self_attn.q_proj.weight"].shape
        == weights["model.layers.0.self_attn.q_proj.weight"].shape
    )


def test_trust_remote_code_defaults_to_false():
    from finetune_engine.config import schema

    assert schema.ModelArgs.model_fields["trust_remote_code"].default is False
    cfg = parse_config(
        {
            "data_conf": {"training_data": {"type": "CONCATENATION", "datasets": [{"path": "d.jsonl"}]}},
            "batchsize_conf": {"total_train_batch_size": 2},
            "run_conf": {"model": "m"},
        }
    )
    assert cfg.run_conf.model_args.trust_remote_code is False
    assert cfg.run_conf.model_args.use_safetensors is True
