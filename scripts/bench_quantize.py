#!/usr/bin/env python3
"""Post-training quantization on the CPU: size on disk, held-out assistant-token loss and vLLM CPU
decode speed of W8A8 and W4A16 against the unquantized model, all measured in one run.

    .venv/bin/python scripts/bench_quantize.py [--hidden 128 --layers 2 --train-steps 150 --iters 50]

The model is the tiny local Llama (its tokenizer, the given size), trained for ``--train-steps`` on
the synthetic chat data so the loss means something; a held-out file of other examples scores it.
Each variant is quantized by ``finetune-engine quantize`` calibrated on ``--samples`` training
examples, scored by the eval job's ``score_model`` (transformers loads compressed-tensors on the
CPU, decompressed), and served by vLLM CPU (.venv-vllm) for the same prompts (greedy, fixed output
length). Ratios are against the unquantized model of the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VLLM_PY = ROOT / ".venv-vllm" / "bin" / "python"

VLLM_SCRIPT = r"""
import json, sys, time
def main():
    from vllm import LLM, SamplingParams
    model, prompts, out_tokens = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3])
    llm = LLM(model=model, max_model_len=512, enforce_eager=True, seed=0)
    params = SamplingParams(max_tokens=out_tokens, temperature=0, ignore_eos=True)
    convs = [[{"role": "user", "content": p}] for p in prompts]
    llm.chat(convs[:2], params)  # warm-up
    best = None
    for _ in range(3):
        t = time.perf_counter()
        outs = llm.chat(convs, params)
        dt = time.perf_counter() - t
        n = sum(len(o.outputs[0].token_ids) for o in outs)
        best = max(best or 0, n / dt)
    single = []
    for _ in range(3):
        t = time.perf_counter()
        o = llm.chat(convs[:1], params)
        single.append(len(o[0].outputs[0].token_ids) / (time.perf_counter() - t))
    first = llm.chat(convs[:1], SamplingParams(max_tokens=16, temperature=0))[0].outputs[0].text
    print("RESULT " + json.dumps({"batch_tok_s": best, "single_tok_s": max(single), "answer": first}))
if __name__ == "__main__":
    main()
"""


def build_model(out: Path, hidden: int, layers: int, intermediate: int, heads: int, steps: int, data: Path):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from finetune_engine.tiny import build_tokenizer

    tok = build_tokenizer()
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=1024,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config)
    texts = [tok.apply_chat_template(json.loads(line)["messages"], tokenize=False) for line in open(data)]
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    tok.pad_token = tok.eos_token
    model.train()
    for step in range(steps):
        batch = texts[(step * 16) % len(texts) :][:16]
        enc = tok(batch, return_tensors="pt", padding=True, add_special_tokens=False)
        labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
        loss = model(**enc, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    print(f"trained {steps} steps, last loss {loss.item():.3f}", flush=True)
    model.eval()
    tok.pad_token = None
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def size(d: Path) -> int:
    return sum(p.stat().st_size for p in d.rglob("*") if p.is_file() and p.name.endswith(".safetensors"))


def vllm_speed(model: Path, prompts: list[str], out_tokens: int, tmp: Path) -> dict:
    env = {
        **os.environ,
        "VLLM_CPU_KVCACHE_SPACE": "1",
        "VLLM_CACHE_ROOT": str(tmp / "vllm-cache"),
        "TORCHINDUCTOR_CACHE_DIR": str(tmp / "inductor"),
        "TMPDIR": str(tmp),
    }
    script = tmp / "speed.py"
    script.write_text(VLLM_SCRIPT)
    proc = subprocess.run(
        [str(VLLM_PY), str(script), str(model), json.dumps(prompts), str(out_tokens)],
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
    )
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    raise RuntimeError(f"vLLM failed on {model}:\n{proc.stderr[-3000:]}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--intermediate", type=int, default=256)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--train-steps", type=int, default=150)
    parser.add_argument("--samples", type=int, default=128)
    parser.add_argument("--iters", type=int, default=50)
    parser.add_argument("--out-tokens", type=int, default=64)
    parser.add_argument("--no-vllm", action="store_true")
    args = parser.parse_args()

    from finetune_engine.jobs.evaluate import score_model
    from finetune_engine.quantize import main as quantize
    from finetune_engine.tiny import write_chat_dataset

    tmp = Path(tempfile.mkdtemp(prefix="bench-quantize-"))
    train = write_chat_dataset(tmp / "train.jsonl", examples=800, seed=0)
    heldout = write_chat_dataset(tmp / "heldout.jsonl", examples=200, seed=1)
    records = [json.loads(line) for line in open(heldout)]
    t = time.perf_counter()
    base = build_model(
        tmp / "base", args.hidden, args.layers, args.intermediate, args.heads, args.train_steps, train
    )
    print(f"model built and trained in {time.perf_counter() - t:.1f}s", flush=True)
    variants = {"unquantized": base}
    for scheme in ("W8A8", "W4A16"):
        out = tmp / scheme.lower()
        t = time.perf_counter()
        argv = [str(base), str(out), "--scheme", scheme, "--calibration-data", str(train)]
        argv += ["--samples", str(args.samples), "--iters", str(args.iters)]
        if quantize(argv) != 0:
            raise SystemExit(f"quantize {scheme} failed")
        print(f"{scheme}: quantized in {time.perf_counter() - t:.1f}s", flush=True)
        variants[scheme] = out
    prompts = [f"What is the capital of {c}?" for c in ("France", "Spain", "Italy", "Japan")]
    prompts += [f"What is {a} plus {b}?" for a, b in ((3, 4), (12, 7), (5, 9), (18, 1))]
    rows = {}
    for name, path in variants.items():
        loss = score_model(path, records, max_seq_length=256, batch_size=16)["eval_loss"]
        rows[name] = {"size": size(path), "loss": loss}
        if not args.no_vllm and VLLM_PY.exists():
            rows[name].update(vllm_speed(path, prompts, args.out_tokens, tmp))
        print(name, json.dumps(rows[name]), flush=True)
    ref = rows["unquantized"]
    print(
        f"\nmodel: Llama hidden {args.hidden}, {args.layers} layers, intermediate {args.intermediate}, "
        f"{args.heads} heads; calibration {args.samples} samples, AutoRound iters {args.iters}"
    )
    head = "| variant | weights on disk | size ratio | held-out loss | loss delta |"
    sep = "| --- | --- | --- | --- | --- |"
    if "batch_tok_s" in ref:
        head += " vLLM CPU tok/s (8 prompts) | ratio | tok/s (1 prompt) | ratio | answer |"
        sep += " --- | --- | --- | --- | --- |"
    print(head + "\n" + sep)
    for name, r in rows.items():
        line = (
            f"| {name} | {r['size'] / 1e6:.2f} MB | {r['size'] / ref['size']:.2f} | {r['loss']:.4f} | "
            f"{r['loss'] - ref['loss']:+.4f} |"
        )
        if "batch_tok_s" in r:
            line += (
                f" {r['batch_tok_s']:.0f} | {r['batch_tok_s'] / ref['batch_tok_s']:.2f} | "
                f"{r['single_tok_s']:.0f} | {r['single_tok_s'] / ref['single_tok_s']:.2f} | "
                f"{r['answer'].strip()[:30]!r} |"
            )
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
