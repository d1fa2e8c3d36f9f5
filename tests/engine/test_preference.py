"""Preference optimisation (dpo and its loss variants, kto, orpo, cpo/SimPO) on the tiny model, for real:
weights move, and the chosen-vs-rejected log-prob margin of the toy pairs grows, measured by the
saved model itself (not by the trainer's own logs)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from finetune_engine.cli.finetuning import main as finetuning
from finetune_engine.tiny import write_preference_dataset

PAIRS = 16  # a toy set small enough that a few steps see every pair several times
LORA = {"peft_type": "LORA", "peft_kwargs": {"r": 8, "lora_alpha": 16, "target_modules": "all-linear"}}


@pytest.fixture(scope="session")
def pref_data(tmp_path_factory) -> dict[str, Path]:
    """The same 16 toy pairs in every format (one seed): the seed's dpo_messages, TRL's dpo_trl
    (message lists) and dpo_text (strings), and kto (both sides of each pair, labelled)."""
    root = tmp_path_factory.mktemp("pref")
    return {
        fmt: write_preference_dataset(root / f"{fmt}.jsonl", PAIRS, seed=0, fmt=fmt)
        for fmt in ("dpo_messages", "dpo_trl", "dpo_text", "kto")
    }


def _pairs(pref_data) -> list[tuple[list[dict], str, str]]:
    rows = [json.loads(line) for line in pref_data["dpo_messages"].read_text().splitlines()]
    return [
        (r["prompt_messages"], r["chosen_messages"][0]["content"], r["rejected_messages"][0]["content"])
        for r in rows
    ]


def _config(
    tmp_path: Path,
    model: Path,
    data: Path,
    peft: dict | None = LORA,
    template: str = "keep-original",
    eval_on: Path | None = None,
    per_device: int = 4,
    **training_args,
) -> Path:
    """A small preference config: 8 steps of batch 8 over the 16 pairs (4 epochs)."""
    cfg = {
        "data_conf": {
            "training_data": {"type": "CONCATENATION", "datasets": [{"path": str(data)}]},
            "validation_data": {"type": "CONCATENATION", "datasets": [{"path": str(eval_on)}]}
            if eval_on
            else {"type": "NONE"},
            "chat_template_name": template,
        },
        "training_args": {
            "output_dir": str(tmp_path / "out"),
            "learning_rate": 0.01,
            "max_steps": 8,
            "logging_steps": 1,
            "save_steps": 4,
            "lr_scheduler_type": "constant",
            **training_args,
        },
        "batchsize_conf": {"total_train_batch_size": 8, "max_per_device_train_batch_size": per_device},
        # merged outputs and auto resume, as this project's operators ask for them
        "run_conf": {
            "model": str(model),
            "determinism": "half",
            "merge_adapter": True,
            "resume_from_checkpoint": "auto",
        },
    }
    if peft is not None:
        cfg["peft_conf"] = peft
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _run(method: str, config: Path, *extra: str) -> dict:
    result = config.parent / "result.json"
    assert (
        finetuning(
            [method, str(config), "--result-file", str(result), "--num-preprocess-workers", "1", *extra]
        )
        == 0
    )
    return json.loads(result.read_text())


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path / "model.safetensors"))


def _moved(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> list[str]:
    return [
        k
        for k in before
        if k in after and before[k].shape == after[k].shape and not torch.equal(before[k], after[k])
    ]


@torch.no_grad()
def _margin(model_dir: Path, tokenizer_dir: Path, pairs) -> float:
    """Mean over the pairs of log p(chosen answer) - log p(rejected answer), each summed over the
    answer's tokens after the chat-templated prompt (the inference format)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()

    def logp(prompt: list[dict], answer: str) -> float:
        p = tok.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True, return_dict=True)[
            "input_ids"
        ]
        full = tok.apply_chat_template(
            prompt + [{"role": "assistant", "content": answer}], tokenize=True, return_dict=True
        )["input_ids"]
        assert full[: len(p)] == p
        ids = torch.tensor([full])
        logprobs = model(ids).logits[0, :-1].log_softmax(-1)
        targets = ids[0, 1:]
        return logprobs[len(p) - 1 :].gather(-1, targets[len(p) - 1 :, None]).sum().item()

    return sum(logp(q, good) - logp(q, bad) for q, good, bad in pairs) / len(pairs)


