"""The Kubernetes *restricted* Pod Security Standard, checked on a manifest (dict or model object).

Follows https://kubernetes.io/docs/concepts/security/pod-security-standards/ (baseline + restricted
controls) for containers, initContainers and ephemeralContainers. Works on a Pod, a bare PodSpec,
anything with ``spec.template`` (Deployment, Job, ReplicaSet, StatefulSet, DaemonSet), a CronJob,
a PyTorchJob (every replica) and a TrainJob (runtimePatches / podTemplateOverrides pod patches).
Returns readable violations; an empty list means compliant.
"""

from __future__ import annotations

from typing import Any

ALLOWED_VOLUMES = {
    "configMap",
    "csi",
    "downwardAPI",
    "emptyDir",
    "ephemeral",
    "persistentVolumeClaim",
    "projected",
    "secret",
}
ALLOWED_CAPS = {"NET_BIND_SERVICE"}
SAFE_SYSCTLS = {
    "kernel.shm_rmid_forced",
    "net.ipv4.ip_local_port_range",
    "net.ipv4.ip_unprivileged_port_start",
    "net.ipv4.tcp_syncookies",
    "net.ipv4.ping_group_range",
    "net.ipv4.ip_local_reserved_ports",
    "net.ipv4.tcp_keepalive_time",
    "net.ipv4.tcp_fin_timeout",
    "net.ipv4.tcp_keepalive_intvl",
    "net.ipv4.tcp_keepalive_probes",
}
SECCOMP_OK = ("RuntimeDefault", "Localhost")
APPARMOR_OK = (None, "RuntimeDefault", "Localhost")
SELINUX_TYPES = ("", "container_t", "container_init_t", "container_kvm_t", "container_engine_t")
CONTAINER_GROUPS = ("initContainers", "containers", "ephemeralContainers")
_APPARMOR_ANNOTATION = "container.apparmor.security.beta.kubernetes.io/"


class PodSecurityViolation(ValueError):
    """A manifest that the restricted Pod Security Standard would reject."""


def _as_dict(obj: Any) -> dict:
    if isinstance(obj, dict):
        return obj
    from kubernetes.client import ApiClient

    return ApiClient().sanitize_for_serialization(obj)


def pod_specs(doc: dict) -> list[tuple[str, dict, dict]]:
    """(where, pod spec, pod metadata) for every pod template inside a supported manifest."""
    kind = doc.get("kind")
    spec = doc.get("spec") or {}
    if kind is None and ("containers" in doc or "initContainers" in doc):
        return [("podSpec", doc, {})]
    if kind == "Pod":
        return [("spec", spec, doc.get("metadata") or {})]
    if kind == "PyTorchJob":
        return [
            (
                f"spec.pytorchReplicaSpecs.{name}.template.spec",
                (r.get("template") or {}).get("spec") or {},
                (r.get("template") or {}).get("metadata") or {},
            )
            for name, r in (spec.get("pytorchReplicaSpecs") or {}).items()
        ]
    if kind == "TrainJob":
        out = []
        for i, patch in enumerate(spec.get("runtimePatches") or []):
            jobs = (((patch.get("trainingRuntimeSpec") or {}).get("template") or {}).get("spec") or {}).get(
                "replicatedJobs"
            ) or []
            for job in jobs:
                pod = ((job.get("template") or {}).get("spec") or {}).get("template") or {}
                if pod.get("spec"):
                    out.append(
                        (
                            f"spec.runtimePatches[{i}].replicatedJobs.{job.get('name')}.template.spec.template.spec",
                            pod["spec"],
                            pod.get("metadata") or {},
                        )
                    )
        for i, o in enumerate(spec.get("podTemplateOverrides") or []):  # older v1alpha1 CRDs
            if o.get("spec"):
                out.append((f"spec.podTemplateOverrides[{i}].spec", o["spec"], o.get("metadata") or {}))
        return out
    if kind == "CronJob":
        template = ((spec.get("jobTemplate") or {}).get("spec") or {}).get("template") or {}
        return [
            (
                "spec.jobTemplate.spec.template.spec",
                template.get("spec") or {},
                template.get("metadata") or {},
            )
        ]
    if "template" in spec:
        return [
            ("spec.template.spec", spec["template"].get("spec") or {}, spec["template"].get("metadata") or {})
        ]
    return []


