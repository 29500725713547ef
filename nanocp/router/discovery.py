"""Kubernetes discovery: the router follows the worker pods of its release.

It lists, then watches, the pods that match a label selector in one namespace (RBAC: get/list/watch on pods in that
namespace, nothing cluster-wide). A pod is a worker once it is Ready and has an IP; its address is podIP and the
container port named `port_name` (or the port in the `nanocp.io/grpc-port` annotation). A pod that loses its IP or
stops being Ready is removed from the registry, so no request is placed on it. A registered pod being deleted stays
until it is gone: its worker shuts down gracefully, reporting itself draining (so nothing new is placed on its group)
while its live streams finish.

The official client is synchronous: lists run through asyncio.to_thread, and the watch stream is read on a daemon
thread that hands events to the loop, because a blocked read can not be cancelled and must not hold up shutdown.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import threading
from collections.abc import Mapping
from typing import Any

from kubernetes import client, config, watch
from urllib3.exceptions import ReadTimeoutError

from nanocp.router.registry import WorkerRegistry

log = logging.getLogger(__name__)

PORT_ANNOTATION = "nanocp.io/grpc-port"
_EQUALITY = re.compile(r"([A-Za-z0-9./_-]+)\s*==?\s*([A-Za-z0-9._-]*)")


def parse_selector(selector: str) -> dict[str, str]:
    """`a=b,c=d` as a dict; only equality terms, since they are also checked here on every pod."""
    labels: dict[str, str] = {}
    for term in filter(None, (t.strip() for t in selector.split(","))):
        match = _EQUALITY.fullmatch(term)
        if match is None:
            raise ValueError(f"selector term {term!r} is not key=value (only equality terms are supported)")
        labels[match[1]] = match[2]
    return labels


def _draining(pod: Mapping[str, Any]) -> bool:
    """Being deleted and still running: its worker finishes its streams (and goes once its pod has no IP)."""
    return bool((pod.get("metadata") or {}).get("deletionTimestamp") and (pod.get("status") or {}).get("podIP"))


def pod_address(pod: Mapping[str, Any], port_name: str) -> str | None:
    """host:port of a Ready worker pod, or None while it must not take requests."""
    metadata = pod.get("metadata") or {}
    status = pod.get("status") or {}
    if metadata.get("deletionTimestamp") or not status.get("podIP"):
        return None
    conditions = status.get("conditions") or []
    if not any(c.get("type") == "Ready" and c.get("status") == "True" for c in conditions):
        return None
    port = (metadata.get("annotations") or {}).get(PORT_ANNOTATION)
    if port is None:
        containers = (pod.get("spec") or {}).get("containers") or []
        ports = [p for c in containers for p in c.get("ports") or [] if p.get("name") == port_name]
        if not ports:
            return None
        port = ports[0].get("containerPort")
    return f"{status['podIP']}:{port}"


class KubernetesDiscovery:
    def __init__(
        self,
        namespace: str,
        selector: str,
        port_name: str = "grpc",
        *,
        api_client: client.ApiClient | None = None,
        watch_timeout_s: int = 60,
    ) -> None:
        self._namespace = namespace
        self._selector = selector
        self._labels = parse_selector(selector)
        self._port_name = port_name
        self._api = client.CoreV1Api(api_client or _default_client())
        self._watch_timeout_s = watch_timeout_s
        self._addresses: dict[str, str] = {}  # pod name -> address it was added under

    async def run(self, registry: WorkerRegistry) -> None:
        """Lists then watches, forever; a failed list or a broken watch is retried after a pause."""
        while True:
            try:
                listing = await asyncio.to_thread(self._list)
                pods = listing.get("items") or []
                await self._sync(registry, {p["metadata"]["name"]: p for p in pods if self._matches(p)})
                # From the listing's version on, so nothing between list and watch is missed (when there is one).
                await self._watch(registry, (listing.get("metadata") or {}).get("resourceVersion"))
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("kubernetes discovery in namespace %s failed, retrying: %s", self._namespace, exc)
                await asyncio.sleep(2.0)

    def _matches(self, pod: Mapping[str, Any]) -> bool:
        # Servers filter by labelSelector already; checking here too keeps emulators and stray events harmless.
        labels = (pod.get("metadata") or {}).get("labels") or {}
        return all(labels.get(k) == v for k, v in self._labels.items())

    def _list(self) -> dict[str, Any]:
        # Raw JSON rather than the client's models: the same dicts as the watch's raw_object.
        response: Any = self._api.list_namespaced_pod(
            self._namespace, label_selector=self._selector, _preload_content=False
        )
        return dict(json.loads(response.data))

    async def _sync(self, registry: WorkerRegistry, pods: Mapping[str, Mapping[str, Any]]) -> None:
        """Makes the registry hold exactly the Ready pods among `pods` (a full listing)."""
        for name in [n for n in self._addresses if n not in pods]:
            await self._update(registry, name, None)
        for name, pod in pods.items():
            await self._update(registry, name, pod)

    async def _update(self, registry: WorkerRegistry, name: str, pod: Mapping[str, Any] | None) -> None:
        address = pod_address(pod, self._port_name) if pod is not None else None
        old = self._addresses.get(name)
        if old == address or (old is not None and pod is not None and _draining(pod)):
            return
        if old is not None:
            log.info("worker pod %s (%s) went away", name, old)
            del self._addresses[name]
            await registry.remove(old)
        if address is not None:
            log.info("worker pod %s is ready at %s", name, address)
            self._addresses[name] = address
            await registry.add(address)

    async def _watch(self, registry: WorkerRegistry, resource_version: str | None) -> None:
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[dict[str, Any] | BaseException | None] = asyncio.Queue()
        stream = watch.Watch()

        def post(item: dict[str, Any] | BaseException | None) -> None:
            with contextlib.suppress(RuntimeError):  # the loop is closed: the router stopped, no one listens
                loop.call_soon_threadsafe(events.put_nowait, item)

        def read() -> None:
            try:
                for event in stream.stream(
                    self._api.list_namespaced_pod,
                    self._namespace,
                    label_selector=self._selector,
                    resource_version=resource_version,
                    timeout_seconds=self._watch_timeout_s,
                    # A server that ignores timeout_seconds (or goes silent) still ends the watch: then re-list.
                    _request_timeout=self._watch_timeout_s + min(10, self._watch_timeout_s),
                ):
                    post(event)
                post(None)
            except ReadTimeoutError:
                # The request timeout above is how a silent watch ends by design (a busy server or machine reaches
                # it too): re-list at once, with no failure's pause.
                post(None)
            except Exception as exc:
                post(exc)

        threading.Thread(target=read, name="kubernetes pod watch", daemon=True).start()
        try:
            while (event := await events.get()) is not None:
                if isinstance(event, BaseException):
                    raise event
                pod = event.get("raw_object") or {}
                name = (pod.get("metadata") or {}).get("name")
                if name is None:  # e.g. an ERROR event's Status
                    continue
                # A pod relabelled out of the selector goes away like a deleted one.
                gone = event.get("type") == "DELETED" or not self._matches(pod)
                await self._update(registry, name, None if gone else pod)
        finally:
            stream.stop()


def _default_client() -> client.ApiClient:
    """In-cluster credentials in a pod (the chart's ServiceAccount), else the local kubeconfig."""
    try:
        config.load_incluster_config()
    except config.ConfigException:
        config.load_kube_config()
    return client.ApiClient()
