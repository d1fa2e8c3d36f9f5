"""deliver-data from http(s) URLs against a real HTTP server on 127.0.0.1: every redirect hop is
re-checked, the checked address is the one connected to, and a good fetch is validated and uploaded."""

from __future__ import annotations

import ipaddress
import json
import re
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from finetune_engine.jobs.deliver_data import DeliveryError, deliver_data, fetch_urls, resolve_url

GOOD = "".join(
    json.dumps(
        {"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]}
    )
    + "\n"
    for i in range(3)
).encode()
ONLY_LOOPBACK_1 = ["127.0.0.1/32"]  # the test server's address, and nothing else of 127/8


class _Server:
    def __init__(self):
        self.requests: list[tuple[str, str]] = []  # (path, Host header)
        routes = {
            "/good.jsonl": (200, GOOD, {}),
            "/bad.jsonl": (200, b"{oops\n", {}),
            "/r/data.jsonl": (302, b"", {"Location": "/good.jsonl"}),
            "/to-loopback": (302, b"", {"Location": "http://127.0.0.2:{port}/good.jsonl"}),
            "/to-ipv6-loopback": (307, b"", {"Location": "http://[::1]:{port}/good.jsonl"}),
            "/to-metadata": (301, b"", {"Location": "http://169.254.169.254/latest/meta-data/iam"}),
            "/to-private": (308, b"", {"Location": "http://10.0.0.7/data.jsonl"}),
            "/to-file": (302, b"", {"Location": "file:///etc/passwd"}),
            "/loop": (302, b"", {"Location": "/loop"}),
            "/missing.jsonl": (404, b"no", {}),
        }
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 - http.server API
                outer.requests.append((self.path, self.headers.get("Host", "")))
                status, body, headers = routes.get(self.path.split("?")[0], (404, b"", {}))
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k, v.format(port=outer.port))
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def paths(self) -> list[str]:
        return [p for p, _ in self.requests]


@pytest.fixture()
def http_server():
    server = _Server()
    server.thread.start()
    yield server
    server.httpd.shutdown()
    server.httpd.server_close()


def test_fetch_succeeds_from_an_allowed_network(http_server, tmp_path):
    fetch_urls(
        [http_server.url("/good.jsonl")],
        tmp_path,
        allow_private=False,
        timeout=10,
        allow_networks=ONLY_LOOPBACK_1,
    )
    assert (tmp_path / "good.jsonl").read_bytes() == GOOD


def test_the_default_still_refuses_loopback(http_server, tmp_path):
    with pytest.raises(DeliveryError, match="loopback/private"):
        fetch_urls([http_server.url("/good.jsonl")], tmp_path, allow_private=False, timeout=10)
    assert http_server.requests == []  # refused before connecting


def test_redirect_within_the_allowed_network_is_followed_and_keeps_the_name(http_server, tmp_path):
    fetch_urls(
        [http_server.url("/r/data.jsonl")],
        tmp_path,
        allow_private=False,
        timeout=10,
        allow_networks=ONLY_LOOPBACK_1,
    )
    assert http_server.paths() == ["/r/data.jsonl", "/good.jsonl"]
    assert [p.name for p in tmp_path.iterdir()] == ["data.jsonl"]  # the name of the URL as given
    assert (tmp_path / "data.jsonl").read_bytes() == GOOD


def test_redirect_loops_and_http_errors_fail(http_server, tmp_path):
    with pytest.raises(DeliveryError, match="more than 5 redirects"):
        fetch_urls([http_server.url("/loop")], tmp_path, allow_private=True, timeout=10)
    assert http_server.paths().count("/loop") == 6
    with pytest.raises(DeliveryError, match="HTTP 404"):
        fetch_urls([http_server.url("/missing.jsonl")], tmp_path, allow_private=True, timeout=10)


