"""A small Kubernetes API of ours on 127.0.0.1: pods by label selector, deployments, pod logs,
and Status objects for errors, as the real API server returns them."""
from __future__ import annotations

import re
from datetime import datetime, timezone
from pathlib import Path

from .http import FakeApi, FakeServer, Request, Response

TOKEN = "kube-test-token"


def status(code: int, reason: str, message: str) -> Response:
    return Response(code, {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                           "message": message, "reason": reason, "code": code})


def iso(dt: datetime) -> str:
    return dt.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


class FakeKube(FakeApi):
    def __init__(self, latency_s: float = 0.0):
        self.pods: dict[str, list[dict]] = {}  # namespace -> pods
        self.deployments: dict[tuple[str, str], dict] = {}
        self.logs: dict[tuple[str, str], list[str]] = {}  # (namespace, pod) -> lines
        self.fail_paths: dict[str, int] = {}  # path regex -> status code
        self.server = FakeServer(self.handle, latency_s)


    def kubeconfig(self, folder: Path) -> Path:
        path = Path(folder) / "kubeconfig"
        path.write_text(
            "apiVersion: v1\nkind: Config\n"
            f"clusters:\n- name: fake\n  cluster:\n    server: {self.url}\n"
            f"users:\n- name: bot\n  user:\n    token: {TOKEN}\n"
            "contexts:\n- name: fake\n  context:\n    cluster: fake\n    user: bot\n"
            "current-context: fake\n")
        return path

    # --- setup -----------------------------------------------------------------------------------

    def add_pod(self, namespace: str, name: str, labels: dict[str, str], *, containers=("main",),
                terminated_at: datetime | None = None, deleted_at: datetime | None = None, phase: str = "Running"):
        statuses = []
        for c in containers:
            state = ({"terminated": {"exitCode": 0, "reason": "Completed", "finishedAt": iso(terminated_at),
                                     "startedAt": iso(terminated_at)}}
                     if terminated_at else {"running": {"startedAt": "2026-09-01T00:00:00Z"}})
            statuses.append({"name": c, "ready": terminated_at is None, "restartCount": 0, "image": "orzbob/dev:1",
                             "imageID": "sha256:abc", "state": state})
        meta = {"name": name, "namespace": namespace, "labels": labels, "uid": f"uid-{name}",
                "creationTimestamp": "2026-09-01T00:00:00Z"}
        if deleted_at:
            meta["deletionTimestamp"] = iso(deleted_at)
        pod = {"apiVersion": "v1", "kind": "Pod", "metadata": meta,
               "spec": {"containers": [{"name": c, "image": "orzbob/dev:1"} for c in containers]},
               "status": {"phase": "Succeeded" if terminated_at else phase, "containerStatuses": statuses}}
        self.pods.setdefault(namespace, []).append(pod)
        return pod

    def add_deployment(self, namespace: str, name: str, match_labels: dict[str, str]):
        self.deployments[(namespace, name)] = {
            "apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {"name": name, "namespace": namespace},
            "spec": {"replicas": 2, "selector": {"matchLabels": match_labels},
                     "template": {"metadata": {"labels": match_labels},
                                  "spec": {"containers": [{"name": "control-plane", "image": "orzbob/cp:1"}]}}},
        }

    def add_control_plane(self, pods_lines: dict[str, list[str]], namespace: str = "orzbob-system"):
        labels = {"app": "control-plane"}
        self.add_deployment(namespace, "control-plane", labels)
        for pod_name, lines in pods_lines.items():
            self.add_pod(namespace, pod_name, labels, containers=("control-plane",))
            self.logs[(namespace, pod_name)] = list(lines)

    # --- the server ------------------------------------------------------------------------------

    def handle(self, req: Request) -> Response:
        if req.headers.get("authorization") != f"Bearer {TOKEN}":
            return status(401, "Unauthorized", "Unauthorized")
        for pattern, code in self.fail_paths.items():
            if re.search(pattern, req.path):
                return status(code, "InternalError", f"injected failure for {req.path}")
        m = re.fullmatch(r"/api/v1/namespaces/([^/]+)/pods", req.path)
        if m and req.method == "GET":
            items = [p for p in self.pods.get(m.group(1), []) if _selects(req.q("labelSelector", ""), p)]
            return Response(200, {"kind": "PodList", "apiVersion": "v1", "metadata": {"resourceVersion": "1"},
                                  "items": items})
        m = re.fullmatch(r"/api/v1/namespaces/([^/]+)/pods/([^/]+)/log", req.path)
        if m and req.method == "GET":
            ns, name = m.groups()
            if not any(p["metadata"]["name"] == name for p in self.pods.get(ns, [])):
                return status(404, "NotFound", f'pods "{name}" not found')
            lines = self.logs.get((ns, name), [])
            since = req.q("sinceSeconds")
            if since:
                cutoff = datetime.now(timezone.utc).timestamp() - int(since)
                lines = [ln for ln in lines if _line_ts(ln) is None or _line_ts(ln) >= cutoff]
            return Response(200, "".join(ln + "\n" for ln in lines), content_type="text/plain")
        m = re.fullmatch(r"/apis/apps/v1/namespaces/([^/]+)/deployments/([^/]+)", req.path)
        if m and req.method == "GET":
            dep = self.deployments.get(m.groups())
            if dep is None:
                return status(404, "NotFound", f'deployments.apps "{m.group(2)}" not found')
            return Response(200, dep)
        return status(404, "NotFound", "the server could not find the requested resource")


def _selects(selector: str, pod: dict) -> bool:
    labels = pod["metadata"].get("labels") or {}
    for term in filter(None, selector.split(",")):
        k, _, v = term.partition("=")
        if labels.get(k) != v:
            return False
    return True


def _line_ts(line: str) -> float | None:
    try:
        return datetime.strptime(line[:19], "%Y/%m/%d %H:%M:%S").replace(tzinfo=timezone.utc).timestamp()
    except ValueError:
        return None
