"""The Silogen engine's chat templates: same names, same rendered text, same added tokens, same
assistant markers; completion-only labels from the start marker through the end marker; the
conversation framed as BOS + text + EOS; the saved inference tokenizer. On the tiny tokenizer
(BOS <s>, EOS </s>, none of the templates' tokens in its vocabulary)."""

from __future__ import annotations

import json

import pytest

from finetune_engine.config import parse_config
from finetune_engine.data.templates import NAMED_TEMPLATES
from finetune_engine.data.tokenize import IGNORE_INDEX, EncodeSettings, encode_batch
from finetune_engine.modeling import load_tokenizer

CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is 2 plus 3?"},
    {"role": "assistant", "content": "2 plus 3 is 5."},
    {"role": "user", "content": " And the capital of Peru? "},  # spaces: simplified-llama31 trims them
    {"role": "assistant", "content": "The capital of Peru is Lima."},
]

# name -> (the conversation rendered, the first user turn with the generation prompt, tokens added)
EXPECTED = {
    "mistral-with-system": (
        "<<SYS>>\nBe brief.\n<</SYS>>\n[INST] What is 2 plus 3? [/INST]2 plus 3 is 5.</s> "
        "[INST]  And the capital of Peru?  [/INST]The capital of Peru is Lima.</s> ",
        "[INST] What is 2 plus 3? [/INST]",
        [],
    ),
    "chat-ml": (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWhat is 2 plus 3?<|im_end|>\n"
        "<|im_start|>assistant\n2 plus 3 is 5.<|im_end|>\n"
        "<|im_start|>user\n And the capital of Peru? <|im_end|>\n"
        "<|im_start|>assistant\nThe capital of Peru is Lima.<|im_end|>\n",
        "<|im_start|>user\nWhat is 2 plus 3?<|im_end|>\n<|im_start|>assistant\n",
        ["<|im_start|>", "<|im_end|>"],
    ),
    "poro": (
        "<|system|>\nBe brief.</s><|user|>\nWhat is 2 plus 3?</s><|assistant|>\n2 plus 3 is 5.</s>"
        "<|user|>\n And the capital of Peru? </s><|assistant|>\nThe capital of Peru is Lima.</s>",
        "<|user|>\nWhat is 2 plus 3?</s><|assistant|>\n",
        ["<|user|>", "<|assistant|>"],
    ),
    "simplified-llama31": (
        "<s><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nWhat is 2 plus 3?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n2 plus 3 is 5.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nAnd the capital of Peru?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nThe capital of Peru is Lima.<|eot_id|>",
        "<s><|start_header_id|>user<|end_header_id|>\n\nWhat is 2 plus 3?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n",
        ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
    ),
}

# name -> (assistant start marker, assistant end marker), as the Silogen engine defines them
MARKERS = {
    "mistral-with-system": ("[/INST]", "</s>"),
    "chat-ml": ("<|im_start|>assistant\n", "<|im_end|>"),
    "poro": ("<|assistant|>\n", "</s>"),
    "simplified-llama31": ("<|start_header_id|>assistant<|end_header_id|>\n\n", "<|eot_id|>"),
}


def _cfg(model, template: str | None = "chat-ml", peft: dict | None = None, **sft_args):
    data_conf = {"training_data": {"type": "CONCATENATION", "datasets": [{"path": "x.jsonl"}]}}
    if template is not None:
        data_conf["chat_template_name"] = template
    config = {
        "data_conf": data_conf,
        "batchsize_conf": {"total_train_batch_size": 2},
        "run_conf": {"model": str(model), "preset": "none"},
        "sft_args": {"max_seq_length": 512, **sft_args},
    }
    if peft is not None:
        config["peft_conf"] = peft
    return parse_config(config)


def _encode(tok, record, cfg) -> dict:
    [item] = encode_batch(
        [record], tok.tokenizer, EncodeSettings.for_sft(cfg.sft_args, tok.end_marker, tok.start_marker)
    )
    assert isinstance(item, dict), item
    return item


