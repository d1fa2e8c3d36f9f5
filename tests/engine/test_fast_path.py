"""The training hot path on the CPU: the lean loss equals the model's own loss and gradients, packed
rows lose exactly what their examples lose unpacked, and the CUDA defaults stay off the CPU."""

from __future__ import annotations

import pytest
import torch

from finetune_engine import fastpath
from finetune_engine.data.collate import PackedCollator, PaddingCollator
from finetune_engine.data.tokenize import IGNORE_INDEX


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation="sdpa")


def _examples(n: int = 5, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        ids = torch.randint(5, 500, (int(torch.randint(6, 30, (1,), generator=g)),), generator=g).tolist()
        cut = len(ids) // 3 if i % 2 else 0  # some completion-only (prompt labels -100), some full
        out.append({"input_ids": ids, "labels": [IGNORE_INDEX] * cut + ids[cut:]})
    return out


def _targets(batch) -> torch.Tensor:
    return fastpath.shift_labels(batch["labels"]).ne(IGNORE_INDEX).sum()


def test_chunked_loss_equals_the_models_loss_and_gradients(model):
    batch = PaddingCollator(pad_token_id=0)(_examples())
    batch.pop("num_real_tokens")
    n = _targets(batch)
    model.zero_grad()
    plain = model(**batch, num_items_in_batch=n).loss
    plain.backward()
    expected = {k: p.grad.clone() for k, p in model.named_parameters()}
    model.zero_grad()
    lean = fastpath.lean_loss(model, chunk=7)  # several chunks, the last one partial
    assert lean is not None and not lean.fused and "chunked" in lean.kind
    loss = lean(model, dict(batch), n)
    loss.backward()
    assert torch.allclose(loss, plain, atol=1e-5), (loss.item(), plain.item())
    for k, p in model.named_parameters():
        assert torch.allclose(p.grad, expected[k], atol=1e-5, rtol=1e-4), k
    # without num_items_in_batch both are the mean over target tokens
    assert torch.allclose(lean(model, dict(batch)), model(**batch).loss, atol=1e-5)
    assert model.lm_head(torch.zeros(1, 128)).shape[-1] == model.config.vocab_size  # head restored


def test_packed_loss_equals_the_unpacked_loss_of_the_same_examples(model):
    examples = _examples(6, seed=1)
    padded = PaddingCollator(pad_token_id=0)(examples)
    real = padded.pop("num_real_tokens")
    packed = PackedCollator(pad_token_id=0)([{"segments": examples[:4]}, {"segments": examples[4:]}])
    assert packed.pop("num_real_tokens") == real and isinstance(real, int)
    assert _targets(packed) == _targets(padded)  # the trainer's num_items_in_batch, counted alike
    n = _targets(padded)
    with torch.no_grad():
        unpacked = model(**padded, num_items_in_batch=n).loss
        own = model(**packed, num_items_in_batch=n).loss
        lean = fastpath.lean_loss(model)(model, dict(packed), n)
    assert torch.allclose(own, unpacked, atol=1e-5) and torch.allclose(lean, unpacked, atol=1e-5)


def test_lean_loss_declines_heads_it_would_change(model):
    model.config.final_logit_softcapping = 30.0
    try:
        assert fastpath.lean_loss(model) is None
    finally:
        del model.config.final_logit_softcapping
    assert fastpath.lean_loss(model) is not None


@pytest.mark.parametrize(("dropout", "lean"), [(0.1, False), (0.0, True)])
def test_a_lora_head_with_dropout_keeps_the_models_own_loss(tiny_model_dir, dropout, lean):
    """Chunks of a head with dropout would draw other masks than the model's own forward (the
    Silogen e2e curve then drifts); without dropout the LoRA head is used chunk by chunk."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    wrapped = get_peft_model(base, LoraConfig(r=4, target_modules=["lm_head"], lora_dropout=dropout))
    got = fastpath.lean_loss(wrapped)
    assert (got is not None) is lean
    if lean:
        assert got.lm_head is wrapped.get_base_model().get_output_embeddings()


def test_cuda_defaults_and_the_compile_switch(tmp_path):
    from transformers import TrainingArguments

    args = {"optim": "adamw_torch", "torch_compile": False}
    assert fastpath.apply_training_defaults(args, cuda=True) is False
    assert args["optim"] == "adamw_torch" and args["dataloader_num_workers"] == 2
    assert args["dataloader_persistent_workers"] and "torch_compile" not in args
    cpu = {"logging_steps": 1}
    assert fastpath.apply_training_defaults(cpu, cuda=False) is False and cpu == {"logging_steps": 1}
    defaults = {"output_dir": str(tmp_path), "use_cpu": True}
    assert fastpath.apply_training_defaults(defaults, cuda=True) is True
    built = TrainingArguments(**defaults)  # every default is a valid TrainingArguments value
    assert built.optim == "adamw_torch_fused" and built.dataloader_prefetch_factor == 4
    assert not built.torch_compile  # the engine compiles per layer, never the Trainer's whole model
    no_workers = {"dataloader_num_workers": 0}
    fastpath.apply_training_defaults(no_workers, cuda=True)
    assert "dataloader_prefetch_factor" not in no_workers  # refused by TrainingArguments without workers


def test_a_compile_failure_falls_back_to_eager_layers(tiny_model_dir, tmp_path, caplog):
    """A layer that fails to compile on the first step: the trainer warns, makes every layer eager
    again and runs the step without them (token count kept exact)."""
    from torch._dynamo.exc import BackendCompilerFailed
    from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert fastpath.compile_layers(model) == 2
    layers = fastpath.decoder_layers(model)

    def fails(*args, **kwargs):
        raise BackendCompilerFailed(fails, RuntimeError("inductor: no such kernel"), None)

    layers[0]._compiled_call_impl = fails  # as the first compiled call would
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[], max_steps=1)
    trainer = fastpath.fast_trainer_class(Trainer)(model=model, args=args)
    trainer.compiled = True
    trainer.current_gradient_accumulation_steps = 1  # set by the training loop
    batch = PaddingCollator(pad_token_id=0)(_examples(3, seed=3))
    real = batch["num_real_tokens"]
    model.train()
    loss = trainer.training_step(model, batch)
    assert torch.isfinite(loss) and not trainer.compiled
    assert all(layer._compiled_call_impl is None for layer in layers)
    assert "torch.compile failed on this model (BackendCompilerFailed" in caplog.text
    assert "no such kernel" in caplog.text
    assert trainer.state.num_input_tokens_seen == real
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    assert not fastpath.compile_failure(RuntimeError("CUDA out of memory"))


@pytest.mark.parametrize("weights", [torch.float32, torch.bfloat16])
def test_lean_loss_under_the_trainers_bf16_autocast(tiny_model_dir, weights):
    """The Trainer's bf16 wraps the model's forward in autocast with fp32 outputs (accelerate);
    the lean loss applies the head in the same precision, for fp32 and bf16 weights."""
    import copy

    from accelerate.utils import convert_outputs_to_fp32
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=weights)
    wrapped = copy.copy(model)  # as accelerate.prepare: an autocast forward with fp32 outputs
    autocast = torch.autocast("cpu", dtype=torch.bfloat16)
    wrapped.forward = convert_outputs_to_fp32(autocast(model.forward))
    batch = PaddingCollator(pad_token_id=0)(_examples(4, seed=2))
    batch.pop("num_real_tokens")
    n = _targets(batch)
    with torch.no_grad():
        own = wrapped(**batch, num_items_in_batch=n).loss
        lean = fastpath.lean_loss(model, chunk=16, autocast_dtype=torch.bfloat16)(wrapped, dict(batch), n)
    assert torch.allclose(lean, own, atol=2e-3), (lean.item(), own.item())
