"""Kubernetes, read-only: instance pods by label, and the control plane's log lines.

The official client is synchronous; calls run in worker threads so the case pipeline can wait on
Kubernetes, the database and Polar at once. Every pod of the control-plane Deployment is read,
not just one, because any replica may have handled the instance.
"""
from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor

from kubernetes import client, config as kube_config
from kubernetes.client.rest import ApiException

from handlers.model import LogEvent, Pod
from handlers.timeline import to_us
from services.config import Env, KubernetesSettings
from services.controlplane_log import parse_lines

REQUEST_TIMEOUT = (3.05, 10)  # connect, read (seconds)
LOG_THREADS = 8
POD_CACHE_S = 60.0


class KubeNotConfigured(Exception):
    pass


def api_client(env: Env) -> client.ApiClient:
    """An ApiClient from KUBECONFIG, else the in-cluster service account."""
    if env.kubeconfig:
        return kube_config.new_client_from_config(config_file=env.kubeconfig)
    if env.in_cluster:
        cfg = client.Configuration()
        kube_config.load_incluster_config(client_configuration=cfg)
        return client.ApiClient(cfg)
    raise KubeNotConfigured("not configured (no KUBECONFIG and not in a cluster)")


def describe_error(exc: Exception) -> str:
    if isinstance(exc, ApiException):
        reason = exc.reason or ""
        try:
            import json
            reason = json.loads(exc.body).get("message") or reason
        except Exception:
            pass
        return f"HTTP {exc.status}: {reason}"
    return f"{type(exc).__name__}: {exc}"


class KubeSource:
    def __init__(self, api: client.ApiClient, settings: KubernetesSettings):
        self.core = client.CoreV1Api(api)
        self.apps = client.AppsV1Api(api)
        self.s = settings
        self._pool = ThreadPoolExecutor(max_workers=LOG_THREADS, thread_name_prefix="kube")
        self._cp_pods: tuple[float, list] | None = None

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        self.core.api_client.close()

    async def _run(self, fn, *args, **kw):
        return await asyncio.get_running_loop().run_in_executor(self._pool, lambda: fn(*args, **kw))

    async def instance_pods(self, instance_id: str) -> list[Pod]:
        pods = await self._run(self.core.list_namespaced_pod, self.s.instances_namespace,
                               label_selector=f"{self.s.label_instance}={instance_id}",
                               _request_timeout=REQUEST_TIMEOUT)
        return [pod_from(p, self.s.label_tier) for p in pods.items]

    async def _control_plane_pods(self) -> list:
        """The Deployment's pods, found through its selector; cached briefly, because a running bot
        checks often and the control plane's pods change rarely (one round trip saved per check)."""
        now = time.monotonic()
        if self._cp_pods is not None and now - self._cp_pods[0] < POD_CACHE_S:
            return self._cp_pods[1]
        ns = self.s.system_namespace
        dep, pods = await asyncio.gather(
            self._run(self.apps.read_namespaced_deployment, self.s.control_plane_deployment, ns,
                      _request_timeout=REQUEST_TIMEOUT),
            self._run(self.core.list_namespaced_pod, ns, _request_timeout=REQUEST_TIMEOUT))
        selector = (dep.spec.selector.match_labels or {}) if dep.spec and dep.spec.selector else {}
        mine = [p for p in pods.items
                if selector and all((p.metadata.labels or {}).get(k) == v for k, v in selector.items())]
        self._cp_pods = (now, mine)
        return mine

    async def control_plane_events(self, since_us: int | None) -> tuple[list[LogEvent], list[str]]:
        """Parsed lines from every pod of the deployment, since the given time; plus the pods read."""
        ns = self.s.system_namespace
        mine = await self._control_plane_pods()
        since_seconds = None
        if since_us is not None:
            age = int(time.time() - since_us / 1_000_000) + 60
            # a window starting in the future (clock skew, test data) must not shrink the read to nothing
            since_seconds = age if age > 120 else None

        async def read(pod) -> list[LogEvent]:
            containers = [c.name for c in (pod.spec.containers or [])] if pod.spec else []
            events: list[LogEvent] = []
            for container in containers or [None]:
                kw = {"container": container} if container and len(containers) > 1 else {}
                if since_seconds is not None:
                    kw["since_seconds"] = since_seconds
                text = await self._run(self.core.read_namespaced_pod_log, pod.metadata.name, ns,
                                       _request_timeout=REQUEST_TIMEOUT, **kw)
                events.extend(parse_lines((text or "").splitlines(), pod.metadata.name))
            return events

        try:
            results = await asyncio.gather(*(read(p) for p in mine))
        except ApiException as exc:
            if exc.status == 404:  # a pod went away: forget the cached list, read it afresh next time
                self._cp_pods = None
            raise
        events = [e for chunk in results for e in chunk]
        if since_us is not None:
            events = [e for e in events if e.at >= since_us]
        return events, [p.metadata.name for p in mine]


def pod_from(p, tier_label: str) -> Pod:
    labels = p.metadata.labels or {}
    finished = []
    for cs in (p.status.container_statuses or []) if p.status else []:
        term = cs.state.terminated if cs.state else None
        if term is not None and term.finished_at is not None:
            finished.append(to_us(term.finished_at))
    return Pod(name=p.metadata.name, tier=labels.get(tier_label),
               terminated_at=min(finished) if finished else None,
               deleted_at=to_us(p.metadata.deletion_timestamp) if p.metadata.deletion_timestamp else None,
               phase=p.status.phase if p.status else None)

