"""Training speed on one GPU: the engine (full, LoRA, QLoRA) against TRL and a bare training loop.

    python scripts/bench_gpu.py [--steps 30] [--warmup 5] [--peak-tflops 989] [--json bench_gpu.json]
    python scripts/bench_gpu.py --smoke        # the same code, tiny model, CPU, seconds
    python scripts/bench_gpu.py --loss-memory  # CPU: peak memory of the chunked vs plain loss

Model: a random Llama built here (no download): hidden 2048, 16 layers, 16 heads / 8 KV heads,
intermediate 5632, vocab 32000 (0.82B parameters), bf16. Data: the lognormal chat set of
scripts/bench_training.py, packed into rows of --seq tokens, --rows rows per step.

Rows (each in this process, on the same data, the same steps):
  engine full / lora / qlora   ``finetuning sft`` (run_sft) with packing, the engine's defaults
  engine full fa4              the same full fine-tune with attn_implementation flash_attention_4
                               (the CUDA images' FlashAttention 4; Hopper and newer, else skipped)
  TRL defaults                 trl.SFTTrainer with its defaults (no packing), same batch and length
  TRL packing                  trl.SFTTrainer with packing=True
  bare loop full / lora        a hand-written loop: packed rows, flex_attention document mask
                               (sdpa + 4D mask on the CPU), layers compiled, fused AdamW, the
                               model's own loss; the same LoRA adapter for the lora row

Each row: real (non-pad) tokens/s over the steps after --warmup, MFU = tokens/s x 6 x parameters /
peak FLOP/s (peak from --peak-tflops, by default 989 for H100/H200), peak GPU memory; then the
ratios engine/bare loop and engine/TRL packing. trl, datasets and bitsandbytes are optional: a
missing one skips its rows with the reason. Writes everything to --json.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("DISABLE_MLFLOW_INTEGRATION", "TRUE")
ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "engine"), str(ROOT / "scripts")]

PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "H800": 989.0, "A100": 312.0, "L40S": 362.0, "B200": 2250.0}
MODEL_082B = dict(
    hidden_size=2048,
    num_hidden_layers=16,
    num_attention_heads=16,
    num_key_value_heads=8,
    intermediate_size=5632,
    vocab_size=32000,
)
MODEL_TINY = dict(
    hidden_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=256
)
LORA = {"r": 16, "lora_alpha": 32, "lora_dropout": 0.0, "target_modules": "all-linear"}


def peak_tflops(flag: float | None) -> float | None:
    import torch

    if flag:
        return flag
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((v for k, v in PEAK_TFLOPS.items() if k in name), None)


def build_model(out: Path, smoke: bool) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from finetune_engine.tiny import build_tokenizer

    tokenizer = build_tokenizer(1024)
    shape = MODEL_TINY if smoke else MODEL_082B
    config = LlamaConfig(
        **{"vocab_size": len(tokenizer), **shape},
        max_position_embeddings=4096,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(torch.float32 if smoke else torch.bfloat16)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out


def engine_config(model: Path, data: Path, out: Path, a: argparse.Namespace, kind: str) -> dict:
    import torch

    cuda = torch.cuda.is_available()
    cfg: dict = {
        "data_conf": {
            "training_data": {"type": "CONCATENATION", "datasets": [{"path": str(data)}]},
            "validation_data": {"type": "NONE"},
            "chat_template_name": "keep-original",
            "missing_pad_token_strategy": "eos-repurpose",
        },
        "training_args": {
            "output_dir": str(out),
            "max_steps": a.warmup + a.steps,
            "learning_rate": 1e-4,
            "lr_scheduler_type": "constant",
            "save_strategy": "no",
            "logging_steps": a.logging_steps,
            "bf16": cuda,
            "report_to": "none",
        },
        "batchsize_conf": {"total_train_batch_size": a.rows, "max_per_device_train_batch_size": a.rows},
        "sft_args": {"max_seq_length": a.seq, "packing": True},
        "run_conf": {"model": str(model), "model_args": {"dtype": "bfloat16" if cuda else "float32"}},
    }
    if kind == "full-fa4":
        cfg["run_conf"]["model_args"]["attn_implementation"] = "flash_attention_4"
    if kind in ("lora", "qlora"):
        cfg["peft_conf"] = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "peft_kwargs": dict(LORA)}
    if kind == "qlora":
        cfg["quant_conf"] = {
            "quantization_type": "bits-and-bytes",
            "load_in_4bit": True,
            "bnb_4bit_quant_type": "nf4",
            "bnb_4bit_compute_dtype": "bfloat16" if cuda else "float32",
        }
    return cfg


class Meter:
    """Real tokens and time over the steps after ``warmup`` (the device synchronized at both ends)."""

    def __init__(self, warmup: int):
        self.warmup, self.t0, self.tokens0, self.tokens, self.seconds = warmup, None, 0, 0, 0.0

    def mark(self, step: int, tokens: int) -> None:
        import torch

        if step == self.warmup or (step > self.warmup and self.t0 is None):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.t0, self.tokens0 = time.perf_counter(), tokens
        elif self.t0 is not None:
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.seconds, self.tokens = time.perf_counter() - self.t0, tokens - self.tokens0

    def result(self) -> dict:
        return {
            "tokens": self.tokens,
            "seconds": self.seconds,
            "tok_s": self.tokens / max(self.seconds, 1e-9),
        }


def meter_callback(meter: Meter, count=None):
    from transformers import TrainerCallback

    class Timer(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            meter.mark(state.global_step, count() if count else state.num_input_tokens_seen)

    return Timer()


def reset_memory() -> None:
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_memory_gib() -> float | None:
    import torch

    return torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None


def run_engine(model: Path, data: Path, work: Path, a, kind: str) -> dict:
    from finetune_engine.config import parse_config
    from finetune_engine.recipes.sft import run_sft
    from finetune_engine.tracking import TrackingSettings

    if kind == "qlora":
        import importlib.util

        if importlib.util.find_spec("bitsandbytes") is None:
            return {"skipped": "bitsandbytes is not installed"}
    if kind == "full-fa4":
        from finetune_engine.modeling import FLASH_NEEDS, flash_available

        if not flash_available("flash_attention_4"):
            package, gpu, _check = FLASH_NEEDS["flash_attention_4"]
            return {"skipped": f"needs the {package} package and {gpu}"}
    meter = Meter(a.warmup)
    cfg = parse_config(engine_config(model, data, work / f"engine-{kind}", a, kind), source="bench_gpu")
    run_sft(cfg, TrackingSettings(None, None, False, None), extra_callbacks=[meter_callback(meter)])
    return meter.result()


def run_trl(model: Path, data: Path, work: Path, a, packing: bool) -> dict:
    try:
        import datasets
        from trl import SFTConfig, SFTTrainer
    except ImportError as err:
        return {"skipped": f"trl/datasets not importable ({err})"}
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cuda = torch.cuda.is_available()
    tok = AutoTokenizer.from_pretrained(model)
    datasets.disable_caching()
    ds = datasets.load_dataset("json", data_files=str(data), split="train", cache_dir=str(work / "ds-cache"))
    args = SFTConfig(
        output_dir=str(work / f"trl-{'packing' if packing else 'defaults'}"),
        max_steps=a.warmup + a.steps,
        per_device_train_batch_size=a.rows,
        learning_rate=1e-4,
        lr_scheduler_type="constant",
        max_length=a.seq,
        packing=packing,
        save_strategy="no",
        logging_steps=a.logging_steps,
        report_to=[],
        use_cpu=not cuda,
        bf16=cuda,
        disable_tqdm=True,
    )
    m = AutoModelForCausalLM.from_pretrained(model, dtype=torch.bfloat16 if cuda else torch.float32)
    trainer = SFTTrainer(model=m, args=args, train_dataset=ds.remove_columns(["id"]), processing_class=tok)
    real = {"n": 0}
    collate = trainer.data_collator

    def counting(features):
        batch = collate(features)
        mask = batch.get("attention_mask")
        real["n"] += int(mask.sum()) if mask is not None else int(batch["input_ids"].numel())
        return batch

    trainer.data_collator = counting
    meter = Meter(a.warmup)
    trainer.add_callback(meter_callback(meter, lambda: real["n"]))
    trainer.train()
    return meter.result()


def packed_batches(model: Path, data: Path, a, attn: str):
    """The engine's packed rows of the bench data (its tokenizer, packer and collator), as batches."""
    from finetune_engine.config import parse_config
    from finetune_engine.data.collate import PackedCollator
    from finetune_engine.data.load import load_data
    from finetune_engine.data.pack import pack_lengths
    from finetune_engine.data.tokenize import EncodeSettings, encode_batch
    from finetune_engine.modeling import load_tokenizer

    cfg = parse_config(engine_config(model, data, Path(tempfile.gettempdir()), a, "full"), source="bench_gpu")
    tok = load_tokenizer(cfg, str(model))
    records, _ = load_data(cfg.data_conf)
    settings = EncodeSettings.for_sft(cfg.sft_args, tok.end_marker, tok.start_marker)
    examples = [e for e in encode_batch(records, tok.tokenizer, settings) if isinstance(e, dict)]
    bins = pack_lengths([len(e["input_ids"]) for e in examples], a.seq, seed=42)
    collate = PackedCollator(tok.collate_pad_id, attn, pad_to_multiple_of=a.seq)
    rows = [{"segments": [examples[i] for i in b]} for b in bins]
    return [collate(rows[i : i + a.rows]) for i in range(0, len(rows) - a.rows + 1, a.rows)]


