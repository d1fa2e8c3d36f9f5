"""The training hot path: attention kernel choice, per-document masks, compilation, a memory-lean loss.

- Attention: packed rows attend only within their document on the fastest kernel present:
  FlashAttention varlen (flash_attention_3/2: reset ``position_ids``, no mask) when flash-attn is
  installed on a GPU, else flex_attention with a document-causal ``BlockMask`` built once per batch
  on the GPU, else (CPU, where flex_attention has no backward) sdpa with a 4D boolean mask.
  flash_attention_4 (the CUDA images carry it; Hopper and newer) is varlen too, taken when a config
  names it: on Hopper it measures level with flex_attention in public benchmarks, so the default
  stays with the kernel that compiles with the layers (``scripts/bench_gpu.py`` has a row for each).
- Loss: the causal-LM cross-entropy without the full-vocabulary fp32 logits of the whole batch:
  liger-kernel's fused linear cross-entropy on CUDA where installed, else a chunked cross-entropy
  (each chunk's logits recomputed in backward). Same labels (-100 ignored), same normalisation
  (sum over the accumulated batch's target tokens / ``num_items_in_batch``) as transformers' loss.
- Compilation: each decoder layer compiled (regional compilation), undone with a warning if the
  first step fails to compile.
"""

from __future__ import annotations

import importlib.util
import logging
from typing import Any

log = logging.getLogger(__name__)

IGNORE_INDEX = -100
FLEX = "flex_attention"
# Rows of the flattened batch per chunk of the chunked loss: 1024 x vocab 152k x fp32 = 0.6 GiB.
LOSS_CHUNK_TOKENS = 1024

# Configs whose causal-LM head does more than lm_head(hidden) (soft-capping, scaling): their own loss.
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale")


def flex_available() -> bool:
    import torch

    if not torch.cuda.is_available():
        return False  # flex_attention has no backward on the CPU
    return importlib.util.find_spec("torch.nn.attention.flex_attention") is not None


def liger_available() -> bool:
    import torch

    return torch.cuda.is_available() and importlib.util.find_spec("liger_kernel") is not None


def default_attention() -> str | None:
    """The attention to load with when the config names none: flash varlen, flex, or the
    library's default (sdpa) on the CPU."""
    import torch

    if not torch.cuda.is_available():
        return None
    from finetune_engine.modeling import flash_available

    for kind in ("flash_attention_3", "flash_attention_2"):
        if flash_available(kind):
            return kind
    return FLEX if flex_available() else None


def document_block_mask(document_ids):
    """A document-causal flex_attention BlockMask of ``document_ids`` (batch, length): a token
    attends to earlier tokens of its own document only. Built on the ids' device."""
    from torch.nn.attention.flex_attention import create_block_mask

    docs = document_ids

    def document_causal(b, h, q, k):
        return (docs[b, q] == docs[b, k]) & (q >= k)

    batch, length = docs.shape
    return create_block_mask(document_causal, batch, None, length, length, device=docs.device)


def prepare_attention(inputs: dict[str, Any]) -> dict[str, Any]:
    """``inputs`` with a collator's ``document_ids`` turned into the BlockMask flex_attention takes
    as ``attention_mask`` (transformers passes a 4D BlockMask through unchanged)."""
    docs = inputs.pop("document_ids", None)
    if docs is not None:
        inputs["attention_mask"] = document_block_mask(docs)
    return inputs


# ---------------------------------------------------------------------------------------------
# loss
# ---------------------------------------------------------------------------------------------


def shift_labels(labels):
    """The target of each position: the next label (-100 after the last), as transformers shifts."""
    import torch.nn.functional as F

    return F.pad(labels, (0, 1), value=IGNORE_INDEX)[..., 1:]


