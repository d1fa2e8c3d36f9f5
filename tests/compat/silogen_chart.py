"""Render the Silogen engine's Helm chart (llm-finetune-silogen-engine) without helm.

A Silogen user runs ``helm template workloads/llm-finetune-silogen-engine/helm --values OVERRIDE``;
the chart's ``templates/configmap.yaml`` writes ``/configs/finetuning_config.yaml`` and
``templates/_helpers.tpl`` (``finetuningAndUploadEntrypoint``) the commands the Job runs. This module
reproduces both for the chart's own overrides, so the corpus under ``configs/`` holds what the
Silogen engine receives, byte for byte as far as the template language allows:

- values files merge as Helm merges them (maps deep-merge, lists and scalars replace, an explicit
  ``null`` removes the key);
- numbers are float64 inside Helm: printed directly by the template with Go's ``%v`` (``8``,
  ``0.1``, ``1e-05``), and through ``toYaml`` (JSON, then YAML: integral values as integers, other
  values in Go's shortest ``%g`` form, so ``0.00005`` becomes ``5e-05``);
- ``toYaml`` sorts keys, writes block sequences unindented under their key and quotes strings that
  YAML 1.1 would read as something else (``"no"``).

Regenerate the corpus from a checkout of silogen/ai-workloads::

    python tests/compat/silogen_chart.py CHART_DIR tests/compat/configs

where CHART_DIR is ``workloads/llm-finetune-silogen-engine/helm`` of that checkout.
"""

from __future__ import annotations

import copy
import functools
import json
import math
import re
import sys
from decimal import Decimal
from pathlib import Path
from typing import Any

import yaml

NO_VALUE = "<no value>"  # what text/template prints for a missing key

# Each corpus entry: output name -> the values files, in --values order (relative to helm/).
# Model recipes carry no dataset: a user adds one, as the chart's data overrides do.
DATA = "overrides/data/argilla-mistral-large-human-prompts.yaml"
DPO_DATA = "overrides/data/ultrafeedback-binarized.yaml"


def corpus_entries(chart: Path) -> dict[str, list[str]]:
    entries = {
        "tutorial-01-finetune-full-param": ["overrides/tutorial-01-finetune-full-param.yaml"],
        "tutorial-01-finetune-lora": ["overrides/tutorial-01-finetune-lora.yaml"],
        "tutorial-02-qwen-odia-instruct-v1": ["overrides/tutorial-02-qwen-odia-instruct-v1.yaml"],
        "tutorial-05-llama-lora-opi-data": ["overrides/tutorial-05-llama-lora-opi-data.yaml"],
        "tiny-llama-dpo-full-param": ["overrides/tiny-llama-dpo-full-param.yaml"],
        "llama-31-tiny-random-deepspeed-values": ["overrides/llama-31-tiny-random-deepspeed-values.yaml"],
        "repro-tutorial-01-user-inputs": [
            "overrides/models-without-matching-aim-profiles/tiny-llama_tinyllama-1.1b-chat-v1.0.yaml",
            DATA,
            "overrides/additional-example-files/repro-tutorial-01-user-inputs.yaml",
        ],
    }
    for folder in ("models", "models-without-matching-aim-profiles"):
        for f in sorted((chart / "overrides" / folder).glob("*.yaml")):
            entries[f"{folder}--{f.stem}"] = [f"overrides/{folder}/{f.name}", DATA]
    for util in ("mlflow", "speed-and-max-batch-test", "tensorboard"):
        entries[f"utilities--{util}"] = [
            "overrides/tutorial-01-finetune-lora.yaml",
            f"overrides/utilities/{util}.yaml",
        ]
    # the speed test's own data: long rows with a system message and extra top-level keys
    entries["utilities--speed-and-max-batch-test"].append("overrides/data/long-random-data.yaml")
    return entries


# ---------------------------------------------------------------------------------------------
# Helm values
# ---------------------------------------------------------------------------------------------


def _to_helm(value: Any) -> Any:
    """Helm reads values through JSON: every number becomes a float64."""
    if isinstance(value, dict):
        return {str(k): _to_helm(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_to_helm(v) for v in value]
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, (int, float)):
        return float(value)
    return str(value)