def run_bare(model: Path, data: Path, a, lora: bool) -> dict:
    """A hand-written loop: what the engine's step should cost at most."""
    import torch
    from transformers import AutoModelForCausalLM

    from finetune_engine import fastpath

    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    attn = fastpath.FLEX if cuda else "sdpa"
    batches = packed_batches(model, data, a, attn)
    m = AutoModelForCausalLM.from_pretrained(
        model, dtype=torch.bfloat16 if cuda else torch.float32, attn_implementation=attn
    ).to(device)
    if lora:
        from peft import LoraConfig, get_peft_model

        m = get_peft_model(m, LoraConfig(task_type="CAUSAL_LM", **LORA))
    m.train()
    if cuda:
        fastpath.compile_layers(m)
    params = [p for p in m.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, fused=cuda)
    meter = Meter(a.warmup)
    tokens = 0
    for step in range(1, a.warmup + a.steps + 1):
        batch = dict(batches[(step - 1) % len(batches)])
        tokens += batch.pop("num_real_tokens")
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        batch = fastpath.prepare_attention(batch)
        with torch.autocast(device, dtype=torch.bfloat16, enabled=cuda):
            loss = m(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        meter.mark(step, tokens)
    return meter.result()


def loss_memory(vocabs: list[int], tokens: int, hidden: int) -> list[dict]:
    """CPU peak memory (RSS) of one forward+backward of the causal-LM loss, plain (full logits) vs
    chunked, each in a fresh process."""
    out = []
    for vocab in vocabs:
        row = {"vocab": vocab, "tokens": tokens, "hidden": hidden}
        for mode in ("plain", "chunked"):
            proc = subprocess.run(
                [sys.executable, __file__, "--loss-probe", mode, str(vocab), str(tokens), str(hidden)],
                capture_output=True,
                text=True,
                check=True,
            )
            row[f"{mode}_gib"] = json.loads(proc.stdout.strip().splitlines()[-1])["peak_gib"]
        row["reduction"] = row["plain_gib"] / row["chunked_gib"]
        out.append(row)
    return out


def loss_probe(mode: str, vocab: int, tokens: int, hidden: int) -> None:
    import resource

    import torch

    from finetune_engine import fastpath

    torch.manual_seed(0)
    head = torch.nn.Linear(hidden, vocab, bias=False, dtype=torch.bfloat16)
    h = torch.randn(1, tokens, hidden, dtype=torch.bfloat16, requires_grad=True)
    labels = torch.randint(0, vocab, (1, tokens))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if mode == "plain":
        from transformers.loss.loss_utils import ForCausalLMLoss

        loss = ForCausalLMLoss(head(h), labels, vocab)
    else:
        loss = fastpath.chunked_cross_entropy(head, h, fastpath.shift_labels(labels)) / (tokens - 1)
    loss.backward()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"peak_gib": (peak - before) / 2**20, "loss": float(loss.detach())}))


