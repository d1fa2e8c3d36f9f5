"""A tiny HTTP server that plays the parts of the Kubernetes API the serving operators use.

The real ``kubernetes`` (and ``kubernetes_asyncio``) clients talk to it over a loopback socket, so
what they serialize is what a real API server would receive: paths, methods, content types,
bodies. It keeps objects in memory and behaves like the API server where it matters here:

- ``POST`` of a collection creates (409 AlreadyExists when the name exists, 422 without a name);
- ``GET``/``PUT``/``PATCH``/``DELETE`` of an object (404 when absent); ``PUT`` of a custom
  resource without ``metadata.resourceVersion`` is refused (422), as a CRD's strategy does;
  ``PATCH`` requires a patch content type and does a merge;
- ``/status`` of a Deployment reports it ready after ``ready_after`` reads (or never);
- ``POST .../services/NAME/proxy/PATH`` answers like vLLM's OpenAI server, recording the request;
- ``GET`` of a collection lists it (``labelSelector`` with ``k=v`` terms); ``GET .../pods/NAME/log``
  returns what a test put in ``logs``;
- every request must carry ``Authorization: Bearer <token>``.
"""

from __future__ import annotations

import copy
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import yaml

TOKEN = "fake-kube-token"
COLLECTION = re.compile(r"^/(?P<group>api/v1|apis/[^/]+/[^/]+)/namespaces/(?P<ns>[^/]+)/(?P<plural>[^/]+)$")
OBJECT = re.compile(
    r"^/(?P<group>api/v1|apis/[^/]+/[^/]+)/namespaces/(?P<ns>[^/]+)/(?P<plural>[^/]+)/(?P<name>[^/]+)"
    r"(?P<sub>/status)?$"
)
LOG = re.compile(r"^/api/v1/namespaces/(?P<ns>[^/]+)/pods/(?P<name>[^/]+)/log$")
PROXY = re.compile(r"^/api/v1/namespaces/(?P<ns>[^/]+)/services/(?P<name>[^/]+)/proxy/(?P<path>.*)$")
BUILTIN_GROUPS = ("api/v1", "apis/apps/v1", "apis/networking.k8s.io/v1")
PATCH_TYPES = (
    "application/merge-patch+json",
    "application/strategic-merge-patch+json",
    "application/json-patch+json",
    "application/apply-patch+yaml",
)


def _merge(dst: dict, src: dict) -> dict:
    for key, value in src.items():
        if value is None:
            dst.pop(key, None)
        elif isinstance(value, dict) and isinstance(dst.get(key), dict):
            _merge(dst[key], value)
        else:
            dst[key] = copy.deepcopy(value)
    return dst


