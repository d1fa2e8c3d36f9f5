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


RUNNERS = ("kubernetes", "local")


def runner(explicit: str | None = None) -> str:
    """Where a task's engine work runs: the operator's ``runner`` argument, else ``[finetune] runner``.

    One of :data:`RUNNERS`; anything else is a :class:`FinetuneConfigError` (a typo must not fall
    back to the cluster).
    """
    value = (explicit or get("runner") or "kubernetes").lower()
    if value not in RUNNERS:
        from airflow_provider_finetune.exceptions import FinetuneConfigError

        raise FinetuneConfigError(f"runner {value!r}: use 'kubernetes' or 'local' ([finetune] runner)")
    return value
