"""Pieces the bucket-aware jobs share: config input, local names of inputs, result output, log capture."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from finetune_engine.config import ConfigError, parse_config
from finetune_engine.config.schema import ExperimentConfig
from finetune_engine.config.yamlio import safe_load

log = logging.getLogger(__name__)
CONFIG_ENV = "FINETUNE_CONFIG"
RESULT_ENV = "FINETUNE_RESULT_FILE"


def add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config",
        default=None,
        help=(
            "Experiment YAML file; '-' reads stdin; default: "
            f"the YAML text in ${CONFIG_ENV} (how pods pass it)."
        ),
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY.PATH=VALUE",
        help="Override a config value (YAML-parsed). Repeatable.",
    )


def read_config(args: argparse.Namespace, method: str = "sft") -> ExperimentConfig:
    if args.config in (None, ""):
        text, source = os.environ.get(CONFIG_ENV), f"${CONFIG_ENV}"
        if not text:
            raise ConfigError(
                "(none)", [f"no config: pass --config FILE or set {CONFIG_ENV} to the YAML text"]
            )
    elif args.config == "-":
        text, source = sys.stdin.read(), "<stdin>"
    else:
        source = args.config
        try:
            text = Path(args.config).read_text(encoding="utf-8")
        except OSError as err:
            raise ConfigError(source, [f"cannot read: {err.strerror}"]) from None
    try:
        data = safe_load(text)
    except yaml.YAMLError as err:
        raise ConfigError(source, [f"not valid YAML: {err}"]) from None
    return parse_config(data, source=source, overrides=args.overrides, method=method, text=text)


def local_name(uri: str, tag: str) -> str:
    """The local name of a fetched input: ``tag`` and the URI's last segment, trailing slashes
    ignored, so a file and a prefix, with or without ``/``, keep their name and suffix:
    ``local_name("s3://b/prompts/probe.jsonl/", "prompts")`` is ``prompts-probe.jsonl``. The tag
    keeps inputs apart that end alike, and a name from ``.`` or ``..`` a plain file name."""
    return f"{tag}-{uri.rstrip('/').rsplit('/', 1)[-1]}"


def write_result(result: dict[str, Any], path: str | None) -> None:
    target = path or os.environ.get(RESULT_ENV)
    if not target:
        return
    Path(target).parent.mkdir(parents=True, exist_ok=True)
    Path(target).write_text(json.dumps(result, indent=1, sort_keys=True))


def finish(run: Callable[[], dict[str, Any]], result_file: str | None, refused=(ValueError,)) -> int:
    """A job's exit code: 2 with one ``error:`` line when ``run`` refuses its input (``refused``),
    else 0 after the result JSON is written."""
    try:
        result = run()
    except refused as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    write_result(result, result_file)
    return 0


def capture_logs(path: Path) -> logging.Handler:
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.getLogger().addHandler(handler)
    return handler