@dataclass
class FakeKubeAPI:
    ready_after: int | None = 2  # Deployment status reads before it reports ready; None: never
    chat_reply: str = "Hello from the fake vLLM."
    objects: dict[tuple[str, str, str, str], dict] = field(default_factory=dict)
    requests: list[dict] = field(default_factory=list)
    proxied: list[dict] = field(default_factory=list)
    status_reads: int = 0
    logs: dict[tuple[str, str], str] = field(default_factory=dict)  # (namespace, pod) -> its log

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self._version = 0
        api = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def _send(self, code: int, body: Any) -> None:
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _handle(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length) if length else b""
                path = self.path.split("?", 1)[0]
                query = self.path.split("?", 1)[1] if "?" in self.path else ""
                record = {
                    "method": self.command,
                    "path": path,
                    "query": query,
                    "content_type": self.headers.get("Content-Type"),
                    "body": None,
                }
                if raw:
                    try:
                        record["body"] = json.loads(raw)
                    except ValueError:
                        record["body"] = yaml.safe_load(raw)
                with api._lock:
                    api.requests.append(record)
                if self.headers.get("Authorization") != f"Bearer {TOKEN}":
                    return self._send(401, _status(401, "Unauthorized", "no or wrong bearer token"))
                code, body = api.dispatch(record)
                self._send(code, body)

            do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _handle

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    # -- lifecycle ------------------------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def start(self) -> FakeKubeAPI:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def kubeconfig(self, path: Path) -> Path:
        path.write_text(
            yaml.safe_dump(
                {
                    "apiVersion": "v1",
                    "kind": "Config",
                    "current-context": "fake",
                    "clusters": [{"name": "fake", "cluster": {"server": self.url}}],
                    "users": [{"name": "fake", "user": {"token": TOKEN}}],
                    "contexts": [
                        {
                            "name": "fake",
                            "context": {"cluster": "fake", "user": "fake", "namespace": "default"},
                        }
                    ],
                }
            )
        )
        return path

    # -- what the tests look at -----------------------------------------------------------------

    def get(self, plural: str, namespace: str, name: str) -> dict | None:
        return next(
            (o for (_, ns, p, n), o in self.objects.items() if (p, ns, n) == (plural, namespace, name)), None
        )

    def calls(self, *, proxy: bool = True) -> list[tuple[str, str]]:
        return [(r["method"], r["path"]) for r in self.requests if proxy or "/proxy/" not in r["path"]]

    # -- the API ----------------------------------------------------------------------------------

    def dispatch(self, req: dict) -> tuple[int, Any]:
        method, path, body = req["method"], req["path"], req["body"]
        if m := PROXY.match(path):
            return self._proxy(m, req)
        with self._lock:
            if method == "GET" and (m := LOG.match(path)):
                return self._log(m, req)
            if method == "GET" and (m := COLLECTION.match(path)):
                return self._list(m["group"], m["ns"], m["plural"], req["query"])
            if m := COLLECTION.match(path):
                if method != "POST":
                    return 405, _status(405, "MethodNotAllowed", method)
                return self._create(m["group"], m["ns"], m["plural"], body)
            if m := OBJECT.match(path):
                key = (m["group"], m["ns"], m["plural"], m["name"])
                if key not in self.objects:
                    return 404, _status(404, "NotFound", f'{m["plural"]} "{m["name"]}" not found')
                if method == "GET":
                    if m["sub"] and m["plural"] == "deployments":
                        self.status_reads += 1
                        self._update_status(self.objects[key])
                    return 200, self.objects[key]
                if method == "DELETE":
                    del self.objects[key]
                    return 200, _status(200, "Success", "deleted")
                if method == "PUT":
                    if not isinstance(body, dict) or body.get("metadata", {}).get("name") != m["name"]:
                        return 400, _status(
                            400, "BadRequest", "the name of the object does not match the URL"
                        )
                    if m["group"] not in BUILTIN_GROUPS and not body["metadata"].get("resourceVersion"):
                        return 422, _status(
                            422,
                            "Invalid",
                            "metadata.resourceVersion: Invalid value: 0x0: must be specified for an update",
                        )
                    return 200, self._store(key, copy.deepcopy(body), keep=self.objects[key])
                if method == "PATCH":
                    if req["content_type"] not in PATCH_TYPES:
                        return 415, _status(
                            415, "UnsupportedMediaType", f"{req['content_type']} is not a patch type"
                        )
                    if not isinstance(body, dict):
                        return 400, _status(400, "BadRequest", "only merge-style patches are faked")
                    return 200, self._store(
                        key, _merge(copy.deepcopy(self.objects[key]), body), keep=self.objects[key]
                    )
            return 404, _status(404, "NotFound", path)

    def _create(self, group: str, ns: str, plural: str, body: Any) -> tuple[int, Any]:
        if not isinstance(body, dict) or not body.get("metadata", {}).get("name"):
            return 422, _status(422, "Invalid", "metadata.name: Required value")
        if body["metadata"].get("namespace") not in (None, ns):
            return 400, _status(400, "BadRequest", "the namespace of the object does not match the URL")
        key = (group, ns, plural, body["metadata"]["name"])
        if key in self.objects:
            return 409, _status(409, "AlreadyExists", f'{plural} "{key[3]}" already exists')
        return 201, self._store(key, copy.deepcopy(body))

    def _store(self, key: tuple, obj: dict, keep: dict | None = None) -> dict:
        self._version += 1
        meta = obj.setdefault("metadata", {})
        meta["namespace"] = key[1]
        meta["resourceVersion"] = str(self._version)
        meta["uid"] = (keep or {}).get("metadata", {}).get("uid") or f"uid-{self._version}"
        generation = int((keep or {}).get("metadata", {}).get("generation") or 0) + 1
        meta["generation"] = generation
        if keep is not None and "status" in keep:
            obj["status"] = keep["status"]
        self.objects[key] = obj
        return obj

    def _update_status(self, dep: dict) -> None:
        replicas = int(dep.get("spec", {}).get("replicas", 1))
        ready = self.ready_after is not None and self.status_reads >= self.ready_after
        dep["status"] = {
            "observedGeneration": dep["metadata"]["generation"],
            "replicas": replicas,
            "updatedReplicas": replicas,
            "readyReplicas": replicas if ready else 0,
            "availableReplicas": replicas if ready else 0,
            "conditions": [{"type": "Available", "status": "True" if ready else "False"}],
        }

    def _proxy(self, m: re.Match, req: dict) -> tuple[int, Any]:
        if (m["ns"], m["name"].split("%3A")[0].split(":")[0]) not in {
            (ns, n) for (_, ns, p, n) in self.objects if p == "services"
        }:
            return 404, _status(404, "NotFound", f'services "{m["name"]}" not found')
        self.proxied.append({**req, "service": m["name"], "namespace": m["ns"], "proxy_path": m["path"]})
        if req["method"] != "POST" or m["path"] != "v1/chat/completions":
            return 404, {"detail": "Not Found"}
        if (
            req["content_type"] != "application/json"
            or not isinstance(req["body"], dict)
            or not req["body"].get("messages")
        ):
            return 400, {"error": {"message": "expected a JSON chat completion request"}}
        return 200, {
            "id": "chatcmpl-1",
            "object": "chat.completion",
            "model": req["body"].get("model"),
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": self.chat_reply},
                    "finish_reason": "stop",
                }
            ],
        }

    def _list(self, group: str, ns: str, plural: str, query: str) -> tuple[int, Any]:
        """A collection's objects matching ``labelSelector`` (``k=v`` terms joined by commas)."""
        from urllib.parse import parse_qs

        selector = (parse_qs(query).get("labelSelector") or [""])[0]
        wanted = dict(term.split("=", 1) for term in selector.split(",") if "=" in term)
        items = [
            obj
            for (g, n, p, _), obj in sorted(self.objects.items())
            if (g, n, p) == (group, ns, plural)
            and all((obj.get("metadata", {}).get("labels") or {}).get(k) == v for k, v in wanted.items())
        ]
        return 200, {"kind": "List", "apiVersion": "v1", "metadata": {}, "items": copy.deepcopy(items)}

    def _log(self, m: re.Match, req: dict) -> tuple[int, Any]:
        """A pod's log (``tailLines`` honoured), from ``logs``."""
        from urllib.parse import parse_qs

        if ("api/v1", m["ns"], "pods", m["name"]) not in self.objects:
            return 404, _status(404, "NotFound", f'pods "{m["name"]}" not found')
        lines = self.logs.get((m["ns"], m["name"]), "").splitlines()
        tail = (parse_qs(req["query"]).get("tailLines") or [None])[0]
        return 200, "\n".join(lines[-int(tail) :] if tail else lines)