def merge_values(base: dict, override: dict) -> dict:
    """Helm's coalescing of a user values file into the chart's values."""
    out = copy.deepcopy(base)
    for key, value in override.items():
        if value is None:
            out.pop(key, None)
        elif isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge_values(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def load_values(chart: Path, files: list[str]) -> dict:
    values = _to_helm(yaml.safe_load((chart / "values.yaml").read_text()))
    for f in files:
        values = merge_values(values, _to_helm(yaml.safe_load((chart / f).read_text()) or {}))
    return values


# ---------------------------------------------------------------------------------------------
# Go formatting
# ---------------------------------------------------------------------------------------------


def go_float(x: float) -> str:
    """strconv.FormatFloat(x, 'g', -1, 64), which is also fmt's %v for a float64."""
    if math.isinf(x):
        return "+Inf" if x > 0 else "-Inf"
    if math.isnan(x):
        return "NaN"
    if x == 0:
        return "-0" if math.copysign(1, x) < 0 else "0"
    sign, digits, exp = Decimal(repr(x)).normalize().as_tuple()
    ds = "".join(map(str, digits))
    e = exp + len(ds) - 1  # exponent of the first digit
    neg = "-" if sign else ""
    if e < -4 or e >= 6:  # shortest %g switches to %e at exponents < -4 or >= 6
        mant = ds[0] + ("." + ds[1:] if len(ds) > 1 else "")
        return f"{neg}{mant}e{'-' if e < 0 else '+'}{abs(e):02d}"
    if e < 0:
        return f"{neg}0.{'0' * (-e - 1)}{ds}"
    if len(ds) <= e + 1:
        return f"{neg}{ds}{'0' * (e + 1 - len(ds))}"
    return f"{neg}{ds[: e + 1]}.{ds[e + 1 :]}"


def go_print(value: Any) -> str:
    """What ``{{ value }}`` prints."""
    if value is None:
        return NO_VALUE
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return go_float(value)
    if isinstance(value, (dict, list)):
        raise TypeError("the chart prints only scalars directly")
    return str(value)


def _empty(value: Any) -> bool:
    """sprig's notion of empty, used by ``default``."""
    return value is None or value is False or value == 0 or value == "" or value == [] or value == {}


def default(fallback: Any, value: Any) -> Any:
    return fallback if _empty(value) else value


# ---- toYaml: json.Marshal, then YAML (go-yaml v2) -------------------------------------------

_YAML11_SPECIAL = re.compile(
    r"^(?:y|Y|yes|Yes|YES|n|N|no|No|NO|true|True|TRUE|false|False|FALSE|on|On|ON|off|Off|OFF"
    r"|~|null|Null|NULL|\.inf|\.Inf|\.INF|[-+]\.inf|[-+]\.Inf|[-+]\.INF|\.nan|\.NaN|\.NAN)$"
)
_NUMBER = re.compile(
    r"^[-+]?(?:0b[01_]+|0x[0-9a-fA-F_]+|0o?[0-7_]+|[0-9][0-9_]*(?::[0-5]?[0-9])+(?:\.[0-9_]*)?"
    r"|(?:\.[0-9]+|[0-9][0-9_]*(?:\.[0-9_]*)?)(?:[eE][-+]?[0-9]+)?)$"
)
_PLAIN_OK = re.compile(r"^[A-Za-z0-9_./(][A-Za-z0-9_./()@+=,:;*%$!?' -]*$")


def _go_str(s: str) -> str:
    if s == "":
        return '""'
    if "\n" in s:
        raise ValueError("multi-line strings are not used by the chart's configs")
    if _YAML11_SPECIAL.match(s) or _NUMBER.match(s):
        return json.dumps(s)  # go-yaml: double-quoted when a plain scalar would change type
    if _PLAIN_OK.match(s) and ": " not in s and " #" not in s and not s.endswith((" ", ":")):
        return s
    return "'" + s.replace("'", "''") + "'"


def _json_roundtrip(value: Any) -> Any:
    """json.Marshal then yaml.Unmarshal: integral floats come back as ints."""
    if isinstance(value, dict):
        return {k: _json_roundtrip(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_roundtrip(v) for v in value]
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e21:
        return int(value)
    return value


def _go_key_less(a: str, b: str) -> int:
    """go-yaml v2's key order: letters after other runes, digit runs compared as numbers."""
    for i in range(min(len(a), len(b))):
        if a[i] == b[i]:
            continue
        al, bl = a[i].isalpha(), b[i].isalpha()
        if al and bl:
            return -1 if a[i] < b[i] else 1
        if al or bl:
            return -1 if bl else 1
        ai, an = i, 0
        while ai < len(a) and a[ai].isdigit():
            an, ai = an * 10 + int(a[ai]), ai + 1
        bi, bn = i, 0
        while bi < len(b) and b[bi].isdigit():
            bn, bi = bn * 10 + int(b[bi]), bi + 1
        if an != bn:
            return -1 if an < bn else 1
        if ai != bi:
            return -1 if ai < bi else 1
        return -1 if a[i] < b[i] else 1
    return (len(a) > len(b)) - (len(a) < len(b))


def _scalar(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        s = go_float(value)
        return {"+Inf": ".inf", "-Inf": "-.inf", "NaN": ".nan"}.get(s, s)
    return _go_str(str(value))


def _emit(value: Any, indent: int) -> list[str]:
    pad = " " * indent
    lines: list[str] = []
    if isinstance(value, dict):
        for key in sorted(value, key=functools.cmp_to_key(_go_key_less)):
            v = value[key]
            if isinstance(v, dict) and v:
                lines.append(f"{pad}{_go_str(key)}:")
                lines += _emit(v, indent + 2)
            elif isinstance(v, list) and v:
                lines.append(f"{pad}{_go_str(key)}:")
                lines += _emit(v, indent)  # go-yaml v2 does not indent a sequence under its key
            else:
                lines.append(f"{pad}{_go_str(key)}: {_inline(v)}")
    elif isinstance(value, list):
        for item in value:
            if isinstance(item, dict) and item:
                sub = _emit(item, indent + 2)
                lines.append(f"{pad}- {sub[0].lstrip()}")
                lines += sub[1:]
            elif isinstance(item, list) and item:
                sub = _emit(item, indent + 2)
                lines.append(f"{pad}- {sub[0].lstrip()}")
                lines += sub[1:]
            else:
                lines.append(f"{pad}- {_inline(item)}")
    else:
        lines.append(pad + _inline(value))
    return lines


def _inline(value: Any) -> str:
    if value == {} and isinstance(value, dict):
        return "{}"
    if value == [] and isinstance(value, list):
        return "[]"
    return _scalar(value)


def to_yaml(value: Any) -> str:
    """Helm's ``toYaml`` (without its trailing newline)."""
    return "\n".join(_emit(_json_roundtrip(value), 0))


def nindent(n: int, text: str) -> str:
    pad = " " * n
    return "\n" + pad + text.replace("\n", "\n" + pad)


# ---------------------------------------------------------------------------------------------
# templates/configmap.yaml: finetuning_config.yaml
# ---------------------------------------------------------------------------------------------


def local_path(bucket_path: Any) -> str:
    """``/local_resources/{{ .path | replace "/" "_" }}`` (where the download step put the file)."""
    return "/local_resources/" + ("" if bucket_path is None else str(bucket_path)).replace("/", "_")


def render_finetuning_config(values: dict) -> str:
    c = values["finetuning_config"]
    get = lambda d, *keys: functools.reduce(lambda x, k: x.get(k) if isinstance(x, dict) else None, keys, d)  # noqa: E731
    out = [f"method: {go_print(c.get('method'))}", "data_conf:", "  training_data:"]
    ttype = get(c, "data_conf", "training_data", "type")
    out.append(f"    type: {go_print(ttype)}")
    out.append("    datasets:")
    for ds in get(c, "data_conf", "training_data", "datasets") or []:
        out.append(f"      - path: {local_path(ds.get('path'))}")
        if ttype == "PRECOMPUTE_WEIGHTED_MIX":
            out.append(f"        sampling_weight: {go_print(default(1.0, ds.get('sampling_weight')))}")
    vtype = get(c, "data_conf", "validation_data", "type")
    out += ["  validation_data:", f"    type: {go_print(vtype)}"]
    if vtype == "AUTO_SPLIT":
        out.append(f"    ratio: {go_print(get(c, 'data_conf', 'validation_data', 'ratio'))}")
    # The template's CONCATENATION branch tests `.validation_data_type`, a key that does not exist,
    # so validation datasets are never written.
    out.append(f"  chat_template_name: {go_print(get(c, 'data_conf', 'chat_template_name'))}")
    out.append(f"  missing_pad_token_strategy: {go_print(get(c, 'data_conf', 'missing_pad_token_strategy'))}")
    out.append("training_args:" + nindent(2, to_yaml(c.get("training_args"))))
    out.append("overrides:" + nindent(2, to_yaml(c.get("overrides"))))
    out.append("batchsize_conf:")
    total = default(values.get("finetuningGpus"), get(c, "batchsize_conf", "total_train_batch_size"))
    out.append(f"  total_train_batch_size: {go_print(total)}")
    out.append(
        "  max_per_device_train_batch_size: "
        f"{go_print(get(c, 'batchsize_conf', 'max_per_device_train_batch_size'))}"
    )
    out.append(
        "  per_device_eval_batch_size: "
        f"{go_print(default('null', get(c, 'batchsize_conf', 'per_device_eval_batch_size')))}"
    )
    out.append("peft_conf:" + nindent(2, to_yaml(c.get("peft_conf"))))
    out.append("quant_conf:" + nindent(2, to_yaml(c.get("quant_conf"))))
    no_peft = get(c, "peft_conf", "peft_type") == "NO_PEFT"
    out += [
        "run_conf:",
        "  model: /local_resources/basemodel",
        f"  final_checkpoint_name: {'checkpoint-final' if no_peft else 'checkpoint-final-adapter'}"
        + nindent(2, to_yaml(c.get("run_conf"))),
    ]
    if c.get("method") == "sft":
        out.append("sft_args:" + nindent(2, to_yaml(c.get("sft_args"))))
    if not _empty(c.get("tracking")):
        out.append("tracking:" + nindent(2, to_yaml(c.get("tracking"))))
    return "\n".join(out) + "\n"


# ---------------------------------------------------------------------------------------------
# templates/_helpers.tpl: the commands of finetuningAndUploadEntrypoint that touch the outputs
# ---------------------------------------------------------------------------------------------


def render_commands(values: dict) -> list[str]:
    """The engine commands the Job runs in its working directory (bucket syncs left out)."""
    c = values["finetuning_config"]
    cmds = [
        "accelerate launch --config_file /configs/accelerate_config.yaml --no-python "
        f"{go_print(values.get('mainBinaryName'))} --num-preprocess-workers 4 {go_print(c.get('method'))} "
        "/configs/finetuning_config.yaml"
    ]
    if (c.get("peft_conf") or {}).get("peft_type") != "NO_PEFT":
        cmds.append(
            "create_vllm_compatible_adapter --training-config /configs/finetuning_config.yaml "
            "./checkpoints/checkpoint-final-adapter"
        )
        if values.get("mergeAdapter"):
            cmds.append(
                "merge_adapter $merge_base ./checkpoints/checkpoint-final-adapter "
                "./checkpoints/checkpoint-final"
            )
    return cmds


def render(chart: Path, files: list[str]) -> tuple[str, dict]:
    """(finetuning_config.yaml text, job facts) for ``helm template CHART --values f1 --values f2 ...``."""
    values = load_values(chart, files)
    facts = {
        "values_files": files,
        "method": values["finetuning_config"].get("method"),
        "distributedType": values.get("distributedType"),
        "finetuningGpus": go_print(values.get("finetuningGpus")),
        "mergeAdapter": bool(values.get("mergeAdapter")),
        "commands": render_commands(values),
    }
    return render_finetuning_config(values), facts


def write_corpus(chart: Path, out_dir: Path) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for name, files in corpus_entries(chart).items():
        text, facts = render(chart, files)
        header = [
            "# Rendered from the Silogen engine's Helm chart (silogen/ai-workloads,",
            "# workloads/llm-finetune-silogen-engine/helm) as its templates/configmap.yaml writes",
            "# /configs/finetuning_config.yaml, with:",
            *(f"#   --values {f}" for f in files),
            "# Job (templates/_helpers.tpl, finetuningAndUploadEntrypoint):",
            f"#   distributedType: {facts['distributedType']}, finetuningGpus: {facts['finetuningGpus']}, "
            f"mergeAdapter: {str(facts['mergeAdapter']).lower()}",
            *(f"#   $ {cmd}" for cmd in facts["commands"]),
        ]
        path = out_dir / f"{name}.yaml"
        path.write_text("\n".join(header) + "\n" + text)
        written.append(path)
    return written


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: python tests/compat/silogen_chart.py CHART_DIR OUT_DIR")
    for p in write_corpus(Path(sys.argv[1]), Path(sys.argv[2])):
        print(p)
