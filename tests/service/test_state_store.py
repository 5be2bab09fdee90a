"""One memory for every worker: the same recorded session gives byte-identical answers from 1 worker (memory
store), 4 workers (disk store) and 2 server processes sharing a real redis-server; the encoder runs once per
image across processes; a Redis that goes away and comes back costs no 5xx and no wrong mask.

Every server here is gunicorn as deployed (tools/harness/processes.GunicornBackend), over real HTTP on loopback,
with MobileSAM on torch; Redis is a real redis-server (tools/harness/redis_server.py, scripts/install_redis.sh).
"""
from __future__ import annotations

import concurrent.futures
import re

import pytest
import requests

from tools.harness import processes
from tools.harness.processes import GunicornBackend, dump_logs, wait_for
from tools.harness.recordings import CHELSEA, recorded, with_image
from tools.harness.redis_server import RedisServer
from tools.harness.sequences import session
from tools.harness.stub_label_studio import TOKEN as LS_TOKEN

STORE_VARIABLES = ("STATE_STORE", "STATE_STORE_SECRET", "STATE_STORE_MAX_BYTES", "WORKERS", "GUNICORN_CMD_ARGS",
                   "BASIC_AUTH_USER", "BASIC_AUTH_PASS", "LABEL_STUDIO_URL", "LABEL_STUDIO_API_KEY")


@pytest.fixture(scope="module")
def images(fake_label_studio):
    second = CHELSEA[:, ::-1].copy()  # another image: the mirrored photo
    return (fake_label_studio.add_image("/data/upload/7/store-a.jpg", CHELSEA),
            fake_label_studio.add_image("/data/upload/7/store-b.jpg", second))


@pytest.fixture(scope="module")
def start(tmp_path_factory, fake_label_studio, mobile_sam_checkpoint):
    """start(name, **environment) -> a running GunicornBackend with MobileSAM on torch; all stopped at the end."""
    started: list[GunicornBackend] = []

    def run(name: str, **extra: str) -> GunicornBackend:
        folder = tmp_path_factory.mktemp(name)
        backend = GunicornBackend(folder / "gunicorn.log", append=False)
        env = processes.environment({
            "LABEL_STUDIO_URL": fake_label_studio.url, "LABEL_STUDIO_API_KEY": LS_TOKEN,
            "MOBILESAM_CHECKPOINT": str(mobile_sam_checkpoint), "DEVICE": "cpu", "RUN_ONNX_SAM": "false",
            "TORCH_NUM_THREADS": "1", "THREADS": "4", "WORKERS": "1", "XDG_CACHE_HOME": str(folder / "cache"),
            **extra}, drop=STORE_VARIABLES)
        started.append(backend)
        return backend.start(env, timeout=400)

    yield run
    for backend in started:
        if backend.alive():
            dump_logs(backend, chars=3000)
        backend.stop()


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory):
    server = RedisServer(tmp_path_factory.mktemp("redis")).start()
    yield server
    server.stop()


def post(url: str, body: dict) -> requests.Response:
    # a new connection per call, as many annotators' browsers and a load balancer would make
    return requests.post(url + "/predict", json=body, timeout=300, headers={"Connection": "close"})


def comparable(content: bytes) -> bytes:
    """An answer's bytes with its region ids (random per answer, results.py) blanked: all else must match."""
    return re.sub(rb'"id":"[0-9a-f]{10}"', b'"id":"-"', content)


def replay(urls: list[str], bodies: list[dict]) -> list[bytes]:
    """Each body to urls[i % len(urls)] in turn; the answers' bytes, ids blanked (every one must be a 200)."""
    answers = []
    for index, body in enumerate(bodies):
        response = post(urls[index % len(urls)], body)
        assert response.status_code == 200, response.text
        answers.append(comparable(response.content))
    return answers


def per_worker(url: str, workers: int, calls: int = 1000) -> dict[int, dict]:
    """/metrics of each worker (by pid), asked on fresh connections until all `workers` answered (or `calls`)."""
    seen = {}
    for _ in range(calls):
        metrics = requests.get(url + "/metrics", timeout=10, headers={"Connection": "close"}).json()
        seen[metrics["worker_pid"]] = metrics
        if len(seen) == workers:
            break
    return seen


