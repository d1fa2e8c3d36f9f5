"""``finetune-engine validate-config CONFIG [--method sft|dpo|kto|orpo|cpo] [--set k=v ...]``: no
torch needed."""

from __future__ import annotations

import argparse
import sys

from finetune_engine.config import ConfigError, load_config
from finetune_engine.config.training_args import METHODS


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="finetune-engine validate-config", description=__doc__)
    parser.add_argument("config")
    parser.add_argument("--method", default="sft", choices=list(METHODS))
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE")
    args = parser.parse_args(argv)
    try:
        load_config(args.config, overrides=args.overrides, method=args.method)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"{args.config}: valid")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
