"""The base of every engine operator: a KubernetesPodOperator whose pod is built from an engine
job spec, run on the cluster (the parent's machinery: create, wait or defer, logs, XCom, cleanup,
reattach) or locally (the same command and env as a subprocess).
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from airflow.providers.cncf.kubernetes.operators.pod import KubernetesPodOperator
from airflow.sdk import Context

from airflow_provider_finetune import checks, settings
from airflow_provider_finetune.exceptions import EngineJobFailed, FinetuneConfigError
from airflow_provider_finetune.hooks import ConnectionSecretResolver, SecretNames
from airflow_provider_finetune.pods.spec import (
    DEFAULT_TERMINATION_GRACE_SECONDS,
    XCOM_RESULT_FILE,
    EngineJobSpec,
    Scratch,
    SecretEnv,
)

WORKDIR = "/workdir"
MLFLOW_SECRET_KEYS = ("MLFLOW_TRACKING_TOKEN", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")

# KubernetesPodOperator arguments that would replace the locked-down pod an engine operator builds
# (restricted Pod Security Standard, the engine command, secrets only as secretKeyRef): refused, with
# what to use instead. A pod these operators do not describe is a plain KubernetesPodOperator's job.
REFUSED_POD_ARGS = {
    "cmds": "the engine command is the operator's own",
    "arguments": "the engine command is the operator's own",
    "container_security_context": "the container runs under the restricted Pod Security Standard",
    "security_context": "the pod runs under the restricted Pod Security Standard",
    "xcom_sidecar_container_security_context": "the XCom sidecar runs under the restricted standard",
    "volumes": "use scratch_size / scratch_storage_class for disk",
    "volume_mounts": "use scratch_size / scratch_storage_class for disk",
    "hostnetwork": "engine pods never share the node's network",
    "env_vars": "use extra_env for plain settings; credentials come from Kubernetes Secrets",
    "env_from": "use extra_env; credentials come from the [finetune] *_secret_name Secrets",
    "secrets": "credentials come from the [finetune] *_secret_name Secrets as secretKeyRef",
    "configmaps": "use extra_env",
    "pod_template_file": "the pod is built by the operator",
    "pod_template_dict": "the pod is built by the operator",
    "full_pod_spec": "the pod is built by the operator",
    "init_containers": "the pod is built by the operator",
    "container_resources": "use gpus, cpu_per_gpu and memory_per_gpu",
    "automount_service_account_token": "engine pods need no Kubernetes API access",
}


def refuse_pod_args(cls_name: str, kwargs: dict[str, Any]) -> None:
    """FinetuneConfigError naming every KubernetesPodOperator argument that would replace the
    locked-down pod (a default-like value such as ``hostnetwork=False`` passes)."""
    bad = sorted(k for k in kwargs if k in REFUSED_POD_ARGS and kwargs[k] not in (None, False, "", [], {}))
    if bad:
        raise FinetuneConfigError(
            f"{cls_name}: {', '.join(bad)} cannot be set on an engine operator ("
            + "; ".join(f"{k}: {REFUSED_POD_ARGS[k]}" for k in bad)
            + "). Use a plain KubernetesPodOperator for a pod the operator does not describe."
        )


class MlflowSecretResolver(ConnectionSecretResolver):
    """The local runner's stand-in for ``[finetune] mlflow_secret_name``: the ``[finetune]
    mlflow_conn_id`` connection (login/password, or a password alone as a token)."""

    def __init__(self, names: SecretNames, bucket_conn_id: str, hf_conn_id: str, mlflow_conn_id: str):
        super().__init__(names, bucket_conn_id, hf_conn_id)
        self.mlflow_conn_id = mlflow_conn_id

    def __call__(self, secret: str, key: str) -> str:
        mlflow_secret = settings.get("mlflow_secret_name")
        if not (mlflow_secret and secret == mlflow_secret and key in MLFLOW_SECRET_KEYS):
            return super().__call__(secret, key)
        from airflow.exceptions import AirflowNotFoundException
        from airflow.sdk import BaseHook

        try:
            conn = BaseHook.get_connection(self.mlflow_conn_id)
        except AirflowNotFoundException:
            raise KeyError(
                f"Airflow connection {self.mlflow_conn_id!r} ([finetune] mlflow_conn_id) is absent"
            ) from None
        values = (
            {"MLFLOW_TRACKING_USERNAME": conn.login, "MLFLOW_TRACKING_PASSWORD": conn.password}
            if conn.login
            else {"MLFLOW_TRACKING_TOKEN": conn.password}
        )
        if not values.get(key):
            raise KeyError(f"Airflow connection {self.mlflow_conn_id!r} has no value for {key}")
        return values[key]


class EngineJobOperator(KubernetesPodOperator):
    """Runs one ``finetune-engine`` job in a pod.

    :param runner: ``kubernetes`` or ``local``; default ``[finetune] runner``.
    :param engine_image: engine image; default ``[finetune] engine_image``.
    :param gpus: GPUs of the pod (0 = CPU only).
    :param gpu_vendor: ``nvidia`` or ``amd``; default ``[finetune] gpu_vendor``.
    :param cpu_per_gpu: CPU request per GPU (or for the pod when gpus=0).
    :param memory_per_gpu: memory request per GPU (or for the pod when gpus=0).
    :param shm_size: size of the in-memory ``/dev/shm`` volume.
    :param scratch_size: size of the scratch volume at /workdir.
    :param scratch_storage_class: when set, scratch is a generic ephemeral PVC of this class.
    :param bucket: bucket name; default ``[finetune] bucket``.
    :param bucket_conn_id: Airflow ``aws`` connection that stands in for the bucket Secret on the local
        runner; default ``[finetune] bucket_conn_id``.
    :param termination_grace_period: seconds between SIGTERM and SIGKILL when the pod is stopped
        (kill, preemption, eviction): the trainer saves and uploads a checkpoint in them; default 300.
    :param extra_env: more plain environment variables of the engine container (they win over the
        operator's own); credentials are refused here, they belong in Kubernetes Secrets.

    Every other keyword argument goes to KubernetesPodOperator (``node_selector``, ``tolerations``,
    ``active_deadline_seconds`` (default ``[finetune] active_deadline_seconds``, also the local
    runner's deadline), ``deferrable``, ...), except those that would replace the locked-down pod
    (:data:`REFUSED_POD_ARGS`: commands, security contexts, volumes, host network, env and Secret
    sources, pod templates, resources): they are a :class:`FinetuneConfigError` at construction,
    and the final pod is checked again before it is sent. ``log_pod_spec_on_failure`` is off by
    default (a failed pod's spec would go into the task log).
    """

    # engine pods that read models from the bucket never talk to the Hub
    hub_offline = False

    template_fields: Sequence[str] = (
        *KubernetesPodOperator.template_fields,
        "bucket",
        "gpus",
        "engine_image",
    )
    ui_color = "#e8d8f8"

    def __init__(
        self,
        *,
        runner: str | None = None,
        engine_image: str | None = None,
        gpus: int = 0,
        gpu_vendor: str | None = None,
        cpu_per_gpu: str = "4",
        memory_per_gpu: str = "32Gi",
        shm_size: str | None = None,
        scratch_size: str = "100Gi",
        scratch_storage_class: str | None = None,
        bucket: str | None = None,
        bucket_conn_id: str | None = None,
        extra_env: dict[str, str] | None = None,
        **kwargs: Any,
    ) -> None:
        refuse_pod_args(type(self).__name__, kwargs)
        if kwargs.get("active_deadline_seconds") is None:
            kwargs["active_deadline_seconds"] = settings.integer("active_deadline_seconds") or None
        kwargs.setdefault("log_pod_spec_on_failure", False)
        # SIGTERM gives the trainer this long to save and upload a checkpoint before SIGKILL
        kwargs.setdefault("termination_grace_period", DEFAULT_TERMINATION_GRACE_SECONDS)
        kwargs.setdefault("name", None)
        kwargs.setdefault("image", engine_image or settings.get("engine_image"))
        kwargs.setdefault("namespace", settings.get("namespace") or None)
        kwargs.setdefault("kubernetes_conn_id", settings.get("kubernetes_conn_id"))
        kwargs.setdefault("do_xcom_push", True)
        kwargs.setdefault("get_logs", True)
        kwargs.setdefault("log_events_on_failure", True)
        kwargs.setdefault("on_finish_action", "delete_succeeded_pod")
        # GPU nodes often come from an autoscaler: give scheduling time before failing.
        kwargs.setdefault("schedule_timeout_seconds", 1800 if gpus else 600)
        kwargs.setdefault("startup_timeout_seconds", 1800 if gpus else 600)
        kwargs.setdefault("service_account_name", settings.get("service_account_name") or None)
        # the XCom sidecar must pass the restricted Pod Security Standard too
        kwargs.setdefault(
            "xcom_sidecar_container_security_context",
            {
                "allowPrivilegeEscalation": False,
                "runAsNonRoot": True,
                "readOnlyRootFilesystem": True,
                "capabilities": {"drop": ["ALL"]},
                "seccompProfile": {"type": "RuntimeDefault"},
            },
        )
        super().__init__(**kwargs)
        self.runner = runner
        self.engine_image = engine_image or kwargs["image"]
        self.gpus = gpus
        self.gpu_vendor = gpu_vendor
        self.cpu_per_gpu = cpu_per_gpu
        self.memory_per_gpu = memory_per_gpu
        self.shm_size = shm_size
        self.scratch_size = scratch_size
        self.scratch_storage_class = scratch_storage_class
        self.bucket = bucket
        self.bucket_conn_id = bucket_conn_id
        self.extra_env = extra_env or {}
        self._local_runner = None
        self._engine_command: list[str] | None = None

    @classmethod
    def partial(cls, **kwargs: Any) -> Any:
        refuse_pod_args(cls.__name__, kwargs)
        return super().partial(**kwargs)

    # -- what subclasses define ---------------------------------------------------------------

    def engine_command(self, context: Context) -> list[str]:
        raise NotImplementedError

    def engine_env(self, context: Context) -> dict[str, str]:
        return {}

    def validate(self, context: Context) -> None:
        """Checks that must pass before any pod is created, on the rendered arguments: the
        namespace, service account, image, bucket, GPU count, deadline and MLflow URI here;
        subclasses add their URIs and configs (and call this)."""
        if self.namespace:
            checks.check_namespace("namespace", self.namespace)
        if self.service_account_name:
            checks.check_service_account("service_account_name", self.service_account_name)
        checks.check_image("engine_image", self.engine_image)
        checks.check_bucket("bucket", self.resolved_bucket)
        checks.check_positive_int("gpus", self.gpus)
        if self.active_deadline_seconds is not None:
            checks.check_positive_int("active_deadline_seconds", self.active_deadline_seconds, minimum=1)
        if self.termination_grace_period is not None:
            checks.check_positive_int("termination_grace_period", self.termination_grace_period)
        for secret in self.image_pull_secrets or []:
            name = getattr(secret, "name", secret)
            if not checks.DNS_SUBDOMAIN.match(str(name or "")):
                raise FinetuneConfigError(
                    f"image_pull_secrets: {name!r} is not a valid Secret name (lowercase letters, digits, "
                    "'-' and '.')"
                )
        checks.check_mlflow_uri("[finetune] mlflow_tracking_uri", settings.get("mlflow_tracking_uri"))
        for option in ("bucket_secret_name", "mlflow_secret_name"):
            name = settings.get(option)
            if (name or option == "bucket_secret_name") and not checks.DNS_SUBDOMAIN.match(name):
                raise FinetuneConfigError(
                    f"[finetune] {option} {name!r} is not a valid Kubernetes Secret name (lowercase letters, "
                    "digits, '-' and '.')"
                )

    def handle_result(self, context: Context, result: Any) -> Any:
        return result

    # -- resolved settings --------------------------------------------------------------------

    @property
    def resolved_runner(self) -> str:
        return settings.runner(self.runner)

    @property
    def resolved_bucket(self) -> str:
        return self.bucket or settings.get("bucket")

    def bucket_uri(self, *parts: str) -> str:
        key = "/".join(p.strip("/") for p in parts if p)
        return f"s3://{self.resolved_bucket}/{key}"

    def run_key(self, context: Context) -> str:
        """Deterministic per DAG run and map index, so a relaunch resumes and a finished run is skipped."""
        ti = context["ti"]
        run_id = context["run_id"]
        slug = re.sub(r"[^A-Za-z0-9._-]+", "-", run_id).strip("-")[:60]
        digest = hashlib.sha256(run_id.encode()).hexdigest()[:8]
        index = getattr(ti, "map_index", -1)
        return f"{slug}-{digest}" + (f"/map-{index}" if index is not None and index >= 0 else "")

    # -- the pod --------------------------------------------------------------------------------

    @staticmethod
    def writer_id(context: Context) -> str:
        """The job's identity across its tries (dag/run/task/map index): the engine's prefix lease
        lets a retry take over its killed try's lease at once, and refuses any other writer."""
        ti = context["ti"]
        index = getattr(ti, "map_index", -1)
        mapped = f"/{index}" if index is not None and index >= 0 else ""
        return f"{ti.dag_id}/{context['run_id']}/{ti.task_id}{mapped}"

    def build_spec(self, context: Context) -> EngineJobSpec:
        env = {
            "FINETUNE_RESULT_FILE": XCOM_RESULT_FILE,
            "FINETUNE_WORKDIR": WORKDIR,
            "FINETUNE_BUCKET": self.resolved_bucket,
            "FINETUNE_WRITER": self.writer_id(context),
            "HF_HUB_DISABLE_TELEMETRY": "1",
            **({"HF_HUB_OFFLINE": "1"} if self.hub_offline else {}),
            **(
                {"AWS_ENDPOINT_URL": settings.get("bucket_endpoint_url")}
                if settings.get("bucket_endpoint_url")
                else {}
            ),
            **(
                {"MLFLOW_TRACKING_URI": checks.strip_userinfo(settings.get("mlflow_tracking_uri"))}
                if settings.get("mlflow_tracking_uri")
                else {}
            ),
            **self.engine_env(context),
            **self.extra_env,
        }
        bucket_secret = self.secret_names().bucket
        return EngineJobSpec(
            name=self.task_id,
            command=self.engine_command(context),
            env=env,
            secret_env=[
                SecretEnv("AWS_ACCESS_KEY_ID", bucket_secret, "AWS_ACCESS_KEY_ID"),
                SecretEnv("AWS_SECRET_ACCESS_KEY", bucket_secret, "AWS_SECRET_ACCESS_KEY"),
                *self.extra_secret_env(),
                *self.mlflow_secret_env(),
            ],
            image=self.engine_image,
            gpus=int(self.gpus or 0),
            gpu_vendor=self.gpu_vendor or settings.get("gpu_vendor"),
            cpu_per_gpu=self.cpu_per_gpu,
            memory_per_gpu=self.memory_per_gpu,
            shm_size=self.shm_size,
            scratch=Scratch(
                kind="ephemeral" if self.scratch_storage_class else "emptyDir",
                size=self.scratch_size,
                storage_class=self.scratch_storage_class,
                mount_path=WORKDIR,
            ),
            node_selector=self.node_selector or {},
            tolerations=[t.to_dict() if hasattr(t, "to_dict") else t for t in (self.tolerations or [])],
            priority_class_name=self.priority_class_name,
            active_deadline_seconds=self.active_deadline_seconds,
            service_account_name=self.service_account_name,
            namespace=self.namespace,
            image_pull_secrets=[getattr(s, "name", s) for s in self.image_pull_secrets or []],
            affinity=self.affinity_dict(),
            termination_grace_period_seconds=self.termination_grace_period,
        )

    def affinity_dict(self) -> dict[str, Any] | None:
        """The operator's ``affinity`` as a manifest dict (camelCase), or None."""
        if not self.affinity:
            return None
        from airflow_provider_finetune.pods.pod import to_dict

        return to_dict(self.affinity)

    def extra_secret_env(self) -> list[SecretEnv]:
        return []

    def mlflow_secret_env(self) -> list[SecretEnv]:
        """MLflow credentials as optional secretKeyRefs of ``[finetune] mlflow_secret_name`` (if set)."""
        name = settings.get("mlflow_secret_name")
        if not name:
            return []
        if not checks.DNS_SUBDOMAIN.match(name):
            raise FinetuneConfigError(f"[finetune] mlflow_secret_name {name!r} is not a valid Secret name")
        return [SecretEnv(key, name, key, optional=True) for key in MLFLOW_SECRET_KEYS]

    def secret_names(self) -> SecretNames:
        """The Kubernetes Secrets the pod references (the local runner maps each to a connection)."""
        return SecretNames(settings.get("bucket_secret_name"), settings.get("hf_token_secret_name"))

    def local_hf_conn_id(self) -> str:
        """The Airflow connection standing in for the HF token Secret on the local runner."""
        return settings.get("hf_conn_id")

    def local_secret_resolver(self) -> ConnectionSecretResolver:
        """Resolves the pod's secretKeyRefs from Airflow connections (local runner)."""
        return MlflowSecretResolver(
            self.secret_names(),
            self.bucket_conn_id or settings.get("bucket_conn_id"),
            self.local_hf_conn_id(),
            settings.get("mlflow_conn_id"),
        )

    def build_pod_request_obj(self, context: Context | None = None, *, dry_run: bool = False):
        from airflow_provider_finetune.pods.pod import build_pod

        if context is not None:
            spec = self.build_spec(context)
            self._engine_command = list(spec.command)
            self.full_pod_spec = build_pod(spec)
        pod = super().build_pod_request_obj(context, dry_run=dry_run)
        self.check_pod(pod)
        return pod

    def check_pod(self, pod: Any) -> None:
        """The pod as KubernetesPodOperator will send it (its arguments merged over ours): restricted
        Pod Security Standard, no credential as a value, no Secret mounted, no API token, and the
        engine command unchanged. A FinetuneConfigError before anything is created."""
        from airflow_provider_finetune.pods.pod import to_dict
        from airflow_provider_finetune.pods.security import restricted_violations, secret_violations

        doc = to_dict(pod)
        problems = restricted_violations(doc) + secret_violations(doc)
        spec = doc.get("spec") or {}
        if spec.get("automountServiceAccountToken") is not False:
            problems.append("spec: automountServiceAccountToken must be false")
        base = next(
            (c for c in spec.get("containers") or [] if c.get("name") == self.base_container_name), {}
        )
        if self._engine_command is not None and (
            base.get("command") != self._engine_command or base.get("args")
        ):
            problems.append(f"container {self.base_container_name!r}: the engine command was replaced")
        if problems:
            raise FinetuneConfigError(
                f"task {self.task_id}: the pod breaks the engine pod rules and is not sent:\n  "
                + "\n  ".join(problems)
            )

    # -- running ----------------------------------------------------------------------------------

    def execute(self, context: Context) -> Any:
        self.validate(context)
        if self.resolved_runner == "local":
            return self.handle_result(context, self.execute_local(context))
        return self.handle_result(context, super().execute(context))

    def trigger_reentry(self, context: Context, event: dict[str, Any]) -> Any:
        """Deferrable mode: the parent's re-entry after its trigger fired, then our result handling."""
        return self.handle_result(context, super().trigger_reentry(context, event))

    def execute_local(self, context: Context) -> Any:
        from airflow_provider_finetune.runners.local import LocalRunError, LocalRunner

        push, self.do_xcom_push = self.do_xcom_push, False  # no sidecar locally; the file is read back
        try:
            pod = self.build_pod_request_obj(context, dry_run=True)
        finally:
            self.do_xcom_push = push
        workdir = self.local_workdir(context)
        resolver = self.local_secret_resolver()
        local_env = {}
        if not settings.get("bucket_endpoint_url"):
            try:
                bucket = resolver.bucket()
            except KeyError as err:
                raise FinetuneConfigError(f"task {self.task_id} (local runner): {err.args[0]}") from None
            # the endpoint, and the session token that goes with temporary keys (role ARN, session token)
            local_env.update(
                {k: bucket[k] for k in ("AWS_ENDPOINT_URL", "AWS_SESSION_TOKEN") if bucket.get(k)}
            )
        # a kill gives the engine the pod's grace period too: it saves and uploads a checkpoint on SIGTERM
        grace = float(self.termination_grace_period) if self.termination_grace_period is not None else 10.0
        self._local_runner = LocalRunner(
            workdir, resolver, log=self.log.info, extra_env=local_env, grace=grace
        )
        try:
            result = self._local_runner.run(pod, timeout=self.active_deadline_seconds)
        except LocalRunError as err:
            raise EngineJobFailed.from_local(err) from None
        return result.xcom

    def cleanup(
        self, pod: Any, remote_pod: Any, xcom_result: dict | None = None, context: Context | None = None
    ) -> None:
        """The parent's cleanup (events, deletion, its failure); a failed engine container is
        classified first (OOM, deadline, eviction...), while the pod and its log still exist."""
        failure = (
            self.pod_failure(remote_pod)
            if remote_pod is not None and not getattr(self, "_killed", False)
            else None
        )
        try:
            super().cleanup(pod=pod, remote_pod=remote_pod, xcom_result=xcom_result, context=context)
        except Exception as err:
            from airflow_provider_finetune.compat import AirflowSkipException

            if failure is None or isinstance(err, AirflowSkipException):
                raise
            state, tail = failure
            raise EngineJobFailed.from_pod(
                remote_pod.metadata.name, self.base_container_name, state, tail
            ) from err

    def pod_failure(self, remote_pod: Any) -> tuple[dict[str, Any], str] | None:
        """(exit code and reasons, log tail) of the engine container when it failed, else None."""
        status = getattr(remote_pod, "status", None)
        if status is None:
            return None
        base = next((c for c in status.container_statuses or [] if c.name == self.base_container_name), None)
        term = base.state.terminated if base is not None and base.state is not None else None
        if not ((term is not None and term.exit_code != 0) or status.phase == "Failed"):
            return None
        container_reason = term.reason if term is not None else None
        # a container's "Error" says less than the pod's "DeadlineExceeded" / "Evicted"
        reason = (
            container_reason
            if container_reason not in (None, "Error", "Completed")
            else (status.reason or container_reason)
        )
        state = {"exit_code": term.exit_code if term is not None else None, "reason": reason}
        return state, "\n".join(
            filter(None, [term.message if term is not None else None, self.pod_log_tail(remote_pod)])
        )

    def pod_log_tail(self, remote_pod: Any, lines: int = 100) -> str:
        """The last lines of the engine container's log (an accelerator OOM shows only there)."""
        try:
            text = self.client.read_namespaced_pod_log(
                name=remote_pod.metadata.name,
                namespace=remote_pod.metadata.namespace,
                container=self.base_container_name,
                tail_lines=lines,
            )
        except Exception as err:  # the classification is best effort; the parent still reports the failure
            self.log.warning("could not read the log tail of pod %s: %s", remote_pod.metadata.name, err)
            return ""
        return text.decode(errors="replace") if isinstance(text, bytes) else str(text or "")

    def local_workdir(self, context: Context) -> Path:
        from airflow_provider_finetune.runners.local import work_root

        root = work_root(settings.get("local_workdir"))
        ti = context["ti"]
        safe = re.sub(
            r"[^A-Za-z0-9._-]+",
            "-",
            f"{ti.dag_id}/{context['run_id']}/{ti.task_id}/{getattr(ti, 'map_index', -1)}",
        )
        return root / safe

    def on_kill(self) -> None:
        if self._local_runner is not None:
            self._local_runner.kill()
            return
        super().on_kill()


def dump_json(data: Any) -> str:
    return json.dumps(data, sort_keys=True)
