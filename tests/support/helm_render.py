"""Lint and render a Helm chart with real Helm (helm-sdkpy), without a Kubernetes cluster.

Runs under Python >= 3.12 in its own venv (helm-sdkpy's requirement; tests/test_helm.py builds
it), so it imports nothing from lockstep. helm-sdkpy has no ``helm template``; an install does
the same rendering (values merged and checked against values.schema.json, templates executed)
and returns the manifest. The install talks to the small in-memory API server below, which
answers discovery for the kinds the chart uses and accepts every create; HELM_DRIVER=memory keeps
the release record off it. Run with HELM_DRIVER=memory in the environment (Go reads it at load).

Usage: python helm_render.py REQUEST.json  →  JSON on stdout:
{"lint": {case: {"errors": [...], "messages": [...]}}, "render": {case: {"manifest": str} | {"error": str}}}
REQUEST.json: {"chart": DIR, "namespace": NS, "release": NAME, "cases": {case: values}}.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import sys
import tempfile
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import helm_sdkpy
import yaml

# group/version -> [(plural, Kind, namespaced)]: what the fake API server's discovery lists.
RESOURCES: dict[str, list[tuple[str, str, bool]]] = {
    "v1": [
        ("configmaps", "ConfigMap", True),
        ("secrets", "Secret", True),
        ("services", "Service", True),
        ("serviceaccounts", "ServiceAccount", True),
        ("pods", "Pod", True),
        ("namespaces", "Namespace", False),
    ],
    "apps/v1": [("statefulsets", "StatefulSet", True), ("deployments", "Deployment", True)],
    "batch/v1": [("jobs", "Job", True), ("cronjobs", "CronJob", True)],
    "autoscaling/v2": [("horizontalpodautoscalers", "HorizontalPodAutoscaler", True)],
    "policy/v1": [("poddisruptionbudgets", "PodDisruptionBudget", True)],
    "networking.k8s.io/v1": [("networkpolicies", "NetworkPolicy", True)],
    "monitoring.coreos.com/v1": [("servicemonitors", "ServiceMonitor", True)],
    "ray.io/v1": [("rayclusters", "RayCluster", True)],
}
VERBS = ["create", "delete", "get", "list", "patch", "update", "watch"]
# Seconds one lint or install may take; both are local and take well under a second.
ACTION_TIMEOUT_S = 120


def _resource_list(group_version: str) -> dict[str, Any]:
    return {
        "kind": "APIResourceList",
        "apiVersion": "v1",
        "groupVersion": group_version,
        "resources": [
            {"name": plural, "singularName": kind.lower(), "namespaced": namespaced, "kind": kind, "verbs": VERBS}
            for plural, kind, namespaced in RESOURCES[group_version]
        ],
    }


def _group_list() -> dict[str, Any]:
    groups = []
    for group_version in RESOURCES:
        if "/" not in group_version:
            continue
        group, version = group_version.split("/")
        entry = {"groupVersion": group_version, "version": version}
        groups.append({"name": group, "versions": [entry], "preferredVersion": entry})
    return {"kind": "APIGroupList", "apiVersion": "v1", "groups": groups}


def _discovery(path: str) -> dict[str, Any] | None:
    if path == "/version":
        return {"major": "1", "minor": "31", "gitVersion": "v1.31.0", "platform": "linux/amd64"}
    if path == "/api":
        return {"kind": "APIVersions", "versions": ["v1"], "serverAddressByClientCIDRs": []}
    if path == "/apis":
        return _group_list()
    if path == "/api/v1":
        return _resource_list("v1")
    if path.startswith("/apis/") and path[len("/apis/"):] in RESOURCES:
        return _resource_list(path[len("/apis/"):])
    return None


class _FakeApi(BaseHTTPRequestHandler):
    """Discovery answers, 404 for every object read, and 201 echoing every create."""

    def do_GET(self) -> None:
        body = _discovery(self.path.split("?", 1)[0])
        if body is None:
            self._json(404, {"kind": "Status", "apiVersion": "v1", "status": "Failure",
                             "reason": "NotFound", "code": 404, "message": "not found"})
        else:
            self._json(200, body)

    def do_POST(self) -> None:
        raw = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        try:
            created = json.loads(raw)
        except ValueError:
            created = {}
        self._json(201, created)

    def _json(self, status: int, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: object) -> None:
        return None


def _kubeconfig(port: int, namespace: str, directory: Path) -> str:
    path = directory / "kubeconfig"
    path.write_text(yaml.safe_dump({
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "fake", "cluster": {"server": f"http://127.0.0.1:{port}"}}],
        "users": [{"name": "fake", "user": {"token": "fake"}}],
        "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "fake", "namespace": namespace}}],
        "current-context": "fake",
    }))
    return str(path)


def _merged(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merged(out[key], value)
        else:
            out[key] = value
    return out


async def _lint(config: helm_sdkpy.Configuration, chart: Path, values: dict[str, Any], work: Path) -> dict[str, Any]:
    """Lint a copy of the chart whose values.yaml is the chart's own merged with ``values``."""
    copy = work / "lint" / chart.name
    shutil.rmtree(copy.parent, ignore_errors=True)
    shutil.copytree(chart, copy)
    defaults = yaml.safe_load((chart / "values.yaml").read_text()) or {}
    (copy / "values.yaml").write_text(yaml.safe_dump(_merged(defaults, values)))
    result = await asyncio.wait_for(helm_sdkpy.Lint(config).run(str(copy)), ACTION_TIMEOUT_S)
    return {"errors": result.get("Errors") or [], "messages": result.get("Messages") or []}


async def _render(config: helm_sdkpy.Configuration, chart: Path, release: str, values: dict[str, Any]) -> dict[str, Any]:
    try:
        result = await asyncio.wait_for(
            helm_sdkpy.Install(config).run(release, str(chart), values=values or None, wait=False),
            ACTION_TIMEOUT_S,
        )
    except helm_sdkpy.HelmError as exc:
        return {"error": str(exc)}
    hooks = "".join(f"---\n{hook['manifest']}\n" for hook in result.get("hooks") or [])
    return {"manifest": result["manifest"] + hooks}


async def _main(request: dict[str, Any]) -> dict[str, Any]:
    chart = Path(request["chart"])
    namespace = request["namespace"]
    server = ThreadingHTTPServer(("127.0.0.1", 0), _FakeApi)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    out: dict[str, Any] = {"lint": {}, "render": {}}
    try:
        with tempfile.TemporaryDirectory() as tmp:
            work = Path(tmp)
            kubeconfig = _kubeconfig(server.server_address[1], namespace, work)
            for case, values in request["cases"].items():
                # A fresh configuration per case: the memory driver then holds no earlier release.
                config = helm_sdkpy.Configuration(namespace=namespace, kubeconfig=kubeconfig)
                out["lint"][case] = await _lint(config, chart, values, work)
                out["render"][case] = await _render(config, chart, request["release"], values)
    finally:
        server.shutdown()
    return out


if __name__ == "__main__":
    print(json.dumps(asyncio.run(_main(json.loads(Path(sys.argv[1]).read_text())))))