def _chunk_loss_sum(lm_head, hidden, targets, autocast_dtype=None):
    import torch
    import torch.nn.functional as F

    with torch.autocast(hidden.device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
        logits = lm_head(hidden)
    return F.cross_entropy(logits.float(), targets, ignore_index=IGNORE_INDEX, reduction="sum")


def chunked_cross_entropy(lm_head, hidden, targets, chunk: int = LOSS_CHUNK_TOKENS, autocast_dtype=None):
    """Sum of the cross-entropy of ``lm_head(hidden)`` against ``targets`` (flattened), computed
    ``chunk`` rows at a time; backward recomputes each chunk's logits, so at most one chunk's
    fp32 logits exist at once. ``autocast_dtype``: the mixed precision the model's forward ran in
    (the head then computes as it would inside it)."""
    import torch
    from torch.utils.checkpoint import checkpoint

    hidden = hidden.reshape(-1, hidden.shape[-1])
    targets = targets.reshape(-1)
    if hidden.device.type == "cpu":
        # Only target rows (completion-only data skips most); on a GPU this selection would wait
        # for the device (its size is data-dependent), so there ignored rows just add 0.
        keep = targets != IGNORE_INDEX
        hidden, targets = hidden[keep], targets[keep]
    total = hidden.new_zeros((), dtype=torch.float32)
    for at in range(0, targets.shape[0], chunk):
        total = total + checkpoint(
            _chunk_loss_sum,
            lm_head,
            hidden[at : at + chunk],
            targets[at : at + chunk],
            autocast_dtype,
            use_reentrant=False,
        )
    return total


def _liger_loss_sum(lm_head, hidden, targets):
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

    fn = LigerFusedLinearCrossEntropyLoss(ignore_index=IGNORE_INDEX, reduction="sum")
    hidden = hidden.reshape(-1, hidden.shape[-1]).to(lm_head.weight.dtype)
    return fn(lm_head.weight, hidden, targets.reshape(-1), lm_head.bias)


class LeanLoss:
    """The causal-LM loss of a model from its last hidden states; ``None`` from :func:`lean_loss`
    where the model's head is not a plain projection (then the model computes its own loss).

    The model runs its own forward (hooks, adapter wrappers included) with its output projection
    passed through for that call, so it returns the final hidden states; the loss then applies the
    projection chunk by chunk (or fused)."""

    def __init__(self, lm_head, fused: bool, chunk: int = LOSS_CHUNK_TOKENS, autocast_dtype=None):
        self.lm_head, self.fused, self.chunk, self.autocast_dtype = lm_head, fused, chunk, autocast_dtype

    @property
    def kind(self) -> str:
        if self.fused:
            return "liger fused linear cross-entropy"
        return f"chunked cross-entropy ({self.chunk} rows)"

    def hidden_states(self, model, inputs: dict[str, Any]):
        head = self.lm_head
        own = head.__dict__.get("forward")  # accelerate hooks set an instance forward
        head.forward = _identity
        try:
            return model(**inputs).logits
        finally:
            if own is None:
                del head.forward
            else:
                head.forward = own

    def __call__(self, model, inputs: dict[str, Any], num_items_in_batch=None):
        labels = inputs.pop("labels")
        hidden = self.hidden_states(model, inputs)
        targets = shift_labels(labels).to(hidden.device)
        if self.fused:
            total = _liger_loss_sum(self.lm_head, hidden, targets)
        else:
            total = chunked_cross_entropy(self.lm_head, hidden, targets, self.chunk, self.autocast_dtype)
        if num_items_in_batch is None:
            return total / (targets != IGNORE_INDEX).sum().clamp(min=1)
        if hasattr(num_items_in_batch, "to"):
            num_items_in_batch = num_items_in_batch.to(total.device)
        return total / num_items_in_batch


def _identity(x):
    return x


def lean_loss(model, chunk: int = LOSS_CHUNK_TOKENS, autocast_dtype=None) -> LeanLoss | None:
    """The memory-lean loss of ``model`` (a causal LM, bare or in a LoRA-family PEFT wrapper), or
    None where it would not equal the model's own loss. ``autocast_dtype``: the trainer's mixed
    precision (bf16/fp16), whose autocast wraps the model's forward but not this loss."""
    import torch

    base = model
    peft_config = getattr(model, "peft_config", None)
    if peft_config is not None:
        if any(getattr(c, "is_prompt_learning", False) for c in peft_config.values()):
            return None  # prompt/prefix tuning change the inputs in the wrapper's forward
        base = model.get_base_model()
    config = getattr(base, "config", None)
    if config is None or any(getattr(config, k, None) not in (None, 1.0) for k in _LOGIT_TRANSFORMS):
        return None
    lm_head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    if lm_head is None:
        return None
    if any(isinstance(m, torch.nn.Dropout) and m.p > 0 for m in lm_head.modules()):
        # A LoRA head with dropout: chunks would draw other dropout masks than the model's forward.
        return None
    fused = liger_available() and type(lm_head) is torch.nn.Linear
    return LeanLoss(lm_head, fused, chunk, autocast_dtype)


# ---------------------------------------------------------------------------------------------
# compilation
# ---------------------------------------------------------------------------------------------


def decoder_layers(model) -> list:
    """The repeated blocks of a transformers model (its ``_no_split_modules`` classes)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    names = set(getattr(base, "_no_split_modules", None) or [])
    return [m for m in base.modules() if type(m).__name__ in names]


def compile_layers(model) -> int:
    """Compile each decoder layer in place (regional compilation: one graph reused by every
    layer, compiled in seconds, adapters and quantized layers included). Returns how many."""
    layers = decoder_layers(model)
    for layer in layers:
        layer.compile(dynamic=False)
    return len(layers)


def uncompile_layers(model) -> None:
    for layer in decoder_layers(model):
        layer._compiled_call_impl = None


def compile_failure(err: BaseException) -> bool:
    """Whether ``err`` came from torch.compile (dynamo/inductor), not from the model."""
    module = type(err).__module__ or ""
    return (
        module.startswith(("torch._dynamo", "torch._inductor"))
        or "BackendCompilerFailed" in type(err).__name__
    )


# ---------------------------------------------------------------------------------------------
# trainer defaults and the trainer's step
# ---------------------------------------------------------------------------------------------

# TrainingArguments the engine sets on CUDA unless training_args gives them: fused AdamW, and
# batches collated in two worker processes, pinned and prefetched while the GPU computes.
CUDA_TRAINING_DEFAULTS: dict[str, Any] = {
    "optim": "adamw_torch_fused",
    "dataloader_num_workers": 2,
    "dataloader_persistent_workers": True,
    "dataloader_prefetch_factor": 4,
    "dataloader_pin_memory": True,
}


def apply_training_defaults(args: dict[str, Any], cuda: bool) -> bool:
    """Set the fast-path defaults into training_args ``args`` (in place) and return whether the
    engine compiles the model: training_args.torch_compile, by default on with CUDA. The engine
    compiles each decoder layer itself, so the Trainer's whole-model compile stays off."""
    compile_model = args.pop("torch_compile", None)
    if compile_model is None:
        compile_model = cuda
    if cuda:
        for key, value in CUDA_TRAINING_DEFAULTS.items():
            args.setdefault(key, value)
        if args.get("dataloader_num_workers", 0) == 0:
            args.pop("dataloader_persistent_workers", None)
            args.pop("dataloader_prefetch_factor", None)
    return bool(compile_model)


def maybe_compile(model, compile_model: bool) -> bool:
    """Compile ``model``'s decoder layers when asked; False (with the reason) when it cannot."""
    if not compile_model:
        return False
    try:
        n = compile_layers(model)
    except Exception as err:  # an old torch, an unsupported module: train uncompiled
        log.warning("training_args.torch_compile: compiling failed (%s); training without it", err)
        return False
    if not n:
        log.warning("training_args.torch_compile: no decoder layers found to compile; training without it")
        return False
    log.info("torch.compile: %d decoder layers compiled (training_args.torch_compile: false turns it off)", n)
    return True


def fast_trainer_class(base_cls, lean: bool = True):
    """``base_cls`` (a transformers Trainer) with the fast path in its step: tokens counted from the
    collator's Python int (no device sync), flex BlockMask built once per batch, the lean loss
    (``lean``) and a fallback to eager layers when compilation fails on the first step."""

    class FastPathTrainer(base_cls):
        _lean_loss = None
        _lean_checked = False
        compiled = False

        def _lean(self, model):
            if not self._lean_checked:
                self._lean_checked = True
                unwrapped = self.accelerator.unwrap_model(model)
                if not lean:
                    pass
                elif unwrapped is not model:
                    log.info("loss: the model's own (the model is wrapped for several processes)")
                elif self.label_smoother is not None or self.compute_loss_func is not None:
                    log.info("loss: the trainer's own (label smoothing or a custom loss function)")
                else:
                    import torch

                    amp = torch.bfloat16 if self.args.bf16 else torch.float16 if self.args.fp16 else None
                    self._lean_loss = lean_loss(unwrapped, autocast_dtype=amp)
                    log.info("loss: %s", self._lean_loss.kind if self._lean_loss else "the model's own")
            return self._lean_loss

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            real = inputs.pop("num_real_tokens", None)
            if model.training and real is not None:
                self.state.num_input_tokens_seen += int(real)
            inputs = prepare_attention(inputs)
            loss_fn = self._lean(model) if model.training and not return_outputs else None
            if loss_fn is not None and "labels" in inputs:
                return loss_fn(model, dict(inputs), num_items_in_batch)
            return super().compute_loss(
                model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch
            )

        def training_step(self, model, inputs, num_items_in_batch=None):
            """The step; compiled layers that fail to compile (forward or backward, compiled on
            first use) are made eager again and the micro-batch runs again without them."""
            if not self.compiled:
                return super().training_step(model, inputs, num_items_in_batch)
            inputs = dict(inputs)  # compute_loss pops from it; a second try needs it whole
            try:
                return super().training_step(model, dict(inputs), num_items_in_batch)
            except Exception as err:
                if not compile_failure(err):
                    raise
                log.warning(
                    "torch.compile failed on this model (%s: %s); training goes on uncompiled "
                    "(training_args.torch_compile: false skips the attempt)",
                    type(err).__name__,
                    " ".join(str(err).split())[:300],
                )
                uncompile_layers(self.model)
                self.compiled = False
                if inputs.get("num_real_tokens") is not None:
                    self.state.num_input_tokens_seen -= int(inputs["num_real_tokens"])  # counted again
                model.zero_grad(set_to_none=True)  # what the failed backward left (first compile: none)
                return super().training_step(model, inputs, num_items_in_batch)

    FastPathTrainer.__name__ = base_cls.__name__
    return FastPathTrainer
