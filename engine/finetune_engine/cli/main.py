"""``finetune-engine COMMAND``: the jobs that pods run and the checks Airflow runs before them.

Each command is a module with a ``main(argv)``; the module is imported only when its command runs,
so ``--help`` and validation stay free of torch.
"""

from __future__ import annotations

import importlib
import os
import sys

from finetune_engine.cli.errors import DEBUG_ENV, run_guarded

# command -> (module with main(argv), or "module:function", one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "validate-config": (
        "finetune_engine.cli.validate_config",
        "Check an experiment config (and --set overrides).",
    ),
    "validate-data": (
        "finetune_engine.data.validate",
        "Check JSONL data files; every problem with file:line.",
    ),
    "presets": (
        "finetune_engine.config.presets",
        "List model presets (target modules, chat template, GPUs) or match a model.",
    ),
    "train-job": (
        "finetune_engine.jobs.train",
        "Pod job: fetch inputs from the bucket, train/resume, upload checkpoints.",
    ),
    "deliver-model": (
        "finetune_engine.jobs.deliver_model",
        "Pod job: Hub model / directory / prefix -> bucket.",
    ),
    "deliver-data": (
        "finetune_engine.jobs.deliver_data",
        "Pod job: data script or URLs -> validated JSONL in the bucket.",
    ),
    "local-s3": (
        "finetune_engine.storage.local_server",
        "Start/stop the embedded local S3 server (rclone serve s3).",
    ),
    "merge-job": (
        "finetune_engine.jobs.merge",
        "Pod job: merge an adapter from the bucket into its base, upload it.",
    ),
    "quantize": (
        "finetune_engine.quantize",
        "Quantize a saved model (W8A8 / W4A16 compressed-tensors) for vLLM.",
    ),
    "quantize-job": (
        "finetune_engine.jobs.quantize",
        "Pod job: quantize a bucket model, upload the compressed-tensors checkpoint.",
    ),
    "eval-job": (
        "finetune_engine.jobs.evaluate",
        "Pod job: score models on the same held-out data (assistant-token loss).",
    ),
    "pull": ("finetune_engine.jobs.pull", "Download a complete bucket prefix (waits for its marker)."),
    "oci-push": (
        "finetune_engine.storage.oci:push_main",
        "Push a model/adapter/dataset directory to a registry as an OCI artifact (oci://).",
    ),
    "oci-pull": (
        "finetune_engine.storage.oci:pull_main",
        "Pull an OCI artifact into a new directory, verified byte for byte.",
    ),
    "finetuning": (
        "finetune_engine.cli.finetuning",
        "Run SFT/DPO from a config (same as the `finetuning` command).",
    ),
    "merge-adapter": ("finetune_engine.merge", "Merge an adapter into its base (the seed's merge_adapter)."),
    "vllm-adapter": (
        "finetune_engine.adapters",
        "Make an adapter vLLM-ready and preflight it (create_vllm_compatible_adapter).",
    ),
    "generate": (
        "finetune_engine.generate",
        "HF generation over prompts or an eval file, YAML output (also the Silogen engine's config).",
    ),
    "replace-tokens": (
        "finetune_engine.replace_tokens",
        "Rename tokens in a copy of a tokenizer (the Silogen engine's replace_tokens).",
    ),
    "tiny": ("finetune_engine.tiny", "Build the tiny local model or a synthetic chat dataset."),
    "chat": ("finetune_engine.cli.chat", "Ask a saved model one question with its chat template."),
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: finetune-engine [--debug] COMMAND [ARGS...]", "", "commands:"]
    lines += [f"  {name:<{width}}  {text}" for name, (_, text) in COMMANDS.items()]
    lines += [
        "",
        "Run `finetune-engine COMMAND --help` for a command's options. Bad input ends in one message "
        "(exit code 2); an unexpected error also prints its Python traceback (exit code 1); --debug "
        f"(or {DEBUG_ENV}=1) raises every error unchanged.",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--debug"]:
        os.environ[DEBUG_ENV] = "1"
        argv = argv[1:]
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"finetune-engine: unknown command {name!r}\n\n{usage()}", file=sys.stderr)
        return 2

    def run(args: list[str] | None) -> int | None:
        module_name, _, function = COMMANDS[name][0].partition(":")
        return getattr(importlib.import_module(module_name), function or "main")(args)

    return run_guarded(f"finetune-engine {name}", run, rest)


if __name__ == "__main__":
    raise SystemExit(main())
