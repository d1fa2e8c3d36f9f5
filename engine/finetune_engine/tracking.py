"""MLflow settings with the seed's precedence: command line > config file > environment."""

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
    if env.get("DISABLE_MLFLOW_INTEGRATION", "").lower() in _TRUE and not cli_uri:
        return TrackingSettings(None, None, False, None)
    uri = cli_uri or cfg.mlflow_server_uri or env.get("MLFLOW_TRACKING_URI") or None
    experiment = cli_experiment or cfg.experiment_name or env.get("MLFLOW_EXPERIMENT_NAME") or None
    if cli_log_artifacts is not None:
        log_artifacts = str(cli_log_artifacts).lower() in _TRUE
    elif cfg.hf_mlflow_log_artifacts:
        log_artifacts = True
    else:
        log_artifacts = env.get("HF_MLFLOW_LOG_ARTIFACTS", "").lower() in _TRUE
    return TrackingSettings(uri, experiment or ("default" if uri else None), log_artifacts, cfg.run_name)
