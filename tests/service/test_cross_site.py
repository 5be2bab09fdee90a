"""Cross-site requests over real HTTP: a page open in an annotator's browser must not be able to drive the backend.

Browsers send `text/plain`, form and multipart bodies across sites without a CORS preflight, and a page can re-point
its own DNS name at the backend (DNS rebinding). So POSTs must carry a JSON content type (which needs a preflight
that this server never grants) and the Host header must name this server.
"""
from __future__ import annotations

import json

import pytest
import requests

from sam_backend.http import host_allowed

SCHEMA = ('<View><Image name="image" value="$image"/><BrushLabels name="tag" toName="image">'
          '<Label value="Cat"/></BrushLabels><KeyPointLabels name="kp" toName="image" smart="true">'
          '<Label value="Cat"/></KeyPointLabels></View>')
SETUP = {"project": "1.1700000000", "schema": SCHEMA, "hostname": "", "access_token": "", "extra_params": None}


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded",
                                          "multipart/form-data; boundary=x", None])
@pytest.mark.parametrize("path", ["/setup", "/predict", "/webhook"])
def test_posts_without_a_json_content_type_are_refused(live_backend, path, content_type):
    headers = {"Content-Type": content_type} if content_type else {}
    answer = requests.post(live_backend.url + path, data=json.dumps(SETUP).encode(), headers=headers, timeout=30)
    assert answer.status_code == 415, answer.text
    assert "application/json" in answer.json()["error"]
    assert requests.get(live_backend.url + "/health", timeout=10).status_code == 200


@pytest.mark.parametrize("content_type", ["application/json", "application/json; charset=utf-8",
                                          "application/vnd.api+json"])
def test_json_content_types_are_served(live_backend, content_type):
    answer = requests.post(live_backend.url + "/setup", data=json.dumps(SETUP).encode(),
                           headers={"Content-Type": content_type}, timeout=30)
    assert answer.status_code == 200, answer.text
    assert answer.json()["model_version"]


@pytest.mark.parametrize("host", ["evil.example.com", "rebind.attacker.net:9090", "127.0.0.1.nip.io"])
def test_foreign_host_names_are_refused_on_every_route(live_backend, host):
    for method, path in (("GET", "/health"), ("POST", "/setup"), ("GET", "/metrics")):
        answer = requests.request(method, live_backend.url + path, json=SETUP, headers={"Host": host}, timeout=30)
        assert answer.status_code == 400, (method, path, answer.text)
        assert "ALLOWED_HOSTS" in answer.json()["error"] and host.split(":")[0] in answer.json()["error"]


@pytest.mark.parametrize("host", ["127.0.0.1:9090", "localhost:9090", "[::1]:9090", "sam:9090", "ml-backend",
                                  "host.docker.internal:9090", "sam.default.svc.cluster.local", "10.0.0.5"])
def test_loopback_docker_and_cluster_names_are_served(live_backend, host):
    answer = requests.get(live_backend.url + "/health", headers={"Host": host}, timeout=30)
    assert answer.status_code == 200, (host, answer.text)


def test_allowed_hosts_admits_a_configured_domain(base_settings, torch_predictor):
    from conftest import make_live_backend

    backend = make_live_backend(base_settings, torch_predictor, allowed_server_hosts=(".example.com", "ml.acme.io"))
    try:
        for host, status in (("ml.example.com", 200), ("example.com", 200), ("a.b.example.com", 200),
                             ("ml.acme.io", 200), ("ml.acme.io.evil.net", 400), ("notexample.com", 400)):
            answer = requests.get(backend.url + "/health", headers={"Host": host}, timeout=30)
            assert answer.status_code == status, (host, answer.text)
    finally:
        backend.close()


def test_host_rules():
    assert host_allowed("anything.example.org", ("*",))
    assert not host_allowed("", ("*",))
    assert host_allowed("[::1]", ()) and host_allowed("192.168.1.7", ())
    assert not host_allowed("example.org", ()) and host_allowed("example.org.", ("example.org",))
