"""Checks a run's inputs before any GPU pod starts: what a trigger form's JSON schema cannot see.

* the base model prefix is complete in the bucket (its manifest matches the objects);
* the dataset exists and every line is valid for the method (file:line:reason otherwise);
* the experiment config, with the form's overrides, validates for every LoRA rank — the same
  rendering the fine-tune operator does, so the sweep cannot fail on its config later.

Every failure raises ``FinetuneConfigError`` (not retried) naming the param and the fix.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from airflow_provider_finetune.exceptions import FinetuneConfigError

MAX_PREFLIGHT_DATA_BYTES = 2 * 1024**3  # bigger datasets are validated by the training pod itself


def check_inputs(
    *,
    model_uri: str,
    dataset_uri: str,
    method: str,
    config: str,
    overrides: list[str],
    ranks: list[int],
    conn_id: str,
    workdir: Path,
) -> list[int]:
    """Returns the ranks to sweep (unique, sorted) when everything is usable."""
    from airflow_provider_finetune.hooks import BucketHook
    from airflow_provider_finetune.operators.finetune import FinetuneKubernetesOperator
    from finetune_engine.data.validate import DataValidationError, validate_files
    from finetune_engine.storage import StorageError, download_file, is_complete, list_objects

    swept = sorted({int(r) for r in ranks})
    if not swept:
        raise FinetuneConfigError("lora_ranks: give at least one rank")
    for name, uri in (("model_uri", model_uri), ("dataset_uri", dataset_uri)):
        if not str(uri).startswith("s3://"):
            raise FinetuneConfigError(f"{name} {uri!r}: must be an s3:// URI")
    # the config for every rank first: no bucket access needed, the cheapest check
    for rank in swept:
        op = FinetuneKubernetesOperator(
            task_id=f"preflight_r{rank}",
            config=config,
            method=method,
            overrides=overrides,
            lora_rank=rank,
            base_model=model_uri,
            datasets=[dataset_uri],
            gpus=0,
        )
        op.rendered_config()  # raises FinetuneConfigError naming the key
    try:
        client = BucketHook(conn_id).storage_client
        if not is_complete(model_uri, client=client):
            raise FinetuneConfigError(
                f"model_uri {model_uri}: no complete model there (missing or partial upload); deliver it "
                "first (HFModelToBucketOperator / finetune-engine deliver-model)"
            )
        parent, name = dataset_uri.rsplit("/", 1)
        size = list_objects(parent, client=client).get(name)
        if size is None:
            raise FinetuneConfigError(f"dataset_uri {dataset_uri}: no such object in the bucket")
        if size == 0:
            raise FinetuneConfigError(f"dataset_uri {dataset_uri}: the file is empty")
        if size > MAX_PREFLIGHT_DATA_BYTES:
            return swept
        local = workdir / dataset_uri.rsplit("/", 1)[-1]
        download_file(dataset_uri, local, size=size, client=client)
    except StorageError as err:
        raise FinetuneConfigError(f"bucket connection {conn_id!r}: {err}") from None
    try:
        validate_files([local], method=method)
    except DataValidationError as err:
        raise FinetuneConfigError(f"dataset_uri {dataset_uri} is not valid for {method}:\n{err}") from None
    return swept


def check_conf_keys(conf: dict[str, Any] | None, params: dict[str, Any]) -> None:
    """Refuse keys of a run's ``conf`` that name no param: Airflow keeps them silently, so a typo
    (``lora_rank`` for ``lora_ranks``) would otherwise run with the default."""
    import difflib

    unknown = sorted(set(conf or {}) - set(params))
    if unknown:
        hints = []
        for key in unknown:
            close = difflib.get_close_matches(key, list(params), n=1)
            hints.append(f"{key!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        raise FinetuneConfigError(
            f"conf has keys that are not params of this DAG: {', '.join(hints)}; "
            f"the params are {', '.join(sorted(params))}"
        )


def form_overrides(params: dict[str, Any]) -> list[str]:
    """The config overrides of the fine-tune form's training fields."""
    out = [
        f"training_args.learning_rate={float(params['learning_rate'])}",
        f"training_args.num_train_epochs={int(params['epochs'])}",
    ]
    if int(params.get("max_steps", -1)) >= 0:
        out.append(f"training_args.max_steps={int(params['max_steps'])}")
    return out