def _status(code: int, reason: str, message: str) -> dict:
    return {
        "kind": "Status",
        "apiVersion": "v1",
        "status": "Success" if code < 300 else "Failure",
        "code": code,
        "reason": reason,
        "message": message,
    }


class FakeOpenAI:
    """A vLLM-like OpenAI server on loopback for the direct (non-proxy) calls: answers
    ``/v1/chat/completions`` and ``/v1/load_lora_adapter`` only with ``Authorization: Bearer
    <api_key>`` (401 otherwise, as vLLM's ``VLLM_API_KEY`` does), recording every request."""

    def __init__(self, api_key: str | None, reply: str = "Hello from the fake vLLM.") -> None:
        self.api_key, self.reply, self.requests = api_key, reply, []
        self.adapters: dict[str, str] = {}
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def do_POST(self):
                raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                body = json.loads(raw or b"{}")
                fake.requests.append({"path": self.path, "headers": dict(self.headers), "body": body})
                if fake.api_key and self.headers.get("Authorization") != f"Bearer {fake.api_key}":
                    code, answer = 401, {"error": "Unauthorized"}
                elif self.path == "/v1/chat/completions":
                    code, answer = (
                        200,
                        {"choices": [{"message": {"role": "assistant", "content": fake.reply}}]},
                    )
                elif self.path == "/v1/load_lora_adapter":
                    fake.adapters[body["lora_name"]] = body["lora_path"]
                    code, answer = 200, f"Success: LoRA adapter '{body['lora_name']}' added successfully."
                else:
                    code, answer = 404, {"detail": "Not Found"}
                data = json.dumps(answer).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
