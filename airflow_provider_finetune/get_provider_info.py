"""Provider metadata read by Airflow through the ``apache_airflow_provider`` entry point."""

from __future__ import annotations


def get_provider_info() -> dict:
    return {
        "package-name": "airflow-provider-finetune",
        "name": "Fine-tune",
        "description": "LLM fine-tuning as Airflow DAGs on Kubernetes.",
        "versions": ["0.1.0"],
    }
