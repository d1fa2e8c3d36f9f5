"""Post-training quantization: bad input refused before any weight loads, and a real W8A8 / W4A16
compressed-tensors checkpoint that records its calibration sample and that transformers loads."""

from __future__ import annotations

import hashlib
import json
import random
import subprocess
import sys
from pathlib import Path

import pytest

from finetune_engine.manifest import read_manifest, verify_directory
from finetune_engine.quantize import RECORD_NAME, SUPPORTED_MODEL_TYPES, load_calibration, preflight

ENGINE = Path(sys.executable).parent / "finetune-engine"


def _fake_model(path: Path, **config) -> Path:
    """A model directory as far as preflight reads it: config.json and a weights file."""
    path.mkdir(parents=True)
    (path / "config.json").write_text(
        json.dumps({"model_type": "llama", "hidden_size": 128, "intermediate_size": 256, **config})
    )
    (path / "model.safetensors").write_bytes(b"0")
    return path


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"scheme": "W3A3"}, r"--scheme 'W3A3' is not supported; choose one of W8A8, W4A16"),
        ({"model": "missing"}, r"missing: no such model directory"),
        ({"model_type": "t5"}, r"model_type 't5' cannot be quantized here; supported: llama"),
        ({"quantization_config": {"quant_method": "bitsandbytes"}}, r"already quantized \(bitsandbytes\)"),
        (
            {"hidden_size": 200, "scheme": "W4A16"},
            r"hidden_size 200 is not a multiple of .* use --scheme W8A8",
        ),
        ({"samples": 0}, r"--samples must be a positive integer"),
        ({"iters": 5, "calibration": None}, r"--iters > 0 .* give --calibration-data FILE"),
        ({"out_exists": True}, r"exists and is not empty; give a new directory"),
        ({"calibration": "nowhere.jsonl"}, r"--calibration-data .*nowhere.jsonl: no such file"),
        (
            {"calibration_text": '{"messages": [{"role": "user"}]}\nnot json\n'},
            r"cal.jsonl:1: .*\n.*cal.jsonl:2",
        ),
    ],
)
def test_bad_input_is_refused_before_any_weight_loads(tmp_path, change, match):
    model_keys = {k: change[k] for k in ("model_type", "quantization_config", "hidden_size") if k in change}
    model = _fake_model(tmp_path / "m", **model_keys)
    out = tmp_path / "out"
    if change.get("out_exists"):
        out.mkdir()
        (out / "keep.txt").write_text("not ours")
    cal = tmp_path / "cal.jsonl"
    cal.write_text(
        change.get(
            "calibration_text",
            '{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n',
        )
    )
    calibration = change.get("calibration", str(cal))
    if calibration and not Path(calibration).is_absolute():
        calibration = str(tmp_path / calibration)
    model_arg = tmp_path / change["model"] if "model" in change else model
    with pytest.raises(ValueError, match=match):
        preflight(
            model_arg,
            out,
            change.get("scheme", "W8A8"),
            calibration,
            change.get("samples", 8),
            change.get("iters"),
        )
    if change.get("out_exists"):
        assert (out / "keep.txt").read_text() == "not ours"  # never touched
    else:
        assert not out.exists()


def test_the_supported_families_are_dense_decoders():
    assert "llama" in SUPPORTED_MODEL_TYPES and "qwen2" in SUPPORTED_MODEL_TYPES
    assert not {"mixtral", "t5", "bert", "llava"} & set(SUPPORTED_MODEL_TYPES)


def test_the_calibration_sample_is_fixed_and_hashed(chat_data):
    a, b = load_calibration(chat_data, 16), load_calibration(chat_data, 16)
    rows = [json.loads(line) for line in chat_data.read_text().splitlines()]
    expected = sorted(random.Random(0).sample(range(len(rows)), 16))
    assert a.lines == [i + 1 for i in expected] and a.records == [rows[i] for i in expected]
    blob = "".join(
        json.dumps(r, sort_keys=True, ensure_ascii=False, separators=(",", ":")) + "\n" for r in a.records
    )
    assert a.sha256 == b.sha256 == hashlib.sha256(blob.encode()).hexdigest()
    assert load_calibration(chat_data, 17).sha256 != a.sha256
    assert load_calibration(chat_data, 10_000).describe()["samples"] == len(rows)  # all of a small file


def test_the_command_reports_bad_input_in_one_line(tmp_path):
    model = _fake_model(tmp_path / "m")
    proc = subprocess.run(
        [str(ENGINE), "quantize", str(model), str(tmp_path / "o"), "--scheme", "int3"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [
        "finetune-engine quantize: error: --scheme 'int3' is not supported; choose one of W8A8, W4A16"
    ]


@pytest.mark.slow
def test_quantize_writes_a_compressed_tensors_checkpoint_with_its_record(tiny_model_dir, chat_data, tmp_path):
    """W8A8, calibrated; W4A16 (round to nearest) is served by vLLM in the tutorial DAG test."""
    import torch
    from transformers import AutoModelForCausalLM

    out = tmp_path / "q"
    proc = subprocess.run(
        [str(ENGINE), "quantize", str(tiny_model_dir), str(out), "--scheme", "w8a8"]
        + ["--calibration-data", str(chat_data), "--samples", "32", "--iters", "2"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors" and qc["ignore"] == ["lm_head"]
    [group] = qc["config_groups"].values()
    weights, acts = group["weights"], group["input_activations"]
    assert (weights["num_bits"], weights["strategy"]) == (8, "channel")
    assert (acts["num_bits"], acts["strategy"], acts["dynamic"]) == (8, "token", True)
    record = json.loads((out / RECORD_NAME).read_text())
    assert record["scheme"] == "W8A8" and record["calibration"] == load_calibration(chat_data, 32).describe()
    assert record["calibration"]["name"] == chat_data.name and record["iters"] == 2
    assert record["size_bytes"]["after"] < 0.6 * record["size_bytes"]["before"]
    assert verify_directory(out, check_hashes=True) == (True, "complete")
    assert read_manifest(out)["extra"]["quantization"] == record
    assert not list(tmp_path.glob(".q.partial-*"))  # the staging directory is gone
    # transformers loads it on the CPU (decompressed) and it computes nearly the same function
    ids = torch.tensor([[1, 40, 50, 60, 70, 80]])
    with torch.no_grad():
        base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)(ids).logits
        quant = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)(ids).logits
    err = ((quant - base).norm() / base.norm()).item()
    assert 0 < err < 0.05, err
