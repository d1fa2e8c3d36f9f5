"""The ``[finetune]`` config section, read with the provider's defaults."""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

from airflow_provider_finetune.get_provider_info import get_provider_info

SECTION = "finetune"


def default(key: str) -> str:
    return get_provider_info()["config"][SECTION]["options"][key]["default"] or ""


def get(key: str) -> str:
    """``[finetune] key`` from airflow.cfg / AIRFLOW__FINETUNE__KEY, else the provider default."""
    from airflow_provider_finetune.compat import conf

    return conf.get(SECTION, key, fallback=default(key)) or ""


def dag_defaults(dag_id: str, known: Iterable[str]) -> dict[str, Any]:
    """``[finetune] dag_defaults`` for one shipped DAG: a JSON object ``{dag_id: {name: value}}`` whose
    values replace the defaults of that DAG's Params and settings (``known``), read when the DAG is
    parsed. Empty: the DAG's own defaults. A malformed value or a name the DAG does not know is an
    import error of the DAG that names it, never a silently ignored default."""
    from airflow_provider_finetune.exceptions import FinetuneConfigError

    data = json_object("dag_defaults")
    if not all(isinstance(v, dict) for v in data.values()):
        raise FinetuneConfigError('[finetune] dag_defaults must be a JSON object {"dag_id": {"name": value}}')
    mine = data.get(dag_id, {})
    unknown = sorted(set(mine) - set(known))
    if unknown:
        raise FinetuneConfigError(
            f"[finetune] dag_defaults.{dag_id}: unknown name(s) {unknown}; {dag_id} takes {sorted(known)}"
        )
    return mine


def json_object(key: str) -> dict[str, Any]:
    """``[finetune] key`` as a JSON object; empty: ``{}``. Anything else is a :class:`FinetuneConfigError`
    naming the option."""
    from airflow_provider_finetune.exceptions import FinetuneConfigError

    raw = get(key).strip()
    if not raw:
        return {}
    try:
        data = json.loads(raw)
    except json.JSONDecodeError as err:
        raise FinetuneConfigError(f"[finetune] {key} is not JSON: {err}") from None
    if not isinstance(data, dict):
        raise FinetuneConfigError(f"[finetune] {key} must be a JSON object, got {type(data).__name__}")
    return data


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


def integer(key: str, minimum: int = 0) -> int:
    """``[finetune] key`` as an integer >= ``minimum``; anything else is a :class:`FinetuneConfigError`
    naming the option."""
    raw = get(key).strip() or default(key)
    try:
        value = int(raw)
    except ValueError:
        value = None
    if value is None or value < minimum:
        from airflow_provider_finetune.exceptions import FinetuneConfigError

        raise FinetuneConfigError(f"[finetune] {key} {raw!r}: must be an integer >= {minimum}")
    return value