def test_dns_is_resolved_once_and_the_checked_address_is_connected(http_server, tmp_path, monkeypatch):
    """DNS rebinding: the first answer passes the check, later answers point elsewhere. The fetch
    must connect to the checked address (never asking DNS again) and still send the real Host."""
    real = socket.getaddrinfo
    asked = []

    def rebinding(host, port, *args, **kwargs):
        if host == "data.rebind.test":
            asked.append(host)
            ip = "127.0.0.1" if len(asked) == 1 else "10.66.0.1"
            return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (ip, port))]
        return real(host, port, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", rebinding)
    fetch_urls(
        [f"http://data.rebind.test:{http_server.port}/good.jsonl"], tmp_path, False, 10, ONLY_LOOPBACK_1
    )
    assert asked == ["data.rebind.test"]
    assert http_server.requests == [("/good.jsonl", f"data.rebind.test:{http_server.port}")]
    assert (tmp_path / "good.jsonl").read_bytes() == GOOD
    asked.clear()  # a second check of the same name now sees the private answer and refuses
    resolve_url("http://data.rebind.test/x.jsonl", False, ONLY_LOOPBACK_1)
    with pytest.raises(DeliveryError, match="10.66.0.1"):
        resolve_url("http://data.rebind.test/x.jsonl", False, ONLY_LOOPBACK_1)


@pytest.mark.parametrize(
    "path,match",
    [
        ("/to-loopback", "127.0.0.2, a loopback"),
        ("/to-ipv6-loopback", "::1, a loopback"),
        ("/to-metadata", "169.254.169.254, a loopback/private/link-local/metadata"),
        ("/to-private", "10.0.0.7, a loopback"),
        ("/to-file", "only http"),
    ],
)
def test_redirect_from_an_allowed_url_to_a_forbidden_one_is_refused(http_server, tmp_path, path, match):
    with pytest.raises(DeliveryError, match=match):
        fetch_urls(
            [http_server.url(path) + "?name=x.jsonl"],
            tmp_path,
            allow_private=False,
            timeout=10,
            allow_networks=ONLY_LOOPBACK_1,
        )
    assert http_server.paths() == [
        path + "?name=x.jsonl"
    ]  # the first hop only: the target was never contacted
    assert not any(tmp_path.iterdir())


@pytest.mark.s3
def test_deliver_data_from_url_validates_and_uploads(s3_env, http_server):
    from finetune_engine.storage import join, list_objects

    dest = join(s3_env["uri"], "datasets", "web")
    result = deliver_data(
        dest, urls=[http_server.url("/good.jsonl"), http_server.url("/r/data.jsonl")], allow_private_urls=True
    )
    assert result["files"] == [join(dest, "data.jsonl"), join(dest, "good.jsonl")]
    assert result["examples"] == {"data.jsonl": 3, "good.jsonl": 3}
    assert list_objects(dest) == {"data.jsonl": len(GOOD), "good.jsonl": len(GOOD)}
    body = (
        s3_env["server"]
        .client()
        .get_object(Bucket=s3_env["bucket"], Key="datasets/web/good.jsonl")["Body"]
        .read()
    )
    assert body == GOOD


@pytest.mark.s3
def test_deliver_data_from_url_with_invalid_data_uploads_nothing(s3_env, http_server):
    from finetune_engine.data.validate import DataValidationError
    from finetune_engine.storage import join, list_objects

    dest = join(s3_env["uri"], "datasets", "web")
    with pytest.raises(DataValidationError, match="bad.jsonl"):
        deliver_data(
            dest,
            urls=[http_server.url("/good.jsonl"), http_server.url("/bad.jsonl")],
            allow_private_urls=True,
        )
    assert list_objects(dest) == {}


def test_cli_allow_network_flag(http_server, tmp_path, capsys):
    from finetune_engine.jobs.deliver_data import main

    assert (
        main(["s3://b/d", "--url", http_server.url("/to-metadata"), "--allow-network", "127.0.0.1/32"]) == 2
    )
    assert "169.254.169.254" in capsys.readouterr().err


@pytest.mark.parametrize(
    "address",
    [
        "100.64.0.1",
        "100.100.100.200",
        "192.0.2.10",
        "198.18.0.1",
        "::ffff:100.64.0.1",
        "fd00::1",
        "2001:db8::1",
    ],
)
def test_non_public_addresses_are_refused_unless_allowed(address, monkeypatch):
    """Shared address space (100.64.0.0/10, where some clouds serve instance metadata), documentation
    and benchmarking ranges are not public: refused like private ones, unless allowed by network."""
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    monkeypatch.setattr(
        socket, "getaddrinfo", lambda *a, **k: [(family, socket.SOCK_STREAM, 6, "", (address, 80))]
    )
    shown = str(ipaddress.ip_address(address))
    with pytest.raises(DeliveryError, match=f"resolves to {re.escape(shown)}, .*non-public"):
        resolve_url("http://meta.example/data.jsonl")
    nets = ["::/0"] if family == socket.AF_INET6 else ["100.64.0.0/10", "192.0.2.0/24", "198.18.0.0/15"]
    assert resolve_url("http://meta.example/data.jsonl", allow_networks=nets)[1] == shown
    assert resolve_url("http://meta.example/data.jsonl", allow_private=True)[1] == shown


def test_public_addresses_pass(monkeypatch):
    monkeypatch.setattr(
        socket, "getaddrinfo", lambda *a, **k: [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("8.8.8.8", 443))]
    )
    assert resolve_url("https://data.example/x.jsonl") == ("https://data.example/x.jsonl", "8.8.8.8")
