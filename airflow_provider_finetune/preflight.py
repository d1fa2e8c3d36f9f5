"""Checks a run's inputs before any GPU pod starts: what a trigger form's JSON schema cannot see.

* the base model prefix is complete in the bucket (its manifest matches the objects);
* the dataset exists and every line is valid for the method (file:line:reason otherwise);
* the experiment config, with the form's overrides, validates for every LoRA rank — the same
  rendering the fine-tune operator does, so the sweep cannot fail on its config later;
* the config asks for no code from outside the bucket (``trust_remote_code``, a Hub tokenizer or
  attention kernel) unless the DAG's platform settings allow it.

Every failure raises ``FinetuneConfigError`` (not retried) naming the param and the fix.

The shipped DAGs also build their trigger-form choices here, when they are parsed: a param that picks
a file (an experiment config, a data script) is a name from a fixed set, each name mapped to a file
inside the DAG bundle; the set grows only through ``[finetune] dag_defaults``, never through a run's
conf. Neither a free path on the worker nor inline YAML reaches a task.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from airflow_provider_finetune.exceptions import FinetuneConfigError

MAX_PREFLIGHT_DATA_BYTES = 2 * 1024**3  # bigger datasets are validated by the training pod itself
CHOICE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
# a Hugging Face Hub repo id: [namespace/]name, letters, digits, '.', '_', '-', no '..' or '--', at most 96
# characters each; the same text is a JSON-schema pattern (ECMA 262) and a Python regex
_HUB_PART = r"[A-Za-z0-9](?:[A-Za-z0-9._-]{0,94}[A-Za-z0-9])?"
HUB_REPO_ID = rf"(?!.*(?:\.\.|--)){_HUB_PART}(?:/{_HUB_PART})?"
_SCHEMA_SPECIAL = set("^$\\.*+?()[]{}|/")


def literal_pattern(text: str) -> str:
    """``text`` as a regex matching only itself, escaping only the characters both Python and
    ECMA 262 (unicode mode) accept escaped."""
    return "".join("\\" + c if c in _SCHEMA_SPECIAL else c for c in text)


def model_id_pattern(local_dir: str | None = None) -> str:
    """The Param pattern of a model id: a Hub repo id, or exactly ``local_dir`` (the one model directory
    on the worker the platform allows, from ``[finetune] dag_defaults``), never any other worker path."""
    choices = [HUB_REPO_ID] + ([literal_pattern(local_dir)] if local_dir else [])
    return "^(?:" + "|".join(choices) + ")$"


def check_model_id(model_id: str, local_dir: str | None = None) -> str:
    """``model_id`` is a Hub repo id or exactly ``local_dir`` (then it must be a directory with a
    ``config.json``). Returns it."""
    if local_dir and model_id == local_dir:
        if not (Path(local_dir) / "config.json").is_file():
            raise FinetuneConfigError(
                f"model_id {model_id}: the model directory set in [finetune] dag_defaults has no config.json "
                "on this worker; build or copy the model there, or set another model_id there"
            )
        return model_id
    if not re.fullmatch(HUB_REPO_ID, str(model_id)):
        allowed = f" or exactly {local_dir}" if local_dir else ""
        raise FinetuneConfigError(
            f"model_id {model_id!r}: give a Hugging Face Hub repo id (org/name){allowed}; other paths on "
            "the worker are not read"
        )
    return model_id


@dataclass(frozen=True)
class BundleChoices:
    """A trigger-form choice among files of the DAG bundle: ``files`` maps each name to an absolute
    path under the bundle root; ``default`` is one of the names."""

    option: str
    files: dict[str, str]
    default: str

    @property
    def names(self) -> list[str]:
        return sorted(self.files)

    def path(self, name: str) -> str:
        """The file of ``name``, still there and still inside the bundle."""
        if name not in self.files:
            raise FinetuneConfigError(f"{self.option} {name!r}: choose one of {', '.join(self.names)}")
        path = Path(self.files[name])
        if not path.is_file():
            raise FinetuneConfigError(f"{self.option} {name!r}: its file {path} is gone from the DAG bundle")
        return str(path)


def contained(root: Path, relative: str, where: str) -> Path:
    """``relative`` (to ``root``) resolved, symlinks followed; a file that must stay inside ``root``."""
    base = root.resolve()
    path = (base / str(relative)).resolve()
    if not path.is_relative_to(base):
        raise FinetuneConfigError(
            f"{where}: {relative} is outside the DAG bundle {base}; put the file under it and name it "
            "relative to it"
        )
    if not path.is_file():
        raise FinetuneConfigError(f"{where}: no file {relative} in the DAG bundle {base}")
    return path


# The experiment configs the shipped sweeping DAGs offer by name (paths in the DAG bundle).
SHIPPED_SFT_CONFIGS = {
    "tutorial-01-finetune-lora": "engine/configs/tutorial-01-finetune-lora.yaml",
    "tiny-sft-lora": "engine/configs/tiny-sft-lora.yaml",
}


def bundle_choices(
    root: Path,
    dag_id: str,
    defaults: Mapping[str, Any],
    *,
    option: str,
    builtin: Mapping[str, str],
    set_key: str,
    default: str,
) -> BundleChoices:
    """The files a param of ``dag_id`` may pick: ``builtin`` (name -> path relative to ``root``) plus
    ``[finetune] dag_defaults.<dag_id>.<set_key>`` (the same shape), each resolved and contained in
    ``root``. The default is ``dag_defaults.<dag_id>.<option>`` or ``default``: a name of the set, or a
    path relative to ``root``, then offered under its file name without the suffix."""
    where = f"[finetune] dag_defaults.{dag_id}"
    extra = defaults.get(set_key) or {}
    if not isinstance(extra, dict) or not all(isinstance(v, str) for v in extra.values()):
        raise FinetuneConfigError(f'{where}.{set_key} must be a JSON object {{"name": "path/in/the/bundle"}}')
    entries = {**builtin, **extra}
    chosen = str(defaults.get(option, default))
    if chosen not in entries:  # a file of the bundle: its name in the set, else its file name
        path = contained(root, chosen, f"{where}.{option}")
        same = [n for n, rel in entries.items() if (root.resolve() / rel).resolve() == path]
        name = same[0] if same else Path(chosen).name.rsplit(".", 1)[0]
        if not same and name in entries:
            raise FinetuneConfigError(
                f"{where}.{option} {chosen}: the name {name!r} already means {entries[name]}; add the file "
                f"to {where}.{set_key} under another name and give that name"
            )
        entries[name], chosen = entries.get(name, chosen), name
    files = {}
    for name, relative in entries.items():
        if not CHOICE_NAME.fullmatch(name):
            raise FinetuneConfigError(
                f"{where}.{set_key}: name {name!r}: use letters, digits, '.', '_' and '-' (at most 64)"
            )
        origin = f"{where}.{set_key}.{name}" if name in extra else f"{option} {name!r} of {dag_id}"
        files[name] = str(contained(root, relative, origin))
    return BundleChoices(option, files, chosen)


def dag_flag(dag_id: str, defaults: Mapping[str, Any], key: str) -> bool:
    """A boolean platform setting ``[finetune] dag_defaults.<dag_id>.<key>`` (default false)."""
    value = defaults.get(key, False)
    if not isinstance(value, bool):
        raise FinetuneConfigError(
            f"[finetune] dag_defaults.{dag_id}.{key}: give true or false, got {value!r}"
        )
    return value


@dataclass(frozen=True)
class CodeTrust:
    """What a DAG's configs may pull from outside the bucket: set per DAG by the platform
    (``[finetune] dag_defaults``), never by whoever triggers a run."""

    dag_id: str
    remote_code: bool = False
    external_tokenizer: bool = False

    @classmethod
    def from_defaults(cls, dag_id: str, defaults: Mapping[str, Any]) -> CodeTrust:
        return cls(
            dag_id,
            dag_flag(dag_id, defaults, "allow_trust_remote_code"),
            dag_flag(dag_id, defaults, "allow_external_tokenizer"),
        )

    def _setting(self, key: str) -> str:
        setting = json.dumps({self.dag_id: {key: True}})
        return f"the platform allows it for this DAG with [finetune] dag_defaults {setting}"

    def check(self, cfg: Any, source: str) -> None:
        """Refuse a parsed experiment config that would run code or load files from outside the bucket
        when the DAG does not allow it."""
        run = cfg.run_conf
        args = run.model_args
        if args.trust_remote_code and not self.remote_code:
            raise FinetuneConfigError(
                f"{source}: run_conf.model_args.trust_remote_code: true runs code from the model repository "
                f"in the training pod, which holds the bucket keys: choose a config without it ("
                f"{self._setting('allow_trust_remote_code')})"
            )
        kernel = args.attn_implementation
        if kernel and "/" in kernel and not self.remote_code:
            raise FinetuneConfigError(
                f"{source}: run_conf.model_args.attn_implementation {kernel!r} loads a kernel (code) from "
                "the Hub in the training pod: choose a config without it "
                f"({self._setting('allow_trust_remote_code')})"
            )
        tokenizer = run.tokenizer
        if tokenizer and not str(tokenizer).startswith("s3://") and not self.external_tokenizer:
            raise FinetuneConfigError(
                f"{source}: run_conf.tokenizer {tokenizer!r} is not in the bucket (a Hub repo or a path "
                "outside it: its files, and with trust_remote_code its code, reach the training pod); "
                "use the model's own tokenizer or an s3:// prefix "
                f"({self._setting('allow_external_tokenizer')})"
            )


def max_steps_overrides(max_steps: Any) -> list[str]:
    """``training_args.max_steps`` from a ``max_steps`` param: -1 keeps the config's epochs, >= 1 caps
    the steps; 0 (a run that trains nothing, or a single step) is refused."""
    steps = int(max_steps)
    if steps == 0 or steps < -1:
        raise FinetuneConfigError(
            f"max_steps {max_steps}: give -1 (the config's epochs) or at least 1 (0 would train nothing)"
        )
    return [f"training_args.max_steps={steps}"] if steps > 0 else []


def check_configs(
    *,
    config: str,
    overrides: list[str],
    ranks: list[int | None],
    base_model: str,
    datasets: list[str],
    method: str = "sft",
    trust: CodeTrust | None = None,
) -> list[int | None]:
    """The experiment config with ``overrides`` rendered and validated the way the fine-tune operator
    does it, for every LoRA rank (``None``: the config's own peft section), and checked against the
    DAG's ``trust``. Returns the ranks (unique, sorted; ``[None]`` kept)."""
    from airflow_provider_finetune.operators.finetune import FinetuneKubernetesOperator

    swept = sorted({int(r) for r in ranks if r is not None})
    if None in ranks:
        swept = [None, *swept]
    if not swept:
        raise FinetuneConfigError("lora_ranks: give at least one rank")
    for rank in swept:
        op = FinetuneKubernetesOperator(
            task_id=f"preflight_r{rank}" if rank is not None else "preflight",
            config=config,
            method=method,
            overrides=overrides,
            lora_rank=rank,
            base_model=base_model,
            datasets=datasets,
            gpus=0,
        )
        op.rendered_config()  # raises FinetuneConfigError naming the key
        if trust is not None:
            trust.check(op.pod_config(), f"config {config}")
    return swept


def check_model(model_uri: str, conn_id: str, param: str = "model_uri") -> None:
    """A complete model prefix in the bucket."""
    from airflow_provider_finetune.hooks import BucketHook
    from finetune_engine.storage import StorageError, is_complete

    if not str(model_uri).startswith("s3://"):
        raise FinetuneConfigError(f"{param} {model_uri!r}: must be an s3:// URI")
    try:
        complete = is_complete(model_uri, client=BucketHook(conn_id).storage_client)
    except StorageError as err:
        raise FinetuneConfigError(f"bucket connection {conn_id!r}: {err}") from None
    if not complete:
        raise FinetuneConfigError(
            f"{param} {model_uri}: no complete model there (missing or partial upload); deliver it "
            "first (HFModelToBucketOperator / finetune-engine deliver-model)"
        )


def check_dataset(
    dataset_uri: str, method: str, conn_id: str, workdir: Path, param: str = "dataset_uri"
) -> None:
    """The dataset object exists, is not empty, and (up to ``MAX_PREFLIGHT_DATA_BYTES``) every line is
    valid for ``method``."""
    from airflow_provider_finetune.hooks import BucketHook
    from finetune_engine.data.validate import DataValidationError, validate_files
    from finetune_engine.storage import StorageError, download_file, list_objects

    if not str(dataset_uri).startswith("s3://"):
        raise FinetuneConfigError(f"{param} {dataset_uri!r}: must be an s3:// URI")
    try:
        client = BucketHook(conn_id).storage_client
        parent, name = dataset_uri.rsplit("/", 1)
        size = list_objects(parent, client=client).get(name)
        if size is None:
            raise FinetuneConfigError(f"{param} {dataset_uri}: no such object in the bucket")
        if size == 0:
            raise FinetuneConfigError(f"{param} {dataset_uri}: the file is empty")
        if size > MAX_PREFLIGHT_DATA_BYTES:
            return
        workdir.mkdir(parents=True, exist_ok=True)
        local = workdir / name
        download_file(dataset_uri, local, size=size, client=client)
    except StorageError as err:
        raise FinetuneConfigError(f"bucket connection {conn_id!r}: {err}") from None
    try:
        validate_files([local], method=method)
    except DataValidationError as err:
        raise FinetuneConfigError(f"{param} {dataset_uri} is not valid for {method}:\n{err}") from None


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
    trust: CodeTrust | None = None,
) -> list[int]:
    """Returns the ranks to sweep (unique, sorted) when everything is usable."""
    if not [r for r in ranks if r is not None]:
        raise FinetuneConfigError("lora_ranks: give at least one rank")
    for name, uri in (("model_uri", model_uri), ("dataset_uri", dataset_uri)):
        if not str(uri).startswith("s3://"):
            raise FinetuneConfigError(f"{name} {uri!r}: must be an s3:// URI")
    # the config for every rank first: no bucket access needed, the cheapest check
    swept = check_configs(
        config=config,
        overrides=overrides,
        ranks=ranks,
        base_model=model_uri,
        datasets=[dataset_uri],
        method=method,
        trust=trust,
    )
    check_model(model_uri, conn_id)
    check_dataset(dataset_uri, method, conn_id, workdir)
    return [int(r) for r in swept if r is not None]


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
    return out + max_steps_overrides(params.get("max_steps", -1))


