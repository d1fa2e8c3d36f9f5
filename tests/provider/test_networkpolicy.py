"""deploy/networkpolicy-egress.yaml: a valid NetworkPolicy that lets engine pods reach DNS, the
bucket and the Hub, and nothing else (no cloud metadata, no catch-all)."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from airflow_provider_finetune.pods.spec import MANAGED_BY
from tests.provider.conftest import K8S_VERSIONS

POLICY = Path(__file__).resolve().parents[2] / "deploy" / "networkpolicy-egress.yaml"


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_egress_policy_validates(version):
    docs = list(yaml.safe_load_all(POLICY.read_text()))
    assert len(docs) == 1
    kubernetes_validate.validate(docs[0], version, strict=True)


def test_egress_policy_selects_engine_pods_and_allows_only_dns_bucket_and_hub():
    policy = yaml.safe_load(POLICY.read_text())
    spec = policy["spec"]
    assert spec["podSelector"] == {"matchLabels": MANAGED_BY}  # the label every engine pod carries
    assert spec["policyTypes"] == ["Egress"]
    rules = spec["egress"]
    assert all(rule.get("to") and rule.get("ports") for rule in rules), "no rule may allow everything"
    ports = {(p["protocol"], p["port"]) for rule in rules for p in rule["ports"]}
    assert ports == {("UDP", 53), ("TCP", 53), ("TCP", 9000), ("TCP", 443)}
    dns = [r for r in rules if {"protocol": "UDP", "port": 53} in r["ports"]]
    assert dns and dns[0]["to"][0]["podSelector"] == {"matchLabels": {"k8s-app": "kube-dns"}}
    metadata = ipaddress.ip_address("169.254.169.254")
    for rule in rules:
        for peer in rule["to"]:
            if "ipBlock" in peer:
                net = ipaddress.ip_network(peer["ipBlock"]["cidr"])
                assert net.prefixlen >= 8 and metadata not in net, net


DEPLOY = POLICY.parent


@pytest.mark.parametrize("version", K8S_VERSIONS[-1:])
def test_serving_examples_validate_and_select_the_vllm_pods(version):
    from airflow_provider_finetune.pods.serving import ServeSpec, build_vllm_deployment

    for name in ("networkpolicy-vllm.yaml", "kserve-s3-serviceaccount.yaml", "rbac-serving.yaml"):
        for doc in yaml.safe_load_all((DEPLOY / name).read_text()):
            kubernetes_validate.validate(doc, version, strict=True)
    policy = yaml.safe_load((DEPLOY / "networkpolicy-vllm.yaml").read_text())
    spec = ServeSpec(name="vllm-x", model_uri="s3://b/m", served_model_name="x", engine_image="i")
    pod_labels = build_vllm_deployment(spec)["spec"]["template"]["metadata"]["labels"]
    assert policy["spec"]["podSelector"]["matchLabels"].items() <= pod_labels.items()  # selects every server
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    [rule] = policy["spec"]["ingress"]
    assert rule["ports"] == [{"protocol": "TCP", "port": 8000}] and rule["from"]  # one port, named peers only
