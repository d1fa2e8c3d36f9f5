"""The Kubernetes *restricted* Pod Security Standard, checked on a manifest (dict).

Works on a Pod, a Deployment/Job (spec.template), a PyTorchJob (every replica's template) and a
TrainJob pod template override; returns readable violations (empty = compliant).
"""

from __future__ import annotations

ALLOWED_VOLUMES = {"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim", "projected", "secret"}
ALLOWED_CAPS = {"NET_BIND_SERVICE"}
SAFE_SYSCTLS = {"kernel.shm_rmid_forced", "net.ipv4.ip_local_port_range", "net.ipv4.ip_unprivileged_port_start",
                "net.ipv4.tcp_syncookies", "net.ipv4.ping_group_range", "net.ipv4.ip_local_reserved_ports",
                "net.ipv4.tcp_keepalive_time", "net.ipv4.tcp_fin_timeout", "net.ipv4.tcp_keepalive_intvl",
                "net.ipv4.tcp_keepalive_probes"}


def pod_specs(doc: dict) -> list[tuple[str, dict]]:
    """(where, pod spec) pairs inside any supported manifest."""
    kind = doc.get("kind")
    spec = doc.get("spec") or {}
    if kind == "Pod":
        return [("spec", spec)]
    if kind == "PyTorchJob":
        return [(f"spec.pytorchReplicaSpecs.{name}.template.spec", r.get("template", {}).get("spec", {}))
                for name, r in (spec.get("pytorchReplicaSpecs") or {}).items()]
    if kind == "TrainJob":
        out = []
        for i, o in enumerate(spec.get("podTemplateOverrides") or []):
            if o.get("spec"):
                out.append((f"spec.podTemplateOverrides[{i}].spec", o["spec"]))
        return out
    if "template" in spec:
        return [("spec.template.spec", spec["template"].get("spec") or {})]
    return []


def _container_issues(where: str, c: dict, pod_sc: dict) -> list[str]:
    out = []
    sc = c.get("securityContext") or {}
    name = f"{where} container {c.get('name')!r}"
    if sc.get("privileged"):
        out.append(f"{name}: privileged")
    if sc.get("allowPrivilegeEscalation") is not False:
        out.append(f"{name}: allowPrivilegeEscalation must be false")
    caps = sc.get("capabilities") or {}
    if "ALL" not in (caps.get("drop") or []):
        out.append(f"{name}: capabilities must drop ALL")
    extra = set(caps.get("add") or []) - ALLOWED_CAPS
    if extra:
        out.append(f"{name}: adds capabilities {sorted(extra)}")
    if not (sc.get("runAsNonRoot") is True or (pod_sc.get("runAsNonRoot") is True and sc.get("runAsNonRoot") is not False)):
        out.append(f"{name}: runAsNonRoot must be true")
    if sc.get("runAsUser") == 0 or (sc.get("runAsUser") is None and pod_sc.get("runAsUser") == 0):
        out.append(f"{name}: runAsUser 0 (root)")
    seccomp = (sc.get("seccompProfile") or {}).get("type") or (pod_sc.get("seccompProfile") or {}).get("type")
    if seccomp not in ("RuntimeDefault", "Localhost"):
        out.append(f"{name}: seccompProfile must be RuntimeDefault or Localhost")
    if sc.get("procMount") not in (None, "Default"):
        out.append(f"{name}: procMount {sc.get('procMount')}")
    for p in c.get("ports") or []:
        if p.get("hostPort"):
            out.append(f"{name}: hostPort {p['hostPort']}")
    if (sc.get("appArmorProfile") or {}).get("type") not in (None, "RuntimeDefault", "Localhost"):
        out.append(f"{name}: AppArmor profile {sc['appArmorProfile']['type']}")
    selinux = sc.get("seLinuxOptions") or {}
    if selinux.get("user") or selinux.get("role") or selinux.get("type") not in (None, "", "container_t", "container_init_t", "container_kvm_t"):
        out.append(f"{name}: custom SELinux options")
    return out


def restricted_violations(doc: dict) -> list[str]:
    specs = pod_specs(doc)
    if not specs:
        return [f"{doc.get('kind')}: no pod spec found to check"]
    out: list[str] = []
    for where, spec in specs:
        sc = spec.get("securityContext") or {}
        for flag in ("hostNetwork", "hostPID", "hostIPC"):
            if spec.get(flag):
                out.append(f"{where}: {flag}")
        for v in spec.get("volumes") or []:
            types = set(v) - {"name"}
            if not types <= ALLOWED_VOLUMES:
                out.append(f"{where} volume {v.get('name')!r}: type {sorted(types - ALLOWED_VOLUMES)} not allowed")
        for s in sc.get("sysctls") or []:
            if s.get("name") not in SAFE_SYSCTLS:
                out.append(f"{where}: unsafe sysctl {s.get('name')}")
        if sc.get("runAsUser") == 0:
            out.append(f"{where}: pod runAsUser 0 (root)")
        if (sc.get("appArmorProfile") or {}).get("type") not in (None, "RuntimeDefault", "Localhost"):
            out.append(f"{where}: AppArmor profile {sc['appArmorProfile']['type']}")
        for group in ("initContainers", "containers", "ephemeralContainers"):
            for c in spec.get(group) or []:
                out += _container_issues(where, c, sc)
    return out