def tensor_parallel_param(**form: Any):
    """The shipped DAGs' serving ``tensor_parallel_size`` param, checked with ``gpus`` by
    :func:`check_serving`; ``form``: extra Param keywords (title, section)."""
    from airflow.sdk import Param

    return Param(
        0,
        type="integer",
        minimum=0,
        maximum=8,
        description="Tensor-parallel size of the vLLM server (0: the largest power of two <= gpus; "
        "3, 5, 6 or 7 would split the attention heads unevenly).",
        **form,
    )


def check_serving(
    deploy: Any,
    gpus: Any,
    tensor_parallel_size: Any = 0,
    runner: str | None = None,
    attention_heads: int | None = None,
) -> int:
    """Before any pod: serving needs a GPU on the cluster (the local runner's vLLM runs on the CPU),
    and a tensor-parallel size that fits ``gpus`` (and divides the heads, when known). Returns the
    tensor-parallel size the server will use (0/unset: the largest power of two <= gpus)."""
    from airflow_provider_finetune import settings
    from airflow_provider_finetune.pods.serving import (
        check_tensor_parallel_size,
        default_tensor_parallel_size,
    )

    gpus, tp = int(gpus or 0), int(tensor_parallel_size or 0)
    if not deploy:
        return 0
    if gpus == 0 and settings.runner(runner) != "local":
        raise FinetuneConfigError(
            "deploy is on with gpus 0: vLLM on the cluster needs a GPU; set gpus >= 1, turn deploy off, "
            "or use the local runner ([finetune] runner = local: vLLM on the CPU)"
        )
    tp = tp or default_tensor_parallel_size(gpus)
    try:
        check_tensor_parallel_size(tp, gpus, attention_heads)
    except ValueError as err:
        raise FinetuneConfigError(f"tensor_parallel_size: {err}") from None
    return tp
