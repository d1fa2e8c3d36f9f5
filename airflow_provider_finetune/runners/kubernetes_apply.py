"""Create-or-replace and delete the objects that serve a model on the cluster.

DeployVLLMOperator applies its Deployment, Service and optional Ingress / HTTPRoute with
``KubernetesApplier.apply``; UndeployVLLMOperator removes them with ``KubernetesApplier.delete``.
One table (``KubernetesApplier.verbs``) says which client call creates, updates and deletes each
kind, so the two operators cannot disagree about an object.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, NamedTuple


@dataclass(frozen=True)
class Verbs:
    """The client calls for one kind; each takes ``namespace=`` (and ``name=``, ``body=``)."""

    create: Callable[..., Any]
    update: Callable[..., Any]
    delete: Callable[..., Any]


class Target(NamedTuple):
    """An object to delete by name: ``optional`` ones may be absent or not ours to delete (403)."""

    kind: str
    api_version: str
    optional: bool = False


class KubernetesApplier:
    """Apply or delete manifests of the kinds in ``verbs`` through one Kubernetes API client."""

    def __init__(self, api_client: Any, log: Any) -> None:
        from kubernetes import client

        self.apps = client.AppsV1Api(api_client)
        self.core = client.CoreV1Api(api_client)
        self.networking = client.NetworkingV1Api(api_client)
        self.custom = client.CustomObjectsApi(api_client)
        self.log = log

    def verbs(self, kind: str, api_version: str) -> Verbs:
        if kind == "Deployment":
            return Verbs(
                self.apps.create_namespaced_deployment,
                self.apps.replace_namespaced_deployment,
                self.apps.delete_namespaced_deployment,
            )
        if kind == "Service":
            return Verbs(
                self.core.create_namespaced_service,
                self.core.patch_namespaced_service,
                self.core.delete_namespaced_service,
            )
        if kind == "Ingress":
            return Verbs(
                self.networking.create_namespaced_ingress,
                self.networking.replace_namespaced_ingress,
                self.networking.delete_namespaced_ingress,
            )
        if (
            kind == "HTTPRoute"
        ):  # a custom resource: an update without resourceVersion is refused, so merge-patch it
            group, version = api_version.split("/")
            return Verbs(
                *(
                    functools.partial(call, group, version, plural="httproutes")
                    for call in (
                        self.custom.create_namespaced_custom_object,
                        self.custom.patch_namespaced_custom_object,
                        self.custom.delete_namespaced_custom_object,
                    )
                )
            )
        raise ValueError(
            f"cannot apply kind {kind!r} ({api_version}): only Deployment, Service, Ingress and HTTPRoute"
        )

    def apply(self, docs: Iterable[dict[str, Any]], namespace: str) -> None:
        """Create each object, or update it when it exists (409): a retry or a new run updates the same
        objects."""
        from kubernetes.client.exceptions import ApiException

        steps = [
            (doc, self.verbs(doc["kind"], doc["apiVersion"])) for doc in docs
        ]  # an unknown kind fails before any call
        for doc, verbs in steps:
            kind, name = doc["kind"], doc["metadata"]["name"]
            try:
                verbs.create(namespace=namespace, body=doc)
                self.log.info("created %s %s/%s", kind, namespace, name)
            except ApiException as err:
                if err.status != 409:
                    raise RuntimeError(
                        f"Failed to create {kind} {namespace}/{name}: {err.status} {err.reason}"
                    ) from err
                verbs.update(name=name, namespace=namespace, body=doc)
                self.log.info("updated %s %s/%s", kind, namespace, name)

    def delete(self, targets: Iterable[Target], name: str, namespace: str) -> bool:
        """Delete ``name`` of each target kind; True when anything was deleted. Absent (404) is fine;
        an optional target that RBAC does not let us delete (403) is skipped with a warning."""
        from kubernetes.client.exceptions import ApiException

        removed = False
        for target in targets:
            try:
                self.verbs(target.kind, target.api_version).delete(name=name, namespace=namespace)
                self.log.info("deleted %s %s/%s", target.kind, namespace, name)
                removed = True
            except ApiException as err:
                if err.status == 404:
                    continue
                if target.optional and err.status == 403:
                    self.log.warning(
                        "not allowed to delete %s %s/%s (RBAC); skipped", target.kind, namespace, name
                    )
                    continue
                raise
        return removed
