"""Airflow-core names the tests use that moved between 3.1 and 3.3 (the provider's own are in
airflow_provider_finetune.compat)."""

from __future__ import annotations

# a snippet for code run in a subprocess: binds DagBag on every supported release
DAGBAG_IMPORT = (
    "try:\n    from airflow.dag_processing.dagbag import DagBag\n"
    "except ImportError:  # Airflow 3.1\n    from airflow.models.dagbag import DagBag\n"
)


def dagbag_class():
    try:
        from airflow.dag_processing.dagbag import DagBag
    except ImportError:  # Airflow 3.1
        from airflow.models.dagbag import DagBag
    return DagBag
