"""MLflow settings, chosen as the Silogen engine chooses them.

One source wins as a whole, never key by key:

1. ``--mlflow-server-uri`` on the command line: its URI, ``--experiment-name`` (default
   ``default``) and ``--hf-mlflow-log-artifacts`` (default ``False``); the config's tracking
   section is not read.
2. Otherwise the config's tracking section, when it names ``mlflow_server_uri``: its URI,
   experiment and ``hf_mlflow_log_artifacts``; the command line's experiment name and the
   environment are not read.
3. Otherwise ``MLFLOW_TRACKING_URI`` from the environment, with ``MLFLOW_EXPERIMENT_NAME`` and
   ``HF_MLFLOW_LOG_ARTIFACTS``. A tracking section without a URI (which the Silogen engine does not
   accept) still gives its experiment name here.
4. Otherwise MLflow is off. ``DISABLE_MLFLOW_INTEGRATION=TRUE`` turns it off in every case.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

from finetune_engine.config import schema

log = logging.getLogger(__name__)
_TRUE = {"1", "true", "yes", "on"}


@dataclass(frozen=True)
class TrackingSettings:
    uri: str | None
    experiment: str | None
    log_artifacts: bool
    run_name: str | None

    @property
    def enabled(self) -> bool:
        return self.uri is not None


def resolve_tracking(
    cfg: schema.Tracking,
    cli_uri: str | None = None,
    cli_experiment: str | None = None,
    cli_log_artifacts: str | None = None,
    env: dict[str, str] | None = None,
) -> TrackingSettings:
    env = dict(os.environ if env is None else env)
    if _true(env.get("DISABLE_MLFLOW_INTEGRATION")):
        return TrackingSettings(None, None, False, None)
    if cli_uri:
        return TrackingSettings(cli_uri, cli_experiment or "default", _true(cli_log_artifacts), cfg.run_name)
    # the config's experiment name, else the environment's (rules 2 and 3)
    experiment = cfg.experiment_name or env.get("MLFLOW_EXPERIMENT_NAME") or "default"
    if cfg.mlflow_server_uri:
        return TrackingSettings(
            cfg.mlflow_server_uri, experiment, bool(cfg.hf_mlflow_log_artifacts), cfg.run_name
        )
    uri = env.get("MLFLOW_TRACKING_URI") or None
    if uri is None:
        return TrackingSettings(None, None, False, None)
    return TrackingSettings(uri, experiment, _true(env.get("HF_MLFLOW_LOG_ARTIFACTS")), cfg.run_name)


def _true(value: str | bool | None) -> bool:
    return str(value).lower() in _TRUE if value is not None else False
