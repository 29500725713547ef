"""The Helm chart, checked by the real helm binary (installed by `make test`, see scripts/install_helm.py).

Every values file in helm/nanocp/ci is linted and rendered; the rendered manifests are validated offline against the
Kubernetes OpenAPI schemas (kubernetes-validate, strict) and their key properties asserted. Custom resources of the
Gateway API and its Inference Extension (InferencePool, HTTPRoute) are validated against their CRDs' schemas, kept in
tests/crds (each names the release it was taken from), with jsonschema and a strict check for unknown fields; their
CEL rules (x-kubernetes-validations) are left to the API server. Bad values must fail with a message that names the
problem.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "helm" / "nanocp"
VALUES = sorted((CHART / "ci").glob("*-values.yaml"))
KUBERNETES_VERSION = "1.33.0"  # the API the manifests are validated against
NAMESPACE = "serving"
HELM = shutil.which("helm", path=str(ROOT / ".venv" / "bin")) or shutil.which("helm")
pytestmark = pytest.mark.skipif(HELM is None, reason="no helm binary: `make test` installs it into .venv/bin")

Manifest = dict[str, Any]
CRD_SCHEMAS = {
    (f"{crd['group']}/{crd['version']}", crd["kind"]): crd["openAPIV3Schema"]
    for crd in (json.loads(path.read_text()) for path in (ROOT / "tests" / "crds").glob("*.json"))
}


def unknown_fields(value: Any, schema: dict[str, Any], path: str = "") -> Iterator[str]:
    """Fields the schema does not define: the API server would prune them silently, so a typo would go unseen."""
    if isinstance(value, list) and "items" in schema:
        for i, item in enumerate(value):
            yield from unknown_fields(item, schema["items"], f"{path}[{i}]")
    elif isinstance(value, dict) and not schema.get("x-kubernetes-preserve-unknown-fields"):
        properties, others = schema.get("properties"), schema.get("additionalProperties")
        for key, item in value.items():
            if properties is not None and key in properties:
                yield from unknown_fields(item, properties[key], f"{path}.{key}")
            elif isinstance(others, dict):
                yield from unknown_fields(item, others, f"{path}.{key}")
            elif properties is not None:
                yield f"{path}.{key}"


def validate_custom_resource(manifest: Manifest) -> None:
    schema = CRD_SCHEMAS[(manifest["apiVersion"], manifest["kind"])]
    jsonschema.validate(manifest, schema)
    assert list(unknown_fields(manifest, schema)) == []


def helm(*args: str) -> subprocess.CompletedProcess[str]:
    assert HELM is not None
    return subprocess.run([HELM, *args], capture_output=True, text=True, timeout=60)


def render(*args: str) -> list[Manifest]:
    result = helm("template", "r", str(CHART), "--namespace", NAMESPACE, *args)
    assert result.returncode == 0, result.stderr
    return [m for m in yaml.safe_load_all(result.stdout) if m]


def render_file(name: str) -> list[Manifest]:
    return render("--values", str(CHART / "ci" / name))


def of_kind(manifests: list[Manifest], kind: str) -> list[Manifest]:
    return [m for m in manifests if m["kind"] == kind]


def env_of(container: Manifest) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container["env"]}


def worker_pods(manifests: list[Manifest]) -> list[Manifest]:
    sets = of_kind(manifests, "StatefulSet")
    if sets:
        return [s["spec"]["template"] for s in sets]
    return [lws["spec"]["leaderWorkerTemplate"]["workerTemplate"] for lws in of_kind(manifests, "LeaderWorkerSet")]


@pytest.mark.parametrize("values", VALUES, ids=lambda p: p.name.removesuffix("-values.yaml"))
def test_chart_lints_renders_and_validates(values: Path) -> None:
    lint = helm("lint", "--strict", str(CHART), "--values", str(values))
    assert lint.returncode == 0, lint.stdout + lint.stderr
    manifests = render("--values", str(values))
    for manifest in manifests:
        if manifest["kind"] == "LeaderWorkerSet":  # a CRD: not in the core schemas
            continue
        if (manifest["apiVersion"], manifest["kind"]) in CRD_SCHEMAS:
            validate_custom_resource(manifest)
        else:
            kubernetes_validate.validate(manifest, KUBERNETES_VERSION, strict=True)
    for pod in worker_pods(manifests):
        (container,) = pod["spec"]["containers"]
        resources = container["resources"]
        devices = {k: v for k, v in resources["limits"].items() if k not in ("cpu", "memory")}
        assert devices and all(resources["requests"][k] == v for k, v in devices.items())
        shm = next(v for v in pod["spec"]["volumes"] if v["name"] == "dshm")
        assert shm["emptyDir"]["medium"] == "Memory" and shm["emptyDir"]["sizeLimit"]
        probe = container["startupProbe"].get("grpc") or container["startupProbe"]["tcpSocket"]
        assert probe["port"] == container["ports"][0]["containerPort"]
        assert container["startupProbe"]["failureThreshold"] * container["startupProbe"]["periodSeconds"] >= 600


def test_defaults_wire_rendezvous_discovery_and_rbac() -> None:
    manifests = render_file("default-values.yaml")
    (statefulset,) = of_kind(manifests, "StatefulSet")
    name = statefulset["metadata"]["name"]
    env = env_of(statefulset["spec"]["template"]["spec"]["containers"][0])
    assert env["RANK"] == {"fieldRef": {"fieldPath": "metadata.labels['apps.kubernetes.io/pod-index']"}}
    assert env["MASTER_ADDR"] == f"{name}-0.{name}.{NAMESPACE}.svc.cluster.local"
    assert env["WORLD_SIZE"] == str(statefulset["spec"]["replicas"]) == "2"
    services = {s["metadata"]["name"]: s for s in of_kind(manifests, "Service")}
    headless = services[statefulset["spec"]["serviceName"]]
    assert headless["spec"]["clusterIP"] == "None" and headless["spec"]["publishNotReadyAddresses"] is True

    (role,) = of_kind(manifests, "Role")
    assert role["rules"] == [{"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "watch"]}]
    assert not of_kind(manifests, "ClusterRole")
    (router,) = of_kind(manifests, "Deployment")
    args = router["spec"]["template"]["spec"]["containers"][0]["args"]
    selector = next(a for a in args if a.startswith("--selector=")).removeprefix("--selector=")
    (config,) = of_kind(manifests, "ConfigMap")
    assert "--max-migrations=$(NANOCP_MAX_MIGRATIONS)" in args and config["data"]["NANOCP_MAX_MIGRATIONS"] == "2"
    pod_labels = statefulset["spec"]["template"]["metadata"]["labels"]
    assert all(pod_labels[k] == v for k, v in (term.split("=") for term in selector.split(",")))
    router_service = services[router["metadata"]["name"]]
    assert router_service["spec"]["ports"][0]["appProtocol"] == "kubernetes.io/h2c"
    (pdb,) = of_kind(manifests, "PodDisruptionBudget")  # the single router gets none: it would block drains
    assert pdb["spec"]["maxUnavailable"] == 1


def test_affinity_follows_the_ordered_topology_keys() -> None:
    affinity = worker_pods(render_file("default-values.yaml"))[0]["spec"]["affinity"]
    terms = affinity["podAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"]
    assert [t["podAffinityTerm"]["topologyKey"] for t in terms] == [
        "nvidia.com/gpu.clique",
        "network.topology.kubernetes.io/block",
        "kubernetes.io/hostname",
    ]
    assert [t["weight"] for t in terms] == sorted((t["weight"] for t in terms), reverse=True)
    assert "requiredDuringSchedulingIgnoredDuringExecution" not in affinity["podAffinity"]
    assert "podAntiAffinity" not in affinity  # one group: nothing to spread

    hard = worker_pods(render_file("hard-topology-values.yaml"))[0]["spec"]["affinity"]["podAffinity"]
    (required,) = hard["requiredDuringSchedulingIgnoredDuringExecution"]
    assert required["topologyKey"] == "nvidia.com/gpu.clique"
    assert required["labelSelector"]["matchLabels"]["nanocp.io/group"] == "g0"


def test_groups_rendezvous_apart_and_spread_over_domains() -> None:
    manifests = render_file("two-groups-values.yaml")
    pods = worker_pods(manifests)
    assert len(pods) == 2
    masters = {env_of(p["spec"]["containers"][0])["MASTER_ADDR"] for p in pods}
    assert len(masters) == 2
    for pod in pods:
        group = pod["metadata"]["labels"]["nanocp.io/group"]
        (spread,) = pod["spec"]["affinity"]["podAntiAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"]
        expression = spread["podAffinityTerm"]["labelSelector"]["matchExpressions"][0]
        assert expression == {"key": "nanocp.io/group", "operator": "NotIn", "values": [group]}
        assert pod["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 8
    assert len(of_kind(manifests, "PodDisruptionBudget")) == 1  # the workers'; a single router gets none


def test_lws_kueue_rdma_tracing_and_network_policy_options() -> None:
    (lws,) = of_kind(render_file("lws-values.yaml"), "LeaderWorkerSet")
    assert lws["metadata"]["annotations"]["leaderworkerset.sigs.k8s.io/exclusive-topology"] == "nvidia.com/gpu.clique"
    assert lws["spec"]["replicas"] == 2 and lws["spec"]["leaderWorkerTemplate"]["size"] == 2
    env = env_of(lws["spec"]["leaderWorkerTemplate"]["workerTemplate"]["spec"]["containers"][0])
    assert env["MASTER_ADDR"] == "$(LWS_LEADER_ADDRESS)"
    assert "leaderworkerset.sigs.k8s.io/worker-index" in env["RANK"]["fieldRef"]["fieldPath"]

    kueue = worker_pods(render_file("kueue-values.yaml"))[0]["metadata"]
    assert kueue["annotations"]["kueue.x-k8s.io/podset-required-topology"] == "nvidia.com/gpu.clique"
    assert kueue["labels"]["kueue.x-k8s.io/queue-name"] == "gpu-queue"

    container = worker_pods(render_file("no-rdma-values.yaml"))[0]["spec"]["containers"][0]
    assert set(container["resources"]["limits"]) == {"memory", "nvidia.com/gpu"}
    assert env_of(container)["NCCL_SOCKET_IFNAME"] == "eth0"

    traced = render_file("tracing-values.yaml")
    for pod in [*worker_pods(traced), of_kind(traced, "Deployment")[0]["spec"]["template"]]:
        otel = env_of(pod["spec"]["containers"][0])
        assert otel["OTEL_EXPORTER_OTLP_ENDPOINT"] == "http://otel-collector.observability:4317"
        assert "OTEL_SDK_DISABLED" not in otel
    (config,) = of_kind(traced, "ConfigMap")
    assert config["data"]["NANOCP_STEP_SPANS_EVERY"] == "16"
    worker = worker_pods(traced)[0]["spec"]["containers"][0]
    assert {"--step-spans-every=$(NANOCP_STEP_SPANS_EVERY)", "--metrics-port=9090"} <= set(worker["args"])
    assert {"name": "metrics", "containerPort": 9090} in worker["ports"]

    policies = of_kind(render_file("networkpolicy-values.yaml"), "NetworkPolicy")
    assert {p["metadata"]["name"] for p in policies} == {"r-nanocp-router", "r-nanocp-worker-g0"}
    assert not of_kind(render("--set", "networkPolicy.enabled=false"), "NetworkPolicy")


@pytest.mark.parametrize(
    ("values", "message"),
    [
        (["workers.groupSize=-1"], "at '/workers/groupSize': minimum: got -1, want 1"),
        (["workers.groups=0"], "at '/workers/groups': minimum: got 0, want 1"),
        (["policy.name=fastest"], "at '/policy/name': value must be one of 'dcp', 'static', 'balanced', 'uniform'"),
        (["workers.gpus=two"], "at '/workers/gpus': got string, want integer"),
        (["topology.mode=strict"], "at '/topology/mode': value must be one of 'soft', 'hard'"),
        (["workers.nccl.env.DEBUG=INFO"], "'DEBUG' does not match pattern '^NCCL_[A-Z0-9_]+$'"),
        (["workers.shm.sizeLimit=lots"], "at '/workers/shm/sizeLimit'"),
        (["numExperts=7"], "numExperts (7) must be divisible by workers.groupSize (2)"),
        (["policy.cpDegree=4"], "policy.cpDegree (4) can not exceed workers.groupSize (2)"),
        (["inferencePool.enabled=true", "router.httpPort=null"], "inferencePool.enabled needs router.httpPort"),
        (
            ["inferencePool.enabled=true", "inferencePool.httpRoute.enabled=true"],
            "needs inferencePool.httpRoute.parentRefs",
        ),
        (["inferencePool.endpointPicker.failureMode=Maybe"], "at '/inferencePool/endpointPicker/failureMode'"),
        (["router.replicas=2"], "at '/router/replicas': value must be 1"),
        (["policy.maxMigrations=-1"], "at '/policy/maxMigrations': minimum: got -1, want 0"),
    ],
)
def test_bad_values_are_rejected_with_a_clear_message(values: list[str], message: str) -> None:
    result = helm("template", "r", str(CHART), *(a for v in values for a in ("--set", v)))
    assert result.returncode != 0
    assert message in result.stderr


def test_notes_tell_how_to_reach_the_router() -> None:
    result = helm("install", "r", str(CHART), "--namespace", NAMESPACE, "--dry-run=client")
    assert result.returncode == 0, result.stderr
    notes = result.stdout.split("NOTES:", 1)[1]
    assert "kubectl -n serving port-forward svc/r-nanocp-router 50051:50051" in notes
    assert "nanocp generate --router 127.0.0.1:50051" in notes
    assert "port-forward svc/r-nanocp-router 8000:8000" in notes and '"model": "tiny"' in notes


def test_router_serves_http_and_the_inference_pool_routes_a_gateway_to_it() -> None:
    default = render_file("default-values.yaml")
    (router,) = of_kind(default, "Deployment")
    container = router["spec"]["template"]["spec"]["containers"][0]
    assert "--http-port=8000" in container["args"]
    assert {"name": "http", "containerPort": 8000} in container["ports"]
    service = next(s for s in of_kind(default, "Service") if s["metadata"]["name"] == router["metadata"]["name"])
    assert {"name": "http", "port": 8000, "targetPort": "http"} in service["spec"]["ports"]
    assert not of_kind(default, "InferencePool") and not of_kind(default, "HTTPRoute")

    manifests = render_file("inferencepool-values.yaml")
    (pool,) = of_kind(manifests, "InferencePool")
    router_labels = of_kind(manifests, "Deployment")[0]["spec"]["template"]["metadata"]["labels"]
    assert pool["spec"]["selector"]["matchLabels"].items() <= router_labels.items()
    assert pool["spec"]["targetPorts"] == [{"number": 8000}]
    assert pool["spec"]["endpointPickerRef"] == {
        "name": "nanocp-epp",
        "port": {"number": 9002},
        "failureMode": "FailOpen",
    }
    (route,) = of_kind(manifests, "HTTPRoute")
    (rule,) = route["spec"]["rules"]
    assert rule["backendRefs"] == [
        {"group": "inference.networking.k8s.io", "kind": "InferencePool", "name": "r-nanocp"}
    ]
    assert route["spec"]["parentRefs"] == [{"name": "inference-gateway", "sectionName": "http"}]

    policies = of_kind(render_file("networkpolicy-values.yaml"), "NetworkPolicy")
    (router_policy,) = [p for p in policies if p["metadata"]["name"] == "r-nanocp-router"]
    assert {"port": 8000} in router_policy["spec"]["ingress"][0]["ports"]


def test_custom_resources_are_checked_for_unknown_fields() -> None:
    (pool,) = of_kind(render_file("inferencepool-values.yaml"), "InferencePool")
    pool["spec"]["targetPort"] = 8000  # a typo of targetPorts
    with pytest.raises(AssertionError, match=r"'\.spec\.targetPort'"):
        validate_custom_resource(pool)
