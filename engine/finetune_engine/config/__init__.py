"""Experiment config: schema, loading with overrides, batch-size derivation. No torch here."""

from finetune_engine.config.errors import ConfigError
from finetune_engine.config.loader import (
    apply_overrides,
    load_config,
    parse_config,
    read_config_file,
    read_config_yaml,
)

__all__ = [
    "ConfigError",
    "apply_overrides",
    "load_config",
    "parse_config",
    "read_config_file",
    "read_config_yaml",
]
