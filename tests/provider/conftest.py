"""Provider test helpers: golden files, the official schemas (kubernetes-validate, Kubeflow CRDs).

The Kubeflow CRD schemas (Apache License 2.0, the Kubeflow Authors) are read, never copied in,
from ``shared/crds/`` beside the checkout, or from ``$FINETUNE_CRDS_DIR``:

- ``trainer.kubeflow.org_trainjobs.yaml`` (and the training runtimes): Kubeflow Trainer v2,
  https://github.com/kubeflow/trainer ``manifests/base/crds/`` at commit 8c0f505 (2026-08-21);
- ``kubeflow.org_pytorchjobs.yaml``: Training Operator v1 PyTorchJob,
  https://github.com/kubeflow/training-operator (now kubeflow/trainer) branch ``release-1.9``,
  ``manifests/base/crds/``.

Without them the schema tests skip, saying where the files are expected; with ``CI`` set
(``CI=true``, as CI services do) a missing schema is a failure instead, so CI never passes
without having validated the manifests.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any

import pytest
import yaml

GOLDEN = Path(__file__).parent / "golden"
# shared/ beside the checkout (…/shared/crds next to …/main), or $FINETUNE_CRDS_DIR; never copied in.
CRDS = Path(os.environ.get("FINETUNE_CRDS_DIR") or Path(__file__).resolve().parents[3] / "shared" / "crds")
K8S_VERSIONS = [f"1.{m}" for m in range(29, 38)]
CANARY = "sk-canary-3f9a7c1e5b2d"


def assert_golden(name: str, doc: Any) -> None:
    """Compare ``doc`` rendered as YAML with golden/<name>.yaml; UPDATE_GOLDEN=1 rewrites it."""
    path = GOLDEN / f"{name}.yaml"
    text = yaml.safe_dump(doc, sort_keys=True)
    assert "&id0" not in text, f"{name}: objects share a mutable dict (YAML anchors); build fresh ones"
    if os.environ.get("UPDATE_GOLDEN") == "1":
        path.parent.mkdir(exist_ok=True)
        path.write_text(text)
    assert path.exists(), f"{path.name} missing; create it with UPDATE_GOLDEN=1"
    assert text == path.read_text(), (
        f"{path.name} changed; review the diff and rerun with UPDATE_GOLDEN=1 if intended"
    )


def strict(schema: dict) -> dict:
    """The CRD schema with unknown fields rejected (the API server would prune them silently)."""
    if not isinstance(schema, dict):
        return schema
    out = {
        k: strict(v) if isinstance(v, dict) else ([strict(i) for i in v] if isinstance(v, list) else v)
        for k, v in schema.items()
    }
    if (
        "properties" in out
        and "additionalProperties" not in out
        and not out.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    if "properties" in out:
        out["properties"] = {k: strict(v) for k, v in out["properties"].items()}
    return out


def crd_schema(filename: str) -> dict:
    """The storage version's openAPIV3Schema of a Kubeflow CRD, strict; skips when shared/ is absent."""
    path = CRDS / filename
    if not path.exists():
        why = (
            f"Kubeflow CRD schema {filename} not found in {CRDS}: it is read from shared/crds beside the "
            "checkout or from $FINETUNE_CRDS_DIR (sources in "
            "tests/provider/conftest.py), never copied into the repository"
        )
        if in_ci():
            pytest.fail(f"{why}; CI must validate the multi-node manifests, so a missing schema fails there")
        pytest.skip(why)
    return _load_crd_schema(path)


def in_ci() -> bool:
    """CI services set CI=true (GitHub Actions, GitLab, Buildkite, ...); 0/false/empty mean no."""
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


@functools.cache
def _load_crd_schema(path: Path) -> dict:
    crd = yaml.safe_load(path.read_text())
    version = next(v for v in crd["spec"]["versions"] if v.get("storage"))
    return strict(version["schema"]["openAPIV3Schema"])


def containers(doc: dict) -> list[dict]:
    """Every container (init, main, ephemeral) of every pod template in ``doc``."""
    from airflow_provider_finetune.pods.security import CONTAINER_GROUPS, pod_specs

    out = [c for _, spec, _ in pod_specs(doc) for group in CONTAINER_GROUPS for c in spec.get(group) or []]
    if doc.get("kind") == "TrainJob":
        out.append({"name": "trainer", "env": doc["spec"]["trainer"].get("env", [])})
    return out
