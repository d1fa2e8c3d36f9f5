"""The seed engine's console scripts (``merge_adapter``, ``create_vllm_compatible_adapter``,
``generate``, ``replace_tokens``) behind the engine's error boundary: bad input ends in one line and
exit code 2 (or the command's own code), a crash prints its traceback and exit code 1 (cli/errors.py).

Each command's module is imported only when it runs, as ``finetune-engine`` does.
"""

from __future__ import annotations

import importlib

from finetune_engine.cli.errors import run_guarded

# console script -> module with main(argv)
SCRIPTS: dict[str, str] = {
    "merge_adapter": "finetune_engine.merge",
    "create_vllm_compatible_adapter": "finetune_engine.adapters",
    "generate": "finetune_engine.generate",
    "replace_tokens": "finetune_engine.replace_tokens",
}


def _guarded(prog: str, argv: list[str] | None) -> int:
    def run(args: list[str] | None) -> int | None:
        return importlib.import_module(SCRIPTS[prog]).main(args)

    return run_guarded(prog, run, argv)


def merge_adapter(argv: list[str] | None = None) -> int:
    return _guarded("merge_adapter", argv)


def create_vllm_compatible_adapter(argv: list[str] | None = None) -> int:
    return _guarded("create_vllm_compatible_adapter", argv)


def generate(argv: list[str] | None = None) -> int:
    return _guarded("generate", argv)


def replace_tokens(argv: list[str] | None = None) -> int:
    return _guarded("replace_tokens", argv)
