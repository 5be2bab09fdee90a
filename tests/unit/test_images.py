"""images.py against real HTTP servers on loopback: a fake Label Studio (tokens, PAT refresh, presign, redirects)
and other hosts on 127.0.0.2/127.0.0.3, all on tools/harness/stub_label_studio.py. Non-loopback private addresses are never contacted: their refusal is
checked before connecting, with connect() itself patched to fail the test if anything leaves the machine."""
from __future__ import annotations

import base64
import io
import ipaddress
import json
import logging
import os
import socket
import struct
import threading
import time
import zlib
from pathlib import Path
from typing import Callable
from urllib.parse import parse_qs, urlsplit

import numpy as np
import pytest
from PIL import Image

from sam_backend.errors import ImageError
from sam_backend.images import ImageLoader, LabelStudioAccess
from sam_backend.images.credentials import token_kind
from sam_backend.images.redact import redact_url
from sam_backend.images.transport import address_problem
from sam_backend.settings import Settings
from tools.harness import stub_label_studio
from tools.harness.stub_label_studio import FakeLabelStudio, Handler, LoopbackServer

LEGACY = "legacy-0123456789abcdef-secret"
SETUP_TOKEN = "setup-token-fedcba9876543210"


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def make_jwt(claims: dict) -> str:
    return ".".join([b64url(json.dumps({"alg": "HS256", "typ": "JWT"}).encode()),
                     b64url(json.dumps(claims).encode()), b64url(os.urandom(32))])


PAT = make_jwt({"token_type": "refresh", "exp": int(time.time()) + 86400, "jti": "pat-jti-secret", "user_id": 1})


def png(size=(6, 4), mode="RGB", color=(10, 200, 30)) -> bytes:
    out = io.BytesIO()
    Image.new(mode, size, color).save(out, "PNG")
    return out.getvalue()


IMAGE = png()


# ---- HTTP servers (tools/harness/stub_label_studio.py) -----------------------------------------------------------

class TokenLabelStudio(FakeLabelStudio):
    """The harness's Label Studio with more of its access control: /data/... only with `Token <LEGACY>` (when
    legacy tokens are enabled) or the setup token, or `Bearer <access>` where access came from
    POST /api/token/refresh/ {"refresh": PAT}; plus redirects and the presign endpoint of cloud storage.

    Kept here rather than in the harness: only these tests need a PAT refresh, presign and redirects."""

    def __init__(self, host: str = "127.0.0.1") -> None:
        super().__init__(LEGACY, host)
        self.legacy_enabled = True
        self.tokens = {LEGACY, SETUP_TOKEN}
        self.access_lifetime = 300
        self.access: dict[str, float] = {}  # issued access token -> expiry (time.time())
        self.refreshes = 0
        self.redirects: dict[str, str] = {}
        self.files.update({"/data/upload/1/img.png": IMAGE, "/data/local-files/?d=dir/img.png": png(color=(1, 2, 3))})
        self.presign_target = ""
        self.presign_seen: list[str] = []

    def revoke_access(self) -> None:
        with self.lock:
            self.access.clear()

    def authorized(self, header: str | None) -> bool:
        if not header:
            return False
        kind, _, value = header.partition(" ")
        if kind == "Token":
            return self.legacy_enabled and value in self.tokens
        if kind == "Bearer":
            with self.lock:
                return self.access.get(value, 0) > time.time()
        return False

    def app(self, h: Handler, body: bytes) -> None:
        path = h.path
        if h.command == "POST" and path == "/api/token/refresh/":
            refresh = json.loads(body or b"{}").get("refresh")
            if refresh != PAT:
                return h.send(401, b'{"detail": "Token is invalid or expired"}')
            access = make_jwt({"token_type": "access", "exp": int(time.time()) + self.access_lifetime})
            with self.lock:
                self.refreshes += 1
                self.access[access] = time.time() + self.access_lifetime
            return h.send(200, json.dumps({"access": access}).encode(), {"Content-Type": "application/json"})
        if not self.authorized(h.headers.get("Authorization")):
            return h.send(401, b'{"detail": "Authentication credentials were not provided."}')
        if path in self.redirects:
            return h.send(302, headers={"Location": self.redirects[path]})
        if path.startswith("/tasks/7/presign/"):
            self.presign_seen.append(parse_qs(urlsplit(path).query)["fileuri"][0])
            return h.send(303, headers={"Location": self.presign_target})
        self.serve_file(h)

    def secrets(self) -> list[str]:
        with self.lock:
            return [LEGACY, SETUP_TOKEN, PAT, "pat-jti-secret", *self.access]


def static(body: bytes = IMAGE, status: int = 200, headers: dict | None = None):
    return stub_label_studio.static(body, status, headers)


@pytest.fixture
def servers():
    started: list[LoopbackServer] = []

    def start(host: str = "127.0.0.2", app=None) -> LoopbackServer:
        server = LoopbackServer(app or static(), host)
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


@pytest.fixture
def ls(caplog):
    fake = TokenLabelStudio()
    yield fake
    fake.server.stop()
    logged = logged_text(caplog)
    for secret in fake.secrets():  # the access tokens it issued included
        assert secret not in logged


