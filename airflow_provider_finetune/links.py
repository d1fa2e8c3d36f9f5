"""Extra links: the MLflow run of a training task, the endpoint of a served model.

Operators push the URL at run time under the link's XCom key; the UI reads it from there.
"""

from __future__ import annotations

from typing import Any

from airflow.sdk import BaseOperatorLink, Context


class _XComLink(BaseOperatorLink):
    def get_link(self, operator: Any, *, ti_key: Any) -> str:
        from airflow.sdk.execution_time.xcom import XCom

        return XCom.get_value(ti_key=ti_key, key=self.xcom_key) or ""

    @classmethod
    def persist(cls, context: Context, url: str | None) -> None:
        if url:
            context["ti"].xcom_push(key=f"_link_{cls.__name__}", value=url)


class MLflowRunLink(_XComLink):
    name = "MLflow run"


class ServedEndpointLink(_XComLink):
    name = "Served endpoint"


def mlflow_run_url(ui_base: str, run_id: str | None, experiment_id: str | None = None) -> str | None:
    """The run's page in the MLflow UI; ``user:password@`` in ``ui_base`` never reaches the link."""
    from airflow_provider_finetune.checks import strip_userinfo

    if not (ui_base and run_id) or not ui_base.startswith(("http://", "https://")):
        return None
    base = strip_userinfo(ui_base).rstrip("/")
    return (
        f"{base}/#/experiments/{experiment_id}/runs/{run_id}" if experiment_id else f"{base}/#/runs/{run_id}"
    )