@pytest.fixture(scope="session")
def base_margin(tiny_model_dir, pref_data) -> float:
    return _margin(tiny_model_dir, tiny_model_dir, _pairs(pref_data))


def _assert_preference_learned(
    result: dict, tiny_model_dir: Path, pref_data, base_margin: float, layers=("q_proj",)
) -> float:
    final = Path(result["final_checkpoint"])
    moved = _moved(_weights(tiny_model_dir), _weights(final))
    for name in layers:
        assert any(f"layers.0.self_attn.{name}" in k or f"layers.0.mlp.{name}" in k for k in moved), (
            f"{name} did not move"
        )
    after = _margin(final, tiny_model_dir, _pairs(pref_data))
    assert after > base_margin + 0.2, (
        f"chosen-vs-rejected margin did not grow: {base_margin:.3f} -> {after:.3f}"
    )
    return after


# Every key of a preference run's result.json (the train job and the Airflow operators read them).
RESULT_KEYS = {
    "status",
    "method",
    "loss_type",
    "beta",
    "reference",
    "global_step",
    "planned_steps",
    "final_train_loss",
    "train_loss",
    "final_eval_loss",
    "final_eval_metrics",
    "final_train_reward_margin",
    "tokens_seen",
    "train_seconds",
    "num_train_examples",
    "num_eval_examples",
    "truncated_prompts",
    "resumed_from",
    "output_dir",
    "final_checkpoint",
    "final_adapter",
    "grown_base",
    "mlflow_run_id",
    "mlflow_tracking_uri",
    "versions",
}


# -- DPO ------------------------------------------------------------------------------------------


def test_dpo_lora_sigmoid_trains_saves_and_skips_when_finished(tiny_model, pref_data, tmp_path, base_margin):
    """Seed data format (prompt_messages/chosen_messages/rejected_messages), the adapter as policy and
    the adapter-disabled base as reference; eval on the training pairs, where the reward margin
    starts at exactly 0 (policy == reference)."""
    config = _config(
        tmp_path, tiny_model, pref_data["dpo_messages"], eval_on=pref_data["dpo_messages"], beta=0.1
    )
    result = _run("dpo", config)

    assert result["status"] == "completed" and result["global_step"] == result["planned_steps"] == 8
    assert result["method"] == "dpo" and result["loss_type"] == ["sigmoid"] and result["beta"] == 0.1
    assert set(result) == RESULT_KEYS and set(result["versions"]) == {"transformers", "torch", "trl"}
    assert result["grown_base"] is None and result["tokens_seen"] > 0 and result["truncated_prompts"] == 0
    assert result["reference"] == "the base with the adapter disabled"
    assert result["num_train_examples"] == result["num_eval_examples"] == PAIRS
    assert result["final_eval_metrics"]["eval_rewards/margins"] > 0
    assert result["final_eval_metrics"]["eval_rewards/accuracies"] > 0.5
    _assert_preference_learned(result, tiny_model, pref_data, base_margin)

    adapter, final = Path(result["final_adapter"]), Path(result["final_checkpoint"])
    for out in (adapter, final):
        assert (out / "_finetune_manifest.json").exists()
    meta = json.loads((adapter / "finetune_meta.json").read_text())
    assert meta["method"] == "dpo" and meta["added_tokens"] == [] and not meta["trained_embeddings"]
    assert (
        _weights(final)["model.embed_tokens.weight"].shape
        == _weights(tiny_model)["model.embed_tokens.weight"].shape
    )
    assert {p.name for p in (tmp_path / "out").glob("checkpoint-[0-9]*")} == {"checkpoint-4", "checkpoint-8"}

    stamp = (final / "model.safetensors").stat().st_mtime_ns
    again = _run("dpo", config)
    assert again["status"] == "skipped" and again["global_step"] == 8
    assert (final / "model.safetensors").stat().st_mtime_ns == stamp

    # killed after the last step's checkpoint, before the final outputs: finish from checkpoint-8, no
    # extra step
    adapter_weights = load_file(str(adapter / "adapter_model.safetensors"))
    for out in (adapter, final):
        shutil.rmtree(out)
    (tmp_path / "out" / "result.json").unlink()
    resumed = _run("dpo", config)
    assert resumed["status"] == "completed" and resumed["resumed_from"] == "checkpoint-8"
    assert resumed["global_step"] == 8 and resumed["final_train_loss"] is not None
    again_weights = load_file(str(adapter / "adapter_model.safetensors"))
    assert all(torch.equal(adapter_weights[k], again_weights[k]) for k in adapter_weights)


