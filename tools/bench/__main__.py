#!/usr/bin/env python
"""Latency, memory and RLE numbers of the backend, measured the way users run it (issues #5 and #2).

    .venv/bin/python -m tools.bench                      # full run (5-10 min on 2 cores): torch, onnx, onnx-int8
    .venv/bin/python -m tools.bench --quick --modes torch --sizes 640x480   # smoke run, about a minute
    .venv/bin/python -m tools.bench --modes onnx --env ORT_NUM_THREADS=1     # the server with other settings
    .venv/bin/python -m tools.bench --modes onnx --app patched:app --env PYTHONPATH=/tmp/exp   # try a fix first

For every mode the server is started as `make run` starts it (`gunicorn -c gunicorn.conf.py --bind
127.0.0.1:<free port> _wsgi:app`, WORKERS=1, THREADS=8) against a loopback image server playing Label Studio
(it serves /data/upload/... only to `Authorization: Token <token>`), and is fed bodies shaped like the ones a real
Label Studio 1.23 sent (tools/harness/bodies/ls_1_23_interactive_bodies.json). Measured, per mode:

* in-process, before the server starts: image download from the loopback Label Studio, sha256 of the bytes,
  image decode, embedding (preprocessing and encoder; after one untimed warm-up run);
* over HTTP: the cold first click on a new image; warm one-click latency (median, p95) at each size with the
  click moved a little each time, the worker's CPU time per warm click (/proc/<worker>/stat) and the app's own
  time per click (the server's /metrics); the first click on a task "opened" (a context-less /predict) N
  seconds earlier; warm clicks of 1, 4 and 8 concurrent users on different images (every mask compared with
  the mask the same request gets alone); the worker's RSS (/proc/<worker>/status VmRSS) after start-up and
  with N cached images;
* in-process, between two warm HTTP clicks (the server idle), for the same prompt: the bare
  `predictor.decode` and its parts (decoder, mask upscaling), `rle.encode` and the JSON encoding of the
  answer, on the embedding in the form the server caches (float16 by default);
* once: `rle.encode` against `label_studio_sdk.converter.brush.mask2rle` on real SAM masks.

Prints a table with the targets of issue #5 next to the numbers and writes everything, raw samples included, to
artifacts/bench.json (--json), the server logs next to it. The machine is shared in CI and on laptops: the load
average and Linux's CPU pressure are recorded before and after each mode; numbers taken under load are noisy.
"""
from __future__ import annotations

import argparse
import gc
import hashlib
import io
import json
import os
import platform
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np

from tools.harness.processes import GunicornBackend
from tools.harness.recordings import recorded
from tools.harness.stub_label_studio import FakeLabelStudio

ROOT = Path(__file__).resolve().parent.parent

MODELS = ROOT / "models"
DEFAULT_JSON = ROOT / "artifacts" / "bench.json"
TOKEN = "bench0legacy0token"

#: size name -> (H, W)
SIZES = {"640x480": (480, 640), "1920x1080": (1080, 1920), "4000x3000": (3000, 4000)}
MAIN_SIZE = "1920x1080"  # the size of the headline numbers, the cache fill and the concurrent users

#: mode -> server environment on top of the caller's
MODES: dict[str, dict[str, str]] = {
    "torch": {"RUN_ONNX_SAM": "false"},
    "onnx": {"RUN_ONNX_SAM": "true", "ONNX_ENCODER_PATH": str(MODELS / "vit_t.encoder.onnx"),
             "ONNX_DECODER_PATH": str(MODELS / "vit_t.decoder.onnx")},
    "onnx-int8": {"RUN_ONNX_SAM": "true", "ONNX_ENCODER_PATH": str(MODELS / "vit_t.encoder.int8.onnx"),
                  "ONNX_DECODER_PATH": str(MODELS / "vit_t.decoder.int8.onnx")},
}
#: variables the bench sets itself; the caller's values of them are not passed to the server
CONTROLLED = ("RUN_ONNX_SAM", "ONNX_ENCODER_PATH", "ONNX_DECODER_PATH", "LABEL_STUDIO_URL", "LABEL_STUDIO_API_KEY",
              "WORKERS", "THREADS", "PORT", "GUNICORN_CMD_ARGS", "BASIC_AUTH_USER", "BASIC_AUTH_PASS")
#: settings that change speed or memory, recorded with the results
RECORDED_ENV = ("TORCH_NUM_THREADS", "ORT_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "EMBEDDING_CACHE_SIZE",
                "EMBEDDING_FLOAT16", "REFINE_MASKS", "DEVICE", "LOG_LEVEL")

# Targets of issue #5 (and what "about the same" means for the prewarmed click).
TARGET_WARM_OVER_BARE = 1.2
TARGET_WARM_ONNX_MS = 90.0
TARGET_PREWARM_OVER_WARM = 1.5
TARGET_EMBED_ONNX_S = 1.0
TARGET_EMBED_INT8_S = 0.6
TARGET_RSS_ONNX_MB = 700.0
TARGET_P95_8_USERS_MS = 400.0


@dataclass(frozen=True)
class Plan:
    """How many of everything: the full run, or --quick."""

    warm_repeats: int = 30
    extra_cold: dict[str, int] = field(default_factory=lambda: {"640x480": 2, "1920x1080": 0, "4000x3000": 1})
    prewarm_runs: int = 3
    prewarm_delay: float = 3.0
    cached_images: int = 32
    rss_checkpoints: tuple[int, ...] = (20, 32)
    users: tuple[int, ...] = (1, 4, 8)
    clicks_per_user: int = 10
    embed_repeats: int = 3
    small_repeats: int = 5  # download, hash and decode of an image, in-process
    rle_masks: int = 3
    sdk_repeats: int = 2
    # Seconds between a warm HTTP click and the in-process decode of the same prompt, and after it: ONNX
    # Runtime's intra-op threads spin for ~50 ms after a run (measured), and a decode started meanwhile in
    # the other process shares the two cores with them.
    pause: float = 0.1


QUICK = Plan(warm_repeats=3, extra_cold={}, prewarm_runs=1, cached_images=4, rss_checkpoints=(2, 4), users=(1, 2),
             clicks_per_user=2, embed_repeats=1, small_repeats=2, rle_masks=1, sdk_repeats=1)


