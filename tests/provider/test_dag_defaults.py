"""[finetune] dag_defaults: the one documented way to change the shipped DAGs' defaults (make demo
points the tutorial at the tiny model with it); nothing else in dags/ reads the environment."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from airflow_provider_finetune import settings
from airflow_provider_finetune.exceptions import FinetuneConfigError
from tests.airflow_compat import dagbag_class

ROOT = Path(__file__).resolve().parents[2]
DAGS = ROOT / "dags"


def _bag(path: Path):
    return dagbag_class()(str(path))


def test_defaults_replace_the_dags_param_defaults(monkeypatch, tmp_path):
    monkeypatch.setenv(
        "AIRFLOW__FINETUNE__DAG_DEFAULTS",
        json.dumps(
            {
                "finetune_tutorial": {
                    "model_id": "/models/tiny",
                    "gpus": 0,
                    "keep_serving": False,
                    "config": "engine/configs/tiny-sft-lora.yaml",
                }
            }
        ),
    )
    bag = _bag(DAGS / "tutorial.py")
    assert bag.import_errors == {}
    params = bag.dags["finetune_tutorial"].params
    assert params["model_id"] == "/models/tiny" and params["gpus"] == 0 and params["keep_serving"] is False
    # a file of the DAG bundle: the run's conf picks it by its name in the set
    assert params["config"] == "tiny-sft-lora"
    assert "tiny-sft-lora" in bag.dags["finetune_tutorial"].params.get_param("config").schema["enum"]
    assert params["dataset_file"] == "argilla.jsonl"  # not given: the DAG's own default


def test_without_the_option_the_dags_keep_their_production_defaults(monkeypatch):
    monkeypatch.delenv("AIRFLOW__FINETUNE__DAG_DEFAULTS", raising=False)
    params = _bag(DAGS / "tutorial.py").dags["finetune_tutorial"].params
    assert params["model_id"] == "TinyLlama/TinyLlama-1.1B-Chat-v1.0" and params["gpus"] == 1


@pytest.mark.parametrize(
    "value,match",
    [
        (
            '{"finetune_tutorial": {"model": "x"}}',
            r"dag_defaults\.finetune_tutorial: unknown name\(s\) \['model'\]",
        ),
        ("{not json", "not JSON"),
        ('{"finetune_tutorial": 3}', "must be a JSON object"),
    ],
)
def test_a_wrong_value_is_named(monkeypatch, value, match):
    monkeypatch.setenv("AIRFLOW__FINETUNE__DAG_DEFAULTS", value)
    with pytest.raises(FinetuneConfigError, match=match):
        settings.dag_defaults("finetune_tutorial", known=("model_id",))
    errors = _bag(DAGS / "tutorial.py").import_errors  # in Airflow: an import error naming the key
    assert len(errors) == 1 and re.search(match, next(iter(errors.values())))


def test_the_shipped_dags_read_no_environment_variables():
    for path in sorted(DAGS.glob("*.py")):
        text = path.read_text()
        assert "os.environ" not in text and "getenv" not in text, f"{path.name} reads the environment"