@pytest.mark.parametrize(
    "loss_type,extra",
    [
        ("ipo", {}),
        ("hinge", {}),
        ("robust", {"label_smoothing": 0.1}),  # robust equals sigmoid without label noise
    ],
)
def test_dpo_loss_variants_move_the_margin(
    tiny_model_dir, pref_data, tmp_path, base_margin, loss_type, extra
):
    config = _config(tmp_path, tiny_model_dir, pref_data["dpo_messages"], loss_type=loss_type, **extra)
    result = _run("dpo", config)
    assert result["loss_type"] == [loss_type]
    assert result["final_train_reward_margin"] > 0
    _assert_preference_learned(result, tiny_model_dir, pref_data, base_margin)


def test_dpo_full_finetune_against_a_frozen_copy(tiny_model_dir, pref_data, tmp_path, base_margin):
    """TRL's conversational prompt/chosen/rejected format; every layer trains, the reference is a
    frozen copy of the starting model (so the reward margin on the training pairs starts at 0)."""
    config = _config(
        tmp_path,
        tiny_model_dir,
        pref_data["dpo_trl"],
        peft=None,
        eval_on=pref_data["dpo_trl"],
        learning_rate=0.001,
    )
    result = _run("dpo", config)
    assert result["reference"] == "a frozen copy of the starting model"
    assert result["final_adapter"] is None
    assert result["final_eval_metrics"]["eval_rewards/margins"] > 0
    _assert_preference_learned(result, tiny_model_dir, pref_data, base_margin, layers=("q_proj", "down_proj"))
    moved = _moved(_weights(tiny_model_dir), _weights(Path(result["final_checkpoint"])))
    assert any("layers.1." in k for k in moved) and "model.embed_tokens.weight" in moved


# -- KTO, ORPO, CPO/SimPO -------------------------------------------------------------------------


def test_kto_unpaired_labels(tiny_model_dir, pref_data, tmp_path, base_margin):
    """prompt/completion/label rows: each pair's right answer labelled true, the wrong one false."""
    config = _config(tmp_path, tiny_model_dir, pref_data["kto"])
    result = _run("kto", config)
    assert result["method"] == "kto" and result["loss_type"] == "kto"
    assert result["reference"] == "the base with the adapter disabled"
    assert result["num_train_examples"] == 2 * PAIRS
    _assert_preference_learned(result, tiny_model_dir, pref_data, base_margin)


def test_kto_needs_two_examples_per_device(tiny_model_dir, pref_data, tmp_path, caplog):
    config = _config(tmp_path, tiny_model_dir, pref_data["kto"], per_device=1)
    assert finetuning(["kto", str(config)]) == 2
    assert (
        "batchsize_conf.max_per_device_train_batch_size" in caplog.text and "apo_zero_unpaired" in caplog.text
    )
    assert not (tmp_path / "out").exists()


def test_orpo_reference_free_on_text_pairs(tiny_model_dir, pref_data, tmp_path, base_margin):
    """TRL's string prompt/chosen/rejected (EOS appended by TRL); ORPO adds the odds-ratio term to NLL."""
    config = _config(tmp_path, tiny_model_dir, pref_data["dpo_text"], beta=1.0)
    result = _run("orpo", config)
    assert result["method"] == "orpo" and result["reference"] == "none (reference-free)"
    _assert_preference_learned(result, tiny_model_dir, pref_data, base_margin)


def test_cpo_simpo(tiny_model_dir, pref_data, tmp_path, base_margin):
    """SimPO = TRL's CPO trainer with loss_type simpo; cpo_alpha 0 drops the NLL term (pure SimPO)."""
    config = _config(
        tmp_path, tiny_model_dir, pref_data["dpo_messages"], loss_type="simpo", cpo_alpha=0.0, beta=2.0
    )
    result = _run("cpo", config)
    assert result["method"] == "cpo" and result["loss_type"] == "simpo"
    assert result["final_train_reward_margin"] > 0
    _assert_preference_learned(result, tiny_model_dir, pref_data, base_margin)


def test_simpo_asked_of_dpo_names_the_cpo_command(tiny_model_dir, pref_data, tmp_path, capsys):
    config = _config(tmp_path, tiny_model_dir, pref_data["dpo_messages"], loss_type="simpo")
    assert finetuning(["dpo", str(config)]) == 2
    assert "finetuning cpo" in capsys.readouterr().err


