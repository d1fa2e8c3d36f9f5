"""The Silogen engine's tests/test_model_setup.py, case by case. The peer initialises the embedding
rows of new tokens by sampling around the mean of the old rows (_init_new_rows_by_avg_sample); this
engine grows the embeddings in finetune_engine.modeling.load_model (mean-resizing) when the chat
template adds tokens. The cases check the grown input embeddings of the tiny model, which gains two
tokens with chat-ml. (The peer skips when torch lacks a Cholesky decomposition; this torch has one,
so nothing is skipped.)"""

from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def grown(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    from finetune_engine.config import parse_config
    from finetune_engine.modeling import load_model, load_tokenizer

    cfg = parse_config(
        {
            "data_conf": {
                "training_data": {"type": "CONCATENATION", "datasets": [{"path": "unused.jsonl"}]},
                "validation_data": {"type": "NONE"},
                "chat_template_name": "chat-ml",
            },
            "batchsize_conf": {"total_train_batch_size": 1},
            "run_conf": {"model": str(tiny_model_dir)},
        }
    )
    tok = load_tokenizer(cfg, str(tiny_model_dir))
    old = AutoModelForCausalLM.from_pretrained(tiny_model_dir).get_input_embeddings().weight.detach()
    new = load_model(cfg, str(tiny_model_dir), tok, wrap=False).get_input_embeddings().weight.detach()
    assert new.shape[0] == old.shape[0] + len(tok.added_tokens) > old.shape[0]
    return old, new


def test_init_new_rows_by_avg_sample_constant_first_rows(grown):
    """Restates test_model_setup.py::test_init_new_rows_by_avg_sample_constant_first_rows: the old
    rows are unchanged."""
    import torch

    old, new = grown
    assert torch.equal(old, new[: old.shape[0]])


def test_init_new_rows_by_avg_sample_changed_last_rows(grown):
    """Restates test_model_setup.py::test_init_new_rows_by_avg_sample_changed_last_rows: the new
    rows are initialised (not zero)."""
    import torch

    old, new = grown
    assert not torch.equal(new[old.shape[0] :], torch.zeros_like(new[old.shape[0] :]))


def test_init_new_rows_by_avg_sample_close_to_mean(grown):
    """Restates test_model_setup.py::test_init_new_rows_by_avg_sample_close_to_mean: each new row is
    close to the mean of the old rows (the peer's tolerance, 10.0)."""
    import torch

    old, new = grown
    mean = old.float().mean(dim=0)
    for row in new[old.shape[0] :]:
        assert torch.allclose(row.float(), mean, atol=10.0)