def fmt(row: dict, peak: float | None, params: int) -> str:
    if "skipped" in row:
        return f"skipped: {row['skipped']}"
    if "error" in row:
        return f"failed: {row['error']}"
    mfu = row["tok_s"] * 6 * params / (peak * 1e12) if peak else None
    row["mfu"] = mfu
    mem = row.get("peak_gib")
    return (
        f"{row['tok_s']:>10.0f} tok/s  MFU {mfu:.3f}"
        if mfu is not None
        else f"{row['tok_s']:>10.0f} tok/s  MFU n/a"
    ) + (f"  peak {mem:.1f} GiB" if mem is not None else "  peak n/a (CPU)")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--smoke", action="store_true", help="tiny model on the CPU, a few steps")
    p.add_argument("--steps", type=int, default=None, help="measured steps (default 30; smoke 3)")
    p.add_argument("--warmup", type=int, default=None, help="steps before measuring (default 5; smoke 1)")
    p.add_argument("--rows", type=int, default=None, help="packed rows per step (default 8; smoke 2)")
    p.add_argument("--seq", type=int, default=None, help="tokens per row (default 2048; smoke 128)")
    p.add_argument("--examples", type=int, default=None, help="chat examples (default 12000; smoke 120)")
    p.add_argument("--logging-steps", type=int, default=10)
    p.add_argument("--peak-tflops", type=float, default=None, help="device peak bf16 TFLOP/s")
    p.add_argument("--only", default="", help="comma list of rows to run (default all)")
    p.add_argument("--json", default="bench_gpu.json", help="where the results go")
    p.add_argument("--loss-memory", action="store_true", help="CPU: chunked vs plain loss peak memory")
    p.add_argument("--loss-tokens", type=int, default=2048, help="tokens of the --loss-memory probe")
    p.add_argument("--loss-probe", nargs=4, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.loss_probe:
        mode, vocab, tokens, hidden = a.loss_probe
        loss_probe(mode, int(vocab), int(tokens), int(hidden))
        return 0
    if a.loss_memory:
        rows = loss_memory([128256, 152064], a.loss_tokens, 64)
        for r in rows:
            print(
                f"loss peak memory, vocab {r['vocab']}, {r['tokens']} tokens, hidden {r['hidden']}, bf16: "
                f"plain {r['plain_gib']:.2f} GiB, chunked {r['chunked_gib']:.2f} GiB "
                f"({r['reduction']:.1f}x less)"
            )
        Path(a.json).write_text(json.dumps({"loss_memory": rows}, indent=1))
        return 0
    if a.smoke:
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    d = (3, 1, 2, 128, 120) if a.smoke else (30, 5, 8, 2048, 12000)
    given = (a.steps, a.warmup, a.rows, a.seq, a.examples)
    a.steps, a.warmup, a.rows, a.seq, a.examples = (
        v if v is not None else dv for v, dv in zip(given, d, strict=True)
    )
    logging.basicConfig(level=logging.WARNING)
    import torch
    from bench_training import write_dataset

    peak = peak_tflops(a.peak_tflops)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({platform.processor()})"
    work = Path(tempfile.mkdtemp(prefix="bench-gpu-"))
    model = build_model(work / "model", a.smoke)
    data = write_dataset(work / "chat.jsonl", a.examples, seed=0)
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(model)
    with torch.device("meta"):
        from transformers import AutoModelForCausalLM

        params = sum(t.numel() for t in AutoModelForCausalLM.from_config(cfg).parameters())
    print(
        f"device: {device}; model {params / 1e6:.2f}M parameters; {a.rows} x {a.seq} tokens per step; "
        f"{a.warmup} warm-up + {a.steps} measured steps; peak {peak or 'n/a'} TFLOP/s"
    )
    runs = {
        "engine full": lambda: run_engine(model, data, work, a, "full"),
        "engine lora": lambda: run_engine(model, data, work, a, "lora"),
        "engine qlora": lambda: run_engine(model, data, work, a, "qlora"),
        "engine full fa4": lambda: run_engine(model, data, work, a, "full-fa4"),
        "bare loop full": lambda: run_bare(model, data, a, lora=False),
        "bare loop lora": lambda: run_bare(model, data, a, lora=True),
        "TRL packing": lambda: run_trl(model, data, work, a, packing=True),
        "TRL defaults": lambda: run_trl(model, data, work, a, packing=False),
    }
    only = [x.strip() for x in a.only.split(",") if x.strip()]
    results: dict[str, dict] = {}
    for name, fn in runs.items():
        if only and name not in only:
            continue
        reset_memory()
        try:
            row = fn()
        except Exception as err:  # one row failing must not lose the others
            traceback.print_exc()
            row = {"error": f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"}
        if "tok_s" in row:
            row["peak_gib"] = peak_memory_gib()
        results[name] = row
        print(f"{name:<16} {fmt(row, peak, params)}", flush=True)

    def ratio(x: str, y: str) -> float | None:
        if "tok_s" in results.get(x, {}) and "tok_s" in results.get(y, {}):
            return results[x]["tok_s"] / results[y]["tok_s"]
        return None

    ratios = {
        "engine full / bare loop full": ratio("engine full", "bare loop full"),
        "engine full fa4 / engine full": ratio("engine full fa4", "engine full"),
        "engine lora / bare loop lora": ratio("engine lora", "bare loop lora"),
        "engine full / TRL packing": ratio("engine full", "TRL packing"),
        "engine full / TRL defaults": ratio("engine full", "TRL defaults"),
    }
    for name, r in ratios.items():
        print(f"ratio {name}: " + (f"{r:.2f}x" if r is not None else "n/a"))
    mem = {}
    for eng, bare in (("engine full", "bare loop full"), ("engine lora", "bare loop lora")):
        e, b = results.get(eng, {}).get("peak_gib"), results.get(bare, {}).get("peak_gib")
        if e and b:
            mem[f"{eng} / {bare} peak memory"] = e / b
            print(f"ratio {eng} / {bare} peak memory: {e / b:.2f}x")
    Path(a.json).write_text(
        json.dumps(
            {
                "device": device,
                "params": params,
                "peak_tflops": peak,
                "rows": a.rows,
                "seq": a.seq,
                "steps": a.steps,
                "warmup": a.warmup,
                "versions": {"torch": torch.__version__, "python": platform.python_version()},
                "results": results,
                "ratios": ratios,
                "memory_ratios": mem,
            },
            indent=1,
        )
    )
    print(f"results written to {a.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
