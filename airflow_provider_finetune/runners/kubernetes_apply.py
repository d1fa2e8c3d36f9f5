"""Create-or-replace and delete the objects that serve a model on the cluster.

DeployVLLMOperator applies its Deployment, Service and optional Ingress / HTTPRoute / NetworkPolicy
(or a KServe InferenceService) with
``KubernetesApplier.apply``; UndeployVLLMOperator removes them with ``KubernetesApplier.delete``.
One table (``KubernetesApplier.verbs``) says which client call reads, creates, updates and deletes
each kind, so the two operators cannot disagree about an object.

Only objects the provider made are replaced or deleted: an existing object of the same name without
the label ``app.kubernetes.io/managed-by: airflow-provider-finetune`` is refused before anything
is written or deleted.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, NamedTuple

from airflow_provider_finetune.exceptions import FinetuneConfigError

MANAGED_BY_KEY = "app.kubernetes.io/managed-by"
MANAGED_BY_VALUE = "airflow-provider-finetune"
CUSTOM_PLURALS = {"HTTPRoute": "httproutes", "InferenceService": "inferenceservices"}


@dataclass(frozen=True)
class Verbs:
    """The client calls for one kind; each takes ``namespace=`` (and ``name=``, ``body=``)."""

    create: Callable[..., Any]
    update: Callable[..., Any]
    delete: Callable[..., Any]
    read: Callable[..., Any]


def labels_of(obj: Any) -> dict[str, str]:
    meta = obj.get("metadata") if isinstance(obj, dict) else getattr(obj, "metadata", None)
    labels = meta.get("labels") if isinstance(meta, dict) else getattr(meta, "labels", None)
    return dict(labels or {})


def is_managed(obj: Any) -> bool:
    """True when the object carries the provider's managed-by label."""
    return labels_of(obj).get(MANAGED_BY_KEY) == MANAGED_BY_VALUE


class ForeignObjectError(FinetuneConfigError):
    """An object of the name the provider would use exists, and the provider did not make it."""


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
                self.apps.read_namespaced_deployment,
            )
        if kind == "Service":
            return Verbs(
                self.core.create_namespaced_service,
                self.core.patch_namespaced_service,
                self.core.delete_namespaced_service,
                self.core.read_namespaced_service,
            )
        if kind == "Ingress":
            return Verbs(
                self.networking.create_namespaced_ingress,
                self.networking.replace_namespaced_ingress,
                self.networking.delete_namespaced_ingress,
                self.networking.read_namespaced_ingress,
            )
        if kind == "NetworkPolicy":
            return Verbs(
                self.networking.create_namespaced_network_policy,
                self.networking.replace_namespaced_network_policy,
                self.networking.delete_namespaced_network_policy,
                self.networking.read_namespaced_network_policy,
            )
        if kind in CUSTOM_PLURALS:
            # a custom resource: an update without resourceVersion is refused, so merge-patch it
            group, version = api_version.split("/")
            return Verbs(
                *(
                    functools.partial(call, group, version, plural=CUSTOM_PLURALS[kind])
                    for call in (
                        self.custom.create_namespaced_custom_object,
                        self.custom.patch_namespaced_custom_object,
                        self.custom.delete_namespaced_custom_object,
                        self.custom.get_namespaced_custom_object,
                    )
                )
            )
        raise ValueError(
            f"cannot apply kind {kind!r} ({api_version}): only Deployment, Service, Ingress, "
            "NetworkPolicy, HTTPRoute and InferenceService"
        )

    def existing(self, verbs: Verbs, kind: str, name: str, namespace: str, optional: bool = False) -> Any:
        """The object ``name`` of ``kind``, or None when absent (or, ``optional``, not ours to read: 403).
        One the provider did not make is a :class:`ForeignObjectError`."""
        from kubernetes.client.exceptions import ApiException

        try:
            obj = verbs.read(name=name, namespace=namespace)
        except ApiException as err:
            if err.status == 404 or (optional and err.status == 403):
                return None
            raise RuntimeError(
                f"Failed to read {kind} {namespace}/{name}: {err.status} {err.reason}"
            ) from err
        if not is_managed(obj):
            raise ForeignObjectError(
                f"{kind} {namespace}/{name} exists and was not made by airflow-provider-finetune (no "
                f"label {MANAGED_BY_KEY}={MANAGED_BY_VALUE}); it is left as it is. Choose another "
                "served_model_name or namespace, or remove that object yourself if it is no longer needed"
            )
        return obj

    def apply(self, docs: Iterable[dict[str, Any]], namespace: str) -> None:
        """Create each object, or update it when it exists and is the provider's: a retry or a new run
        updates the same objects. Every name is checked before the first write, so a foreign object
        stops the whole apply with nothing changed."""
        from kubernetes.client.exceptions import ApiException

        steps = [
            (doc, self.verbs(doc["kind"], doc["apiVersion"])) for doc in docs
        ]  # an unknown kind fails before any call
        present = [
            self.existing(verbs, doc["kind"], doc["metadata"]["name"], namespace) is not None
            for doc, verbs in steps
        ]
        for (doc, verbs), exists in zip(steps, present, strict=True):
            kind, name = doc["kind"], doc["metadata"]["name"]
            if not exists:
                try:
                    verbs.create(namespace=namespace, body=doc)
                    self.log.info("created %s %s/%s", kind, namespace, name)
                    continue
                except ApiException as err:
                    if err.status != 409:
                        raise RuntimeError(
                            f"Failed to create {kind} {namespace}/{name}: {err.status} {err.reason}"
                        ) from err
                    self.existing(verbs, kind, name, namespace)  # made meanwhile: ours?
            verbs.update(name=name, namespace=namespace, body=doc)
            self.log.info("updated %s %s/%s", kind, namespace, name)

    def delete(self, targets: Iterable[Target], name: str, namespace: str) -> bool:
        """Delete ``name`` of each target kind; True when anything was deleted. Absent (404) is fine;
        an optional target that RBAC does not let us read or delete (403) is skipped with a warning.
        An object the provider did not make is refused before anything is deleted."""
        from kubernetes.client.exceptions import ApiException

        found = []
        for target in targets:
            verbs = self.verbs(target.kind, target.api_version)
            if self.existing(verbs, target.kind, name, namespace, optional=target.optional) is not None:
                found.append((target, verbs))
        removed = False
        for target, verbs in found:
            try:
                verbs.delete(name=name, namespace=namespace)
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
