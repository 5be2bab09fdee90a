"""Soak test: the backend as users run it, under a few thousand Label Studio calls; memory, statuses, latency.

    python -m tools.soak --requests 3000 --images 40 --concurrency 8 [--max-seconds 1800] [--cache-size N]

What it does, all on loopback:

1. Generates `--images` images (random crops of scikit-image's bundled photos, resized to various sizes from about
   240 to 1400 pixels a side, JPEG or PNG) and serves them from a stand-in Label Studio (`/data/upload/...`,
   legacy token required), on 127.0.0.1.
2. Starts the backend as `make run` does: `gunicorn -c gunicorn.conf.py --bind 127.0.0.1:<free port> _wsgi:app`,
   with real MobileSAM weights (models/mobile_sam.pt, MOBILESAM_CHECKPOINT to override), LABEL_STUDIO_URL and
   LABEL_STUDIO_API_KEY pointing at the stand-in; EMBEDDING_CACHE_SIZE is the backend's default unless
   `--cache-size` is given.
3. Sends `--requests` calls to /predict from `--concurrency` threads, as annotators would: a session opens a task
   (context null), then adds clicks (native positive and negative, or the seed's alias labels) or draws a box,
   each call carrying every region of its group as Label Studio does, then moves to another image. About
   `--bad-fraction` of the calls are faulty (invalid JSON, unknown labels, NaN or far-off coordinates, a wrong
   original size, a missing image, too many points, an oversized body) and must get their 4xx.
4. Samples the gunicorn worker's resident memory (VmRSS in /proc/<pid>/status) every `--sample-interval` seconds.

It prints RSS at start (model loaded, before any request), after the warm-up (`--warmup` requests, default the
first 10%) and at the end, the growth, the counts by status and by kind, unexpected answers, latency percentiles,
and the backend's /metrics. Stops issuing requests after `--max-seconds`. Exit status 0 when every call got the
status its kind expects and nothing answered 5xx; 1 otherwise; 2 when the server did not start.
"""
from __future__ import annotations

import argparse
import copy
import io
import json
import math
import os
import random
import secrets
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import requests

from tools.harness import recordings
from tools.harness.processes import GunicornBackend, HarnessError, environment, rss_kib
from tools.harness.stub_label_studio import FakeLabelStudio

#: scikit-image photos that ship with the package (no download)
PHOTOS = ["chelsea", "coffee", "astronaut", "rocket", "hubble_deep_field", "camera", "coins", "moon", "grass",
          "gravel", "brick", "immunohistochemistry", "colorwheel"]


