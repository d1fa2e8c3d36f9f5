"""Provider metadata read by Airflow through the ``apache_airflow_provider`` entry point."""

from __future__ import annotations

from airflow_provider_finetune import __version__


def _opt(description: str, default: str | None, example: str | None = None, type_: str = "string") -> dict:
    return {
        "description": description,
        "version_added": None,
        "type": type_,
        "example": example,
        "default": default,
    }


def get_provider_info() -> dict:
    return {
        "package-name": "airflow-provider-finetune",
        "name": "Fine-tune",
        "description": "LLM fine-tuning as Airflow DAGs on Kubernetes: deliver, sweep, merge, serve.",
        "versions": [__version__],
        "integrations": [
            {
                "integration-name": "Fine-tune",
                "external-doc-url": "https://github.com/airflow-provider-finetune/airflow-provider-finetune",
                "tags": ["software"],
            }
        ],
        "config": {
            "finetune": {
                "description": "Defaults of the fine-tuning operators; each can be overridden per operator.",
                "options": {
                    "runner": _opt(
                        "Where engine pods run: kubernetes (the cluster) or local (a subprocess on the "
                        "worker, same command and env).",
                        "kubernetes",
                        "local",
                    ),
                    "engine_image": _opt(
                        "Engine image of the fine-tuning pods.",
                        f"ghcr.io/airflow-provider-finetune/engine-cuda:{__version__}",
                    ),
                    "namespace": _opt(
                        "Kubernetes namespace of the pods, jobs and vLLM servers: a dedicated one with the "
                        "restricted Pod Security Standard enforced (deploy/README.md), never 'default'.",
                        "finetune",
                    ),
                    "kubernetes_conn_id": _opt("Kubernetes connection.", "kubernetes_default"),
                    "bucket_conn_id": _opt(
                        "Airflow aws connection of the bucket (login = access key, password = secret key, "
                        "extra endpoint_url for MinIO/SeaweedFS; role_arn, aws_session_token, profile_name "
                        "and region_name are honoured). Airflow-side reads "
                        "and the local runner take credentials from it.",
                        "aws_default",
                    ),
                    "bucket": _opt("Bucket of models, datasets and experiments.", "finetune"),
                    "bucket_endpoint_url": _opt(
                        "S3 endpoint the pods use (in-cluster MinIO service, for example); empty for AWS.",
                        "",
                        "http://minio.minio.svc:9000",
                    ),
                    "bucket_secret_name": _opt(
                        "Kubernetes Secret with AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY for the pods.",
                        "finetune-bucket",
                    ),
                    "hf_token_secret_name": _opt(
                        "Kubernetes Secret with HF_TOKEN (gated Hub models).", "hf-token"
                    ),
                    "hf_conn_id": _opt(
                        "Airflow connection whose password is the Hub token (local runner).",
                        "huggingface_default",
                    ),
                    "gpu_vendor": _opt("GPU resource vendor: nvidia or amd.", "nvidia", "amd"),
                    "service_account_name": _opt(
                        "Service account of the pods (empty: namespace default).", ""
                    ),
                    "active_deadline_seconds": _opt(
                        "Default deadline of every engine pod and job (activeDeadlineSeconds) and of the "
                        "local runner's subprocess, in seconds; an operator's active_deadline_seconds wins. "
                        "A retry resumes from the newest complete checkpoint. 0: no deadline.",
                        "259200",
                        "86400",
                        "integer",
                    ),
                    "max_sweep_gpus": _opt(
                        "Most GPUs one fine-tuning task may ask for, counting every mapped instance of a "
                        "sweep: instances x num_nodes x gpus. A task above it fails before any pod. "
                        "0: no cap.",
                        "64",
                        "16",
                        "integer",
                    ),
                    "local_workdir": _opt("Work directory of the local runner.", "", "/tmp/finetune"),
                    "mlflow_tracking_uri": _opt("MLflow tracking URI given to the engine (empty: off).", ""),
                    "mlflow_secret_name": _opt(
                        "Kubernetes Secret with MLflow credentials for the pods: its keys "
                        "MLFLOW_TRACKING_TOKEN, MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD "
                        "(each optional) become "
                        "secretKeyRefs of the same names (empty: none). Never put credentials in the URI.",
                        "",
                        "mlflow-credentials",
                    ),
                    "mlflow_conn_id": _opt(
                        "Airflow connection standing in for [finetune] mlflow_secret_name on the local "
                        "runner: login and password become MLFLOW_TRACKING_USERNAME / "
                        "MLFLOW_TRACKING_PASSWORD; a password without a login becomes "
                        "MLFLOW_TRACKING_TOKEN. Absent: no credentials.",
                        "mlflow_default",
                    ),
                    "mlflow_ui_url": _opt(
                        "Base URL of the MLflow UI for the extra link (default: the tracking URI).", ""
                    ),
                    "dag_defaults": _opt(
                        "Defaults of the shipped DAGs' Params and settings, as JSON {dag_id: {name: value}}, "
                        "read when the DAGs are parsed; an unknown name is an import error of that DAG.",
                        "",
                        '{"finetune_tutorial": {"model_id": "/models/tiny", "gpus": 0}}',
                    ),
                    "vllm_python": _opt(
                        "Python of the vLLM venv used by DeployVLLM on the local runner.",
                        "",
                        ".venv-vllm/bin/python",
                    ),
                    "local_vllm_engine_args": _opt(
                        "Extra vLLM server arguments, as a JSON object, for the servers DeployVLLM starts on "
                        "the local runner; an operator's own engine_args win. "
                        '{"enforce_eager": true} skips torch.compile and its warm-up: a CPU server is ready '
                        "~20 s sooner and generates a little slower.",
                        "",
                        '{"enforce_eager": true}',
                    ),
                },
            }
        },
        "triggers": [
            {
                "integration-name": "Fine-tune",
                "python-modules": [
                    "airflow_provider_finetune.triggers.deployment",
                    "airflow_provider_finetune.triggers.job",
                ],
            },
        ],
        # No "connection-types": the bucket is the amazon provider's `aws` connection (login/password =
        # keys, extra endpoint_url), the cluster the cncf provider's `kubernetes` one, and the Hub token
        # the password of any connection ([finetune] hf_conn_id; `generic` works). Those types already
        # have their UI fields; declaring our own would need a hook per type and shadow theirs.
        "extra-links": [
            "airflow_provider_finetune.links.MLflowRunLink",
            "airflow_provider_finetune.links.ServedEndpointLink",
        ],
    }