@pytest.fixture(scope="module")
def reference(start, images) -> list[bytes]:
    """The answers of one worker with today's in-process memory."""
    backend = start("memory")
    try:
        assert requests.get(backend.url + "/health", timeout=5).json()["state_store"]["backend"] == "memory"
        answers = replay([backend.url], session(images))
    finally:
        backend.stop()
    assert all(b'"brushlabels"' in answer for answer in answers[:2]), "the session's first boxes find objects"
    return answers


def test_four_workers_with_the_disk_store_answer_byte_for_byte_as_one(start, images, reference, tmp_path):
    # WORKERS=4 and no STATE_STORE: the default is the shared disk store (under XDG_CACHE_HOME here)
    backend = start("disk4", WORKERS="4")
    health = requests.get(backend.url + "/health", timeout=5).json()
    assert health["state_store"]["backend"] == "disk" and health["state_store"]["status"] == "ok"

    # the first click on a new image, sent to every worker at once: the encoder runs once
    first = with_image(recorded("keypoints_positive_and_negative"), "/data/upload/7/store-a.jpg", task_id=999)
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(lambda _: post(backend.url, first), range(4)))
    assert [a.status_code for a in answers] == [200] * 4
    assert len({comparable(a.content) for a in answers}) == 1

    assert replay([backend.url], session(images)) == reference

    workers = per_worker(backend.url, 4)
    served = {pid: m["routes"].get("/predict", {}).get("count", 0) for pid, m in workers.items()}
    assert sum(1 for count in served.values() if count) >= 2, f"the calls must have spread over workers: {served}"
    runs = sum(m["state_store"]["encoder_runs"] for m in workers.values())
    assert len(workers) == 4 and runs == 2, f"encoder runs per worker: " \
        f"{ {pid: m['state_store']['encoder_runs'] for pid, m in workers.items()} } (2 images)"


def test_two_servers_sharing_redis_answer_byte_for_byte_as_one(start, images, reference, redis_server):
    first = start("redis-a", STATE_STORE=redis_server.url, STATE_STORE_SECRET="test-secret")
    second = start("redis-b", STATE_STORE=redis_server.url, STATE_STORE_SECRET="test-secret")
    assert replay([first.url, second.url], session(images)) == reference
    runs = [backend.metrics()["state_store"]["encoder_runs"] for backend in (first, second)]
    assert sorted(runs) == [0, 2] or sorted(runs) == [1, 1], runs  # each image embedded once, by either server
    assert sum(runs) == 2


def test_redis_stopped_and_restarted_mid_session_costs_no_error_and_no_wrong_mask(start, images, reference,
                                                                                    tmp_path_factory):
    redis = RedisServer(tmp_path_factory.mktemp("redis-fault")).start()
    try:
        backend = start("redis-fault", STATE_STORE=redis.url)
        bodies = session(images)
        answers = replay([backend.url], bodies[:6])
        redis.stop()
        answers += replay([backend.url], bodies[6:11])
        health = requests.get(backend.url + "/health", timeout=5)
        assert health.status_code == 200 and health.json()["status"] == "UP"
        assert health.json()["state_store"]["status"] == "degraded"
        redis.start()

        probe = with_image(recorded("keypoints_positive_and_negative"), images[0], task_id=555)

        def recovered() -> bool:
            # a call (on a task of its own, not to change the session's memory) tries the store again
            assert requests.post(backend.url + "/predict", json=probe, timeout=60).status_code == 200
            return requests.get(backend.url + "/health", timeout=5).json()["state_store"]["status"] == "ok"

        wait_for(recovered, 30, interval=1, what="the state store to be back")
        answers += replay([backend.url], bodies[11:])
        assert answers == reference
        log = backend.log_path.read_text()
        assert log.count("is degraded") == 1, "the outage is logged once"
        assert log.count("is back after") == 1
    finally:
        redis.stop()
