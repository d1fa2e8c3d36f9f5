"""Completion-only masks, packing isolation, padding — on the tiny model's real tokenizer."""

from __future__ import annotations

import pytest
import torch

from finetune_engine import fastpath
from finetune_engine.config import parse_config
from finetune_engine.data.collate import PackedCollator, PaddingCollator
from finetune_engine.data.pack import pack_lengths
from finetune_engine.data.tokenize import IGNORE_INDEX, EncodeSettings, encode_batch
from finetune_engine.modeling import load_tokenizer

CONVERSATION = {
    "messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is 2 plus 3?"},
        {"role": "assistant", "content": "2 plus 3 is 5."},
        {"role": "user", "content": "And the capital of Peru?"},
        {"role": "assistant", "content": "The capital of Peru is Lima."},
    ]
}


def _cfg(model, template="chat-ml", pad="bos-repurpose"):
    return parse_config(
        {
            "data_conf": {
                "training_data": {"type": "CONCATENATION", "datasets": [{"path": "x.jsonl"}]},
                "chat_template_name": template,
                "missing_pad_token_strategy": pad,
            },
            "batchsize_conf": {"total_train_batch_size": 2},
            "run_conf": {"model": str(model)},
        }
    )


@pytest.mark.parametrize(
    "template", ["chat-ml", "llama-3", "mistral-with-system", "poro", "simplified-llama31", "keep-original"]
)
def test_completions_only_mask_is_exact(tiny_model_dir, template):
    tok = load_tokenizer(_cfg(tiny_model_dir, template), str(tiny_model_dir))
    settings = EncodeSettings(max_seq_length=512, completions_only=True, end_marker=tok.end_marker)
    [item] = encode_batch([CONVERSATION], tok.tokenizer, settings)
    ids, labels = item["input_ids"], item["labels"]
    trained = [i for i, lab in zip(ids, labels, strict=True) if lab != IGNORE_INDEX]
    # Trained tokens are exactly the two replies, each with its end marker, in order.
    expected = "2 plus 3 is 5." + tok.end_marker + "The capital of Peru is Lima." + tok.end_marker
    assert tok.tokenizer.decode(trained) == expected
    # Labels equal the input where trained.
    assert all(lab in (IGNORE_INDEX, i) for i, lab in zip(ids, labels, strict=True))
    # Nothing from the system/user turns is trained.
    masked_text = tok.tokenizer.decode([i for i, lab in zip(ids, labels, strict=True) if lab == IGNORE_INDEX])
    assert "What is 2 plus 3?" in masked_text and "Be brief." in masked_text


def test_chat_ml_adds_tokens_and_end_marker(tiny_model_dir):
    tok = load_tokenizer(_cfg(tiny_model_dir), str(tiny_model_dir))
    assert tok.added_tokens == ["<|im_start|>", "<|im_end|>"]
    assert tok.end_marker == "<|im_end|>"
    ids = tok.tokenizer("<|im_end|>", add_special_tokens=False)["input_ids"]
    assert len(ids) == 1  # one special token, not split into bytes


def test_full_sequence_training_without_completions_only(tiny_model_dir):
    tok = load_tokenizer(_cfg(tiny_model_dir), str(tiny_model_dir))
    [item] = encode_batch([CONVERSATION], tok.tokenizer, EncodeSettings(512))
    assert item["labels"][0] == IGNORE_INDEX
    assert item["labels"][1:] == item["input_ids"][1:]


def test_length_filter_and_truncate(tiny_model_dir):
    tok = load_tokenizer(_cfg(tiny_model_dir), str(tiny_model_dir))
    assert encode_batch([CONVERSATION], tok.tokenizer, EncodeSettings(10)) == ["too_long"]
    [item] = encode_batch([CONVERSATION], tok.tokenizer, EncodeSettings(10, "truncate"))
    assert len(item["input_ids"]) == 10 and item["truncated"] == [1]
    # Truncation that cuts every assistant token leaves nothing to train on: dropped and counted.
    out = encode_batch(
        [CONVERSATION],
        tok.tokenizer,
        EncodeSettings(10, "truncate", completions_only=True, end_marker=tok.end_marker),
    )
    assert out == ["no_trained_tokens"]


def test_eos_repurposed_pad_keeps_eos_in_loss(tiny_model_dir):
    tok = load_tokenizer(_cfg(tiny_model_dir, "keep-original", "eos-repurpose"), str(tiny_model_dir))
    assert tok.tokenizer.pad_token == tok.tokenizer.eos_token
    settings = EncodeSettings(512, completions_only=True, end_marker=tok.end_marker)
    short = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}
    items = encode_batch([CONVERSATION, short], tok.tokenizer, settings)
    batch = PaddingCollator(tok.tokenizer.pad_token_id)(items)
    eos = tok.tokenizer.eos_token_id
    for row, item in enumerate(items):
        n = len(item["input_ids"])
        # every EOS inside the example that ends an assistant turn is still a label
        assert (batch["labels"][row, :n] == eos).sum() == item["labels"].count(eos) > 0
        assert (batch["labels"][row, n:] == IGNORE_INDEX).all()
        assert batch["attention_mask"][row, :n].all() and not batch["attention_mask"][row, n:].any()


def test_pack_lengths_fits_and_is_dense():
    import random

    rng = random.Random(0)
    lengths = [min(500, int(rng.lognormvariate(4.0, 0.8)) + 5) for _ in range(2000)]
    bins = pack_lengths(lengths, 512)
    assert sorted(i for b in bins for i in b) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in b) <= 512 for b in bins)
    assert sum(lengths) / (512 * len(bins)) > 0.97
    with pytest.raises(ValueError, match="more than the pack capacity"):
        pack_lengths([600], 512)


@pytest.mark.parametrize("attn", ["sdpa", "eager", pytest.param("flex_attention", marks=pytest.mark.slow)])
def test_packed_rows_do_not_cross_contaminate(tiny_model_dir, attn):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation=attn).eval()
    g = torch.Generator().manual_seed(0)
    segs = [torch.randint(5, 500, (n,), generator=g).tolist() for n in (9, 14, 6)]
    features = [{"segments": [{"input_ids": s, "labels": s} for s in segs]}]
    batch = PackedCollator(pad_token_id=0, attn_implementation=attn)(features)
    batch.pop("num_real_tokens")
    # flex_attention: the collator gives document ids, the trainer's step builds the BlockMask
    # (on the CPU flex_attention runs forward only, compiled: a few seconds)
    batch = fastpath.prepare_attention(batch)
    with torch.no_grad():
        packed = model(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            position_ids=batch["position_ids"],
        ).logits[0]
        at = 0
        for s in segs:
            alone = model(input_ids=torch.tensor([s])).logits[0]
            assert torch.allclose(packed[at : at + len(s)], alone, atol=1e-4), f"segment at {at} differs"
            at += len(s)