# ---- statistics and machine ----------------------------------------------------------------------------------------
def summary(samples_ms: list[float]) -> dict[str, float | int | None]:
    """n, median, p95, min and max of samples in milliseconds (None for an empty list)."""
    if not samples_ms:
        return {"n": 0, "p50": None, "p95": None, "min": None, "max": None}
    values = np.asarray(samples_ms, dtype=float)
    return {"n": int(values.size), "p50": round(float(np.median(values)), 2),
            "p95": round(float(np.percentile(values, 95)), 2), "min": round(float(values.min()), 2),
            "max": round(float(values.max()), 2)}


def timed(function: Callable[[], Any]) -> tuple[float, Any]:
    """(milliseconds, result) of one call."""
    started = time.perf_counter()
    result = function()
    return (time.perf_counter() - started) * 1000.0, result


def median_ms(function: Callable[[], Any], repeats: int) -> tuple[float, Any]:
    """Median milliseconds of `repeats` calls, and the last result."""
    times, result = [], None
    for _ in range(max(1, repeats)):
        elapsed, result = timed(function)
        times.append(elapsed)
    return float(np.median(times)), result


def load() -> list[float]:
    """The 1, 5 and 15 minute load averages."""
    return [round(value, 2) for value in os.getloadavg()]


def cpu_pressure() -> float | None:
    """Share of the last 60 s in which some runnable task waited for a CPU (Linux PSI), in percent."""
    try:
        line = Path("/proc/pressure/cpu").read_text().splitlines()[0]
        return float(dict(part.split("=") for part in line.split()[1:])["avg60"])
    except (OSError, ValueError, KeyError, IndexError):
        return None