@pytest.fixture(autouse=True)
def no_secrets_in_logs(caplog):
    caplog.set_level(logging.DEBUG, logger="sam_backend.images")
    yield
    logged = logged_text(caplog)
    for secret in [LEGACY, SETUP_TOKEN, PAT, "topsecret", "hunter2"]:
        assert secret not in logged


def logged_text(caplog) -> str:
    """Everything the test logged (caplog.text at teardown would hold the teardown's records only)."""
    records = [r for phase in ("setup", "call") for r in caplog.get_records(phase)]
    return "\n".join(f"{r.getMessage()} {r.args!r}" for r in records)


@pytest.fixture
def loopback_only(monkeypatch):
    """Fail the test if any socket connects anywhere but loopback; returns the list of connected addresses."""
    attempts: list[str] = []
    original = socket.socket.connect

    def connect(self, address):
        attempts.append(address[0])
        assert ipaddress.ip_address(address[0]).is_loopback, f"a packet would leave the machine: {address}"
        return original(self, address)

    monkeypatch.setattr(socket.socket, "connect", connect)
    return attempts


@pytest.fixture
def resolve(monkeypatch):
    """Map test host names to addresses: resolve({"name": ["10.0.0.1"]}); a list of lists answers successive
    lookups in turn (the last one repeating)."""
    table: dict[str, list] = {}
    original = socket.getaddrinfo

    def getaddrinfo(host, port, *args, **kwargs):
        if isinstance(host, bytes):
            host = host.decode()
        if host in table:
            answers = table[host]
            current = answers.pop(0) if len(answers) > 1 else answers[0]
            result = []
            for address in current:
                family = socket.AF_INET6 if ":" in address else socket.AF_INET
                sockaddr = (address, int(port), 0, 0) if family == socket.AF_INET6 else (address, int(port))
                result.append((family, socket.SOCK_STREAM, 6, "", sockaddr))
            return result
        return original(host, port, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)

    def add(mapping: dict) -> None:
        for name, value in mapping.items():
            table[name] = value if value and isinstance(value[0], list) else [value]
    return add


def loader(**overrides) -> ImageLoader:
    values = {"image_timeout": 3.0}
    values.update(overrides)
    return ImageLoader(Settings(**values))


def expect(status: int, call: Callable, *secrets: str) -> ImageError:
    with pytest.raises(ImageError) as info:
        call()
    error = info.value
    assert error.status == status, error.message
    assert str(error) == error.message
    for secret in [LEGACY, SETUP_TOKEN, PAT, "pat-jti-secret", "topsecret", "hunter2", *secrets]:
        assert secret not in error.message
    return error


# ---- Label Studio credentials ----------------------------------------------------------------------------------

def test_token_kinds():
    assert token_kind(LEGACY) == "legacy"
    assert token_kind(PAT) == "pat"
    assert token_kind(make_jwt({"token_type": "access"})) == "access"
    assert token_kind("a.b.c") == "legacy"
    assert token_kind("") == "none"


def test_legacy_token_relative_and_absolute(ls):
    images = loader(label_studio_url=ls.url, label_studio_api_key=LEGACY)
    assert images.fetch("/data/upload/1/img.png") == IMAGE
    assert images.fetch(ls.url + "/data/upload/1/img.png") == IMAGE
    assert ls.server.authorizations() == [f"Token {LEGACY}"] * 2


def test_label_studio_under_a_base_path(servers):
    seen = []

    def app(h, _):
        seen.append((h.path, h.headers.get("Authorization")))
        h.send(200, IMAGE)
    server = servers("127.0.0.1", app)
    images = loader(label_studio_url=server.url + "/ls/", label_studio_api_key=LEGACY)
    assert images.fetch("/data/upload/1/a.png") == IMAGE
    assert images.fetch(server.url + "/ls/data/upload/1/b.png") == IMAGE
    assert seen == [("/ls/data/upload/1/a.png", f"Token {LEGACY}"), ("/ls/data/upload/1/b.png", f"Token {LEGACY}")]


def test_pat_is_refreshed_cached_and_refreshed_again_after_401(ls):
    images = loader(label_studio_url=ls.url, label_studio_api_key=PAT)
    assert images.fetch("/data/upload/1/img.png") == IMAGE
    assert images.fetch("/data/upload/1/img.png") == IMAGE
    assert ls.refreshes == 1
    ls.revoke_access()  # the cached access token is now refused with 401
    assert images.fetch("/data/upload/1/img.png") == IMAGE
    assert ls.refreshes == 2
    gets = [r for r in ls.server.requests if r["method"] == "GET"]
    assert [r["headers"]["Authorization"].split()[0] for r in gets] == ["Bearer"] * 4
    assert all(r["headers"]["Authorization"] != f"Bearer {PAT}" for r in gets)  # the PAT itself is never sent
    assert [r["headers"]["Authorization"] for r in gets][-2] != [r["headers"]["Authorization"] for r in gets][-1]
    refresh = [r for r in ls.server.requests if r["method"] == "POST"]
    assert [json.loads(r["body"]) for r in refresh] == [{"refresh": PAT}] * 2


def test_access_token_close_to_expiry_is_refreshed(ls):
    ls.access_lifetime = 10  # less than the 30 s margin
    images = loader(label_studio_url=ls.url, label_studio_api_key=PAT)
    images.fetch("/data/upload/1/img.png")
    images.fetch("/data/upload/1/img.png")
    assert ls.refreshes == 2