# -- data formats ---------------------------------------------------------------------------------


def test_formats_map_to_trl_rows(pref_data):
    from finetune_engine.data.preference import to_trl

    seed_rows = [to_trl(json.loads(line)) for line in pref_data["dpo_messages"].read_text().splitlines()]
    trl_rows = [to_trl(json.loads(line)) for line in pref_data["dpo_trl"].read_text().splitlines()]
    assert seed_rows == trl_rows and set(seed_rows[0]) == {"prompt", "chosen", "rejected"}
    kto_rows = [to_trl(json.loads(line)) for line in pref_data["kto"].read_text().splitlines()]
    assert [r["label"] for r in kto_rows[:4]] == [True, False, True, False]
    assert (
        kto_rows[0]["prompt"] == seed_rows[0]["prompt"]
        and kto_rows[0]["completion"] == seed_rows[0]["chosen"]
    )
    assert kto_rows[1]["completion"] == seed_rows[0]["rejected"]


def test_wrong_format_for_the_method_is_refused_before_training(
    tiny_model_dir, pref_data, chat_data, tmp_path, capsys
):
    assert finetuning(["dpo", str(_config(tmp_path, tiny_model_dir, pref_data["kto"]))]) == 2
    assert finetuning(["kto", str(_config(tmp_path, tiny_model_dir, chat_data))]) == 2
    err = capsys.readouterr().err
    assert str(pref_data["kto"]) in err and str(chat_data) in err
    assert not (tmp_path / "out").exists()


# -- the chat-template rule -----------------------------------------------------------------------


def test_check_template_rule():
    from finetune_engine.data.preference import PreferenceTemplateError, check_template

    check_template("keep-original", [], {}, "m")
    check_template("keep-original", [], {"chat_template_name": "chat-ml"}, "m")
    check_template("chat-ml", [], {"chat_template_name": "chat-ml"}, "m")
    with pytest.raises(PreferenceTemplateError, match=r"adds tokens \['<\|im_start\|>'\].*keep-original"):
        check_template("chat-ml", ["<|im_start|>"], {}, "m")
    # A template other than the SFT one is named as such, even when it would also add tokens.
    with pytest.raises(PreferenceTemplateError) as err:
        check_template("llama-3", ["<|eot_id|>"], {"chat_template_name": "chat-ml"}, "m", "sft-out")
    assert "llama-3 differs from the template sft-out was fine-tuned with (chat-ml" in str(err.value)
    assert "keep-original (or chat-ml)" in str(err.value)


def test_new_tokens_are_refused_before_the_model_loads(tiny_model_dir, pref_data, tmp_path, caplog):
    config = _config(tmp_path, tiny_model_dir, pref_data["dpo_messages"], template="chat-ml")
    assert finetuning(["dpo", str(config)]) == 2
    assert "adds tokens ['<|im_start|>', '<|im_end|>']" in caplog.text
    assert "data_conf.chat_template_name" in caplog.text
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_dpo_continues_an_sft_adapter_with_its_template(
    tiny_model_dir, chat_data, pref_data, tmp_path, caplog
):
    """SFT with chat-ml (new tokens, LoRA) -> DPO on that adapter: another template is refused
    naming the SFT one; chat-ml itself trains with no new tokens, TRL's frozen copy of the adapter
    as reference, and only the trained adapter is saved."""
    from tests.engine.conftest import make_config

    sft_dir = tmp_path / "sft"
    sft_dir.mkdir()
    sft_cfg = make_config(
        sft_dir,
        tiny_model_dir,
        chat_data,
        peft_conf={"peft_type": "LORA", "peft_kwargs": {"r": 4, "target_modules": "all-linear"}},
        training_args={"output_dir": str(sft_dir / "out"), "max_steps": 2, "learning_rate": 0.003},
    )
    assert finetuning(["sft", str(sft_cfg), "--num-preprocess-workers", "1"]) == 0
    base, sft_adapter = sft_dir / "out" / "checkpoint-new-basemodel", sft_dir / "out" / "checkpoint-final"
    assert base.is_dir() and sft_adapter.is_dir()

    pretrained = {"peft_type": "PRETRAINED_PEFT", "name_or_path": str(sft_adapter)}
    (tmp_path / "wrong").mkdir()
    wrong = _config(tmp_path / "wrong", base, pref_data["dpo_messages"], peft=pretrained, template="llama-3")
    assert finetuning(["dpo", str(wrong)]) == 2
    assert f"differs from the template {sft_adapter} was fine-tuned with (chat-ml" in caplog.text
    assert not (tmp_path / "wrong" / "out").exists()

    (tmp_path / "dpo").mkdir()
    config = _config(
        tmp_path / "dpo", base, pref_data["dpo_messages"], peft=pretrained, template="chat-ml", max_steps=4
    )
    result = _run("dpo", config)
    assert result["reference"] == "a frozen copy of the pretrained adapter"
    adapter = Path(result["final_adapter"])
    assert not (adapter / "ref").exists(), "TRL's reference adapter must not be saved as an output"
    meta = json.loads((adapter / "finetune_meta.json").read_text())
    assert meta["chat_template_name"] == "chat-ml" and meta["added_tokens"] == []
    emb = "model.embed_tokens.weight"
    assert (
        _weights(Path(result["final_checkpoint"]))[emb].shape == _weights(base)[emb].shape
    )  # no vocabulary growth
    before = load_file(str(sft_adapter / "adapter_model.safetensors"))
    after = load_file(str(adapter / "adapter_model.safetensors"))
    assert set(before) == set(after) and _moved(before, after), "the SFT adapter did not train further"


