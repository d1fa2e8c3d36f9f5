"""Engine images and example manifests: hadolint, pins, non-root, no secrets, a complete lock, RBAC."""

from __future__ import annotations

import importlib.metadata as md
import re
import subprocess
import sys
from pathlib import Path

import kubernetes_validate
import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from airflow_provider_finetune.pods.serving import VLLM_IMAGES
from tests.provider.conftest import K8S_VERSIONS

ROOT = Path(__file__).resolve().parents[2]
IMAGES = ROOT / "images"
DOCKERFILES = {"cuda": IMAGES / "engine-cuda.Dockerfile", "rocm": IMAGES / "engine-rocm.Dockerfile"}
LOCK = IMAGES / "requirements-engine.txt"
BRIEF = [
    "torch",
    "transformers",
    "trl",
    "peft",
    "accelerate",
    "datasets",
    "bitsandbytes",
    "mlflow",
    "boto3",
    "huggingface-hub",
    "pydantic",
    "pyyaml",
    "tqdm",
    "psutil",
]


def _pins(path: Path) -> dict[str, tuple[str, str]]:
    """canonical name -> (name as written, version) of every ``name==version`` line."""
    out = {}
    for line in path.read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, _, version = line.partition("==")
            out[canonicalize_name(name)] = (name, version)
    return out


def _instructions(path: Path) -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", path.read_text())
    return [
        (ln.split()[0].upper(), ln.split(None, 1)[1] if " " in ln.strip() else "")
        for ln in text.splitlines()
        if ln.strip() and not ln.lstrip().startswith("#")
    ]


