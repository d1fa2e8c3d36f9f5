"""Provider test helpers: the official schemas (kubernetes-validate, Kubeflow CRDs)."""

from __future__ import annotations

import functools
from pathlib import Path

import pytest
import yaml

CRDS = Path(__file__).resolve().parents[3] / "shared" / "crds"
K8S_VERSIONS = [f"1.{m}" for m in range(29, 38)]


def strict(schema: dict) -> dict:
    """The CRD schema with unknown fields rejected (the API server would prune them silently)."""
    if not isinstance(schema, dict):
        return schema
    out = {k: strict(v) if isinstance(v, dict) else ([strict(i) for i in v] if isinstance(v, list) else v) for k, v in schema.items()}
    if "properties" in out and "additionalProperties" not in out and not out.get("x-kubernetes-preserve-unknown-fields"):
        out["additionalProperties"] = False
    if "properties" in out:
        out["properties"] = {k: strict(v) for k, v in out["properties"].items()}
    return out


def crd_schema(filename: str) -> dict:
    path = CRDS / filename
    if not path.exists():
        pytest.skip(f"Kubeflow CRD schemas not found at {CRDS} (the shared/ directory beside the checkout); "
                    "they are read from there, never copied into the repository")
    return _load_crd_schema(filename)


@functools.cache
def _load_crd_schema(filename: str) -> dict:
    path = CRDS / filename
    if not path.exists():
        pytest.skip(f"Kubeflow CRD schemas not found at {CRDS} (the shared/ directory beside the checkout); "
                    "they are read from there, never copied into the repository")
    crd = yaml.safe_load(path.read_text())
    version = next(v for v in crd["spec"]["versions"] if v.get("storage"))
    return strict(version["schema"]["openAPIV3Schema"])
