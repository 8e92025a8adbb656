"""The deployment files agree with each other and with the gateway: the Dockerfile, deploy/compose.yaml and
deploy/kubernetes/. Schemas are checked in CI by the real tools (hadolint, docker compose config,
kubernetes-validate); this checks what they cannot: paths, names, ports, probes and the guard's command line.
"""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml

from gateway.config import DEFAULT_MODELS, load_config
from gateway.policy.store import PolicyStore
from tests.test_policy_configmap import ConfigMapVolume

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
GATEWAY = {"app.kubernetes.io/name": "guardgate", "app.kubernetes.io/component": "gateway"}
FLEXGUARD = DEFAULT_MODELS["flexguard"]
VLLM_ARGS = ["--model", FLEXGUARD, "--port", "8000", "--dtype", "bfloat16", "--max-model-len", "8192"]


def k8s() -> dict[tuple[str, str], dict]:
    docs = {}
    for path in sorted((DEPLOY / "kubernetes").glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            docs[(doc["kind"], doc["metadata"]["name"])] = doc
    return docs


def compose() -> dict:
    return yaml.safe_load((DEPLOY / "compose.yaml").read_text())


def pod(docs, name: str) -> dict:
    return docs[("Deployment", name)]["spec"]["template"]


# ----- Dockerfile -----


def test_the_image_is_multi_stage_non_root_and_checks_healthz():
    text = (ROOT / "Dockerfile").read_text()
    assert re.search(r"^FROM \S+ AS build$", text, re.M) and len(re.findall(r"^FROM ", text, re.M)) == 2
    assert re.search(r"^USER 10001:10001$", text, re.M)
    health = re.search(r"^HEALTHCHECK .*\n\s+CMD (.*)$", text, re.M)
    assert health and "urllib.request" in health.group(1) and "curl" not in health.group(1)
    assert "GUARDGATE_HEALTHZ=http://127.0.0.1:8080/healthz" in text
    assert '"/etc/guardgate/gateway.yaml"' in text and "/etc/guardgate/policies/" in text


# ----- compose -----


def test_compose_runs_gateway_redis_and_a_flexguard_vllm_on_a_gpu():
    services = compose()["services"]
    assert set(services) == {"gateway", "redis", "guard"}
    guard = services["guard"]
    assert guard["command"] == VLLM_ARGS
    devices = guard["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]
    gw = services["gateway"]
    assert "../policies:/etc/guardgate/policies:ro" in gw["volumes"]
    assert urlsplit(gw["environment"]["GUARD_BASE_URL"]).netloc == "guard:8000"
    assert urlsplit(gw["environment"]["REDIS_URL"]).netloc == "redis:6379"
    assert gw["build"] == {"context": "..", "dockerfile": "Dockerfile"}
    assert (DEPLOY / gw["build"]["context"] / "Dockerfile").is_file()


# ----- Kubernetes -----


def test_the_gateway_deployment_has_replicas_split_probes_limits_and_runs_as_non_root():
    docs = k8s()
    dep = docs[("Deployment", "guardgate")]
    assert dep["spec"]["replicas"] >= 2
    spec = pod(docs, "guardgate")["spec"]
    assert spec["securityContext"]["runAsNonRoot"] is True and spec["securityContext"]["runAsUser"] == 10001
    (c,) = spec["containers"]
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert set(c["resources"]["requests"]) == {"cpu", "memory"} and set(c["resources"]["limits"]) == {"cpu", "memory"}
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
    assert "subPath" not in mounts["/etc/guardgate/policies"]  # subPath mounts never see ConfigMap updates
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert volumes[mounts["/etc/guardgate/policies"]["name"]]["configMap"]["name"] == "guardgate-policies"
    assert volumes[mounts["/etc/guardgate/gateway.yaml"]["name"]]["configMap"]["name"] == "guardgate-config"


def test_the_pdb_and_hpa_target_the_gateway():
    docs = k8s()
    assert docs[("PodDisruptionBudget", "guardgate")]["spec"]["selector"]["matchLabels"] == GATEWAY
    hpa = docs[("HorizontalPodAutoscaler", "guardgate")]["spec"]
    assert hpa["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "guardgate"}
    assert hpa["minReplicas"] >= 2 and hpa["minReplicas"] >= docs[("PodDisruptionBudget", "guardgate")]["spec"]["minAvailable"]


def test_the_guard_is_flexguard_on_vllm_with_a_gpu_like_in_compose():
    spec = pod(k8s(), "guardgate-guard")["spec"]
    (c,) = spec["containers"]
    assert c["args"] == VLLM_ARGS == compose()["services"]["guard"]["command"]
    assert c["image"] == compose()["services"]["guard"]["image"].split(":-", 1)[1].rstrip("}")
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 1


def test_every_service_selects_a_deployment_and_a_named_port():
    docs = k8s()
    deployments = [d for (kind, _), d in docs.items() if kind == "Deployment"]
    for (kind, name), svc in docs.items():
        if kind != "Service":
            continue
        matching = [d for d in deployments
                    if svc["spec"]["selector"].items() <= d["spec"]["template"]["metadata"]["labels"].items()]
        assert len(matching) == 1, name
        ports = {p["name"] for c in matching[0]["spec"]["template"]["spec"]["containers"] for p in c["ports"]}
        assert {p["targetPort"] for p in svc["spec"]["ports"]} <= ports, name


def test_only_the_gateway_may_reach_the_guard_and_redis():
    docs = k8s()
    policies = [d["spec"] for (kind, _), d in docs.items() if kind == "NetworkPolicy"]
    for component, port in (("guard", 8000), ("redis", 6379)):
        labels = pod(docs, f"guardgate-{component}")["metadata"]["labels"]
        selecting = [p for p in policies if p["podSelector"]["matchLabels"].items() <= labels.items()]
        assert selecting, component
        for p in selecting:
            assert p["policyTypes"] == ["Ingress"]
            for rule in p["ingress"]:
                assert rule["from"] == [{"podSelector": {"matchLabels": GATEWAY}}]
                assert rule["ports"] == [{"protocol": "TCP", "port": port}]


def test_the_configmaps_hold_a_config_and_policies_the_gateway_accepts(tmp_path, monkeypatch):
    docs = k8s()
    for key in docs[("Secret", "guardgate-secrets")]["stringData"]:
        monkeypatch.setenv(key, "placeholder-0123456789")
    etc = tmp_path / "etc-guardgate"
    etc.mkdir()
    (etc / "gateway.yaml").write_text(docs[("ConfigMap", "guardgate-config")]["data"]["gateway.yaml"])
    ConfigMapVolume(etc / "policies").publish(docs[("ConfigMap", "guardgate-policies")]["data"])
    config = load_config(etc / "gateway.yaml")
    assert config.server.allow_open is False and config.server.host == "0.0.0.0"
    assert config.guard.model == FLEXGUARD
    assert urlsplit(config.guard.base_urls[0]).netloc == "guardgate-guard:8000"
    assert config.cache.redis_url is not None
    assert urlsplit(config.cache.redis_url.get_secret_value()).hostname == "guardgate-redis"
    store = PolicyStore(config.policies_dir, allow_open=False)  # keys exist, so it starts closed
    assert sorted(store.current.tenants) == ["acme", "default"]
    assert store.current.for_api_key("change-me-acme-key-0001").tenant == "acme"


@pytest.mark.parametrize("name", ["gateway-config.yaml", "policies-configmap.yaml", "secret.yaml"])
def test_no_manifest_holds_a_real_looking_secret(name):
    text = (DEPLOY / "kubernetes" / name).read_text()
    assert not re.search(r"\bsk-[A-Za-z0-9]{16,}", text)
    if name == "secret.yaml":
        values = yaml.safe_load(text)["stringData"]
        assert all(v == "" or v.startswith("REPLACE") for v in values.values())