def test_every_silogen_template_name_exists_and_the_default_is_theirs(tiny_model_dir):
    from finetune_engine.config.schema import ChatTemplateName

    names = {t.value for t in ChatTemplateName}
    assert {"mistral-with-system", "chat-ml", "poro", "keep-original", "simplified-llama31"} <= names
    assert set(EXPECTED) <= set(NAMED_TEMPLATES)
    assert _cfg(tiny_model_dir, template=None).data_conf.chat_template_name == "mistral-with-system"


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_template_renders_like_the_silogen_engine_and_adds_the_same_tokens(tiny_model_dir, name):
    full, prompt, added = EXPECTED[name]
    tok = load_tokenizer(_cfg(tiny_model_dir, name), str(tiny_model_dir))
    t = tok.tokenizer
    assert t.apply_chat_template(CONVERSATION, tokenize=False) == full
    assert t.apply_chat_template(CONVERSATION[1:2], tokenize=False, add_generation_prompt=True) == prompt
    assert tok.added_tokens == added
    assert len(t) == t.vocab_size + len(added)  # the tiny tokenizer had no added tokens before
    for token in added:  # each new token is one special token, never split
        assert len(t(token, add_special_tokens=False)["input_ids"]) == 1
    assert (tok.start_marker, tok.end_marker) == MARKERS[name]


def test_mistral_with_system_adds_no_tokens_so_the_model_keeps_its_vocabulary(tiny_model_dir):
    """No vocabulary growth: no resized embeddings, no full embedding copies in the adapter."""
    from finetune_engine.modeling import load_model

    cfg = _cfg(
        tiny_model_dir,
        "mistral-with-system",
        peft={
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "peft_kwargs": {"r": 4, "target_modules": ["q_proj", "v_proj"]},
        },
    )
    tok = load_tokenizer(cfg, str(tiny_model_dir))
    vocab = json.loads((tiny_model_dir / "config.json").read_text())["vocab_size"]
    assert tok.added_tokens == [] and len(tok.tokenizer) == vocab
    model = load_model(cfg, str(tiny_model_dir), tok)
    assert model.get_input_embeddings().weight.shape[0] == vocab
    assert not model.peft_config["default"].modules_to_save


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_completions_only_trains_start_marker_reply_and_end_marker(tiny_model_dir, name):
    """The Silogen collator's labels: from each assistant start marker through its end marker."""
    cfg = _cfg(tiny_model_dir, name, train_on_completions_only=True)
    tok = load_tokenizer(cfg, str(tiny_model_dir))
    t = tok.tokenizer
    item = _encode(tok, {"messages": CONVERSATION}, cfg)
    ids, labels = item["input_ids"], item["labels"]
    assert all(lab in (IGNORE_INDEX, i) for i, lab in zip(ids, labels, strict=True))
    start, end = MARKERS[name]
    trained = t.decode([i for i, lab in zip(ids, labels, strict=True) if lab != IGNORE_INDEX])
    assert trained == f"{start}2 plus 3 is 5.{end}{start}The capital of Peru is Lima.{end}"
    # Framing: BOS first (once, untrained), EOS last: appended and untrained, or, where the
    # conversation already ends with EOS (poro), that EOS as the trained end marker.
    assert ids[0] == t.bos_token_id and ids[1] != t.bos_token_id and labels[0] == IGNORE_INDEX
    assert ids[-1] == t.eos_token_id and ids[-2] != t.eos_token_id
    assert labels[-1] == (t.eos_token_id if EXPECTED[name][0].endswith("</s>") else IGNORE_INDEX)
    # The trained positions form two runs, one per assistant turn.
    positions = [k for k, lab in enumerate(labels) if lab != IGNORE_INDEX]
    runs = 1 + sum(1 for a, b in zip(positions, positions[1:], strict=False) if b != a + 1)
    assert runs == 2


def test_label_ids_exact_on_chat_ml(tiny_model_dir):
    """Which ids carry labels, token by token, for one chat-ml example."""
    cfg = _cfg(tiny_model_dir, "chat-ml", train_on_completions_only=True)
    tok = load_tokenizer(cfg, str(tiny_model_dir))
    t = tok.tokenizer
    item = _encode(tok, {"messages": CONVERSATION[1:3]}, cfg)
    tokens = t.convert_ids_to_tokens(item["input_ids"])
    trained = [tok_ for tok_, lab in zip(tokens, item["labels"], strict=True) if lab != IGNORE_INDEX]
    assert tokens[:3] == ["<s>", "<|im_start|>", "user"] and tokens[-3:] == ["<|im_end|>", "Ċ", "</s>"]
    assert trained == ["<|im_start|>", "assistant", "Ċ", "2", "Ġplus", "Ġ3", "Ġis", "Ġ5", ".", "<|im_end|>"]


