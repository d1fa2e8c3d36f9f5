"""YAML as the engine reads it: PyYAML's safe loader plus YAML 1.2 floats.

PyYAML follows YAML 1.1, where a float needs a dot: ``5e-05`` and ``1e-6`` are strings. Helm (Go)
writes small numbers exactly that way, so a config rendered by a Helm chart (the Silogen engine's
chart renders ``learning_rate: 5e-05``) would carry a string where a number was meant. This loader
reads them as the floats YAML 1.2 says they are.
"""

from __future__ import annotations

import re
from typing import Any

import yaml


class EngineYamlLoader(yaml.SafeLoader):
    """SafeLoader that also resolves exponent-only floats (``5e-05``, ``1E+3``, ``-2e4``)."""


EngineYamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def safe_load(text: str | bytes) -> Any:
    """``yaml.safe_load`` with YAML 1.2 exponent floats."""
    return yaml.load(text, Loader=EngineYamlLoader)  # noqa: S506 - a SafeLoader subclass