def machine_info() -> dict[str, Any]:
    cpu_model = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith(("model name", "hardware", "cpu model")) and ":" in line:
                value = line.split(":", 1)[1].strip()
                if value and not value.isdigit():
                    cpu_model = value
                    break
    except OSError:
        pass
    memory = {}
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("MemTotal", "MemAvailable"):
                memory[key] = round(int(value.split()[0]) / 1024)
    except OSError:
        pass
    versions = {}
    from importlib import metadata

    for name in ("numpy", "torch", "onnxruntime", "opencv-python-headless", "gunicorn", "flask"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:  # not installed (an ONNX-only install has no torch)
            versions[name] = None
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                                timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    return {"cpu_model": cpu_model, "cpus": os.cpu_count(),
            "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
            "memory_mb": memory, "loadavg_start": load(),
            "cpu_pressure_avg60_start": cpu_pressure(), "python": platform.python_version(),
            "platform": platform.platform(), "versions": versions, "commit": commit,
            "env": {name: os.environ[name] for name in RECORDED_ENV if name in os.environ}}


# ---- Label Studio on loopback ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class BenchImage:
    path: str  # Label Studio media path
    data: bytes  # JPEG
    height: int
    width: int
    click: tuple[float, float]  # (x, y) percent: the object's most interior pixel

    def clicks(self, count: int, seed: int) -> list[tuple[float, float]]:
        """`count` clicks within +-1.5 % of the image around the object's centre; the same for the same seed."""
        rng = np.random.default_rng(seed)
        offsets = rng.uniform(-1.5, 1.5, size=(count, 2))
        return [(round(min(max(self.click[0] + dx, 0.0), 100.0), 3), round(min(max(self.click[1] + dy, 0.0), 100.0), 3))
                for dx, dy in offsets]


class ImageSet:
    """Distinct photo composites (tests/scenes.py) at each size, built on first use and served by `label_studio`.

    Image `index` of a size is always the same bytes; variants of the scenes are flipped and rolled copies, so
    every index has its own content (the cache is keyed by the image's sha256).
    """

    def __init__(self, label_studio: FakeLabelStudio) -> None:
        self.label_studio = label_studio
        self._images: dict[tuple[str, int], BenchImage] = {}

    def get(self, size: str, index: int) -> BenchImage:
        key = (size, index)
        if key not in self._images:
            self._images[key] = self._make(size, index)
        return self._images[key]

    def _make(self, size: str, index: int) -> BenchImage:
        from PIL import Image

        from tools.harness import scenes

        names = list(scenes.RECIPES) + list(scenes.EXTRA_RECIPES)
        height, width = SIZES[size]
        base = scenes.scene(names[index % len(names)], (height, width))
        variant = index // len(names)
        image, mask = base.image, base.mask
        if variant & 1:
            image, mask = image[:, ::-1], mask[:, ::-1]
        if variant & 2:
            image, mask = image[::-1], mask[::-1]
        if variant >= 4:
            shift = (variant // 4) * 37
            image, mask = np.roll(image, shift, axis=1), np.roll(mask, shift, axis=1)
        x, y = scenes.interior_point(np.ascontiguousarray(mask))
        buffer = io.BytesIO()
        Image.fromarray(np.ascontiguousarray(image)).save(buffer, format="JPEG", quality=90)
        path = f"/data/upload/7/bench-{size}-{index}.jpg"
        self.label_studio.files[path] = buffer.getvalue()
        return BenchImage(path, buffer.getvalue(), height, width,
                          (round(100 * (x + 0.5) / width, 3), round(100 * (y + 0.5) / height, 3)))


# ---- request bodies, as Label Studio 1.23 sends them ------------------------------------------------------------------
def click_body(image: BenchImage, x: float, y: float, task_id: int) -> dict:
    """One positive keypoint at (x, y) percent: the first click on an object."""
    body = recorded("keypoints_positive_and_negative")
    task = body["tasks"][0]
    task["id"] = task_id
    task["data"]["image"] = image.path
    region = body["params"]["context"]["result"][0]
    region.update(original_width=image.width, original_height=image.height, id=f"b{task_id:09d}", is_positive=True)
    region["value"].update(x=x, y=y)
    body["params"]["context"]["result"] = [region]
    return body


def open_body(image: BenchImage, task_id: int) -> dict:
    """What Label Studio sends when a task is opened: no context (the backend prewarms the image's embedding)."""
    body = recorded("open_task")
    body["tasks"][0]["id"] = task_id
    body["tasks"][0]["data"]["image"] = image.path
    return body


# ---- the server under test ----------------------------------------------------------------------------------------------
class Client:
    """One user: a keep-alive HTTP session to the backend."""

    #: connection errors retried on a new connection, by every client (see `predict`)
    retries = 0

    def __init__(self, url: str) -> None:
        import requests

        self.url = url
        self.session = requests.Session()

    def predict(self, body: dict) -> tuple[float, dict]:
        """(milliseconds, answer) of one /predict; the body is serialised before the clock starts.

        gunicorn closes a keep-alive connection idle for 2 s at its next loop turn (about once a second), so a
        request sent on it just then is reset; it is sent again on a new connection and counted in
        `Client.retries` (the time is that of the second attempt).
        """
        import requests

        data = json.dumps(body).encode()
        for attempt in (1, 2):
            started = time.perf_counter()
            try:
                response = self.session.post(self.url + "/predict", data=data, timeout=600,
                                             headers={"Content-Type": "application/json"})
            except requests.ConnectionError:
                if attempt == 2:
                    raise
                Client.retries += 1
                self.fresh()
                continue
            break
        elapsed = (time.perf_counter() - started) * 1000.0
        if response.status_code != 200:
            raise RuntimeError(f"/predict answered {response.status_code}: {response.text[:500]}")
        return elapsed, response.json()

    def fresh(self) -> None:
        """Drop the kept-alive connection: the next request opens a new one."""
        import requests

        self.session.close()
        self.session = requests.Session()

    def close(self) -> None:
        self.session.close()


def mask_of(answer: dict) -> tuple | None:
    """(width, height, sha256 of the RLE) of the answer's one region, None when there is none."""
    regions = answer["results"][0]["result"]
    if not regions:
        return None
    region = regions[0]
    digest = hashlib.sha256(bytes(region["value"]["rle"])).hexdigest()
    return region["original_width"], region["original_height"], digest


# ---- in-process measurements -------------------------------------------------------------------------------------------
def server_env(mode: str, label_studio: FakeLabelStudio, extra: dict[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in CONTROLLED}
    env.update(MODES[mode])
    env.update(LABEL_STUDIO_URL=label_studio.url, LABEL_STUDIO_API_KEY=TOKEN, WORKERS="1", THREADS="8")
    env.update(extra)
    return env


def missing_models(mode: str) -> list[str]:
    if mode == "torch":
        path = MODELS / "mobile_sam.pt"
        return [] if path.is_file() else [str(path)]
    return [MODES[mode][key] for key in ("ONNX_ENCODER_PATH", "ONNX_DECODER_PATH") if not Path(MODES[mode][key]).is_file()]


class LocalPredictor:
    """The mode's predictor in this process, for the parts of a click and of an embedding.

    Bare decoder timings are taken shortly after each HTTP click of the same prompt, so that both see the same
    load on a shared machine; the server is idle meanwhile (clicks are sequential, see Plan.pause).

    As in the gunicorn worker, the model is loaded by the main thread and used from another one. This matters
    for torch (libgomp): on a busy machine, decodes run from the main thread of a fresh process took ~1 s
    each, every time, until some other thread had used torch; from a second thread they took ~0.1 s, like the
    server's request threads.
    """

    def __init__(self, env: dict[str, str]) -> None:
        from sam_backend.sam import loading
        from sam_backend.cache import EmbeddingCache
        from sam_backend.images import ImageLoader
        from sam_backend.settings import from_environment

        self.settings = from_environment(env)
        self.load_ms, self.predictor = timed(lambda: loading.load(self.settings))
        self.loader = ImageLoader(self.settings)
        self.cache = EmbeddingCache(len(SIZES) + 1, compact=self.settings.embedding_float16)
        self.images: dict[str, BenchImage] = {}
        self.pixels: dict[str, np.ndarray] = {}
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="local-predictor")
        self._warmed_up = False
        self.as_float32: dict[str, Any] = {}

    def _in_thread(self, function: Callable, *args):
        return self._thread.submit(function, *args).result()

    def prepare(self, size: str, image: BenchImage, repeats: int, embed_repeats: int) -> dict:
        """Download, hash, decode and embed `image` (kept for `click`); their medians in ms."""
        return self._in_thread(self._prepare, size, image, repeats, embed_repeats)

    def click(self, size: str, x: float, y: float, pause: float = 0.0) -> dict[str, float]:
        """Milliseconds of one click's parts: bare predictor.decode, and separately its decoder and mask
        upscaling, then rle.encode and the JSON encoding of an answer like the server's; and, when the cache
        holds float16, the bare decode of the same values as float32, `pause` seconds later."""
        return self._in_thread(self._click, size, x, y, pause)

    def masks(self, size: str, count: int) -> list[np.ndarray]:
        """Real masks for the RLE comparison: the object and some background clicks."""
        return self._in_thread(self._masks, size, count)

    def _prepare(self, size: str, image: BenchImage, repeats: int, embed_repeats: int) -> dict:
        from sam_backend.sam import transforms
        from sam_backend.images import ImageLoader

        fetch_ms, data = median_ms(lambda: self.loader.fetch(image.path), repeats)
        sha_ms, _ = median_ms(lambda: hashlib.sha256(data).hexdigest(), repeats)
        decode_ms, pixels = median_ms(lambda: ImageLoader.decode(data, self.settings.max_image_pixels), repeats)
        preprocess_ms, _ = median_ms(lambda: transforms.preprocess_image(pixels), embed_repeats)
        if not self._warmed_up:  # the first runs of an encoder are slower (torch: the first few, up to 3x)
            self.predictor.embed(pixels)
            self._warmed_up = True
        embed_times = []
        for _ in range(max(1, embed_repeats)):
            elapsed, embedding = timed(lambda: self.predictor.embed(pixels))
            embed_times.append(elapsed)
        cached = self.cache.get_or_compute(size, lambda: embedding)  # as the server caches it (float16 by default)
        if cached.features.dtype != np.float32:
            # The very same values as float32: decoding from these instead shows what the cast costs per click
            self.as_float32[size] = replace(cached, features=cached.features.astype(np.float32))
        self.images[size], self.pixels[size] = image, pixels
        for x, y in image.clicks(2, seed=0):  # first runs allocate; not counted
            self.predictor.decode(self.cache.get_or_compute(size, _unreachable), self.prompt(image, x, y))
        return {"jpeg_bytes": len(data), "fetch_ms": round(fetch_ms, 2), "sha256_ms": round(sha_ms, 2),
                "image_decode_ms": round(decode_ms, 2), "preprocess_ms": round(preprocess_ms, 2),
                "embed_ms": summary(embed_times)}

    @staticmethod
    def prompt(image: BenchImage, x: float, y: float):
        """The prompt the server builds from one positive click at (x, y) percent (prompts.build_prompt)."""
        from sam_backend.sam.types import Prompt

        return Prompt(np.array([[x * image.width / 100, y * image.height / 100]], np.float32),
                      np.array([1], np.int32))

    def _click(self, size: str, x: float, y: float, pause: float) -> dict[str, float]:
        from sam_backend.encoding import rle
        from sam_backend.sam import transforms

        image = self.images[size]
        embedding = self.cache.get_or_compute(size, _unreachable)
        prompt = self.prompt(image, x, y)
        cpu = time.process_time()
        bare, _ = timed(lambda: self.predictor.decode(embedding, prompt))
        bare_cpu = (time.process_time() - cpu) * 1000.0
        decoder, (low_res, iou) = timed(lambda: self.predictor.decode_low_res(embedding, prompt))
        upscale, prediction = timed(lambda: transforms.best_prediction(low_res, iou, prompt, embedding))
        encode, encoded = timed(lambda: rle.encode(prediction.mask))
        answer = {"results": [{"result": [{
            "id": "0123456789", "from_name": "tag", "to_name": "image", "type": "brushlabels",
            "original_width": image.width, "original_height": image.height, "image_rotation": 0, "readonly": False,
            "score": round(prediction.score, 4),
            "value": {"format": "rle", "rle": encoded, "brushlabels": ["Cat"]}}],
            "score": round(prediction.score, 4), "model_version": self.predictor.model_version}]}
        to_json, text = timed(lambda: json.dumps(answer))
        parts = {"bare": bare, "bare_cpu": bare_cpu, "decoder": decoder, "upscale": upscale, "rle": encode,
                 "json": to_json, "answer_bytes": len(text)}
        if size in self.as_float32:
            # after a pause too: the first decode after an idle spell is the slower one (torch: ~20 ms slower)
            time.sleep(pause)
            parts["bare_fp32_features"] = timed(lambda: self.predictor.decode(self.as_float32[size], prompt))[0]
        return parts

    def _masks(self, size: str, count: int) -> list[np.ndarray]:
        image = self.images[size]
        embedding = self.cache.get_or_compute(size, _unreachable)
        points = [image.click, (10.0, 10.0), (85.0, 80.0), (50.0, 90.0), (90.0, 15.0)]
        return [self.predictor.decode(embedding, self.prompt(image, x, y)).mask for x, y in points[:count]]

    def close(self) -> None:
        self._thread.shutdown()
        self.cache.close()
        self.predictor = None
        self.cache = None
        self.pixels.clear()
        gc.collect()


def _unreachable():
    raise AssertionError("prepare() embeds every size first")


def hash_seed(text: str) -> int:
    return int(hashlib.sha256(text.encode()).hexdigest()[:8], 16)


def main_size(sizes: list[str]) -> str:
    return MAIN_SIZE if MAIN_SIZE in sizes else sizes[0]


def rle_comparison(masks: list[np.ndarray], plan: Plan) -> dict:
    """rle.encode against the SDK's mask2rle on the same masks: time and byte equality."""
    from sam_backend.encoding import rle
    from label_studio_sdk.converter.brush import mask2rle

    rows = []
    for mask in masks:
        ours_ms, ours = median_ms(lambda: rle.encode(mask), 5)
        sdk_ms, sdk = median_ms(lambda: mask2rle(mask.astype(np.uint8) * np.uint8(255)), plan.sdk_repeats)
        rows.append({"shape": list(mask.shape), "coverage": round(float(mask.mean()), 3), "rle_bytes": len(ours),
                     "rle_encode_ms": round(ours_ms, 2), "sdk_mask2rle_ms": round(sdk_ms, 1),
                     "identical": ours == list(sdk)})
    return {"masks": rows,
            "rle_encode_ms_p50": round(float(np.median([r["rle_encode_ms"] for r in rows])), 2) if rows else None,
            "sdk_mask2rle_ms_p50": round(float(np.median([r["sdk_mask2rle_ms"] for r in rows])), 1) if rows else None,
            "all_identical": all(r["identical"] for r in rows)}


# ---- over HTTP --------------------------------------------------------------------------------------------------------------
class TaskIds:
    def __init__(self, start: int = 1000) -> None:
        self._next = start
        self._lock = threading.Lock()

    def __call__(self) -> int:
        with self._lock:
            self._next += 1
            return self._next


def http_run(mode: str, env: dict[str, str], plan: Plan, images: ImageSet, sizes: list[str],
             label_studio: FakeLabelStudio, local: LocalPredictor, log_dir: Path,
             say: Callable[[str], None], app: str = "_wsgi:app") -> tuple[dict, dict]:
    """The HTTP measurements of one mode; also returns the in-process click parts (ms) per size, each taken
    `plan.pause` seconds after the warm HTTP click of the same prompt."""
    # `gunicorn -c gunicorn.conf.py --bind 127.0.0.1:<port> _wsgi:app` with one worker of 8 threads (see server_env)
    server = GunicornBackend(log_dir / f"bench-server-{mode}.log", app, append=False)
    ids = TaskIds()
    out: dict[str, Any] = {"loadavg_before": load(), "cpu_pressure_avg60_before": cpu_pressure()}
    retries = Client.retries
    used: dict[str, int] = {size: 0 for size in SIZES}  # images of each size this server has seen

    def new_image(size: str) -> BenchImage:
        image = images.get(size, used[size])
        used[size] += 1
        return image

    try:
        server.start(env, interval=0.2, single_worker=True)
        out["startup_s"] = round(server.startup_s, 2)
        time.sleep(1.0)
        out["rss_startup_mb"] = server.memory()
        say(f"  server up in {out['startup_s']} s, worker {server.worker}, RSS {out['rss_startup_mb']}")
        client = Client(server.url)
        cold: dict[str, list[float]] = {}
        warm: dict[str, list[float]] = {}
        downloads: dict[str, float] = {}
        parts: dict[str, list[dict]] = {}
        server_cpu: dict[str, float] = {}
        in_app: dict[str, float] = {}
        for size in sizes:
            image = new_image(size)  # index 0: the image the in-process numbers are taken on
            cold[size] = [client.predict(click_body(image, *image.click, ids()))[0]]
            for _ in range(plan.extra_cold.get(size, 0)):
                extra = new_image(size)
                cold[size].append(client.predict(click_body(extra, *extra.click, ids()))[0])
            before = label_studio.count(image.path)
            warm[size], parts[size] = [], []
            cpu, routes = server.cpu(), server.metrics()["routes"]["/predict"]
            for x, y in image.clicks(plan.warm_repeats, seed=hash_seed(size)):
                warm[size].append(client.predict(click_body(image, x, y, ids()))[0])
                time.sleep(plan.pause)
                parts[size].append(local.click(size, x, y, plan.pause))
                time.sleep(plan.pause)
            server_cpu[size] = round((server.cpu() - cpu) * 1000.0 / plan.warm_repeats, 1)
            after = server.metrics()["routes"]["/predict"]  # the app's own timing, from before_request on
            in_app[size] = round((after["seconds_total"] - routes["seconds_total"]) * 1000.0
                                 / max(1, after["count"] - routes["count"]), 2)
            downloads[size] = (label_studio.count(image.path) - before) / plan.warm_repeats
            say(f"  {size}: cold {summary(cold[size])['p50']} ms, warm p50 {summary(warm[size])['p50']} ms")
        out["cold_ms"] = {size: summary(values) for size, values in cold.items()}
        out["warm_ms"] = {size: summary(values) for size, values in warm.items()}
        out["downloads_per_warm_click"] = downloads
        out["server_cpu_ms_per_warm_click"] = server_cpu
        out["app_ms_per_warm_click"] = in_app  # mean, from the server's /metrics

        main = main_size(sizes)
        prewarmed, opened = [], []
        for _ in range(plan.prewarm_runs):
            image = new_image(main)
            task_id = ids()
            opened.append(client.predict(open_body(image, task_id))[0])
            time.sleep(plan.prewarm_delay)
            client.fresh()  # the server may be closing the idle connection right now; Label Studio would reconnect
            prewarmed.append(client.predict(click_body(image, *image.click, task_id))[0])
        out["prewarm_delay_s"] = plan.prewarm_delay
        out["open_task_ms"] = summary(opened)
        out["prewarmed_first_click_ms"] = summary(prewarmed)
        say(f"  prewarmed first click p50 {out['prewarmed_first_click_ms']['p50']} ms")

        # Fill the cache with new images at the main size: each is a cold click too
        rss_at: dict[str, dict] = {}
        fill: list[BenchImage] = []
        checkpoints = sorted(plan.rss_checkpoints)
        while True:
            items = server.metrics()["embedding_cache"]["items"]
            for checkpoint in [c for c in checkpoints if c <= items and str(c) not in rss_at]:
                rss_at[str(checkpoint)] = {**server.memory(), "cached_images": items}
            if items >= max(checkpoints + [plan.cached_images]) or len(fill) > 2 * plan.cached_images:
                break
            image = new_image(main)
            fill.append(image)
            cold[main].append(client.predict(click_body(image, *image.click, ids()))[0])
        out["cold_ms"][main] = summary(cold[main])
        out["rss_cached_mb"] = rss_at
        out["images_seen"] = {size: count for size, count in used.items() if count}
        say(f"  RSS with cached images: {rss_at}")

        # Concurrent users, each clicking on its own cached image
        users = max(plan.users)
        mine = (fill[-users:] if len(fill) >= users else
                [images.get(main, i) for i in range(users)])
        for image in mine:  # make sure every user's image is cached
            client.predict(click_body(image, *image.click, ids()))
        bodies = [[click_body(image, x, y, ids()) for x, y in image.clicks(plan.clicks_per_user, seed=u)]
                  for u, image in enumerate(mine)]
        misses_before = server.metrics()["embedding_cache"]["misses"]
        alone = [[mask_of(client.predict(body)[1]) for body in user] for user in bodies]
        client.close()
        concurrency: dict[str, Any] = {}
        for count in plan.users:
            latencies: list[float] = []
            mismatches = 0
            barrier = threading.Barrier(count)
            lock = threading.Lock()
            errors: list[BaseException] = []

            def user(index: int) -> None:
                nonlocal mismatches
                own = Client(server.url)
                try:
                    barrier.wait()
                    for body, expected in zip(bodies[index], alone[index]):
                        elapsed, answer = own.predict(body)
                        with lock:
                            latencies.append(elapsed)
                            mismatches += mask_of(answer) != expected
                except BaseException as error:  # reported after the join
                    errors.append(error)
                finally:
                    own.close()

            threads = [threading.Thread(target=user, args=(i,)) for i in range(count)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            if errors:
                raise errors[0]
            concurrency[str(count)] = {**summary(latencies), "masks_equal_alone": mismatches == 0,
                                       "mismatches": mismatches}
            say(f"  {count} users: p50 {concurrency[str(count)]['p50']} ms, p95 {concurrency[str(count)]['p95']} ms,"
                f" masks equal: {mismatches == 0}")
        out["concurrent_ms"] = concurrency
        out["concurrent_embeddings_computed"] = server.metrics()["embedding_cache"]["misses"] - misses_before
        out["rss_end_mb"] = server.memory()
        metrics = server.metrics()
        out["server_metrics"] = {"embedding_cache": metrics["embedding_cache"],
                                 "predict": metrics["routes"].get("/predict")}
        out["raw_ms"] = {"cold": cold, "warm": warm, "prewarmed": prewarmed}
    finally:
        server.stop()
    out["loadavg_after"] = load()
    out["cpu_pressure_avg60_after"] = cpu_pressure()
    out["connection_retries"] = Client.retries - retries
    clicks = {}
    for size, rows in parts.items():
        clicks[size] = {key: summary([row[key] for row in rows])
                        for key in ("bare", "bare_cpu", "decoder", "upscale", "rle", "json", "bare_fp32_features")
                        if all(key in row for row in rows)}
        clicks[size]["answer_bytes"] = rows[0]["answer_bytes"] if rows else None
        # what the server spends beyond the measured parts: HTTP, Flask, body parsing, image download and hash
        clicks[size]["rest"] = summary([w - sum(row[k] for k in ("bare", "rle", "json"))
                                        for w, row in zip(warm[size], rows)])
        clicks[size]["raw_bare"] = [round(row["bare"], 2) for row in rows]
    return out, clicks


# ---- report ---------------------------------------------------------------------------------------------------------------
def fmt(value: Any, digits: int = 1) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def evaluate(results: dict) -> list[dict]:
    """Each target of issue #5: measured value, limit, met or missed and by how much."""
    targets = []

    def add(name: str, value: float | None, limit: float, unit: str) -> None:
        if value is None:
            return
        targets.append({"target": name, "value": round(value, 3), "limit": limit, "unit": unit,
                        "met": value <= limit, "excess": round(value - limit, 3),
                        "ratio_to_limit": round(value / limit, 2) if limit else None})

    for mode, run in results["modes"].items():
        if "http" not in run:
            continue
        http, local = run["http"], run["in_process"]
        main = results["main_size"]
        warm = http["warm_ms"].get(main, {}).get("p50")
        bare = local["sizes"].get(main, {}).get("bare", {}).get("p50")
        if warm and bare:
            add(f"{mode}: warm click {main} p50 / bare decoder p50", warm / bare, TARGET_WARM_OVER_BARE, "x")
        if mode.startswith("onnx"):
            add(f"{mode}: warm click {main} p50", warm, TARGET_WARM_ONNX_MS, "ms")
        prewarmed = http["prewarmed_first_click_ms"]["p50"]
        if warm and prewarmed:
            add(f"{mode}: prewarmed first click p50 / warm click p50", prewarmed / warm, TARGET_PREWARM_OVER_WARM, "x")
        embed = local["sizes"].get(main, {}).get("embed_ms", {}).get("p50")
        if mode == "onnx" and embed:
            add("onnx: embedding (in-process)", embed / 1000, TARGET_EMBED_ONNX_S, "s")
        if mode == "onnx-int8" and embed:
            add("onnx-int8: embedding (in-process)", embed / 1000, TARGET_EMBED_INT8_S, "s")
        if mode.startswith("onnx"):
            most = max(http["rss_cached_mb"], key=int, default=None)
            if most is not None:
                add(f"{mode}: RSS with {http['rss_cached_mb'][most]['cached_images']} cached images",
                    http["rss_cached_mb"][most]["VmRSS"], TARGET_RSS_ONNX_MB, "MiB")
        users = max(http["concurrent_ms"], key=int)
        add(f"{mode}: {users} concurrent users warm p95", http["concurrent_ms"][users]["p95"],
            TARGET_P95_8_USERS_MS, "ms")
    return targets


def report(results: dict) -> str:
    lines: list[str] = []
    add = lines.append
    m = results["machine"]
    main = results["main_size"]
    add(f"Machine: {m['cpu_model']}, {m['cpus_usable']}/{m['cpus']} CPUs, {m['memory_mb'].get('MemTotal', '?')} MiB;"
        f" load {m['loadavg_start']} at start, {results['loadavg_end']} at end (CPU pressure avg60"
        f" {fmt(m['cpu_pressure_avg60_start'])}% / {fmt(results['cpu_pressure_avg60_end'])}%); commit {m['commit']};"
        f" {'QUICK' if results['quick'] else 'full'} run in {results['duration_s']:.0f} s")
    env = {**m["env"], **results["extra_env"]}
    add(f"Server: gunicorn -c gunicorn.conf.py {results['app']}, WORKERS=1 THREADS=8, {env or 'default settings'}")
    modes = [mode for mode, run in results["modes"].items() if "http" in run]
    for mode, run in results["modes"].items():
        if "skipped" in run:
            add(f"{mode}: skipped ({run['skipped']})")
    add("")
    add("Warm one-click /predict over HTTP (ms) vs the bare predictor.decode of the same prompts in-process;"
        " CPU: the worker's CPU ms per click (/proc) vs the bare decode's")
    add(f"{'mode':<10} {'size':<10} {'warm p50':>8} {'p95':>7} {'bare p50':>8} {'ratio':>6} {'target':>20}"
        f" {'CPU srv':>7} {'bare':>6} {'ratio':>5} {'GETs':>4}  load / CPU pressure")
    for mode in modes:
        http, local = results["modes"][mode]["http"], results["modes"][mode]["in_process"]
        for size in results["sizes"]:
            warm, bare = http["warm_ms"][size], local["sizes"][size]["bare"]
            ratio = warm["p50"] / bare["p50"] if bare["p50"] else None
            cpu_server, cpu_bare = http["server_cpu_ms_per_warm_click"][size], local["sizes"][size]["bare_cpu"]["p50"]
            target = ""
            if size == main:
                target = f"<= {TARGET_WARM_OVER_BARE}x" + (f", {TARGET_WARM_ONNX_MS:.0f} ms" if mode != "torch" else "")
            add(f"{mode:<10} {size:<10} {fmt(warm['p50']):>8} {fmt(warm['p95']):>7} {fmt(bare['p50']):>8}"
                f" {fmt(ratio, 2):>6} {target:>20} {fmt(cpu_server):>7} {fmt(cpu_bare):>6}"
                f" {fmt(cpu_server / cpu_bare if cpu_bare else None, 2):>5}"
                f" {fmt(http['downloads_per_warm_click'][size], 1):>4}"
                f"  {http['loadavg_before'][0]} / {fmt(http['cpu_pressure_avg60_before'])}%")
    add("  (GETs: image downloads from Label Studio per warm click)")
    add("")
    add("Breakdown of a warm click (ms). In-process medians of the same prompts, each taken between two HTTP"
        " clicks: bare decode (the first after a pause, as the server's), of which decoder and mask upscaling"
        " (each run right after another decode), rle.encode, JSON of the answer, image download from Label Studio"
        " and its sha256. app: the server's own mean time per warm click (/metrics, Flask before_request to"
        " after_request); rest = app - bare - rle - json - fetch - sha256 (parsing, prompts, memory, Flask);"
        " outside = HTTP p50 - app (gunicorn, sockets, client)")
    add(f"{'mode':<10} {'size':<10} {'bare':>6} {'decoder':>7} {'upscale':>7} {'rle':>5} {'json':>5} {'fetch':>5}"
        f" {'sha256':>6} {'app':>6} {'rest':>5} {'HTTP':>6} {'outside':>7} {'answer KB':>9}")
    for mode in modes:
        http, local = results["modes"][mode]["http"], results["modes"][mode]["in_process"]
        for size in results["sizes"]:
            s = local["sizes"][size]
            parts = [s["bare"]["p50"], s["decoder"]["p50"], s["upscale"]["p50"], s["rle"]["p50"], s["json"]["p50"],
                     s["fetch_ms"], s["sha256_ms"]]
            spent = parts[0] + sum(parts[3:])
            app = http["app_ms_per_warm_click"][size]
            warm = http["warm_ms"][size]["p50"]
            add(f"{mode:<10} {size:<10} " + " ".join(f"{fmt(p):>{w}}" for p, w in zip(parts, (6, 7, 7, 5, 5, 5, 6)))
                + f" {fmt(app):>6} {fmt(app - spent):>5} {fmt(warm):>6} {fmt(warm - app):>7}"
                  f" {s['answer_bytes'] / 1024:>9.1f}")
    add("")
    for mode in modes:
        s = results["modes"][mode]["in_process"]["sizes"][main]
        if "bare_fp32_features" in s:
            add(f"{mode}: bare decode {main} from the cached float16 features p50 {fmt(s['bare']['p50'])} ms,"
                f" from the same values as float32 {fmt(s['bare_fp32_features']['p50'])} ms (each after a pause)")
    add("")
    add("Cold first click on a new image over HTTP (ms) and its parts in-process (ms)")
    add(f"{'mode':<10} {'size':<10} {'n':>3} {'cold p50':>8} {'max':>7} {'fetch':>6} {'decode':>6} {'embed':>7}"
        f" {'bare':>6} {'parts':>7}")
    for mode in modes:
        http, local = results["modes"][mode]["http"], results["modes"][mode]["in_process"]
        for size in results["sizes"]:
            c, s = http["cold_ms"][size], local["sizes"][size]
            parts = [s["fetch_ms"] + s["sha256_ms"], s["image_decode_ms"], s["embed_ms"]["p50"],
                     s["bare"]["p50"]]
            add(f"{mode:<10} {size:<10} {c['n']:>3} {fmt(c['p50']):>8} {fmt(c['max']):>7} {fmt(parts[0]):>6}"
                f" {fmt(parts[1]):>6} {fmt(parts[2]):>7} {fmt(parts[3]):>6} {fmt(sum(parts)):>7}")
    add("")
    delay = results["modes"][modes[0]]["http"]["prewarm_delay_s"] if modes else "?"
    add(f"First click on a task opened {delay} s earlier (context-less /predict), {main} (ms)")
    add(f"{'mode':<10} {'n':>3} {'open p50':>8} {'click p50':>9} {'max':>7} {'warm p50':>8} {'ratio':>6}"
        f" {'target':>8}")
    for mode in modes:
        http = results["modes"][mode]["http"]
        p, w = http["prewarmed_first_click_ms"], http["warm_ms"][main]["p50"]
        add(f"{mode:<10} {p['n']:>3} {fmt(http['open_task_ms']['p50']):>8} {fmt(p['p50']):>9} {fmt(p['max']):>7}"
            f" {fmt(w):>8} {fmt(p['p50'] / w if w else None, 2):>6} {'<= ' + str(TARGET_PREWARM_OVER_WARM) + 'x':>8}")
    add("")
    add(f"Image embedding in-process, {main} (ms; preprocessing included)")
    add(f"{'mode':<10} {'n':>3} {'p50':>7} {'min':>7} {'preproc':>7} {'target':>8}")
    for mode, run in results["modes"].items():
        if "in_process" not in run:
            continue
        s = run["in_process"]["sizes"][main]
        target = {"onnx": f"<= {TARGET_EMBED_ONNX_S * 1000:.0f}", "onnx-int8": f"<= {TARGET_EMBED_INT8_S * 1000:.0f}"}
        add(f"{mode:<10} {s['embed_ms']['n']:>3} {fmt(s['embed_ms']['p50']):>7} {fmt(s['embed_ms']['min']):>7}"
            f" {fmt(s['preprocess_ms']):>7} {target.get(mode, ''):>8}")
    rle_cmp = results.get("rle")
    if rle_cmp and rle_cmp["masks"]:
        add("")
        add(f"RLE of real {main} SAM masks: rle.encode vs label_studio_sdk mask2rle")
        for row in rle_cmp["masks"]:
            add(f"  coverage {row['coverage']:.3f}, {row['rle_bytes']} bytes: rle.encode {row['rle_encode_ms']} ms,"
                f" mask2rle {row['sdk_mask2rle_ms']} ms ({row['sdk_mask2rle_ms'] / max(row['rle_encode_ms'], 1e-3):.0f}x),"
                f" identical: {row['identical']}")
    add("")
    add("Worker RSS (MiB; VmRSS / peak VmHWM)")
    checkpoints = sorted({c for mode in modes for c in results["modes"][mode]["http"]["rss_cached_mb"]}, key=int)
    add(f"{'mode':<10} {'start-up':>9} " + " ".join(f"{c + ' imgs':>15}" for c in checkpoints)
        + f" {'end':>15} {'target':>15}")
    for mode in modes:
        http = results["modes"][mode]["http"]
        cells = [f"{http['rss_cached_mb'][c]['VmRSS']:.0f}/{http['rss_cached_mb'][c]['VmHWM']:.0f}"
                 if c in http["rss_cached_mb"] else "-" for c in checkpoints]
        end = f"{http['rss_end_mb']['VmRSS']:.0f}/{http['rss_end_mb']['VmHWM']:.0f}"
        target = f"<= {TARGET_RSS_ONNX_MB:.0f} at 32" if mode != "torch" else ""
        add(f"{mode:<10} {http['rss_startup_mb']['VmRSS']:>9.0f} " + " ".join(f"{c:>15}" for c in cells)
            + f" {end:>15} {target:>15}")
    add("")
    add(f"Concurrent users, each clicking on its own cached {main} image (ms over HTTP)")
    add(f"{'mode':<10} {'users':>5} {'n':>4} {'p50':>7} {'p95':>7} {'max':>7} {'masks = alone':>13} {'target':>10}")
    for mode in modes:
        http = results["modes"][mode]["http"]
        for users, c in http["concurrent_ms"].items():
            target = f"p95 <= {TARGET_P95_8_USERS_MS:.0f}" if users == max(http["concurrent_ms"], key=int) else ""
            add(f"{mode:<10} {users:>5} {c['n']:>4} {fmt(c['p50']):>7} {fmt(c['p95']):>7} {fmt(c['max']):>7}"
                f" {str(c['masks_equal_alone']):>13} {target:>10}")
        if http["concurrent_embeddings_computed"]:
            add(f"  note: {http['concurrent_embeddings_computed']} embeddings were computed during the concurrent runs")
    retried = {mode: results["modes"][mode]["http"]["connection_retries"] for mode in modes}
    if any(retried.values()):
        add(f"  note: requests resent on a new connection after a reset of an idle keep-alive one: {retried}")
    if "torch" in modes:
        http = results["modes"]["torch"]["http"]
        add("")
        add(f"Issue #2, default (torch) mode, {main}:")
        rss = http["rss_cached_mb"]
        twenty = rss.get("20", rss.get(min(rss, key=int))) if rss else None
        add(f"  cold click p50 {fmt(http['cold_ms'][main]['p50'])} ms (n={http['cold_ms'][main]['n']}),"
            f" warm click p50 {fmt(http['warm_ms'][main]['p50'])} ms (n={http['warm_ms'][main]['n']});"
            f" RSS {http['rss_startup_mb']['VmRSS']:.0f} MiB after start-up,"
            f" {fmt(twenty['VmRSS'], 0) if twenty else '-'} MiB after"
            f" {twenty['cached_images'] if twenty else '-'} images")
    add("")
    add("Targets (issue #5)")
    for t in results["targets"]:
        verdict = "met" if t["met"] else f"MISSED by {t['excess']:+g} {t['unit']} ({t['ratio_to_limit']}x the limit)"
        add(f"  {t['target']}: {t['value']:g} {t['unit']} (limit {t['limit']:g}) {verdict}")
    return "\n".join(lines)


# ---- main -------------------------------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a few repeats of everything (smoke test)")
    parser.add_argument("--modes", default="torch,onnx,onnx-int8",
                        help="comma list of torch, onnx, onnx-int8 (default: %(default)s)")
    parser.add_argument("--sizes", default=",".join(SIZES), help="comma list of %(default)s")
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON, help="where to write the results (%(default)s)")
    parser.add_argument("--repeats", type=int, help="warm clicks per size (default 30, --quick 3)")
    parser.add_argument("--prewarm-delay", type=float, help="seconds between opening a task and clicking (3)")
    parser.add_argument("--cached", type=int, help="images to fill the cache with (default 32, --quick 4)")
    parser.add_argument("--users", help="comma list of concurrent user counts (default 1,4,8; --quick 1,2)")
    parser.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                        help="extra server setting, e.g. ORT_NUM_THREADS=1 (repeatable)")
    parser.add_argument("--app", default="_wsgi:app",
                        help="the WSGI app gunicorn serves (default %(default)s); another module that patches the "
                             "serving code before importing _wsgi tries a fix without editing it (with --env "
                             "PYTHONPATH=<its directory>); the in-process numbers stay those of the unpatched code")
    args = parser.parse_args(argv)
    args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    args.sizes = [s.strip() for s in args.sizes.split(",") if s.strip()]
    for mode in args.modes:
        if mode not in MODES:
            parser.error(f"unknown mode {mode!r}; choose from {', '.join(MODES)}")
    for size in args.sizes:
        if size not in SIZES:
            parser.error(f"unknown size {size!r}; choose from {', '.join(SIZES)}")
    if not args.modes or not args.sizes:
        parser.error("give at least one mode and one size")
    extra = {}
    for item in args.env:
        key, sep, value = item.partition("=")
        if not sep or not key:
            parser.error(f"--env {item!r} is not KEY=VALUE")
        extra[key] = value
    args.extra_env = extra
    return args


def make_plan(args: argparse.Namespace) -> Plan:
    plan = QUICK if args.quick else Plan()
    changes: dict[str, Any] = {}
    if args.repeats is not None:
        changes["warm_repeats"] = max(1, args.repeats)
    if args.prewarm_delay is not None:
        changes["prewarm_delay"] = args.prewarm_delay
    if args.cached is not None:
        changes["cached_images"] = max(1, args.cached)
        changes["rss_checkpoints"] = tuple(sorted({c for c in plan.rss_checkpoints if c < args.cached}
                                                  | {max(1, args.cached)}))
    if args.users:
        changes["users"] = tuple(int(u) for u in args.users.split(","))
    if changes:
        plan = replace(plan, **changes)
    return plan


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    plan = make_plan(args)
    started = time.monotonic()

    def say(text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    results: dict[str, Any] = {"machine": machine_info(), "quick": args.quick, "plan": plan.__dict__,
                               "sizes": args.sizes, "main_size": main_size(args.sizes), "extra_env": args.extra_env, "app": args.app,
                               "modes": {}}
    say(f"load average {results['machine']['loadavg_start']} on {results['machine']['cpus']} CPUs "
        f"({results['machine']['cpu_model']})")
    label_studio = FakeLabelStudio(TOKEN)
    images = ImageSet(label_studio)
    masks: list[np.ndarray] = []
    try:
        for mode in args.modes:
            missing = missing_models(mode)
            if missing:
                results["modes"][mode] = {"skipped": f"missing {', '.join(missing)}; build the ONNX files with "
                                                     f"`make onnx`"}
                say(f"{mode}: skipped, missing {missing}")
                continue
            env = server_env(mode, label_studio, args.extra_env)
            say(f"{mode}: in-process measurements (load {load()})")
            local = LocalPredictor(env)
            try:
                inside: dict[str, Any] = {"load_ms": round(local.load_ms, 1),
                                          "embedding_float16": local.settings.embedding_float16, "sizes": {}}
                for size in args.sizes:
                    repeats = plan.embed_repeats if size == main_size(args.sizes) else 1
                    inside["sizes"][size] = local.prepare(size, images.get(size, 0), plan.small_repeats, repeats)
                main = main_size(args.sizes)
                if not masks:
                    masks = local.masks(main, plan.rle_masks)
                say(f"{mode}: HTTP measurements")
                http, clicks = http_run(mode, env, plan, images, args.sizes, label_studio, local, args.json.parent,
                                        say, args.app)
                for size, entry in clicks.items():
                    inside["sizes"][size].update(entry)
            finally:
                local.close()
            results["modes"][mode] = {"in_process": inside, "http": http}
        if masks:
            say("RLE: rle.encode vs mask2rle")
            results["rle"] = rle_comparison(masks, plan)
    finally:
        label_studio.close()
    results["loadavg_end"] = load()
    results["cpu_pressure_avg60_end"] = cpu_pressure()
    results["duration_s"] = round(time.monotonic() - started, 1)
    results["targets"] = evaluate(results)
    table = report(results)
    results["table"] = table
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=1, default=str))
    print(table)
    print(f"\nwritten to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