def test_option_keeps_the_reply_only_labels(tiny_model_dir):
    cfg = _cfg(tiny_model_dir, "chat-ml", train_on_completions_only=True, train_assistant_start_marker=False)
    tok = load_tokenizer(cfg, str(tiny_model_dir))
    item = _encode(tok, {"messages": CONVERSATION}, cfg)
    trained = tok.tokenizer.decode(
        [i for i, lab in zip(item["input_ids"], item["labels"], strict=True) if lab != IGNORE_INDEX]
    )
    assert trained == "2 plus 3 is 5.<|im_end|>The capital of Peru is Lima.<|im_end|>"


def test_keep_original_start_marker_is_the_generation_prompt(tiny_model_dir):
    cfg = _cfg(tiny_model_dir, "keep-original", train_on_completions_only=True)
    tok = load_tokenizer(cfg, str(tiny_model_dir))
    item = _encode(tok, {"messages": CONVERSATION}, cfg)
    trained = tok.tokenizer.decode(
        [i for i, lab in zip(item["input_ids"], item["labels"], strict=True) if lab != IGNORE_INDEX]
    )
    assert trained == "Assistant:\n2 plus 3 is 5.</s>Assistant:\nThe capital of Peru is Lima.</s>"


def test_full_sequence_training_appends_a_trained_eos_unless_asked_not_to(tiny_model_dir):
    cfg = _cfg(tiny_model_dir, "chat-ml")
    tok = load_tokenizer(cfg, str(tiny_model_dir))
    t = tok.tokenizer
    item = _encode(tok, {"messages": CONVERSATION}, cfg)
    rendered = t(EXPECTED["chat-ml"][0], add_special_tokens=False)["input_ids"]
    assert item["input_ids"] == [t.bos_token_id, *rendered, t.eos_token_id]
    assert item["labels"] == [IGNORE_INDEX, *rendered, t.eos_token_id]
    off = _cfg(tiny_model_dir, "chat-ml", append_eos_token=False)
    assert _encode(tok, {"messages": CONVERSATION}, off)["input_ids"] == [t.bos_token_id, *rendered]
    # Not doubled: poro's conversation already ends with EOS; simplified-llama31 already starts with BOS.
    for name in ("poro", "simplified-llama31"):
        cfg = _cfg(tiny_model_dir, name)
        tok = load_tokenizer(cfg, str(tiny_model_dir))
        ids = _encode(tok, {"messages": CONVERSATION}, cfg)["input_ids"]
        assert ids[:2].count(t.bos_token_id) == 1 and ids[-2:].count(t.eos_token_id) == 1, name


@pytest.mark.parametrize("name", ["mistral-with-system", "chat-ml"])
def test_saved_tokenizer_has_the_inference_settings(tiny_model_dir, tmp_path, name):
    """add_bos_token true, add_eos_token false, eos_token = the template's assistant end."""
    from transformers import AutoTokenizer

    from finetune_engine.modeling import prepare_tokenizer_for_inference

    tok = load_tokenizer(_cfg(tiny_model_dir, name), str(tiny_model_dir))
    prepare_tokenizer_for_inference(tok.tokenizer, tok.end_marker)
    tok.tokenizer.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "tokenizer_config.json").read_text())["eos_token"] == MARKERS[name][1]
    # transformers 5 keeps add_bos_token/add_eos_token in tokenizer.json's post-processor, not in
    # tokenizer_config.json: BOS is added, EOS is not.
    post = json.dumps(json.loads((tmp_path / "tokenizer.json").read_text())["post_processor"]["single"])
    assert "<s>" in post and MARKERS[name][1] not in post
    again = AutoTokenizer.from_pretrained(tmp_path)
    ids = again("hello there")["input_ids"]
    assert ids[0] == again.bos_token_id and ids[-1] != again.eos_token_id
    assert again.eos_token == MARKERS[name][1]
    assert again.chat_template == NAMED_TEMPLATES[name].jinja


@pytest.mark.parametrize("name", ["mistral-with-system", "chat-ml", "simplified-llama31"])
def test_generation_prompt_is_the_prefix_training_saw(tiny_model_dir, name):
    """Prompts for generation get the BOS that training framed the conversation with, once."""
    from finetune_engine.data.tokenize import with_bos

    cfg = _cfg(tiny_model_dir, name)
    tok = load_tokenizer(cfg, str(tiny_model_dir))
    t = tok.tokenizer
    trained = _encode(tok, {"messages": CONVERSATION[1:3]}, cfg)["input_ids"]
    prompt = with_bos(t, t.apply_chat_template(CONVERSATION[1:2], tokenize=False, add_generation_prompt=True))
    ids = t(prompt, add_special_tokens=False)["input_ids"]
    assert ids[0] == t.bos_token_id and ids.count(t.bos_token_id) == 1
    assert trained[: len(ids)] == ids
