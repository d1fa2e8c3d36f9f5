"""``finetuning {sft,dpo,kto,orpo,cpo} CONFIG``: the seed engine's command line, plus --set and
--result-file."""

from __future__ import annotations

import argparse
import logging
import sys

from finetune_engine.config import ConfigError, load_config
from finetune_engine.config.training_args import METHODS

DESCRIPTION = "Finetuning"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="finetuning", description=DESCRIPTION)
    parser.add_argument(
        "method",
        choices=list(METHODS),
        help="The kind of finetuning to run. SFT is Supervised FineTuning. DPO stands for Direct "
        "Preference Optimization; training_args.loss_type picks its variants (sigmoid, ipo, hinge, "
        "robust, ...). KTO trains on unpaired prompt/completion/label data, ORPO is reference-free, "
        "CPO includes SimPO (training_args.loss_type: simpo).",
    )
    parser.add_argument("config", help="Path to the experiment's YAML config file.")
    parser.add_argument("--logging-level", default="INFO", help="Python logging level (default INFO).")
    parser.add_argument(
        "--num-preprocess-workers", type=int, default=4, help="Number of processes to use for preprocessing"
    )
    parser.add_argument("--mlflow-server-uri", default=None, help="MLflow server URI. Can be local path.")
    parser.add_argument(
        "--experiment-name", default=None, help="Experiment name that is used for MLflow tracking"
    )
    parser.add_argument(
        "--hf-mlflow-log-artifacts", default=None, help="Whether to store model artifacts in MLFlow"
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY.PATH=VALUE",
        help="Override a config value (YAML-parsed), e.g. --set peft_conf.peft_kwargs.r=16. Repeatable.",
    )
    parser.add_argument(
        "--result-file",
        default=None,
        help="Write the result JSON (losses, steps, paths, MLflow run id) here; env FINETUNE_RESULT_FILE.",
    )
    parser.add_argument("--validate-only", action="store_true", help="Check config and data, then exit.")
    return parser


def setup_logging(level: str) -> None:
    numeric = getattr(logging, level.upper(), logging.INFO)
    logging.basicConfig(
        level=numeric, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
    logging.getLogger().setLevel(numeric)


def main(argv: list[str] | None = None) -> int:
    """The ``finetuning`` command: every error ends in one message (see cli/errors.py)."""
    from finetune_engine.cli.errors import run_guarded

    return run_guarded("finetuning", _main, argv)


def _main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.logging_level)
    log = logging.getLogger("finetuning")
    try:
        cfg = load_config(args.config, overrides=args.overrides, method=args.method)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    from finetune_engine.data.validate import DataValidationError

    try:
        if args.validate_only:
            from finetune_engine.data.preference import DATA_METHOD
            from finetune_engine.data.validate import validate_files

            paths = [d.path for d in cfg.data_conf.training_data.datasets]
            reports = validate_files(paths, method=DATA_METHOD.get(args.method, args.method))
            for r in reports:
                print(f"{r.file}: {r.examples} valid {r.kind} examples")
            print(f"{args.config}: config valid")
            return 0
        from finetune_engine.tracking import resolve_tracking

        tracking = resolve_tracking(
            cfg.tracking, args.mlflow_server_uri, args.experiment_name, args.hf_mlflow_log_artifacts
        )
        if args.method == "sft":
            from finetune_engine.recipes.sft import run_sft

            result = run_sft(cfg, tracking, args.num_preprocess_workers, args.result_file)
        else:
            from finetune_engine.recipes.preference import run_preference

            result = run_preference(cfg, tracking, args.method, args.num_preprocess_workers, args.result_file)
    except DataValidationError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except ValueError as err:
        log.error("%s", err)
        return 2
    log.info(
        "done: %s",
        {
            k: result.get(k)
            for k in ("status", "global_step", "final_eval_loss", "final_adapter", "final_checkpoint")
        },
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
