"""The chart's hardening, rendered by the real helm: pods run non-root on a read-only root filesystem without
privileges (IPC_LOCK only with RDMA), workers have no API token, NetworkPolicies say who reaches which port, the
internal API's token and TLS reach both sides' flags, and shutdown's grace matches terminationGracePeriodSeconds."""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

import pytest
from test_helm_chart import HELM, Manifest, of_kind, render, render_file, worker_pods

pytestmark = pytest.mark.skipif(HELM is None, reason="no helm binary: `make test` installs it into .venv/bin")
VALUES_DIR = Path(__file__).resolve().parent.parent / "helm" / "nanocp" / "ci"
VALUES = sorted(VALUES_DIR.glob("*-values.yaml"))


def router_pod(manifests: list[Manifest]) -> Manifest:
    (router,) = of_kind(manifests, "Deployment")
    return dict(router["spec"]["template"])


def pods(manifests: list[Manifest]) -> list[Manifest]:
    return [router_pod(manifests), *worker_pods(manifests)]


def args_of(pod: Manifest) -> dict[str, str]:
    pairs = (a.split("=", 1) for a in pod["spec"]["containers"][0]["args"] if a.startswith("--"))
    return {p[0]: p[1] if len(p) > 1 else "" for p in pairs}


def mounts_of(pod: Manifest) -> dict[str, str]:
    return {m["name"]: m["mountPath"] for m in pod["spec"]["containers"][0]["volumeMounts"]}


@pytest.mark.parametrize("values", VALUES, ids=lambda p: p.name.removesuffix("-values.yaml"))
def test_pods_run_non_root_read_only_and_without_privileges(values: Path) -> None:
    manifests = render("--values", str(values))
    rdma = "no-rdma" not in values.name
    for pod in pods(manifests):
        spec = pod["spec"]
        assert spec["securityContext"]["runAsNonRoot"] is True and spec["securityContext"]["runAsUser"] > 0
        assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        (container,) = spec["containers"]
        context = container["securityContext"]
        assert context["readOnlyRootFilesystem"] is True
        assert context["allowPrivilegeEscalation"] is False and context["privileged"] is False
        assert context["capabilities"]["drop"] == ["ALL"]
        worker = pod["metadata"]["labels"]["app.kubernetes.io/component"] == "worker"
        assert context["capabilities"].get("add") == (["IPC_LOCK"] if worker and rdma else None)
        assert {"/tmp", "/home/nanocp"} <= set(mounts_of(pod).values())  # what is written goes to emptyDirs
        grace = args_of(pod)["--shutdown-grace"]
        assert spec["terminationGracePeriodSeconds"] == int(grace) + 10


def test_workers_get_an_account_without_an_api_token() -> None:
    manifests = render_file("default-values.yaml")
    accounts = {a["metadata"]["name"]: a for a in of_kind(manifests, "ServiceAccount")}
    for pod in worker_pods(manifests):
        assert pod["spec"]["automountServiceAccountToken"] is False
        assert accounts[pod["spec"]["serviceAccountName"]]["automountServiceAccountToken"] is False
    (binding,) = of_kind(manifests, "RoleBinding")  # only the router's account may read pods
    assert [s["name"] for s in binding["subjects"]] == [router_pod(manifests)["spec"]["serviceAccountName"]]


def ingress_of(manifests: list[Manifest], name: str) -> list[dict[str, Any]]:
    (policy,) = [p for p in of_kind(manifests, "NetworkPolicy") if p["metadata"]["name"] == name]
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    return list(policy["spec"]["ingress"])


def test_network_policies_are_on_by_default_and_say_who_reaches_which_port() -> None:
    manifests = render_file("two-groups-values.yaml")
    monitoring = [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}]
    clients, metrics = ingress_of(manifests, "r-nanocp-router")
    assert clients == {"ports": [{"port": 50051}, {"port": 8000}]}  # no clientSelectors: anyone may call the APIs
    assert metrics == {"ports": [{"port": 9090}], "from": monitoring}
    for group in ("g0", "g1"):
        from_router, from_peers, scrapes = ingress_of(manifests, f"r-nanocp-worker-{group}")
        assert from_router["ports"] == [{"port": 50061}]
        assert from_router["from"][0]["podSelector"]["matchLabels"]["app.kubernetes.io/component"] == "router"
        (peers,) = from_peers["from"]
        assert "ports" not in from_peers  # the store, gloo and NCCL: any port, from the group's own pods only
        assert peers["podSelector"]["matchLabels"]["nanocp.io/group"] == group
        assert scrapes == {"ports": [{"port": 9090}], "from": monitoring}
    restricted = ingress_of(render_file("security-values.yaml"), "r-nanocp-router")[0]
    assert restricted["from"] == [{"podSelector": {"matchLabels": {"nanocp.io/client": "true"}}}]


def test_the_internal_token_is_generated_mounted_and_passed_to_both_sides() -> None:
    manifests = render_file("default-values.yaml")
    (secret,) = of_kind(manifests, "Secret")
    assert len(base64.b64decode(secret["data"]["token"])) == 48
    for pod in pods(manifests):
        assert args_of(pod)["--internal-token-file"] == "/var/run/nanocp/internal-token/token"
        assert mounts_of(pod)["internal-token"] == "/var/run/nanocp/internal-token"
        volume = next(v for v in pod["spec"]["volumes"] if v["name"] == "internal-token")
        assert volume["secret"]["secretName"] == secret["metadata"]["name"]
    unauthenticated = render("--set", "security.internalToken.enabled=false")
    assert not of_kind(unauthenticated, "Secret")
    assert all("--internal-token-file" not in args_of(p) for p in pods(unauthenticated))


def test_tls_and_api_tokens_reach_the_flags_and_probes_check_the_port() -> None:
    manifests = render_file("security-values.yaml")
    assert not of_kind(manifests, "Secret")  # the token Secret is the user's own
    router = router_pod(manifests)
    flags = args_of(router)
    assert flags["--tls-cert"] == "/var/run/nanocp/public-tls/tls.crt"
    assert flags["--api-tokens"] == "/var/run/nanocp/api-tokens/tokens"
    assert flags["--admin-tokens"] == "/var/run/nanocp/api-tokens/admin-tokens"
    no_admins = ("--values", str(VALUES_DIR / "security-values.yaml"), "--set", "security.apiTokens.admins=false")
    without_admins = render(*no_admins)
    assert "--admin-tokens" not in args_of(router_pod(without_admins))
    assert flags["--worker-tls-cert"] == "/var/run/nanocp/internal-tls/tls.crt"
    assert flags["--worker-tls-server-name"] == "nanocp-worker"
    assert router["spec"]["containers"][0]["readinessProbe"]["tcpSocket"] == {"port": 50051}  # kubelet has no TLS
    for worker in worker_pods(manifests):
        flags = args_of(worker)
        assert flags["--tls-client-ca"] == "/var/run/nanocp/internal-tls/ca.crt"
        assert "--api-tokens" not in flags and "public-tls" not in mounts_of(worker)
        assert worker["spec"]["containers"][0]["readinessProbe"]["tcpSocket"] == {"port": 50061}
        volume = next(v for v in worker["spec"]["volumes"] if v["name"] == "internal-token")
        assert volume["secret"]["secretName"] == "my-internal-token"