# -- max_prompt_length ----------------------------------------------------------------------------


@pytest.mark.parametrize("method,fmt", [("dpo", "dpo_messages"), ("kto", "kto")])
def test_prompt_limit_keeps_the_prompt_end(tiny_model_dir, pref_data, tmp_path, method, fmt):
    """The tokenized prompts keep their last max_prompt_length tokens, and a prompt longer than
    max_length is cut rather than dropped."""
    import datasets
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from finetune_engine.data.preference import to_trl
    from finetune_engine.recipes.preference import _trainer_classes, _with_prompt_limit

    config_cls, trainer_cls = _trainer_classes(method)
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    tok.pad_token = tok.eos_token
    rows = [to_trl(json.loads(line)) for line in pref_data[fmt].read_text().splitlines()]
    full = [
        tok.apply_chat_template(r["prompt"], add_generation_prompt=True, tokenize=True, return_dict=True)[
            "input_ids"
        ]
        for r in rows
    ]
    assert min(len(p) for p in full) > 16  # every prompt alone would fill max_length
    counts: dict[str, int] = {}
    args = config_cls(
        output_dir=str(tmp_path),
        max_length=16,
        per_device_train_batch_size=4,
        use_cpu=True,
        bf16=False,
        report_to=[],
    )
    trainer = _with_prompt_limit(trainer_cls, 6, counts)(
        model=AutoModelForCausalLM.from_pretrained(tiny_model_dir),
        args=args,
        processing_class=tok,
        train_dataset=datasets.Dataset.from_list(rows),
        **({"ref_model": None} if method == "dpo" else {}),
    )
    assert len(trainer.train_dataset) == len(rows) and counts == {"train": len(rows)}
    assert trainer.train_dataset["prompt_ids"] == [p[-6:] for p in full]
    # Without the limit, TRL drops every example whose prompt fills max_length.
    plain = trainer_cls(
        model=AutoModelForCausalLM.from_pretrained(tiny_model_dir),
        args=args,
        processing_class=tok,
        train_dataset=datasets.Dataset.from_list(rows),
    )
    assert len(plain.train_dataset) == 0


def test_max_prompt_length_in_a_run(tiny_model_dir, pref_data, tmp_path, caplog):
    config = _config(
        tmp_path, tiny_model_dir, pref_data["dpo_messages"], max_length=16, max_prompt_length=6, max_steps=1
    )
    result = _run("dpo", config)
    assert result["truncated_prompts"] == result["num_train_examples"] == PAIRS
    assert result["global_step"] == 1
    # The same max_length without the limit leaves nothing to train on, and says what to change.
    other = tmp_path / "other"
    other.mkdir()
    assert (
        finetuning(["dpo", str(_config(other, tiny_model_dir, pref_data["dpo_messages"], max_length=16))])
        == 2
    )
    assert (
        "training_args.max_length (now 16)" in caplog.text
        and "training_args.max_prompt_length" in caplog.text
    )