def _container_issues(where: str, c: dict, pod_sc: dict, annotations: dict) -> list[str]:
    out = []
    sc = c.get("securityContext") or {}
    name = f"{where} container {c.get('name')!r}"
    if sc.get("privileged"):
        out.append(f"{name}: privileged")
    if (sc.get("windowsOptions") or {}).get("hostProcess"):
        out.append(f"{name}: windowsOptions.hostProcess")
    if sc.get("allowPrivilegeEscalation") is not False:
        out.append(f"{name}: allowPrivilegeEscalation must be false")
    caps = sc.get("capabilities") or {}
    if "ALL" not in (caps.get("drop") or []):
        out.append(f"{name}: capabilities must drop ALL")
    extra = set(caps.get("add") or []) - ALLOWED_CAPS
    if extra:
        out.append(f"{name}: adds capabilities {sorted(extra)} (only NET_BIND_SERVICE is allowed)")
    if sc.get("runAsNonRoot") is False or not (
        sc.get("runAsNonRoot") is True or pod_sc.get("runAsNonRoot") is True
    ):
        out.append(f"{name}: runAsNonRoot must be true (container or pod)")
    if sc.get("runAsUser") == 0:
        out.append(f"{name}: runAsUser 0 (root)")
    seccomp = (sc.get("seccompProfile") or {}).get("type")
    if seccomp is not None and seccomp not in SECCOMP_OK:
        out.append(f"{name}: seccompProfile {seccomp} (use RuntimeDefault or Localhost)")
    if seccomp is None and (pod_sc.get("seccompProfile") or {}).get("type") is None:
        out.append(f"{name}: no seccompProfile (set RuntimeDefault on the pod or the container)")
    if sc.get("procMount") not in (None, "Default"):
        out.append(f"{name}: procMount {sc.get('procMount')}")
    for p in c.get("ports") or []:
        if p.get("hostPort"):
            out.append(f"{name}: hostPort {p['hostPort']}")
    apparmor = (sc.get("appArmorProfile") or {}).get("type")
    if apparmor not in APPARMOR_OK:
        out.append(f"{name}: AppArmor profile {apparmor}")
    legacy = annotations.get(_APPARMOR_ANNOTATION + str(c.get("name")))
    if legacy is not None and legacy != "runtime/default" and not legacy.startswith("localhost/"):
        out.append(f"{name}: AppArmor annotation {legacy}")
    out += _selinux_issues(name, sc.get("seLinuxOptions") or {})
    return out


def _selinux_issues(name: str, selinux: dict) -> list[str]:
    out = []
    if selinux.get("user") or selinux.get("role"):
        out.append(f"{name}: SELinux user/role must not be set")
    if selinux.get("type", "") not in SELINUX_TYPES:
        out.append(f"{name}: SELinux type {selinux.get('type')}")
    return out


def restricted_violations(doc: Any) -> list[str]:
    """Every way ``doc`` breaks the restricted Pod Security Standard (empty list: compliant)."""
    doc = _as_dict(doc)
    specs = pod_specs(doc)
    if not specs:
        return [f"{doc.get('kind')}: no pod spec found to check"]
    out: list[str] = []
    for where, spec, metadata in specs:
        sc = spec.get("securityContext") or {}
        annotations = metadata.get("annotations") or {}
        for flag in ("hostNetwork", "hostPID", "hostIPC"):
            if spec.get(flag):
                out.append(f"{where}: {flag}")
        for v in spec.get("volumes") or []:
            types = set(v) - {"name"}
            if not types <= ALLOWED_VOLUMES:
                out.append(
                    f"{where} volume {v.get('name')!r}: type {sorted(types - ALLOWED_VOLUMES)} not allowed"
                )
        for s in sc.get("sysctls") or []:
            if s.get("name") not in SAFE_SYSCTLS:
                out.append(f"{where}: unsafe sysctl {s.get('name')}")
        if sc.get("runAsUser") == 0:
            out.append(f"{where}: pod runAsUser 0 (root)")
        if sc.get("runAsNonRoot") is False:
            out.append(f"{where}: pod runAsNonRoot false")
        if (sc.get("seccompProfile") or {}).get("type") not in (None, *SECCOMP_OK):
            out.append(f"{where}: pod seccompProfile {sc['seccompProfile']['type']}")
        if (sc.get("appArmorProfile") or {}).get("type") not in APPARMOR_OK:
            out.append(f"{where}: pod AppArmor profile {sc['appArmorProfile']['type']}")
        if (sc.get("windowsOptions") or {}).get("hostProcess"):
            out.append(f"{where}: pod windowsOptions.hostProcess")
        out += _selinux_issues(f"{where} pod", sc.get("seLinuxOptions") or {})
        for group in CONTAINER_GROUPS:
            for c in spec.get(group) or []:
                out += _container_issues(where, c, sc, annotations)
    return out