def test_hadolint_passes_without_a_config():
    assert not (ROOT / ".hadolint.yaml").exists() and not (IMAGES / ".hadolint.yaml").exists()
    assert sorted(IMAGES.glob("*.Dockerfile")) == sorted(DOCKERFILES.values()), (
        "a Dockerfile this suite does not lint"
    )
    proc = subprocess.run(
        [str(Path(sys.executable).parent / "hadolint"), *map(str, DOCKERFILES.values())],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("platform", sorted(DOCKERFILES))
def test_dockerfile_shape(platform):
    steps = _instructions(DOCKERFILES[platform])
    froms = [arg for op, arg in steps if op == "FROM"]
    assert len(froms) == 1 and re.match(r"^[a-z0-9./-]+:\d+(\.\d+)*[-a-z0-9.]*$", froms[0]), froms
    assert "latest" not in froms[0]
    assert (
        froms[0]
        == {"cuda": "nvidia/cuda:13.0.0-cudnn-runtime-ubuntu24.04", "rocm": "rocm/dev-ubuntu-24.04:7.2"}[
            platform
        ]
    )
    ops = [op for op, _ in steps]
    user = [arg for op, arg in steps if op == "USER"]
    assert user == ["1000:1000"] and ops.index("USER") > max(i for i, op in enumerate(ops) if op == "RUN")
    entry = next(arg for op, arg in steps if op == "ENTRYPOINT")
    assert yaml.safe_load(entry) == ["/usr/bin/tini", "--", "finetune-engine"]
    runs = " ".join(arg for op, arg in steps if op == "RUN")
    assert "torch==2.13.0" in runs and '--index-url "${TORCH_INDEX_URL}"' in runs
    assert "-r /opt/requirements-engine.txt" in runs
    assert '-c /opt/requirements-engine.txt "/opt/src/engine[train,storage]"' in runs and "pip check" in runs
    assert f"setuptools=={md.version('setuptools')}" in runs, "pin the setuptools the suite runs with"
    copies = [arg.split() for op, arg in steps if op == "COPY"]
    for src, _dst in copies:
        assert (ROOT / src).exists(), src
    # uid 1000 is taken by Ubuntu's own user in these bases: it must be replaced, not clashed with
    assert "userdel --remove ubuntu" in runs and "useradd --uid 1000" in runs


@pytest.mark.parametrize("platform", sorted(DOCKERFILES))
def test_no_secrets_in_images(platform):
    steps = _instructions(DOCKERFILES[platform])
    for op, arg in steps:
        if op in ("ARG", "ENV"):
            names = re.findall(r"([A-Za-z_][A-Za-z0-9_]*)=", arg) or [arg.split("=")[0]]
            for name in names:
                assert not re.search(r"TOKEN|SECRET|PASSWORD|API_?KEY|ACCESS_KEY", name), f"{op} {name}"
    text = DOCKERFILES[platform].read_text()
    assert "TOKEN" not in text
    assert not re.search(r"hf_[A-Za-z0-9]{20,}|AKIA[A-Z0-9]{16}|sk-[A-Za-z0-9]{16,}", text)
    assert "--mount=type=secret" not in text and "huggingface-cli login" not in text


def test_lock_pins_the_tested_versions():
    lock = _pins(LOCK)
    tested = _pins(ROOT / "constraints.txt")
    for key, (name, version) in lock.items():
        assert re.match(r"^\d+(\.\d+)*([a-z]+\d+)?(\.post\d+)?$", version), (
            f"{name}: not an exact pin ({version!r})"
        )
        assert key in tested, f"{name} is pinned for the image but not in constraints.txt"
        assert tested[key] == (name, version), (
            f"{name}: image {version}, tests {tested[key][1]} (spell it as constraints.txt does)"
        )
    for name in BRIEF:
        assert canonicalize_name(name) in lock, name
    assert lock["torch"][1] == "2.13.0" and lock["transformers"][1] == "5.23.0" and lock["trl"][1] == "1.16.0"


def test_lock_is_complete():
    """Everything finetune-engine[train,storage] pulls in on Linux/Python 3.12 is pinned (and nothing
    else)."""
    env = {
        "python_version": "3.12",
        "python_full_version": "3.12.3",
        "sys_platform": "linux",
        "platform_system": "Linux",
        "platform_machine": "x86_64",
        "implementation_name": "cpython",
        "platform_python_implementation": "CPython",
        "os_name": "posix",
    }
    seen: dict[str, set[str]] = {}

    def visit(name: str, extras: set[str]) -> None:
        key = canonicalize_name(name)
        first = key not in seen
        new = extras - seen.get(key, set())
        if not first and not new:
            return
        seen.setdefault(key, set()).update(extras)
        for raw in md.distribution(name).requires or []:
            req = Requirement(raw)
            wanted = ([""] if first else []) + sorted(new)
            if (
                req.marker is None
                and first
                or req.marker is not None
                and any(req.marker.evaluate({**env, "extra": e}) for e in wanted)
            ):
                visit(req.name, set(req.extras))

    visit("finetune-engine", {"train", "storage"})
    needed = set(seen) - {"finetune-engine", "setuptools"}  # setuptools: pinned in the Dockerfiles
    locked = set(_pins(LOCK))
    assert not needed - locked, f"missing from {LOCK.name}: {sorted(needed - locked)}"
    assert not locked - needed, f"not needed by the engine: {sorted(locked - needed)}"


def test_docs_name_the_pinned_bases_and_vllm_tags():
    readme = (IMAGES / "README.md").read_text()
    for path in DOCKERFILES.values():
        base = next(arg for op, arg in _instructions(path) if op == "FROM")
        index = re.search(r"TORCH_INDEX_URL=(\S+)", path.read_text()).group(1)
        assert base in readme and index in readme, path.name
    vllm = (IMAGES / "vllm.md").read_text()
    for image in VLLM_IMAGES.values():
        assert f"`{image}`" in vllm


# -- deploy/ examples ----------------------------------------------------------------------------

RBAC = ROOT / "deploy" / "rbac.yaml"


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_rbac_example_validates(version):
    for doc in yaml.safe_load_all(RBAC.read_text()):
        kubernetes_validate.validate(doc, version, strict=True)


def test_rbac_grants_what_the_operators_use_and_no_more():
    docs = {d["kind"]: d for d in yaml.safe_load_all(RBAC.read_text())}
    assert set(docs) == {"ServiceAccount", "Role", "RoleBinding"}, "namespaced only; no Secrets with values"
    rules = {
        (g, r): set(rule["verbs"])
        for rule in docs["Role"]["rules"]
        for g in rule["apiGroups"]
        for r in rule["resources"]
    }
    assert rules == {
        ("", "pods"): {"create", "get", "list", "watch", "patch", "delete"},
        ("", "pods/log"): {"get"},
        ("", "pods/exec"): {"create", "get"},
        ("", "events"): {"list", "watch"},
        ("apps", "deployments"): {"create", "get", "update", "patch", "delete"},
        ("apps", "deployments/status"): {"get"},
        ("", "services"): {"create", "get", "patch", "delete"},
        ("", "services/proxy"): {"create"},
        ("trainer.kubeflow.org", "trainjobs"): {"create", "get", "delete"},
        ("kubeflow.org", "pytorchjobs"): {"create", "get", "delete"},
    }
    assert not any("*" in v or "secrets" in r for (_, r), v in rules.items())
    binding = docs["RoleBinding"]
    assert binding["roleRef"]["name"] == docs["Role"]["metadata"]["name"]
    assert binding["subjects"][0]["name"] == docs["ServiceAccount"]["metadata"]["name"]
    assert "rbac.yaml" in (ROOT / "deploy" / "README.md").read_text()
