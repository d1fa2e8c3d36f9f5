"""The ``[finetune]`` config section, read with the provider's defaults."""

from __future__ import annotations

from airflow_provider_finetune.get_provider_info import get_provider_info

SECTION = "finetune"


def default(key: str) -> str:
    return get_provider_info()["config"][SECTION]["options"][key]["default"] or ""


def get(key: str) -> str:
    """``[finetune] key`` from airflow.cfg / AIRFLOW__FINETUNE__KEY, else the provider default."""
    from airflow.sdk import conf

    return conf.get(SECTION, key, fallback=default(key)) or ""
