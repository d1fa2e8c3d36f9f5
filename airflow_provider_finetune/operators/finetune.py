"""FinetuneKubernetesOperator: one fine-tuning run (SFT/DPO, full or LoRA) in a GPU pod.

Mappable: ``.partial(config=...).expand(lora_rank=[4, 8, 16])`` or ``.expand(overrides=[...])``.
The experiment config is validated (with every override applied) before any pod is created.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Sequence
from typing import Any

import yaml
from airflow.sdk import Context

from airflow_provider_finetune import checks, settings
from airflow_provider_finetune.exceptions import EngineJobFailed, FinetuneConfigError
from airflow_provider_finetune.links import MLflowRunLink, mlflow_run_url
from airflow_provider_finetune.oci import OciMixin
from airflow_provider_finetune.operators.base import EngineJobOperator


def overrides_list(overrides: Any) -> list[str]:
    """Accept ``["a.b=1"]`` or ``{"a.b": 1}``; values of a dict are YAML-dumped."""
    if not overrides:
        return []
    if isinstance(overrides, dict):
        return [
            f"{k}={yaml.safe_dump(v, default_flow_style=True).strip().removesuffix('...').strip()}"
            for k, v in overrides.items()
        ]
    if isinstance(overrides, str):
        return [overrides] if overrides.strip() else []
    return [str(o) for o in overrides if str(o).strip()]  # templates may render an override away


# HF TrainingArguments per strategy (transformers 5: ``fsdp=True`` + ``fsdp_config``, FSDP2 by default;
# DeepSpeed: a config dict with "auto" values the HF integration fills from the training arguments).
_DS_AUTO = {
    "train_batch_size": "auto",
    "train_micro_batch_size_per_gpu": "auto",
    "gradient_accumulation_steps": "auto",
    "gradient_clipping": "auto",
    "bf16": {"enabled": "auto"},
    "fp16": {"enabled": "auto"},
}
STRATEGIES: dict[str, dict[str, Any]] = {
    "ddp": {},
    "fsdp": {
        "fsdp": True,
        "fsdp_config": {
            "version": 2,
            "auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
            "reshard_after_forward": True,
            "state_dict_type": "FULL_STATE_DICT",
        },
    },
    "deepspeed-zero1": {"deepspeed": {**_DS_AUTO, "zero_optimization": {"stage": 1}}},
    "deepspeed-zero3": {
        "deepspeed": {
            **_DS_AUTO,
            "zero_optimization": {
                "stage": 3,
                "overlap_comm": True,
                "contiguous_gradients": True,
                "reduce_bucket_size": "auto",
                "stage3_prefetch_bucket_size": "auto",
                "stage3_param_persistence_threshold": "auto",
                "stage3_gather_16bit_weights_on_model_save": True,
            },
        }
    },
}


def strategy_training_args(strategy: str | None) -> dict[str, Any]:
    """The training_args a distributed strategy sets (a fresh copy); raises naming the choices."""
    import copy

    if strategy is None:
        return {}
    if strategy not in STRATEGIES:
        raise FinetuneConfigError(f"distributed_strategy {strategy!r}: use one of {sorted(STRATEGIES)}")
    return copy.deepcopy(STRATEGIES[strategy])


SWEEP_LABEL = "{{ task.sweep_label() }}"
LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]{0,61})?[A-Za-z0-9])?$")
_LABEL_NAME = re.compile(r"^[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$")
# a multi-node job's name: pods and Services derive theirs from it (``<job>-node-0-0-<hash>``,
# ``<job>-worker-12``), which must stay DNS labels of at most 63 characters
JOB_NAME_MAX = 40


def label_key_problem(key: str) -> str | None:
    """Why ``key`` is not a Kubernetes label/annotation key (``[prefix/]name``), or None."""
    prefix, _, name = key.rpartition("/")
    if prefix and (len(prefix) > 253 or not checks.DNS_SUBDOMAIN.match(prefix)):
        return "the prefix before '/' must be a DNS subdomain (e.g. kueue.x-k8s.io)"
    if not _LABEL_NAME.match(name):
        return "the name must be at most 63 letters, digits, '-', '_' or '.', alphanumeric at both ends"
    return None


# A model's config.json is a few kilobytes; validate() reads no more than this of it.
MODEL_CONFIG_MAX_BYTES = 1 << 20


class FinetuneKubernetesOperator(OciMixin, EngineJobOperator):
    """Fine-tune in a pod: ``finetune-engine train-job`` with the rendered config.

    :param config: the experiment config as a dict, YAML text, or a path to a YAML file.
    :param method: ``sft``, or a preference method: ``dpo``, ``kto``, ``orpo``, ``cpo`` (SimPO: ``cpo``
        with loss_type simpo).
    :param overrides: ``--set`` style overrides (list of ``key.path=value`` or a dict).
    :param lora_rank: shortcut for ``peft_conf.peft_kwargs.r`` (and lora_alpha = 2 x r unless set).
    :param base_model: bucket URI of the base model (sets ``run_conf.model``).
    :param datasets: bucket URIs of training datasets (sets ``data_conf.training_data.datasets``).
    :param experiment: experiment name (bucket prefix and MLflow experiment); default the DAG id.
    :param checkpoint_uri: where checkpoints and outputs go; default
        ``s3://<bucket>/experiments/<experiment>/<run key>`` (deterministic: a relaunch resumes).
    :param run_name: names the run's prefix instead of the DAG run id: launching again with the same
        name resumes unfinished runs and skips finished ones (the seed tutorial's ``run_id``).
    :param merge_adapter: also write the merged model (``run_conf.merge_adapter``): with an adapter,
        the pod writes ``checkpoint-final-adapter`` (the adapter) and ``checkpoint-final`` (merged),
        the Silogen chart's layout; the engine's own default is not to merge.
    :param gpus: GPUs per node, one training process each (more than one launches torchrun).
    :param num_nodes: nodes of the run; more than one runs a Kubeflow TrainJob or PyTorchJob on the
        cluster instead of a pod.
    :param distributed: multi-node kind: ``trainjob`` (Kubeflow Trainer) or ``pytorchjob``.
    :param elastic_policy: ``pytorchjob`` only: make it elastic with this ``elasticPolicy`` (over the
        defaults rdzvBackend c10d, minReplicas = maxReplicas = num_nodes, maxRestarts 3).
    :param poll_interval: multi-node: seconds between status checks of the job and its pods.
    :param training_runtime: ``trainjob`` only: the (Cluster)TrainingRuntime the TrainJob runs on
        (``torch-distributed`` by default; e.g. a cluster's own runtime); templated.
    :param training_runtime_kind: ``ClusterTrainingRuntime`` (default) or ``TrainingRuntime`` (one in
        the job's namespace).
    :param ttl_seconds_after_finished: ``pytorchjob`` only: the Training Operator removes a finished job
        this long after it ends (a failed one the operator keeps for its logs); default one day.

    Multi-node jobs are named per run (task, run id, map index and config hash: a retry of the same
    run finds its job again, the next run makes its own) and labelled with their dag, task, run and
    map index; a name taken by another run's job is an error, never a reattachment. The wait defers
    to :class:`~airflow_provider_finetune.triggers.job.TrainingJobTrigger` (``deferrable=True``, or
    ``[operators] default_deferrable``) or runs the same loop on the worker, until
    ``active_deadline_seconds`` plus ``schedule_timeout_seconds``; a failure names its reason (the
    job's condition, or a pod's ImagePullBackOff, OOMKilled, Unschedulable) and the failed pod's log
    tail. The job is deleted on success (``on_finish_action``), on kill and on timeout.
    ``image_pull_secrets``, ``affinity``, ``labels`` and ``annotations`` (e.g. Kueue's
    ``kueue.x-k8s.io/queue-name`` label) reach the job and its pods.
    :param distributed_strategy: ``ddp``, ``fsdp`` (FSDP2, transformer-layer wrapping, full state
        dict saved), ``deepspeed-zero1`` or ``deepspeed-zero3``; sets ``training_args.fsdp`` /
        ``fsdp_config`` or ``training_args.deepspeed`` (overrides may refine them). Default: what the
        config says (DDP across processes unless its training_args set fsdp/deepspeed). FSDP and
        DeepSpeed launch with torchrun even on one GPU; DeepSpeed needs ``gpus >= 1`` and an engine
        image with ``deepspeed`` installed (not in the default lock, see images/README.md).
    """

    template_fields: Sequence[str] = (
        *EngineJobOperator.template_fields,
        "config",
        "overrides",
        "lora_rank",
        "base_model",
        "datasets",
        "experiment",
        "checkpoint_uri",
        "method",
        "run_name",
        "distributed_strategy",
        "training_runtime",
        "output_oci",  # OciMixin: push the final adapter/model to a registry
    )
    oci_output = True
    template_fields_renderers = {**EngineJobOperator.template_fields_renderers, "config": "yaml"}
    operator_extra_links = (MLflowRunLink(),)
    hub_offline = True

    def __init__(
        self,
        *,
        config: dict | str,
        method: str = "sft",
        overrides: list[str] | dict | None = None,
        lora_rank: int | None = None,
        base_model: str | None = None,
        datasets: list[str] | None = None,
        experiment: str | None = None,
        checkpoint_uri: str | None = None,
        run_name: str | None = None,
        merge_adapter: bool = True,
        gpus: int = 1,
        num_nodes: int = 1,
        distributed: str = "trainjob",
        elastic_policy: dict | None = None,
        poll_interval: float = 30,
        distributed_strategy: str | None = None,
        training_runtime: str = "torch-distributed",
        training_runtime_kind: str = "ClusterTrainingRuntime",
        ttl_seconds_after_finished: int | None = None,
        **kwargs: Any,
    ) -> None:
        if kwargs.get("map_index_template") is None and (lora_rank is not None or overrides):
            kwargs["map_index_template"] = SWEEP_LABEL
        super().__init__(gpus=gpus, **kwargs)
        self.config = config
        self.method = method
        self.overrides = overrides
        self.lora_rank = lora_rank
        self.base_model = base_model
        self.datasets = datasets
        self.experiment = experiment
        self.checkpoint_uri = checkpoint_uri
        self.run_name = run_name
        self.merge_adapter = merge_adapter
        self.num_nodes = num_nodes
        self.distributed = distributed
        self.elastic_policy = elastic_policy
        self.poll_interval = poll_interval
        self.distributed_strategy = distributed_strategy
        self.training_runtime = training_runtime
        self.training_runtime_kind = training_runtime_kind
        self.ttl_seconds_after_finished = ttl_seconds_after_finished
        self._job: dict[str, str] | None = None  # the multi-node job this task created or reattached to
        self._pod_config: Any = None  # the parsed config, once validated (pod_config())

    @classmethod
    def partial(cls, **kwargs: Any) -> Any:
        """``.partial(...)`` with readable sweep rows by default (the mapped task's template is read
        from the partial arguments, before any task object exists)."""
        if kwargs.get("map_index_template") is None:
            kwargs["map_index_template"] = SWEEP_LABEL
        return super().partial(**kwargs)

    def sweep_label(self, width: int = 100) -> str:
        """The row label of a mapped run: ``r=8``, ``learning_rate=0.0001, max_steps=20`` (last key
        segment of each override), cut to ``width``; empty when nothing is swept."""
        parts = [f"r={self.lora_rank}"] if self.lora_rank is not None else []
        for item in overrides_list(self.overrides):
            key, sep, value = item.partition("=")
            parts.append(f"{key.strip().rsplit('.', 1)[-1]}{sep}{' '.join(value.split())}")
        label = ", ".join(parts)
        return label if len(label) <= width else label[: width - 3] + "..."

    def _experiment_source(self) -> tuple[dict, str | None, str]:
        """(the config mapping, its YAML text when given as text or a file, the name messages use).

        YAML is read exactly as ``finetune-engine validate-config`` reads it (the engine's safe loader:
        duplicate keys, alias bombs, recursion, depth and size are refused, naming the line)."""
        from finetune_engine.config import ConfigError, read_config_file, read_config_yaml

        cfg = self.config
        if isinstance(cfg, dict):
            return dict(cfg), None, f"task {self.task_id} config"
        source = f"task {self.task_id} config"
        try:
            if isinstance(cfg, str) and "\n" not in cfg and cfg.endswith((".yaml", ".yml")):
                source = cfg
                cfg = read_config_file(cfg)
            if not isinstance(cfg, str):
                raise ConfigError(
                    source, [f"give a dict, YAML text or a .yaml file path, not {type(cfg).__name__}"]
                )
            data = read_config_yaml(cfg, source)
        except ConfigError as err:
            raise FinetuneConfigError(str(err)) from None
        if not isinstance(data, dict):
            raise FinetuneConfigError(
                f"{source}: the config must be a mapping of sections (data_conf, training_args, ...), got "
                f"{'an empty document' if data is None else type(data).__name__}"
            )
        return data, cfg, source

    def _experiment_dict(self) -> dict:
        return self._experiment_source()[0]

    def all_overrides(self) -> list[str]:
        out = []
        if self.base_model:
            out.append(f"run_conf.model={self.base_model}")
        if self.datasets:
            out.append("data_conf.training_data.type=CONCATENATION")
            out.append(
                "data_conf.training_data.datasets="
                + yaml.safe_dump([{"path": d} for d in self.datasets], default_flow_style=True).strip()
            )
        if self.lora_rank is not None:
            rank = int(self.lora_rank)
            out += ["peft_conf.peft_type=LORA", f"peft_conf.peft_kwargs.r={rank}"]
            if "lora_alpha" not in str(self.overrides or ""):
                out.append(f"peft_conf.peft_kwargs.lora_alpha={2 * rank}")
        for key, value in strategy_training_args(self.distributed_strategy).items():
            out.append(
                f"training_args.{key}={json.dumps(value)}"
            )  # JSON is YAML: the override parser reads it
        out.append(f"run_conf.merge_adapter={'true' if self.merge_adapter else 'false'}")
        if self.experiment:
            out.append(f"tracking.experiment_name={self.experiment}")
        return out + overrides_list(self.overrides)

    def pod_config(self):
        """The experiment config the pod runs (overrides and the pod's run_conf defaults applied),
        parsed and validated once per task instance; raises FinetuneConfigError naming keys."""
        if self._pod_config is None:
            from finetune_engine.config import ConfigError, parse_config

            data, text, source = self._experiment_source()
            try:
                cfg = parse_config(
                    data, source=source, overrides=self.all_overrides(), method=self.method, text=text
                )
            except ConfigError as err:
                raise FinetuneConfigError(str(err)) from None
            self._pod_config = self._pod_run_conf(cfg)
        return self._pod_config

    def _config_dump(self, *, exclude_defaults: bool) -> str:
        """The pod config as sorted YAML, without ``training_args.output_dir`` (the pod sets it)."""
        data = self.pod_config().model_dump(mode="json", exclude_defaults=exclude_defaults)
        data.get("training_args", {}).pop("output_dir", None)
        return yaml.safe_dump(data, sort_keys=True)

    def rendered_config(self) -> str:
        """The final config YAML (overrides applied), validated; raises FinetuneConfigError naming keys."""
        return self._config_dump(exclude_defaults=False)

    @staticmethod
    def _pod_run_conf(cfg):
        """What a pod run asks for unless the config says otherwise: resume (a relaunch continues
        from the bucket's newest checkpoint), and for adapter runs the Silogen chart's naming
        (the adapter in checkpoint-final-adapter, the merged model, with merge_adapter, in
        checkpoint-final)."""
        from finetune_engine.config import schema

        run, given = cfg.run_conf, cfg.run_conf.model_fields_set
        update: dict[str, Any] = {}
        if "resume_from_checkpoint" not in given:
            update["resume_from_checkpoint"] = "auto"
        if "final_checkpoint_name" not in given and not isinstance(cfg.peft_conf, schema.NoPeft):
            update["final_checkpoint_name"] = "checkpoint-final-adapter"
        return cfg.model_copy(update={"run_conf": run.model_copy(update=update)}) if update else cfg

    def check_strategy(self) -> None:
        """The strategy against the resources and the config, before any pod."""
        strategy = self.distributed_strategy
        if strategy is None:
            return
        strategy_training_args(strategy)  # names the choices when unknown
        gpus, nodes = int(self.gpus or 0), int(self.num_nodes or 1)
        if strategy.startswith("deepspeed") and gpus < 1:
            raise FinetuneConfigError(
                f"distributed_strategy {strategy!r} needs gpus >= 1 (DeepSpeed runs on GPUs), got gpus={gpus}"
            )
        if strategy == "fsdp" and max(gpus, 1) * nodes < 2:
            raise FinetuneConfigError(
                "distributed_strategy 'fsdp' shards over several processes: give gpus >= 2 "
                f"or num_nodes >= 2 (got gpus={gpus}, num_nodes={nodes})"
            )
        own = self._experiment_dict().get("training_args") or {}
        clash = sorted(
            k for k in ("fsdp", "fsdp_config", "deepspeed") if own.get(k) not in (None, "", False, {})
        )
        if clash:
            raise FinetuneConfigError(
                f"distributed_strategy {strategy!r} sets the parallelism, but the config's training_args "
                f"already set {clash}: remove them from the config or drop distributed_strategy"
            )

    def validate(self, context: Context) -> None:
        from finetune_engine.config.training_args import METHODS

        super().validate(context)
        if self.method not in METHODS:
            raise FinetuneConfigError(f"method {self.method!r}: use one of {', '.join(METHODS)}")
        checks.check_positive_int("num_nodes", self.num_nodes, minimum=1)
        self.check_strategy()
        if self.num_nodes > 1 and self.distributed not in ("trainjob", "pytorchjob"):
            raise FinetuneConfigError(
                f"distributed {self.distributed!r}: use trainjob (Kubeflow Trainer) or pytorchjob"
            )
        if self.num_nodes > 1:
            self.check_multinode_args()
        self.check_gpu_budget(context)
        if self.base_model:
            checks.check_bucket_uri("base_model", self.base_model)
        for i, uri in enumerate(self.datasets or []):
            checks.check_bucket_uri(f"datasets[{i}]", uri)
        self.rendered_config()
        self.check_config_uris()
        self.check_batch_split()
        checks.check_bucket_uri(
            "checkpoint_uri", self.checkpoint_uri or self.resolved_checkpoint_uri(context)
        )
        self.check_target_modules()

    def check_multinode_args(self) -> None:
        """The job-level arguments of a multi-node run: runtime, TTL, labels and annotations."""
        from airflow_provider_finetune.pods.distributed import RUNTIME_KINDS

        if self.training_runtime_kind not in RUNTIME_KINDS:
            raise FinetuneConfigError(
                f"training_runtime_kind {self.training_runtime_kind!r}: use one of {', '.join(RUNTIME_KINDS)}"
            )
        if not checks.DNS_SUBDOMAIN.match(str(self.training_runtime or "")):
            raise FinetuneConfigError(
                f"training_runtime {self.training_runtime!r} is not a runtime name (lowercase letters, "
                "digits, '-' and '.'); e.g. torch-distributed (kubectl get clustertrainingruntimes)"
            )
        if self.ttl_seconds_after_finished is not None:
            checks.check_positive_int("ttl_seconds_after_finished", self.ttl_seconds_after_finished)
        for field, mapping in (("labels", self.labels), ("annotations", self.annotations)):
            for key, value in (mapping or {}).items():
                problem = label_key_problem(str(key))
                if problem is None and field == "labels" and not LABEL_VALUE.match(str(value)):
                    problem = (
                        "values are at most 63 letters, digits, '-', '_' or '.', alphanumeric at both ends"
                    )
                if problem:
                    raise FinetuneConfigError(f"{field} {key!r}: {problem}")

    def check_target_modules(self) -> None:
        """An explicit ``peft_conf.peft_kwargs.target_modules`` list names modules the base model has
        (the pod would fail on it after downloading the model). The architecture comes from the model's
        config.json (a local directory, or one small read from the bucket) or else from a preset; when
        neither says, or it is not in the engine's table, nothing is refused. ``all-linear`` and regex
        strings are left to peft."""
        from finetune_engine.config import architectures, presets, schema

        cfg = self.pod_config()
        peft = cfg.peft_conf
        if not isinstance(peft, schema.AdapterPeft) or peft.peft_type not in presets.TARGETED_PEFT_TYPES:
            return
        targets = peft.peft_kwargs.get("target_modules")
        if not isinstance(targets, list) or not targets:
            return
        model_type, source = self.base_model_type()
        unmatched = architectures.unmatched_target_modules(targets, model_type)
        if model_type is None or not unmatched:
            if model_type not in architectures.MODULE_NAMES:
                self.log.info("target_modules not checked: the base model's architecture is not known here")
            return
        raise FinetuneConfigError(
            f"task {self.task_id} config peft_conf.peft_kwargs.target_modules {targets}: "
            f"{architectures.describe_unmatched(unmatched, model_type)} (model_type {model_type!r} from "
            f"{source})"
        )

    def base_model_type(self) -> tuple[str | None, str]:
        """(``model_type`` of run_conf.model, where it was read) without loading weights: its
        config.json (local, or from the bucket), else the preset run_conf.preset names or the model id
        matches; (None, "") when unknown."""
        from finetune_engine.config import architectures, presets

        run = self.pod_config().run_conf
        model = str(run.model)
        if model.startswith("s3://"):
            data = self.read_model_config(model)
            model_type = (data or {}).get("model_type")
            if isinstance(model_type, str):
                return model_type, f"{model.rstrip('/')}/config.json"
        else:
            local = presets.local_model_type(model)
            if local:
                return local, f"{model}/config.json"
        preset = presets.BY_NAME.get(run.preset) if run.preset not in ("auto", "none") else None
        if preset is not None:
            return architectures.preset_model_type(preset), f"run_conf.preset {preset.name}"
        found = presets.match_preset(model)
        if found is not None:
            return architectures.preset_model_type(found[0]), f"the preset {found[0].name} ({found[1]})"
        return None, ""

    def read_model_config(self, model_uri: str) -> dict | None:
        """The config.json of a model prefix in the bucket: one GET of at most
        ``MODEL_CONFIG_MAX_BYTES``, two tries with short timeouts; None when it cannot be read (no
        connection, no such object, too large, not JSON). Only a check depends on it."""
        from botocore.config import Config

        from airflow_provider_finetune.hooks import BucketHook
        from finetune_engine.storage import parse_uri

        conn_id = self.bucket_conn_id or settings.get("bucket_conn_id")
        uri = f"{model_uri.rstrip('/')}/config.json"
        try:
            bucket, key = parse_uri(uri)
            hook = BucketHook(conn_id)
            engine_client = hook.storage_client  # the engine's signer and addressing, checked credentials
            client = hook.get_session(region_name=hook.region_name).client(
                "s3",
                endpoint_url=engine_client.meta.endpoint_url,
                region_name=engine_client.meta.region_name,
                verify=hook.verify,
                config=engine_client.meta.config.merge(
                    Config(
                        retries={"total_max_attempts": 2, "mode": "standard"},
                        connect_timeout=5,
                        read_timeout=10,
                    )
                ),
            )
            response = client.get_object(Bucket=bucket, Key=key, Range=f"bytes=0-{MODEL_CONFIG_MAX_BYTES}")
            body = response["Body"].read(MODEL_CONFIG_MAX_BYTES + 1)
            if len(body) > MODEL_CONFIG_MAX_BYTES:
                self.log.info("%s is larger than %d bytes: not read", uri, MODEL_CONFIG_MAX_BYTES)
                return None
            data = json.loads(body)
        except Exception as err:  # noqa: BLE001 - best effort: the pod reads the model anyway
            self.log.info("target_modules not checked: could not read %s (%s)", uri, str(err)[:200])
            return None
        return data if isinstance(data, dict) else None

    def world_size(self) -> int:
        """Training processes of the run: one per GPU (one per node on CPU), on every node."""
        return max(int(self.gpus or 0), 1) * int(self.num_nodes or 1)

    def check_gpu_budget(self, context: Context) -> None:
        """``[finetune] max_sweep_gpus``: the GPUs of every mapped instance of this task together."""
        cap = settings.integer("max_sweep_gpus")
        instances = int(context.get("expanded_ti_count") or 1)
        total = int(self.gpus or 0) * int(self.num_nodes or 1) * instances
        if cap and total > cap:
            raise FinetuneConfigError(
                f"task {self.task_id} asks for {total} GPUs ({instances} mapped instance(s) x "
                f"{self.num_nodes} node(s) x {self.gpus} GPU(s)), more than [finetune] max_sweep_gpus = "
                f"{cap}: sweep fewer values, use fewer GPUs per run, or raise the option"
            )

    def check_batch_split(self) -> None:
        """batchsize_conf.total_train_batch_size must split evenly over the training processes (the
        engine derives per-device batch and accumulation from it, the same way, in the pod)."""
        from finetune_engine.config.batchsize import derive_batch_plan

        conf = self.pod_config().batchsize_conf
        per_device = conf.max_per_device_train_batch_size
        try:
            derive_batch_plan(
                conf.total_train_batch_size,
                per_device if isinstance(per_device, int) else 1,
                self.world_size(),
            )
        except ValueError as err:
            raise FinetuneConfigError(
                f"task {self.task_id}: {err} (gpus={self.gpus} x num_nodes={self.num_nodes}); change "
                "batchsize_conf.total_train_batch_size or the GPU count"
            ) from None

    def check_config_uris(self) -> None:
        """Every bucket URI of the config is well-formed; on the cluster the base model comes from the
        bucket (training pods run with HF_HUB_OFFLINE=1: deliver Hub models first)."""
        cfg = self.pod_config()
        run = cfg.run_conf
        uris = {"run_conf.model": run.model, "run_conf.tokenizer": run.tokenizer}
        for section in ("training_data", "validation_data"):
            data = getattr(cfg.data_conf, section, None)
            for i, ref in enumerate(getattr(data, "datasets", None) or []):
                uris[f"data_conf.{section}.datasets[{i}].path"] = getattr(ref, "path", None)
        for key, uri in uris.items():
            if isinstance(uri, str) and uri.startswith("s3:"):
                checks.check_bucket_uri(f"config {key}", uri)
        if self.resolved_runner == "kubernetes" and not str(run.model).startswith("s3://"):
            raise FinetuneConfigError(
                f"config run_conf.model {run.model!r}: training pods read the base model from the bucket "
                "(they run with HF_HUB_OFFLINE=1); deliver it with HFModelToBucketOperator and give its "
                "s3:// prefix (base_model= or run_conf.model)"
            )

    def config_hash(self) -> str:
        """Hash of the config's non-default values (the checkpoint prefix's suffix): a new engine
        key with a default leaves it, and so the checkpoint prefix of a run in progress, unchanged."""
        return hashlib.sha256(self._config_dump(exclude_defaults=True).encode()).hexdigest()[:10]

    def resolved_checkpoint_uri(self, context: Context) -> str:
        if self.checkpoint_uri:
            return self.checkpoint_uri.rstrip("/")
        experiment = self.experiment or context["ti"].dag_id
        label = f"r{int(self.lora_rank)}-" if self.lora_rank is not None else ""
        run = self.run_key(context).split("/map-")[0] if not self.run_name else self.run_name
        return self.bucket_uri("experiments", experiment, run, f"{label}{self.config_hash()}")

    def engine_command(self, context: Context) -> list[str]:
        job = [
            "train-job",
            "--method",
            self.method,
            "--checkpoint-uri",
            self.resolved_checkpoint_uri(context),
        ]
        if self.num_nodes > 1:
            from airflow_provider_finetune.pods.distributed import torchrun_command

            return torchrun_command(job)
        if (
            int(self.gpus or 0) > 1
            or (self.distributed_strategy or "ddp") != "ddp"
            and int(self.gpus or 0) >= 1
        ):
            # One process per GPU; batch size and accumulation are derived from the world size.
            return [
                "torchrun",
                "--standalone",
                f"--nproc-per-node={int(self.gpus)}",
                "-m",
                "finetune_engine.cli.main",
                *job,
            ]
        return ["finetune-engine", *job]

    def execute(self, context: Context) -> Any:
        if self.num_nodes > 1 and self.resolved_runner == "kubernetes":
            self.validate(context)
            return self.execute_multinode(context)
        return super().execute(context)

    def job_name(self, context: Context) -> str:
        """The multi-node job's name: the task id and a hash of dag, task, run id, map index and config
        (a retry of the run finds its job again; the next run, or another config, makes its own),
        DNS-1035 and at most :data:`JOB_NAME_MAX` characters."""
        ti = context["ti"]
        index = getattr(ti, "map_index", -1)
        key = f"{ti.dag_id}\0{ti.task_id}\0{context['run_id']}\0{index}\0{self.config_hash()}"
        suffix = hashlib.sha256(key.encode()).hexdigest()[:10]
        readable = re.sub(r"[^a-z0-9-]+", "-", ti.task_id.lower()).strip("-")
        if not readable or not readable[0].isalpha():
            readable = f"ft-{readable}".rstrip("-")
        return f"{readable[: JOB_NAME_MAX - len(suffix) - 1].rstrip('-')}-{suffix}"

    def multinode_manifest(self, context: Context) -> dict:
        from airflow_provider_finetune.pods.distributed import build_pytorchjob, build_trainjob
        from airflow_provider_finetune.pods.spec import labels_for
        from airflow_provider_finetune.triggers.job import JOB_LABEL

        base = self.build_spec(context)
        ti = context["ti"]
        name = self.job_name(context)
        spec = base.__class__(
            **{
                **base.__dict__,
                "labels": {
                    **{str(k): str(v) for k, v in (self.labels or {}).items()},
                    **labels_for(ti.dag_id, ti.task_id, context["run_id"], getattr(ti, "map_index", -1)),
                    JOB_LABEL: name,
                },
                "annotations": {str(k): str(v) for k, v in (self.annotations or {}).items()},
                "name": name,
            }
        )
        procs = max(int(self.gpus or 1), 1)
        if self.distributed == "pytorchjob":
            from airflow_provider_finetune.pods.distributed import DEFAULT_TTL_SECONDS_AFTER_FINISHED

            ttl = self.ttl_seconds_after_finished
            return build_pytorchjob(
                spec,
                self.num_nodes,
                procs,
                self.elastic_policy,
                ttl_seconds_after_finished=DEFAULT_TTL_SECONDS_AFTER_FINISHED if ttl is None else ttl,
            )
        return build_trainjob(
            spec,
            self.num_nodes,
            procs,
            runtime=self.training_runtime,
            runtime_kind=self.training_runtime_kind,
        )

    def custom_objects_api(self):
        from airflow.providers.cncf.kubernetes.hooks.kubernetes import KubernetesHook
        from kubernetes import client

        return client.CustomObjectsApi(KubernetesHook(conn_id=self.kubernetes_conn_id).api_client)

    def execute_multinode(self, context: Context) -> Any:
        """Create (or, on a retry of the same run, reattach to) a TrainJob/PyTorchJob, then wait for it
        in the triggerer (deferrable) or on the worker; the result JSON comes from the bucket."""
        import asyncio
        import time

        from kubernetes.client.exceptions import ApiException

        from airflow_provider_finetune.pods.security import PodSecurityViolation, check_sent
        from airflow_provider_finetune.triggers.job import TrainingJobTrigger, first_event

        doc = self.multinode_manifest(context)
        try:
            check_sent(doc)
        except PodSecurityViolation as err:
            raise FinetuneConfigError(f"task {self.task_id}: {err}") from None
        group, version = doc["apiVersion"].split("/")
        plural = "trainjobs" if doc["kind"] == "TrainJob" else "pytorchjobs"
        ns = doc["metadata"].get("namespace") or self.namespace or settings.get("namespace") or "default"
        name = doc["metadata"]["name"]
        job = {"group": group, "version": version, "namespace": ns, "plural": plural, "name": name}
        api = self.custom_objects_api()
        try:
            api.create_namespaced_custom_object(group, version, ns, plural, doc)
            self.log.info("created %s %s/%s (%d nodes)", doc["kind"], ns, name, self.num_nodes)
        except ApiException as err:
            if err.status != 409:
                raise RuntimeError(f"Failed to create {doc['kind']} {ns}/{name}: {err.reason}") from err
            self.reattach(api, doc, job)
        self._job = job
        deadline = None
        if self.active_deadline_seconds:
            deadline = (
                time.time() + int(self.active_deadline_seconds) + int(self.schedule_timeout_seconds or 0)
            )
        trigger = TrainingJobTrigger(
            name=name,
            namespace=ns,
            group=group,
            version=version,
            plural=plural,
            kubernetes_conn_id=self.kubernetes_conn_id,
            poll_interval=self.poll_interval,
            deadline=deadline,
            schedule_timeout=self.schedule_timeout_seconds,
            cluster_context=self.cluster_context,
            in_cluster=self.in_cluster,
            config_file=self.config_file,
        )
        if self.deferrable:
            self.defer(trigger=trigger, method_name="execute_multinode_complete")
        return self.execute_multinode_complete(context, asyncio.run(first_event(trigger)))

    def reattach(self, api: Any, doc: dict, job: dict[str, str]) -> None:
        """The job's name exists: reattach when it is this task instance's own job (its dag, task, run
        and map index labels match ours); a failed one of ours is deleted and created again (a retry
        runs again, resuming from the bucket's checkpoints); anything else is refused."""
        from airflow_provider_finetune.pods.spec import LABEL_PREFIX
        from airflow_provider_finetune.triggers.job import job_state

        kind, where = doc["kind"], f"{doc['kind']} {job['namespace']}/{job['name']}"
        args = (job["group"], job["version"], job["namespace"], job["plural"], job["name"])
        existing = api.get_namespaced_custom_object(*args)
        theirs = (existing.get("metadata") or {}).get("labels") or {}
        mine = {k: v for k, v in doc["metadata"]["labels"].items() if k.startswith(f"{LABEL_PREFIX}/")}
        differ = sorted(k for k, v in mine.items() if theirs.get(k) != v)
        if differ:
            owner = theirs.get(f"{LABEL_PREFIX}/run-id") or "no run of this provider"
            raise FinetuneConfigError(
                f"task {self.task_id}: {where} exists but is not this task instance's job (it belongs to "
                f"{owner}; labels {', '.join(differ)} differ): delete it (kubectl delete {job['plural']} -n "
                f"{job['namespace']} {job['name']}) if it is stale, or run under another run id"
            )
        state, message, _ = job_state({"kind": kind, **existing}, [])
        if state != "failed":
            self.log.info("%s exists and is this run's (%s): reattaching", where, message)
            return
        self.log.warning("%s of this run failed before (%s): deleting it and starting again", where, message)
        self.delete_job(api, job, wait=True)
        api.create_namespaced_custom_object(*args[:4], doc)
        self.log.info("created %s again", where)

    def delete_job(self, api: Any, job: dict[str, str], wait: bool = False) -> None:
        """Delete the job and its pods (background propagation); a job already gone is fine. ``wait``:
        until the name is free again (at most a few minutes)."""
        import time

        from kubernetes import client
        from kubernetes.client.exceptions import ApiException

        args = (job["group"], job["version"], job["namespace"], job["plural"], job["name"])
        try:
            api.delete_namespaced_custom_object(
                *args, body=client.V1DeleteOptions(propagation_policy="Background")
            )
            self.log.info("deleted %s %s/%s", job["plural"][:-1], job["namespace"], job["name"])
        except ApiException as err:
            if err.status != 404:
                raise
        for _ in range(300 if wait else 0):
            try:
                api.get_namespaced_custom_object(*args)
            except ApiException as err:
                if err.status == 404:
                    return
                raise
            time.sleep(1)

    def job_log_tail(self, job: dict[str, str], pod: str | None, lines: int = 100) -> str:
        """The last lines of a job pod's engine log: the named pod, else the job's first pod (rank 0)."""
        from airflow_provider_finetune.triggers.job import JOB_LABEL

        try:
            core = self.client
            if pod is None:
                response = core.list_namespaced_pod(
                    job["namespace"], label_selector=f"{JOB_LABEL}={job['name']}", _preload_content=False
                )
                names = sorted(p["metadata"]["name"] for p in json.loads(response.data).get("items") or [])
                if not names:
                    return ""
                pod = names[0]
            text = core.read_namespaced_pod_log(name=pod, namespace=job["namespace"], tail_lines=lines)
        except Exception as err:  # noqa: BLE001 - the log is best effort; the job's state decides
            self.log.warning("could not read the log of the job's pods: %s", str(err)[:300])
            return ""
        text = text.decode(errors="replace") if isinstance(text, bytes) else str(text or "")
        return f"--- log of pod {pod} (last {lines} lines) ---\n{text}" if text else ""

    def execute_multinode_complete(self, context: Context, event: dict[str, Any]) -> Any:
        """The job ended (or the wait did): its log tail into the task log; on success the stored
        result, and the job deleted (``on_finish_action``); otherwise an error naming the reason."""
        job = {k: event[k] for k in ("group", "version", "namespace", "plural", "name")}
        self._job = job
        where = f"{job['plural'][:-1]} {job['namespace']}/{job['name']}"
        tail = self.job_log_tail(job, event.get("pod"))
        if tail:
            self.log.info("%s", tail)
        api = self.custom_objects_api()
        if event.get("status") != "succeeded":
            stuck = event.get("status") == "timeout" or event.get("pod") is not None
            if stuck or getattr(self.on_finish_action, "value", self.on_finish_action) == "delete_pod":
                # a stuck gang holds its GPUs until deleted; a failed job is kept for its TTL (logs)
                self.delete_job(api, job)
            self._job = None
            last = "\n".join(tail.splitlines()[-10:])
            raise EngineJobFailed(
                f"{where}: {event.get('status')}: {event.get('message')}" + (f"\n{last}" if last else "")
            )
        result = self.read_remote_result(self.resolved_checkpoint_uri(context))
        if getattr(self.on_finish_action, "value", self.on_finish_action) in (
            "delete_pod",
            "delete_succeeded_pod",
        ):
            self.delete_job(api, job)
        self._job = None
        return self.handle_result(context, result)

    def on_kill(self) -> None:
        if self._job is not None:
            job, self._job = self._job, None
            try:
                self.delete_job(self.custom_objects_api(), job)
            except Exception as err:  # noqa: BLE001 - kill goes on; the job's deadline/TTL remain
                self.log.warning("could not delete %s/%s: %s", job["namespace"], job["name"], err)
            return
        super().on_kill()

    def read_remote_result(self, checkpoint_uri: str) -> dict:
        """The run's stored result.json, without the ``config`` it records (the engine compares it on a
        relaunch; XComs stay small and config-free, as the pods' own results are)."""
        import tempfile

        from airflow_provider_finetune.hooks import BucketHook
        from finetune_engine.storage import download_file

        client = BucketHook(self.bucket_conn_id or settings.get("bucket_conn_id")).storage_client
        with tempfile.TemporaryDirectory() as tmp:
            download_file(f"{checkpoint_uri}/result.json", f"{tmp}/result.json", client=client)
            with open(f"{tmp}/result.json", encoding="utf-8") as f:
                result = json.load(f)
        if isinstance(result, dict):
            result.pop("config", None)
        return result

    def engine_env(self, context: Context) -> dict[str, str]:
        return {"FINETUNE_CONFIG": self.rendered_config()}

    def handle_result(self, context: Context, result: Any) -> Any:
        if isinstance(result, dict):
            if result.get("mlflow_tracking_uri"):  # stored in XCom and shown: never with credentials
                result["mlflow_tracking_uri"] = checks.strip_userinfo(result["mlflow_tracking_uri"])
            ui = settings.get("mlflow_ui_url") or result.get("mlflow_tracking_uri") or ""
            MLflowRunLink.persist(context, mlflow_run_url(ui, result.get("mlflow_run_id")))
            if self.lora_rank is not None:
                result.setdefault("lora_rank", int(self.lora_rank))
        return result