# ---- images ---------------------------------------------------------------------------------------------------
def make_images(count: int, rng: random.Random) -> list[tuple[str, bytes, int, int]]:
    """(path, encoded bytes, width, height) of `count` resized random crops of scikit-image photos."""
    import cv2
    import skimage.data
    from PIL import Image

    photos = []
    for name in PHOTOS:
        pixels = getattr(skimage.data, name)()
        if pixels.ndim == 2:
            pixels = np.repeat(pixels[..., None], 3, axis=2)
        photos.append((name, np.ascontiguousarray(pixels[..., :3])))
    images = []
    for index in range(count):
        name, photo = photos[index % len(photos)]
        height, width = photo.shape[:2]
        crop_h = rng.randint(max(64, height // 3), height)
        crop_w = rng.randint(max(64, width // 3), width)
        top, left = rng.randint(0, height - crop_h), rng.randint(0, width - crop_w)
        crop = photo[top:top + crop_h, left:left + crop_w]
        long_side = rng.choice([240, 320, 480, 640, 800, 1024, 1400])
        aspect = rng.uniform(0.5, 2.0)
        out_w, out_h = (long_side, max(120, round(long_side / aspect))) if aspect >= 1 else \
            (max(120, round(long_side * aspect)), long_side)
        resized = cv2.resize(crop, (out_w, out_h), interpolation=cv2.INTER_AREA)
        buffer = io.BytesIO()
        kind = "png" if index % 4 == 3 else "jpg"
        Image.fromarray(resized).save(buffer, format="PNG" if kind == "png" else "JPEG", quality=90)
        images.append((f"/data/upload/1/{index:03d}-{name}.{kind}", buffer.getvalue(), out_w, out_h))
    return images


# ---- the calls ------------------------------------------------------------------------------------------------
@dataclass
class Call:
    kind: str
    expected: int
    body: object  # a JSON value, or bytes to send as they are


@dataclass
class Outcome:
    kind: str
    expected: int
    status: int  # 0: no answer (connection error)
    seconds: float
    detail: str = ""


@dataclass
class Templates:
    calls: dict[str, dict] = field(default_factory=dict)

    @classmethod
    def load(cls) -> "Templates":
        return cls(recordings.bodies("/predict"))

    def body(self, name: str, image: str, task_id: int, width: int, height: int) -> dict:
        body = copy.deepcopy(self.calls[name])
        body["project"] = "soak." + name.split("_")[0]
        for task in body["tasks"]:
            task["id"] = task_id
            task["data"]["image"] = image
            task["drafts"] = []
        context = body["params"].get("context") or {}
        for region in context.get("result") or []:
            region.update(original_width=width, original_height=height)
        return body


def percent(rng: random.Random) -> float:
    return round(rng.uniform(5, 95), 2)


def session(rng: random.Random, templates: Templates, image: tuple[str, bytes, int, int], task_id: int,
            bad_fraction: float, missing: str) -> list[Call]:
    """What one annotator sends while labelling one task: open it, then 1-8 smart-tool actions."""
    path, _, width, height = image
    calls = [Call("open", 200, templates.body("open_task", path, task_id, width, height))]
    style = rng.choice(["native clicks", "native clicks", "native box", "alias clicks", "alias box"])
    clicks: list[dict] = []
    for _ in range(rng.randint(1, 8)):
        if rng.random() < bad_fraction:
            calls.append(bad_call(rng, templates, path, task_id, width, height, missing))
            continue
        if style == "native clicks":
            body = templates.body("keypoints_positive_and_negative", path, task_id, width, height)
            template = body["params"]["context"]["result"][0]
            click = copy.deepcopy(template)
            click.update(id=f"k{len(clicks)}", is_positive=not clicks or rng.random() < 0.7)
            click["value"].update(x=percent(rng), y=percent(rng))
            clicks.append(click)
            body["params"]["context"]["result"] = clicks[:]  # every keypoint of the label, as Label Studio sends
            calls.append(Call("click", 200, body))
        elif style == "alias clicks":
            body = templates.body("alias_positive_keypoint", path, task_id, width, height)
            click = copy.deepcopy(body["params"]["context"]["result"][0])
            click.update(id=f"a{len(clicks)}")
            click["value"].update(x=percent(rng), y=percent(rng))
            clicks.append(click)
            body["params"]["context"]["result"] = clicks[:]
            calls.append(Call("alias click", 200, body))
        else:
            name = "rectangle" if style == "native box" else "alias_rectangle"
            body = templates.body(name, path, task_id, width, height)
            x, y = rng.uniform(0, 60), rng.uniform(0, 60)
            body["params"]["context"]["result"][0]["value"].update(
                x=round(x, 2), y=round(y, 2), width=round(rng.uniform(10, 100 - x), 2),
                height=round(rng.uniform(10, 100 - y), 2))
            calls.append(Call("box", 200, body))
    return calls


def bad_call(rng: random.Random, templates: Templates, path: str, task_id: int, width: int, height: int,
             missing: str) -> Call:
    body = templates.body("keypoints_positive_and_negative", path, task_id, width, height)
    click = body["params"]["context"]["result"][0]
    body["params"]["context"]["result"] = [click]
    kind = "oversized body" if rng.random() < 0.05 else rng.choice([
        "bad json", "empty body", "unknown label", "nan coordinate", "far-off coordinate", "wrong original size",
        "missing image", "too many points", "no tasks"])
    if kind == "bad json":
        return Call(kind, 400, json.dumps(body).encode()[:-3])
    if kind == "empty body":
        return Call(kind, 400, b"")
    if kind == "unknown label":
        click["value"].update(keypointlabels=["Zebra"], labels=["Zebra"])
        return Call(kind, 422, body)
    if kind == "nan coordinate":
        click["value"]["x"] = math.nan
        return Call(kind, 400, body)
    if kind == "far-off coordinate":
        click["value"]["y"] = rng.choice([-50, 180, 1e9])
        return Call(kind, 400, body)
    if kind == "wrong original size":
        click["original_width"] = width * 2
        return Call(kind, 400, body)
    if kind == "missing image":
        body["tasks"][0]["data"]["image"] = missing
        return Call(kind, 404, body)
    if kind == "too many points":
        points = []
        for index in range(300):
            point = copy.deepcopy(click)
            point["id"] = f"p{index}"
            point["value"].update(x=percent(rng), y=percent(rng))
            points.append(point)
        body["params"]["context"]["result"] = points
        return Call(kind, 400, body)
    if kind == "no tasks":
        body["tasks"] = []
        return Call(kind, 400, body)
    return Call(kind, 413, b'{"tasks": "' + b"x" * (17 << 20) + b'"}')


def send(http: requests.Session, url: str, call: Call, timeout: float) -> Outcome:
    data = call.body if isinstance(call.body, bytes) else json.dumps(call.body, allow_nan=True).encode()
    started = time.perf_counter()
    try:
        answer = http.post(url + "/predict", data=data, headers={"Content-Type": "application/json"},
                           timeout=timeout)
    except requests.RequestException as error:
        return Outcome(call.kind, call.expected, 0, time.perf_counter() - started, type(error).__name__)
    seconds = time.perf_counter() - started
    detail = ""
    try:
        answered = answer.json()
        if answer.status_code == 200:
            if not isinstance(answered.get("results"), list):
                detail = "200 without results"
        elif not isinstance(answered.get("error"), str):
            detail = "error answer without an error string"
    except ValueError:
        detail = "answer is not JSON"
    return Outcome(call.kind, call.expected, answer.status_code, seconds, detail)


# ---- the run --------------------------------------------------------------------------------------------------
def percentiles(values: list[float]) -> str:
    if not values:
        return "-"
    ms = np.array(values) * 1000
    return " ".join(f"p{p}={np.percentile(ms, p):.0f}" for p in (50, 90, 99)) + f" max={ms.max():.0f} ms"


def mib(kib: int | None) -> str:
    return "?" if kib is None else f"{kib / 1024:.1f} MiB"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=3000, help="calls to /predict (default %(default)s)")
    parser.add_argument("--images", type=int, default=40, help="distinct images (default %(default)s)")
    parser.add_argument("--concurrency", type=int, default=8, help="client threads (default %(default)s)")
    parser.add_argument("--max-seconds", type=float, default=1800, help="stop sending after this long")
    parser.add_argument("--warmup", type=int, default=None, help="requests before the warm RSS (default 10%%)")
    parser.add_argument("--bad-fraction", type=float, default=0.08, help="share of faulty calls")
    parser.add_argument("--cache-size", type=int, default=None, help="EMBEDDING_CACHE_SIZE (default: the backend's)")
    parser.add_argument("--sample-interval", type=float, default=1.0, help="seconds between RSS samples")
    parser.add_argument("--seed", type=int, default=6)
    parser.add_argument("--timeout", type=float, default=300, help="seconds for one call")
    parser.add_argument("--startup-timeout", type=float, default=300)
    parser.add_argument("--checkpoint", default=None, help="MOBILESAM_CHECKPOINT (default models/mobile_sam.pt)")
    parser.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                        help="extra environment for the server (repeatable), e.g. MALLOC_ARENA_MAX=2")
    parser.add_argument("--json", type=Path, default=None, help="also write the numbers here")
    args = parser.parse_args(argv)
    warmup = args.warmup if args.warmup is not None else max(1, args.requests // 10)
    rng = random.Random(args.seed)

    print(f"generating {args.images} images ...", flush=True)
    images = make_images(args.images, rng)
    sizes = sorted((w, h) for _, _, w, h in images)
    print(f"  sizes from {sizes[0][0]}x{sizes[0][1]} to {sizes[-1][0]}x{sizes[-1][1]}, "
          f"{sum(len(b) for _, b, _, _ in images) / 2**20:.1f} MiB encoded", flush=True)
    token = secrets.token_hex(20)
    label_studio = FakeLabelStudio(token, keep_alive=True)
    label_studio.files.update({path: data for path, data, _, _ in images})
    environ = {"LABEL_STUDIO_URL": label_studio.url, "LABEL_STUDIO_API_KEY": token, "WORKERS": "1",
               "LOG_LEVEL": "warning"}
    environ.update({"MOBILESAM_CHECKPOINT": args.checkpoint} if args.checkpoint else {})
    environ.update({"EMBEDDING_CACHE_SIZE": str(args.cache_size)} if args.cache_size else {})
    for item in args.env:
        key, _, value = item.partition("=")
        environ[key] = value
    for name in ("BASIC_AUTH_USER", "BASIC_AUTH_PASS"):
        os.environ.pop(name, None)
    logs = Path(tempfile.mkdtemp(prefix="soak-")) / "gunicorn.log"
    print(f"starting gunicorn (log: {logs}) ...", flush=True)
    backend = GunicornBackend(logs, append=False)
    try:
        backend.start(environment(environ), timeout=args.startup_timeout, single_worker=True)
    except HarnessError as error:
        print(f"FAILED to start: {error}", file=sys.stderr)
        print(logs.read_text(errors="replace")[-3000:], file=sys.stderr)
        label_studio.close()
        return 2
    print(f"  worker pid {backend.worker} on {backend.url}", flush=True)

    templates = Templates.load()
    calls: list[Call] = []
    task_id = 1000
    missing = "/data/upload/1/does-not-exist.jpg"
    while len(calls) < args.requests:
        task_id += 1
        calls += session(rng, templates, rng.choice(images), task_id, args.bad_fraction, missing)
    calls = calls[:args.requests]
    # Sessions go to the threads whole (an annotator's calls arrive in order), interleaved across threads.
    queues: list[list[Call]] = [[] for _ in range(args.concurrency)]
    current, position = 0, 0
    for call in calls:
        if call.kind == "open":
            current, position = position % args.concurrency, position + 1
        queues[current].append(call)

    samples: list[tuple[float, int, int, int]] = []  # (seconds since start, calls done, RSS KiB, cached embeddings)
    outcomes: list[Outcome] = []
    lock = threading.Lock()
    stop = threading.Event()
    start_rss = rss_kib(backend.worker)
    warm_rss: list[int | None] = [None]
    started = time.monotonic()
    deadline = started + args.max_seconds

    def sampler() -> None:
        http, items, last_metrics = requests.Session(), 0, 0.0
        while not stop.is_set():
            if time.monotonic() - last_metrics > 5:
                try:
                    items = http.get(backend.url + "/metrics", timeout=30).json()["embedding_cache"]["items"]
                except (requests.RequestException, ValueError, KeyError):
                    pass
                last_metrics = time.monotonic()
            value = rss_kib(backend.worker)
            with lock:
                done = len(outcomes)
            if value is not None:
                samples.append((time.monotonic() - started, done, value, items))
            stop.wait(args.sample_interval)

    def client(queue: list[Call]) -> None:
        http = requests.Session()
        for call in queue:
            if time.monotonic() > deadline:
                break
            outcome = send(http, backend.url, call, args.timeout)
            with lock:
                outcomes.append(outcome)
                if len(outcomes) == warmup:
                    warm_rss[0] = rss_kib(backend.worker)
                done = len(outcomes)
            if done % 250 == 0:
                print(f"  {done} calls, {time.monotonic() - started:.0f} s, RSS {mib(rss_kib(backend.worker))}",
                      flush=True)

    threading.Thread(target=sampler, daemon=True).start()
    threads = [threading.Thread(target=client, args=(queue,)) for queue in queues]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.monotonic() - started
    time.sleep(2)  # let prewarming finish before the last sample
    end_rss = rss_kib(backend.worker)
    stop.set()
    alive = backend.alive() and rss_kib(backend.worker) is not None
    try:
        metrics = requests.get(backend.url + "/metrics", timeout=30).json()
        health = requests.get(backend.url + "/health", timeout=30).status_code
    except requests.RequestException as error:
        metrics, health = {"error": str(error)}, 0
    backend.stop()
    label_studio.close()

    # ---- report ----
    statuses = Counter(o.status for o in outcomes)
    by_kind: dict[str, Counter] = defaultdict(Counter)
    latencies: dict[str, list[float]] = defaultdict(list)
    unexpected = [o for o in outcomes if o.status != o.expected or o.detail]
    for outcome in outcomes:
        by_kind[outcome.kind][outcome.status] += 1
        latencies[outcome.kind].append(outcome.seconds)
    peak = max((s[2] for s in samples), default=None)
    # The embedding cache grows until it holds EMBEDDING_CACHE_SIZE embeddings (2 MiB each in MobileSAM); growth
    # after it is full is what a leak would show. RSS swings by a few hundred MiB with the encoder's activations,
    # so compare medians of the first and last quarter of the calls made with a full cache.
    capacity = max((s[3] for s in samples), default=0)
    full = [s for s in samples if s[3] >= capacity > 0]
    full_rss = full[0][2] if full else None
    drift = None
    if len(full) >= 8:
        quarter = max(2, len(full) // 4)
        drift = (float(np.median([s[2] for s in full[-quarter:]])) -
                 float(np.median([s[2] for s in full[:quarter]]))) / 1024
        drift_calls = full[-1][1] - full[0][1]
    print()
    print(f"{len(outcomes)} calls in {elapsed:.0f} s ({len(outcomes) / max(elapsed, 1e-9):.1f}/s), "
          f"{args.concurrency} threads, {args.images} images, EMBEDDING_CACHE_SIZE "
          f"{args.cache_size or 'default'}{'; stopped by --max-seconds' if len(outcomes) < len(calls) else ''}")
    print(f"RSS of the worker: start {mib(start_rss)}, after {warmup} warm-up calls {mib(warm_rss[0])}, "
          f"end {mib(end_rss)}, peak {mib(peak)}")
    if warm_rss[0] is not None and end_rss is not None:
        print(f"  growth after warm-up: {(end_rss - warm_rss[0]) / 1024:+.1f} MiB; "
              f"from start: {(end_rss - (start_rss or 0)) / 1024:+.1f} MiB")
    if full:
        print(f"  embedding cache full ({capacity} images) from call {full[0][1]}, RSS then {mib(full_rss)}; "
              + ("too few samples since to tell a drift" if drift is None else
                 f"median RSS, last vs first quarter of the {drift_calls} calls since: {drift:+.1f} MiB"))
    print("statuses: " + ", ".join(f"{status or 'no answer'}: {count}" for status, count in sorted(statuses.items())))
    for kind in sorted(by_kind):
        counts = ", ".join(f"{status}: {count}" for status, count in sorted(by_kind[kind].items()))
        print(f"  {kind:20s} {counts:28s} {percentiles(latencies[kind])}")
    print(f"latency, all calls: {percentiles([o.seconds for o in outcomes])}")
    good = [o.seconds for o in outcomes if o.status == 200 and o.kind != "open"]
    print(f"latency, interactive 200s: {percentiles(good)}")
    cache = metrics.get("embedding_cache", {}) if isinstance(metrics, dict) else {}
    print(f"embedding cache: {cache}; images served by the stand-in: {dict(label_studio.statuses())}")
    print(f"after the run: worker alive {alive}, /health {health}")
    if unexpected:
        print(f"UNEXPECTED answers: {len(unexpected)}")
        for outcome in unexpected[:20]:
            print(f"  {outcome.kind}: expected {outcome.expected}, got {outcome.status} {outcome.detail}")
    if args.json:
        args.json.write_text(json.dumps({
            "calls": len(outcomes), "seconds": elapsed, "concurrency": args.concurrency, "images": args.images,
            "rss_kib": {"start": start_rss, "warm": warm_rss[0], "end": end_rss, "peak": peak},
            "cache_full_rss_kib": full_rss, "full_cache_drift_mib": drift, "statuses": {str(k): v for k, v in statuses.items()},
            "by_kind": {k: {str(s): c for s, c in v.items()} for k, v in by_kind.items()},
            "latency_ms": {k: {f"p{p}": float(np.percentile(np.array(v) * 1000, p)) for p in (50, 90, 99)}
                           for k, v in latencies.items()},
            "unexpected": len(unexpected), "metrics": metrics, "samples": samples}, indent=1))
    failed = bool(unexpected) or any(status >= 500 or status == 0 for status in statuses) or not alive or health != 200
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
