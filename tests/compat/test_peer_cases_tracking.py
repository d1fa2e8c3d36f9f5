"""The Silogen engine's tests/test_tracking.py, case by case: where MLflow settings come from
(the peer's setup_tracking; here finetune_engine.tracking.resolve_tracking, which returns the
settings instead of calling mlflow)."""

from __future__ import annotations

from finetune_engine.config.schema import Tracking
from finetune_engine.tracking import resolve_tracking

CONF = {"mlflow_server_uri": "file:///mlruns", "experiment_name": "conf", "hf_mlflow_log_artifacts": "False"}


def test_setup_tracking_args_over_conf():
    """Restates test_tracking.py::test_setup_tracking_args_over_conf: with a server URI on the
    command line, the command line's experiment name wins over the config's."""
    settings = resolve_tracking(
        Tracking(**CONF), cli_uri="file:///mlruns", cli_experiment="args", cli_log_artifacts="False", env={}
    )
    assert settings.enabled
    assert settings.experiment == "args"


def test_setup_tracking_conf_over_env():
    """Restates test_tracking.py::test_setup_tracking_conf_over_env: without a server URI on the
    command line, the config's tracking section is used as a whole (experiment "conf", although
    the command line names "args"), also when MLFLOW_TRACKING_URI is set."""
    settings = resolve_tracking(
        Tracking(**CONF),
        cli_uri=None,
        cli_experiment="args",
        cli_log_artifacts="False",
        env={"MLFLOW_TRACKING_URI": "file:///mlruns"},
    )
    assert settings.enabled
    assert settings.experiment == "conf"


def test_setup_tracking_disabled():
    """Restates test_tracking.py::test_setup_tracking_disabled: no tracking section, no server URI
    on the command line and no MLFLOW_TRACKING_URI: MLflow is off."""
    settings = resolve_tracking(
        Tracking(), cli_uri=None, cli_experiment="args", cli_log_artifacts="False", env={}
    )
    assert not settings.enabled
