#!/usr/bin/env python
"""Shared state numbers (issue #12): 8 users on 2 workers with the disk store and with Redis, against 1 worker
with the in-process memory, in one run.

    .venv/bin/python -m tools.bench.shared_state              # about 5 minutes on 2 cores
    .venv/bin/python -m tools.bench.shared_state --clicks 4   # shorter

Each configuration is gunicorn as `make run` starts it (MobileSAM on torch, THREADS=8) against a loopback
Label Studio stand-in holding 8 photos of 1920x1080, one per user. The 8 users click at once, each on their own
task, each click on a new connection (spread over the workers as a load balancer would): one first click (the image is embedded), then `--clicks` more clicks added one by one (each refines the
previous mask: prompt memory read and written through the store). Printed per configuration: warm-click p50 and
p95 over HTTP; encoder runs per image, summed over the workers (/metrics of each); answers identical to the
1-worker ones (region ids aside); each worker's RSS. Then, in-process, what a warm click costs in store
operations (the prompt memory's exchange, previous mask and new mask, and the image-URL lookup), at 1920x1080,
per backend. A real redis-server is started on loopback (scripts/install_redis.sh). Writes artifacts/shared_state.json.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import json
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import requests

from tools.harness import processes
from tools.harness.processes import GunicornBackend, children, memory_mb
from tools.harness.recordings import CHELSEA, recorded
from tools.harness.redis_server import RedisServer
from tools.harness.stub_label_studio import TOKEN, FakeLabelStudio
from tools.weights import fetch

USERS = 8
WIDTH, HEIGHT = 1920, 1080
DEFAULT_JSON = Path(__file__).resolve().parents[2] / "artifacts" / "shared_state.json"


def images(label_studio: FakeLabelStudio) -> list[str]:
    base = cv2.resize(CHELSEA, (WIDTH, HEIGHT), interpolation=cv2.INTER_CUBIC)
    paths = []
    for user in range(USERS):
        image = np.roll(base, shift=user * 97, axis=1) if user % 2 == 0 else np.roll(base[:, ::-1], user * 61, 1)
        paths.append(label_studio.add_image(f"/data/upload/12/user{user}.jpg", np.ascontiguousarray(image)))
    return paths


def clicks_of(path: str, task_id: int, count: int) -> list[dict]:
    """The bodies of one user: a first click, then `count` clicks added one by one (all resent, as the editor)."""
    bodies, regions = [], []
    for step in range(count + 1):
        body = recorded("keypoints_positive_and_negative")
        task = body["tasks"][0]
        task["id"], task["data"]["image"] = task_id, path
        region = dict(body["params"]["context"]["result"][0])
        region = json.loads(json.dumps(region))
        region.update(original_width=WIDTH, original_height=HEIGHT, id=f"s{task_id}{step}", is_positive=step != 2)
        region["value"].update(x=35 + 4 * step, y=40 + 3 * (step % 3))
        regions.append(region)
        body["params"]["context"]["result"] = json.loads(json.dumps(regions))
        bodies.append(body)
    return bodies


def comparable(content: bytes) -> bytes:
    return re.sub(rb'"id":"[0-9a-f]{10}"', b'"id":"-"', content)


def run_configuration(name: str, env: dict[str, str], paths: list[str], clicks: int, folder: Path) -> dict:
    backend = GunicornBackend(folder / f"{name}.log", append=False)
    backend.start(processes.environment(env, drop=("GUNICORN_CMD_ARGS", "STATE_STORE", "WORKERS")), timeout=600)
    try:
        def user(index: int) -> tuple[list[float], list[bytes]]:
            # a new connection per click, as a load balancer spreads them: a kept-alive one stays on one worker
            times, answers = [], []
            for step, body in enumerate(clicks_of(paths[index], 5000 + index, clicks)):
                data = json.dumps(body).encode()
                started = time.perf_counter()
                response = requests.post(backend.url + "/predict", data=data, timeout=600,
                                         headers={"Content-Type": "application/json", "Connection": "close"})
                elapsed = (time.perf_counter() - started) * 1000
                if response.status_code != 200:
                    raise RuntimeError(f"{name}: /predict answered {response.status_code}: {response.text[:300]}")
                if step:
                    times.append(elapsed)
                answers.append(comparable(response.content))
            return times, answers

        with concurrent.futures.ThreadPoolExecutor(USERS) as pool:
            results = list(pool.map(user, range(USERS)))
        workers, pids = {}, children(backend.process.pid)
        for _ in range(1000):  # fresh connections, until every worker has answered
            metrics = requests.get(backend.url + "/metrics", timeout=10, headers={"Connection": "close"}).json()
            workers[metrics["worker_pid"]] = metrics
            if len(workers) == len(pids):
                break
        warm = sorted(t for times, _ in results for t in times)
        return {
            "warm_p50_ms": round(statistics.median(warm), 1),
            "warm_p95_ms": round(warm[min(len(warm) - 1, int(0.95 * len(warm)))], 1),
            "warm_clicks": len(warm),
            "encoder_runs": sum(m["state_store"]["encoder_runs"] for m in workers.values()),
            "workers_seen": len(workers), "workers": len(pids),
            "predicts_per_worker": sorted(m["routes"].get("/predict", {}).get("count", 0) for m in workers.values()),
            "rss_mib_per_worker": [memory_mb(pid).get("VmRSS") for pid in pids],
            "answers": [a for _, answers in results for a in answers],
        }
    finally:
        backend.stop()


def store_overhead(redis_url: str, folder: Path, repeats: int = 50) -> dict[str, float]:
    """Milliseconds of the store operations one warm click makes (median), per backend, at 1920x1080."""
    from sam_backend.cache import RecentImages
    from sam_backend.labelstudio.context import Region
    from sam_backend.labelstudio.label_config import Target
    from sam_backend.labelstudio.memory import PromptMemory, SharedPromptMemory
    from sam_backend.sam.types import Prompt
    from sam_backend.store import GuardedStore, open_store

    logits = np.random.default_rng(0).standard_normal((1, 256, 256)).astype(np.float32)
    target = Target("tag", "Cat", True)
    out = {}
    for name, spec in (("memory", None), ("disk", f"disk:{folder / 'overhead'}"), ("redis", redis_url)):
        store = GuardedStore(open_store(spec)) if spec else None
        memory = SharedPromptMemory(store) if store else PromptMemory()
        recent = RecentImages(store=store)
        key, source = (f"p-{name}", 1, "/data/upload/1/x.jpg"), ("/data/upload/1/x.jpg", None)
        recent.put(source, ("MobileSAM", "d" * 64))
        times = []
        for step in range(repeats + 5):
            regions = [Region(id=f"r{i}", type="keypointlabels", group=("tag2", "Cat"), target=target, positive=True,
                              x=10.0 + i, y=20.0) for i in range(step % 6 + 1)]
            prompt = Prompt(points=np.array([[100.0 + i, 200.0] for i in range(len(regions))], np.float32),
                            labels=np.ones(len(regions), np.int32))
            started = time.perf_counter()
            recent.get(source)
            memory.exchange(key, regions)
            memory.previous_mask(key, ("tag", "Cat"), prompt)
            memory.remember_mask(key, ("tag", "Cat"), prompt, logits)
            if step >= 5:
                times.append((time.perf_counter() - started) * 1000)
        out[name] = round(statistics.median(times), 2)
        if store:
            store.close()
    return out


def embedding_round_trip(redis_url: str, folder: Path, repeats: int = 30) -> dict:
    """Bytes of one stored 1920x1080 MobileSAM embedding, and median ms to put / get it, per shared backend."""
    from sam_backend.cache import pack_embedding, unpack_embedding
    from sam_backend.sam.types import Embedding
    from sam_backend.store import open_store

    features = np.random.default_rng(1).standard_normal((1, 256, 64, 64)).astype(np.float16)
    value = pack_embedding(Embedding(features=features, original_size=(HEIGHT, WIDTH), input_size=(576, 1024)))
    out = {"bytes": len(value), "features_bytes": features.nbytes}
    started = time.perf_counter()
    for _ in range(repeats):
        unpack_embedding(value)
    out["unpack_ms"] = round((time.perf_counter() - started) * 1000 / repeats, 2)
    for name, spec in (("disk", f"disk:{folder / 'round-trip'}"), ("redis", redis_url)):
        store, puts, gets = open_store(spec), [], []
        for index in range(repeats):
            started = time.perf_counter()
            store.put("bench-embedding", f"k{index % 4}", value)
            puts.append((time.perf_counter() - started) * 1000)
            started = time.perf_counter()
            store.get("bench-embedding", f"k{index % 4}")
            gets.append((time.perf_counter() - started) * 1000)
        out[name] = {"put_ms": round(statistics.median(puts), 2), "get_ms": round(statistics.median(gets), 2)}
        store.close()
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.bench.shared_state", description=__doc__.split("\n\n")[0])
    parser.add_argument("--clicks", type=int, default=8, help="warm clicks per user (default %(default)s)")
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON)
    args = parser.parse_args(argv)
    checkpoint = fetch("mobile_sam")
    folder = Path(tempfile.mkdtemp(prefix="shared-state-bench-"))
    label_studio = FakeLabelStudio(TOKEN)
    (folder / "redis").mkdir()
    redis = RedisServer(folder / "redis").start()
    try:
        paths = images(label_studio)
        base = {"LABEL_STUDIO_URL": label_studio.url, "LABEL_STUDIO_API_KEY": TOKEN, "DEVICE": "cpu",
                "MOBILESAM_CHECKPOINT": str(checkpoint), "RUN_ONNX_SAM": "false", "THREADS": "8",
                "XDG_CACHE_HOME": str(folder / "cache")}
        configurations = {
            "1 worker, memory": {**base, "WORKERS": "1"},
            "2 workers, disk": {**base, "WORKERS": "2", "STATE_STORE": f"disk:{folder / 'disk'}"},
            "2 workers, redis": {**base, "WORKERS": "2", "STATE_STORE": redis.url},
        }
        results = {}
        for name, env in configurations.items():
            print(f"running {name} ...", file=sys.stderr, flush=True)
            results[name] = run_configuration(name.replace(", ", "-").replace(" ", ""), env, paths, args.clicks,
                                              folder)
        reference = results["1 worker, memory"]["answers"]
        for result in results.values():
            result["identical_answers"] = f"{sum(a == b for a, b in zip(result['answers'], reference))}/" \
                                          f"{len(reference)}"
        overhead = store_overhead(redis.url, folder)
        round_trip = embedding_round_trip(redis.url, folder)
    finally:
        redis.stop()
        label_studio.close()
    print(f"\n8 users at once, each: 1 first click + {args.clicks} refining clicks on their own 1920x1080 image "
          f"(MobileSAM, torch, CPU)")
    print(f"{'':20} {'warm p50':>9} {'warm p95':>9} {'encoder runs/image':>19} {'identical':>10} "
          f"{'predicts per worker':>20}  RSS MiB per worker")
    for name, r in results.items():
        print(f"{name:20} {r['warm_p50_ms']:>7} ms {r['warm_p95_ms']:>6} ms {r['encoder_runs'] / USERS:>19.2f} "
              f"{r['identical_answers']:>10} {r['predicts_per_worker']!s:>20}  {r['rss_mib_per_worker']}")
    print("\nstore operations of one warm click (image-URL lookup, prompt memory exchange + previous mask + new "
          "mask), median ms:")
    for name, ms in overhead.items():
        extra = f" (+{ms - overhead['memory']:.2f} ms over memory)" if name != "memory" else ""
        print(f"  {name:7} {ms:6.2f} ms{extra}")
    print(f"\none embedding in the store: {round_trip['bytes']} bytes ({round_trip['features_bytes']} of float16 "
          f"features), unpacked in {round_trip['unpack_ms']} ms; median put / get: disk "
          f"{round_trip['disk']['put_ms']} / {round_trip['disk']['get_ms']} ms, redis {round_trip['redis']['put_ms']} / "
          f"{round_trip['redis']['get_ms']} ms (once per image and process; later clicks use the worker's own LRU)")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"configurations": {n: {k: v for k, v in r.items() if k != "answers"}
                                                        for n, r in results.items()},
                                     "store_overhead_ms": overhead, "embedding_round_trip": round_trip},
                                    indent=2))
    print(f"\nwritten to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