def test_concurrent_fetches_refresh_once(ls):
    images = loader(label_studio_url=ls.url, label_studio_api_key=PAT)
    results, errors = [], []

    def work():
        try:
            results.append(images.fetch("/data/upload/1/img.png"))
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)
    threads = [threading.Thread(target=work) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors and results == [IMAGE] * 8
    assert ls.refreshes == 1


def test_pat_refused_by_label_studio(ls):
    revoked = make_jwt({"token_type": "refresh", "jti": "other"})
    images = loader(label_studio_url=ls.url, label_studio_api_key=revoked)
    error = expect(502, lambda: images.fetch("/data/upload/1/img.png"), revoked)
    assert "personal access token" in error.message and "LABEL_STUDIO_API_KEY" in error.message


@pytest.mark.parametrize("status, body, words", [
    (404, b"", "too old"), (500, b"", "HTTP 500"), (200, b'{"refresh": "x"}', "access"), (200, b"<html>", "access")])
def test_bad_token_refresh_answers(servers, status, body, words):
    server = servers("127.0.0.1", static(body, status, {"Content-Type": "application/json"}))
    images = loader(label_studio_url=server.url, label_studio_api_key=PAT)
    assert words in expect(502, lambda: images.fetch("/data/upload/1/img.png")).message
    assert [r["method"] for r in server.requests] == ["POST"]


def test_legacy_token_refused_when_legacy_tokens_are_disabled(ls):
    ls.legacy_enabled = False
    images = loader(label_studio_url=ls.url, label_studio_api_key=LEGACY)
    error = expect(502, lambda: images.fetch("/data/upload/1/img.png"))
    assert "legacy token" in error.message and "401" in error.message


def test_no_token_at_all(ls):
    images = loader(label_studio_url=ls.url)
    error = expect(502, lambda: images.fetch("/data/upload/1/img.png"))
    assert "no credentials" in error.message
    assert ls.server.authorizations() == [None]


def test_fallback_from_setup(ls):
    images = loader()
    assert images.fetch("/data/upload/1/img.png", LabelStudioAccess(ls.url, SETUP_TOKEN)) == IMAGE
    assert images.fetch("/data/upload/1/img.png", LabelStudioAccess(ls.url, PAT)) == IMAGE
    assert ls.server.authorizations()[0] == f"Token {SETUP_TOKEN}"
    error = expect(400, lambda: images.fetch("/data/upload/1/img.png"))
    assert "LABEL_STUDIO_URL" in error.message
    error = expect(400, lambda: images.fetch("/data/upload/1/img.png", LabelStudioAccess("ls:8080", SETUP_TOKEN)))
    assert "/setup" in error.message
    with_bad_url = loader(label_studio_url="localhost:8080", label_studio_api_key=LEGACY)
    assert "LABEL_STUDIO_URL" in expect(500, lambda: with_bad_url.fetch("/data/upload/1/img.png")).message


def test_unusable_label_studio_url_does_not_block_other_images(servers):
    server = servers("127.0.0.2")
    images = loader(allow_private_hosts=True)
    assert images.fetch(server.url + "/img.png", LabelStudioAccess("ls:8080", SETUP_TOKEN)) == IMAGE
    assert server.authorizations() == [None]


def test_configured_key_is_never_sent_to_a_hostname_from_setup(ls):
    """LABEL_STUDIO_API_KEY without LABEL_STUDIO_URL: /setup's hostname gets /setup's token, not the key."""
    images = loader(label_studio_api_key=LEGACY)
    assert images.fetch("/data/upload/1/img.png", LabelStudioAccess(ls.url, SETUP_TOKEN)) == IMAGE
    assert ls.server.authorizations() == [f"Token {SETUP_TOKEN}"]


def test_configured_url_uses_setup_token_when_no_key(ls):
    images = loader(label_studio_url=ls.url)
    assert images.fetch("/data/upload/1/img.png", LabelStudioAccess("http://elsewhere:1", SETUP_TOKEN)) == IMAGE
    assert ls.server.authorizations() == [f"Token {SETUP_TOKEN}"]


# ---- other hosts: no credentials, redirects --------------------------------------------------------------------

def test_credentials_never_sent_to_another_host(ls, servers):
    other = servers("127.0.0.2")
    same_host_other_port = servers("127.0.0.1")
    images = loader(label_studio_url=ls.url, label_studio_api_key=LEGACY, allow_private_hosts=True)
    assert images.fetch(other.url + "/data/upload/1/img.png") == IMAGE
    assert images.fetch(same_host_other_port.url + "/data/upload/1/img.png") == IMAGE
    assert other.authorizations() == [None] and same_host_other_port.authorizations() == [None]


def test_credentials_not_sent_after_a_redirect_away_from_label_studio(ls, servers):
    other = servers("127.0.0.2", static())
    ls.redirects["/data/upload/1/away.png"] = other.url + "/img.png"
    images = loader(label_studio_url=ls.url, label_studio_api_key=PAT, allow_private_hosts=True)
    assert images.fetch("/data/upload/1/away.png") == IMAGE
    assert other.authorizations() == [None]


def test_credentials_not_sent_when_a_redirect_comes_back_to_label_studio(ls, servers):
    bounce = servers("127.0.0.2", static(b"", 302, {"Location": ls.url + "/data/upload/1/img.png"}))
    ls.redirects["/data/upload/1/away.png"] = bounce.url + "/back"
    images = loader(label_studio_url=ls.url, label_studio_api_key=LEGACY, allow_private_hosts=True)
    error = expect(502, lambda: images.fetch("/data/upload/1/away.png"))
    assert "redirect from another host" in error.message
    assert ls.server.authorizations() == [f"Token {LEGACY}", None]


def test_same_origin_redirect_keeps_credentials(ls):
    ls.redirects["/data/upload/1/moved.png"] = "/data/upload/1/img.png"
    images = loader(label_studio_url=ls.url, label_studio_api_key=LEGACY)
    assert images.fetch("/data/upload/1/moved.png") == IMAGE
    assert ls.server.authorizations() == [f"Token {LEGACY}"] * 2


def test_too_many_redirects(servers):
    loop = servers("127.0.0.2", static(b"", 302, {"Location": "/again"}))
    images = loader(allow_private_hosts=True)
    error = expect(502, lambda: images.fetch(loop.url + "/start"))
    assert "redirects" in error.message
    assert len(loop.requests) == 6


def test_redirect_to_unsupported_scheme(servers):
    server = servers("127.0.0.2", static(b"", 302, {"Location": "file:///etc/passwd"}))
    expect(502, lambda: loader(allow_private_hosts=True).fetch(server.url + "/x"))


def test_userinfo_is_sent_as_basic_auth_only_to_its_host_and_never_shown(servers):
    server = servers("127.0.0.2", static(status=404))
    images = loader(allow_private_hosts=True)
    error = expect(404, lambda: images.fetch(server.url.replace("//", "//user:hunter2@") + "/x.png"))
    assert "***@" in error.message
    assert server.authorizations() == ["Basic " + base64.b64encode(b"user:hunter2").decode()]


# ---- reachable hosts (SSRF) ------------------------------------------------------------------------------------

@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.2", "localhost"])
def test_loopback_targets_that_are_not_label_studio_are_refused(ls, servers, host):
    victim = servers("127.0.0.1" if host == "localhost" else host)
    port = victim.server_address[1]
    images = loader(label_studio_url=ls.url, label_studio_api_key=LEGACY)
    error = expect(403, lambda: images.fetch(f"http://{host}:{port}/data/upload/1/img.png"))
    assert "loopback" in error.message and "ALLOW_PRIVATE_IMAGE_HOSTS" in error.message
    assert victim.requests == [] and ls.server.requests == []


def test_ipv6_loopback_refused(loopback_only):
    expect(403, lambda: loader().fetch("http://[::1]:9/img.png"))
    assert loopback_only == []


@pytest.mark.parametrize("address", ["10.0.0.1", "172.16.5.4", "192.168.1.1", "169.254.169.254", "100.64.0.1",
                                     "0.0.0.0", "224.0.0.1", "255.255.255.255", "[fc00::1]", "[fe80::1]",
                                     "[::ffff:10.0.0.1]", "[::ffff:127.0.0.1]", "[2002:a00:1::1]", "[::]",
                                     "[ff02::1]", "2130706433"])
def test_private_addresses_refused_before_connecting(loopback_only, address):
    error = expect(403, lambda: loader().fetch(f"http://{address}/latest/meta-data/"))
    assert "address" in error.message
    assert loopback_only == []


def test_host_names_resolving_to_private_addresses_refused_before_connecting(loopback_only, resolve):
    resolve({"internal.test": ["10.1.2.3"], "mixed.test": ["93.184.216.34", "192.168.0.9"],
             "v6.test": ["fd12::5"]})
    images = loader()
    for host in ("internal.test", "mixed.test", "v6.test"):
        error = expect(403, lambda: images.fetch(f"https://{host}/a.jpg"))
        assert host in error.message
    assert loopback_only == []


def test_address_check_of_the_connected_peer_defeats_dns_rebinding(servers, resolve, loopback_only):
    """The name resolves to a public address for the check, then to loopback for the connection."""
    victim = servers("127.0.0.2")
    resolve({"rebind.test": [["93.184.216.34"], ["127.0.0.2"]]})
    error = expect(403, lambda: loader().fetch(f"http://rebind.test:{victim.server_address[1]}/img.png"))
    assert "connected to 127.0.0.2" in error.message
    assert loopback_only == ["127.0.0.2"]  # the connection was made, and closed before a byte was sent
    time.sleep(0.05)
    assert victim.requests == []


def test_redirect_to_a_private_address_refused(ls, servers, loopback_only):
    victim = servers("127.0.0.2")
    ls.redirects["/data/upload/1/meta.png"] = "http://169.254.169.254/latest/meta-data/"
    ls.redirects["/data/upload/1/local.png"] = victim.url + "/admin"
    images = loader(label_studio_url=ls.url, label_studio_api_key=LEGACY)
    expect(403, lambda: images.fetch("/data/upload/1/meta.png"))
    expect(403, lambda: images.fetch("/data/upload/1/local.png"))
    assert victim.requests == []
    assert set(loopback_only) == {"127.0.0.1"}


def test_allow_private_hosts(servers):
    server = servers("127.0.0.2")
    assert loader(allow_private_hosts=True).fetch(server.url + "/img.png") == IMAGE
    expect(403, lambda: loader().fetch(server.url + "/img.png"))


def test_allowed_hosts(ls, servers, resolve):
    allowed = servers("127.0.0.2")
    other = servers("127.0.0.3")
    resolve({"img.example.test": ["127.0.0.2"], "example.test": ["127.0.0.2"]})
    port = allowed.server_address[1]
    images = loader(label_studio_url=ls.url, label_studio_api_key=LEGACY, allow_private_hosts=True,
                    allowed_hosts=("127.0.0.2", "*.example.test"))
    assert images.fetch(allowed.url + "/a.png") == IMAGE
    assert images.fetch(f"http://img.example.test:{port}/b.png") == IMAGE
    assert images.fetch("/data/upload/1/img.png") == IMAGE  # Label Studio is always allowed
    error = expect(403, lambda: images.fetch(other.url + "/c.png"))
    assert "ALLOWED_IMAGE_HOSTS" in error.message
    expect(403, lambda: images.fetch(f"http://example.test:{port}/d.png"))
    assert other.requests == []
    with_port = loader(allow_private_hosts=True, allowed_hosts=(f"127.0.0.2:{port}",))
    assert with_port.fetch(allowed.url + "/e.png") == IMAGE
    expect(403, lambda: with_port.fetch(other.url.replace("127.0.0.3", "127.0.0.2") + "/f.png"))
    # allowed by name is not allowed to be private
    expect(403, lambda: loader(allowed_hosts=("127.0.0.2",)).fetch(allowed.url + "/g.png"))


def test_address_problem():
    assert address_problem("8.8.8.8") is None
    assert address_problem("2001:4860:4860::8888") is None
    assert address_problem("64:ff9b::808:808") is None  # NAT64 of a public address
    assert address_problem("64:ff9b::a00:1") == "private"
    assert address_problem("127.0.0.1") == "loopback"
    assert address_problem("::ffff:169.254.1.1") == "link-local"
    assert address_problem("239.1.1.1") == "multicast"
    assert address_problem("fe80::1%eth0") == "link-local"


@pytest.mark.parametrize("url", [
    "data:image/png;base64,iVBORw0KGgo=", "ftp://example.com/a.png", "file:///etc/passwd", "gopher://x/",
    "images/a.png", "//example.com/a.png", "/api/projects/1/", "/static/../data/x", "/data/../api/current-user/whoami",
    "/data/%2e%2e/api/x", "", "   ", "http:///nohost.png", "http://example.com:99999/a"])
def test_malformed_or_unsupported_references(ls, url):
    images = loader(label_studio_url=ls.url, label_studio_api_key=LEGACY)
    expect(400, lambda: images.fetch(url))
    assert ls.server.requests == []


# ---- cloud storage ---------------------------------------------------------------------------------------------

def test_cloud_uri_through_label_studio_presign(ls, servers):
    bucket = servers("127.0.0.2")
    ls.presign_target = bucket.url + "/bucket/key.png?X-Amz-Credential=AKIA&X-Amz-Signature=topsecret"
    images = loader(label_studio_url=ls.url, label_studio_api_key=PAT, allow_private_hosts=True)
    assert images.fetch("s3://bucket/dir/key.png", task_id=7) == IMAGE
    assert base64.urlsafe_b64decode(ls.presign_seen[0]).decode() == "s3://bucket/dir/key.png"
    assert [r["headers"]["Authorization"].split()[0] for r in ls.server.requests if r["method"] == "GET"] == \
        ["Bearer"]
    assert bucket.authorizations() == [None]


def test_cloud_uri_errors(ls, servers):
    gone = servers("127.0.0.2", static(status=404))
    ls.presign_target = gone.url + "/bucket/key.png?X-Amz-Signature=topsecret"
    images = loader(label_studio_url=ls.url, label_studio_api_key=LEGACY, allow_private_hosts=True)
    error = expect(404, lambda: images.fetch("gs://bucket/key.png", task_id=7))
    assert "X-Amz-Signature=***" in error.message
    assert "task" in expect(400, lambda: images.fetch("azure-blob://container/key.png")).message
    assert "LABEL_STUDIO_URL" in expect(400, lambda: loader().fetch("s3://bucket/key.png", task_id=7)).message
    expect(400, lambda: images.fetch("s3://bucket", task_id=7))


# ---- local files -----------------------------------------------------------------------------------------------

@pytest.fixture
def root(tmp_path):
    base = tmp_path / "root"
    (base / "dir").mkdir(parents=True)
    (base / "dir" / "img.png").write_bytes(png(color=(5, 6, 7)))
    (base / "dir" / "big.bin").write_bytes(b"x" * 5000)
    (tmp_path / "outside.png").write_bytes(png(color=(9, 9, 9)))
    (base / "escape.png").symlink_to(tmp_path / "outside.png")
    (base / "escape_dir").symlink_to(tmp_path)
    (base / "inside.png").symlink_to(base / "dir" / "img.png")
    return base


def test_local_files_read_from_the_document_root(root, ls):
    images = loader(local_files_root=root, max_image_bytes=4000)
    data = png(color=(5, 6, 7))
    assert images.fetch("/data/local-files/?d=dir/img.png") == data
    assert images.fetch("/data/local-files?d=dir%2Fimg.png") == data
    assert images.fetch("/data/local-files/?d=/dir/img.png") == data  # relative to the root, as in Label Studio
    assert images.fetch("/data/local-files/?d=dir/../dir/./img.png") == data
    expect(403, lambda: images.fetch("/data/local-files/?d=inside.png"))  # links are never followed (races)
    assert images.fetch(ls.url + "/data/local-files/?d=dir/img.png", LabelStudioAccess(ls.url, LEGACY)) == data
    assert ls.server.requests == []


@pytest.mark.parametrize("path, status", [
    ("../outside.png", 403), ("dir/../../outside.png", 403), ("escape.png", 403), ("escape_dir/outside.png", 403),
    ("%2E%2E/outside.png", 403), ("", 400), ("dir/missing.png", 404), ("missing/x.png", 404), ("dir", 404),
    ("dir/big.bin", 413), ("dir/img.png%00.jpg", 400), (".", 404), ("dir/..", 404)])
def test_local_files_refusals(root, path, status):
    error = expect(status, lambda: loader(local_files_root=root, max_image_bytes=4000)
                   .fetch(f"/data/local-files/?d={path}"))
    assert str(root.parent) not in error.message or status == 403


def test_local_files_never_block_on_a_fifo_nor_follow_a_linked_folder(root):
    import os
    import threading

    os.mkfifo(root / "dir" / "pipe.png")
    (root / "linked").symlink_to(root / "dir")  # points inside, and is refused all the same
    images = loader(local_files_root=root)
    outcome = {}
    worker = threading.Thread(target=lambda: outcome.update(
        error=expect(404, lambda: images.fetch("/data/local-files/?d=dir/pipe.png"))), daemon=True)
    worker.start()
    worker.join(10)
    assert not worker.is_alive(), "reading a FIFO under the root blocked the request"
    assert "not a regular file" in outcome["error"].message
    assert "symbolic link" in expect(403, lambda: images.fetch("/data/local-files/?d=linked/img.png")).message


def test_a_lone_surrogate_in_a_url_is_a_client_error():
    for url in ("s3://bucket/\ud800.png", "http://us\udfffer:pw@example.com/a.png", "/data/upload/\ud800.png"):
        assert "surrogate" in expect(400, lambda: loader().fetch(url, task_id=1)).message


def test_absolute_local_path_stays_under_the_root(root, tmp_path):
    expect(404, lambda: loader(local_files_root=root).fetch(f"/data/local-files/?d={tmp_path}/outside.png"))
    expect(404, lambda: loader(local_files_root=root).fetch("/data/local-files/?d=/etc/passwd"))


def test_local_files_without_a_root_go_through_label_studio(ls):
    for images in (loader(label_studio_url=ls.url, label_studio_api_key=LEGACY),
                   loader(label_studio_url=ls.url, label_studio_api_key=LEGACY, local_files_root=Path("/"))):
        assert images.fetch("/data/local-files/?d=dir/img.png") == png(color=(1, 2, 3))
    assert ls.server.authorizations() == [f"Token {LEGACY}"] * 2


# ---- limits ----------------------------------------------------------------------------------------------------

def test_stalling_server_times_out(servers):
    release = threading.Event()

    def stall(h, _):
        release.wait(5)
    server = servers("127.0.0.2", stall)
    started = time.monotonic()
    try:
        error = expect(504, lambda: loader(allow_private_hosts=True, image_timeout=0.3).fetch(server.url + "/x"))
    finally:
        release.set()
    assert "timed out" in error.message
    assert time.monotonic() - started < 1.5


@pytest.mark.parametrize("interval", [0.05, 0.25], ids=["drip", "just-inside-each-read-timeout"])
def test_slow_drip_hits_the_total_deadline(servers, interval):
    """A host sending a byte every `interval` s never trips the 0.3 s read timeout; the whole fetch (3 x 0.3 s)
    still ends by its deadline, not a read later (each read waits at most what is left of it)."""
    stop = threading.Event()

    def drip(h, _):
        h.send_response(200)
        h.send_header("Content-Length", "100000")
        h.end_headers()
        while not stop.is_set():
            h.wfile.write(b"x")
            h.wfile.flush()
            time.sleep(interval)
    server = servers("127.0.0.2", drip)
    started = time.monotonic()
    try:
        expect(504, lambda: loader(allow_private_hosts=True, image_timeout=0.3).fetch(server.url + "/x"))
    finally:
        stop.set()
    assert time.monotonic() - started < 0.9 + 0.5


def test_connection_refused(servers):
    server = servers("127.0.0.2")
    url = server.url
    server.stop()
    expect(502, lambda: loader(allow_private_hosts=True).fetch(url + "/x"))


def test_oversized_bodies(servers):
    with_length = servers("127.0.0.2", static(b"x" * 5000))
    without_length = servers("127.0.0.2", lambda h, _: h.send(200, b"x" * 5000, length=None))
    announced = servers("127.0.0.2", lambda h, _: h.send(200, b"", length=10 ** 12))
    images = loader(allow_private_hosts=True, max_image_bytes=4000)
    assert "5000 bytes" in expect(413, lambda: images.fetch(with_length.url + "/a")).message
    expect(413, lambda: images.fetch(without_length.url + "/b"))
    expect(413, lambda: images.fetch(announced.url + "/c"))
    assert loader(allow_private_hosts=True, max_image_bytes=5000).fetch(without_length.url + "/d") == b"x" * 5000


def test_content_length_lies(servers):
    too_small = servers("127.0.0.2", lambda h, _: h.send(200, b"x" * 5000, length=100))
    too_large = servers("127.0.0.2", lambda h, _: h.send(200, b"x" * 200, length=3000))
    images = loader(allow_private_hosts=True, max_image_bytes=4000)
    assert images.fetch(too_small.url + "/a") == b"x" * 100  # never more than announced
    assert "200 bytes" in expect(502, lambda: images.fetch(too_large.url + "/b")).message


@pytest.mark.parametrize("status, expected", [(404, 404), (410, 404), (500, 502), (503, 502), (403, 502),
                                              (204, 502), (304, 502)])
def test_upstream_statuses(servers, status, expected):
    server = servers("127.0.0.2", static(b"" if status in (204, 304) else b"nope", status))
    assert str(status) in expect(expected, lambda: loader(allow_private_hosts=True).fetch(server.url + "/x")).message


def test_redact_url():
    assert redact_url("http://u:p@h:1/a?token=abc&d=dir/x.png&X-Amz-Signature=s#frag") == \
        "http://***@h:1/a?token=***&d=dir/x.png&X-Amz-Signature=***"
    assert redact_url("data:image/png;base64,AAAA") == "data:..."
    assert len(redact_url("http://h/" + "a" * 1000)) <= 200


def test_redact_url_shows_the_cloud_uri_a_presign_url_encodes():
    cloud = "s3://bucket/cat.jpg?X-Amz-Signature=SECRET"
    encoded = base64.urlsafe_b64encode(cloud.encode()).decode()
    for value in (encoded, encoded.rstrip("="), encoded.replace("=", "%3D")):
        assert redact_url(f"http://ls:8080/tasks/3/presign/?fileuri={value}") == \
            "http://ls:8080/tasks/3/presign/?fileuri=s3://bucket/cat.jpg?X-Amz-Signature=***"
    assert redact_url("http://ls:8080/tasks/3/presign/?fileuri=@@not-base64") == \
        "http://ls:8080/tasks/3/presign/?fileuri=***"


# ---- decode ----------------------------------------------------------------------------------------------------

def encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    out = io.BytesIO()
    image.save(out, fmt, **kwargs)
    return out.getvalue()


def decode(data: bytes, max_pixels: int = 10 ** 8) -> np.ndarray:
    array = ImageLoader.decode(data, max_pixels)
    assert array.dtype == np.uint8 and array.ndim == 3 and array.shape[2] == 3
    assert array.flags.c_contiguous
    return array


def test_decode_rgb():
    array = decode(IMAGE)
    assert array.shape == (4, 6, 3) and tuple(array[0, 0]) == (10, 200, 30)


@pytest.mark.parametrize("mode, color, expected", [
    ("L", 77, (77, 77, 77)), ("LA", (77, 0), (77, 77, 77)), ("RGBA", (10, 20, 30, 0), (10, 20, 30)),
    ("1", 1, (255, 255, 255)), ("P", 0, (0, 0, 0))])
def test_decode_modes_to_rgb(mode, color, expected):
    assert tuple(decode(png(mode=mode, color=color))[1, 1]) == expected


def test_decode_palette_with_transparency():
    image = Image.new("P", (4, 4), 1)
    image.putpalette([0, 0, 0, 200, 100, 50] + [0] * 762)
    assert tuple(decode(encode(image, "PNG", transparency=1))[0, 0]) == (200, 100, 50)


def test_decode_cmyk_jpeg():
    array = decode(encode(Image.new("CMYK", (8, 8), (0, 255, 255, 0)), "JPEG", quality=95))
    red, green, blue = (int(v) for v in array[4, 4])
    assert red > 200 and green < 60 and blue < 60


def test_decode_16_bit_png():
    values = np.array([[0, 257 * 128, 65535]], dtype=np.uint16)
    data = encode(Image.fromarray(values), "PNG")
    assert Image.open(io.BytesIO(data)).mode.startswith("I")
    assert decode(data)[0, :, 0].tolist() == [0, 128, 255]


def test_decode_32_bit_tiff():
    values = np.array([[0, 100, 255]], dtype=np.int32)
    assert decode(encode(Image.fromarray(values, "I"), "TIFF"))[0, :, 1].tolist() == [0, 100, 255]


def test_decode_applies_exif_orientation():
    image = Image.new("RGB", (40, 20), (0, 0, 0))
    image.paste((255, 255, 255), (0, 0, 10, 10))  # a white top-left corner
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    array = decode(encode(image, "JPEG", exif=exif, quality=95))
    assert array.shape == (40, 20, 3)
    assert array[2, -3].mean() > 200 and array[2, 2].mean() < 50  # the corner went to the top right


def test_decode_animated_gif_gives_the_first_frame():
    frames = [Image.new("RGB", (5, 5), color) for color in ((255, 0, 0), (0, 0, 255))]
    data = encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    assert Image.open(io.BytesIO(data)).n_frames == 2
    red, green, blue = decode(data)[2, 2]
    assert red > 200 and blue < 50


def test_decode_webp_and_bmp():
    assert decode(encode(Image.new("RGB", (3, 2), (1, 2, 3)), "BMP")).shape == (2, 3, 3)
    assert decode(encode(Image.new("RGBA", (3, 2), (1, 2, 3, 4)), "WEBP", lossless=True)).shape == (2, 3, 3)


@pytest.mark.parametrize("data", [b"", b"hello, this is text", b"<html><body>Log in</body></html>",
                                  b"<svg xmlns='http://www.w3.org/2000/svg'/>", b"%PDF-1.4\n"])
def test_decode_refuses_non_images(data):
    expect(415, lambda: ImageLoader.decode(data, 10 ** 8))


def test_decode_refuses_truncated_or_corrupt_images():
    jpeg = encode(Image.effect_noise((64, 64), 50).convert("RGB"), "JPEG")
    expect(422, lambda: ImageLoader.decode(jpeg[: len(jpeg) // 2], 10 ** 8))
    noisy = encode(Image.effect_noise((64, 64), 50).convert("RGB"), "PNG")
    expect(422, lambda: ImageLoader.decode(noisy[: len(noisy) // 2], 10 ** 8))
    expect(422, lambda: ImageLoader.decode(noisy[:20], 10 ** 8))
    corrupt = bytearray(noisy)
    corrupt[60:80] = b"\x00" * 20
    expect(422, lambda: ImageLoader.decode(bytes(corrupt), 10 ** 8))


def png_header(width: int, height: int) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b""))


def test_decode_refuses_decompression_bombs_from_the_header():
    bomb = png_header(9000, 9000)  # 81 megapixels in 100 bytes (below Pillow's own warning threshold)
    assert len(bomb) < 200
    error = expect(413, lambda: ImageLoader.decode(bomb, 10 ** 6))
    assert "9000x9000" in error.message and "MAX_IMAGE_PIXELS" in error.message
    # beyond Pillow's own limit (DecompressionBombError), whatever ours is
    huge = png_header(100_000, 100_000)
    expect(413, lambda: ImageLoader.decode(huge, 10 ** 8))
    expect(413, lambda: ImageLoader.decode(huge, 10 ** 12))
    assert decode(png((50, 20)), max_pixels=1000).shape == (20, 50, 3)
    expect(413, lambda: ImageLoader.decode(png((50, 20)), 999))


def test_decode_refuses_zero_size_images():
    expect(422, lambda: ImageLoader.decode(png_header(0, 10), 10 ** 8))
    expect(415, lambda: ImageLoader.decode(b"", 10 ** 8))


def test_decode_returns_a_writable_copy():
    array = decode(IMAGE)
    array[0, 0] = 0  # callers may work in place


# ---- HTTPS -----------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def certificate(tmp_path_factory):
    import shutil
    import subprocess
    if shutil.which("openssl") is None:
        pytest.skip("openssl is needed to make a test certificate")
    directory = tmp_path_factory.mktemp("tls")
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                    "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "1", "-subj", "/CN=img.test",
                    "-addext", "subjectAltName=DNS:img.test,IP:127.0.0.2"], check=True, capture_output=True)
    return cert, key


@pytest.fixture
def https_server(certificate, servers):
    import ssl
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(*certificate)
    server = servers("127.0.0.2")
    server.socket = context.wrap_socket(server.socket, server_side=True)
    return server


def test_https_verifies_the_certificate_against_the_host_name(https_server, certificate, monkeypatch, resolve):
    port = https_server.server_address[1]
    resolve({"img.test": ["127.0.0.2"], "other.test": ["127.0.0.2"]})
    images = loader(allow_private_hosts=True)
    assert "TLS" in expect(502, lambda: images.fetch(f"https://127.0.0.2:{port}/a.png")).message  # unknown CA
    monkeypatch.setattr("sam_backend.images.transport._CA_CERTS", str(certificate[0]))
    assert images.fetch(f"https://127.0.0.2:{port}/a.png") == IMAGE
    assert images.fetch(f"https://img.test:{port}/a.png") == IMAGE
    expect(502, lambda: images.fetch(f"https://other.test:{port}/a.png"))  # the certificate is not for it


def test_https_peer_check(https_server, certificate, monkeypatch, resolve, loopback_only):
    port = https_server.server_address[1]
    monkeypatch.setattr("sam_backend.images.transport._CA_CERTS", str(certificate[0]))
    resolve({"img.test": [["93.184.216.34"], ["127.0.0.2"]]})
    error = expect(403, lambda: loader().fetch(f"https://img.test:{port}/a.png"))
    assert "connected to 127.0.0.2" in error.message
    assert https_server.requests == []


def test_label_studio_on_ipv6_loopback():
    class Server6(LoopbackServer):
        address_family = socket.AF_INET6
    try:
        server = Server6(static(), "::1")
    except OSError:
        pytest.skip("no IPv6 loopback here")
    try:
        url = f"http://[::1]:{server.server_address[1]}"
        assert loader(label_studio_url=url, label_studio_api_key=LEGACY).fetch("/data/upload/1/img.png") == IMAGE
        assert server.authorizations() == [f"Token {LEGACY}"]
    finally:
        server.stop()