def check_restricted(doc: Any) -> None:
    """Raise PodSecurityViolation (a ValueError) naming the object and every violation."""
    problems = restricted_violations(doc)
    if problems:
        d = _as_dict(doc)
        meta = d.get("metadata") or {}
        what = f"{d.get('kind', 'PodSpec')} {meta.get('namespace') or '-'}/{meta.get('name') or '-'}"
        raise PodSecurityViolation(
            f"{what} violates the restricted Pod Security Standard:\n  " + "\n  ".join(problems)
        )


def secret_violations(doc: Any) -> list[str]:
    """Every way ``doc`` could carry or expose a credential: a plain env value that is (or is named
    like) one, a command argument that looks like a token, ``envFrom`` (a whole Secret or ConfigMap
    as env), a Secret volume, or a service account token mounted on purpose. Values are never echoed."""
    from airflow_provider_finetune.pods.spec import refuse_secret_values

    doc = _as_dict(doc)
    out: list[str] = []
    groups = [
        (where, c, spec)
        for where, spec, _ in pod_specs(doc)
        for g in CONTAINER_GROUPS
        for c in spec.get(g) or []
    ]
    if doc.get("kind") == "TrainJob":
        trainer = (doc.get("spec") or {}).get("trainer") or {}
        groups.append(("spec", {"name": "trainer", **trainer}, {}))
    for where, c, _ in groups:
        name = f"{where} container {c.get('name')!r}"
        plain = {e.get("name"): e.get("value") for e in c.get("env") or [] if "valueFrom" not in e}
        try:
            refuse_secret_values(name, plain, [*(c.get("command") or []), *(c.get("args") or [])])
        except ValueError as err:
            out.append(str(err))
        if c.get("envFrom"):
            out.append(f"{name}: envFrom (a whole Secret or ConfigMap as env); use secretKeyRef per variable")
    for where, spec, metadata in pod_specs(doc):
        for v in spec.get("volumes") or []:
            if "secret" in v or any(
                "secret" in (s or {}) for s in (v.get("projected") or {}).get("sources") or []
            ):
                out.append(f"{where} volume {v.get('name')!r}: mounts a Secret")
        if spec.get("automountServiceAccountToken") is True:
            out.append(f"{where}: automountServiceAccountToken true (the pods need no API access)")
        try:
            refuse_secret_values(
                where, {}, [], metadata.get("labels") or {}, metadata.get("annotations") or {}
            )
        except ValueError as err:
            out.append(str(err))
    meta = doc.get("metadata") or {}
    try:
        refuse_secret_values("metadata", {}, [], meta.get("labels") or {}, meta.get("annotations") or {})
    except ValueError as err:
        out.append(str(err))
    return out


def check_sent(doc: Any) -> None:
    """What the provider sends to the API server, checked last: the restricted Pod Security Standard
    and the secret guard (:func:`secret_violations`). Raises PodSecurityViolation naming the object
    and every problem."""
    problems = restricted_violations(doc) + secret_violations(doc)
    if problems:
        d = _as_dict(doc)
        meta = d.get("metadata") or {}
        what = f"{d.get('kind', 'PodSpec')} {meta.get('namespace') or '-'}/{meta.get('name') or '-'}"
        raise PodSecurityViolation(
            f"{what} is not sent: it breaks the provider's pod rules:\n  " + "\n  ".join(problems)
        )
