"""How much memory one request can make the server take: peak RSS of a gunicorn worker per hostile or unlucky image.

    python -m tools.memory_bench [--mode torch|onnx] [--pixels N] [--env NAME=VALUE ...]

Starts the backend as deployed (gunicorn.conf.py, one worker, default settings unless `--env` says otherwise)
beside a stand-in Label Studio, warms it up (a click on a 640x480 photo and one on a 1920x1080 one: the
"loaded state"), then for each case resets the worker's peak RSS (`/proc/<pid>/clear_refs`, 5) and reports
VmHWM minus the loaded state's VmRSS, the answer's status, its time and, where the image holds a known
object (a disk), the mask's IoU with it:

* png16: a 16-bit grayscale PNG of `--pixels` pixels (default: MAX_IMAGE_PIXELS's default; a few hundred KB: flat
  areas compress well);
* png_rgb: an RGB PNG of that size; jpeg_rgb: a JPEG of that size; jpeg_progressive: a progressive JPEG of that size;
* over_limit: an RGB PNG of twice `--pixels` (413 at default settings);
* clicks4: 4 concurrent clicks on the cached png_rgb image (each answer is a full-size mask);
* bomb: a PNG whose header claims 40000 x 40000 pixels.

The goal of issue #11: no case raises the worker's RSS by more than 600 MB over its loaded state. The images
are refused (413, naming MAX_IMAGE_PIXELS) when `--pixels` exceeds that setting: run with `--env
MAX_IMAGE_PIXELS=...` to measure what a raised limit costs.
"""
from __future__ import annotations

import argparse
import io
import struct
import sys
import tempfile
import threading
import time
import zlib
from pathlib import Path

import numpy as np
import requests
from PIL import Image, ImageDraw

from sam_backend.settings import Settings
from tools.bench.over_http import click_body
from tools.bench.plan import TOKEN, BenchImage, server_env
from tools.bench.report import machine_info
from tools.harness.processes import GunicornBackend, HarnessError, environment
from tools.harness.recordings import decoded
from tools.harness.stub_label_studio import FakeLabelStudio

GOAL_MB = 600


def disk_image(size: tuple[int, int], mode: str) -> tuple[Image.Image, np.ndarray]:
    """An image of `size` (H, W) in `mode` ("RGB" or "I;16") holding one bright disk; and the disk's mask."""
    height, width = size
    radius = min(height, width) // 4
    centre = (width // 2, height // 2)
    box = (centre[0] - radius, centre[1] - radius, centre[0] + radius, centre[1] + radius)
    mask = Image.new("1", (width, height), 0)
    ImageDraw.Draw(mask).ellipse(box, fill=1)
    if mode == "RGB":
        image = Image.new("RGB", (width, height), (40, 60, 90))
        ImageDraw.Draw(image).ellipse(box, fill=(230, 200, 60))
    else:
        image = Image.new("I", (width, height), 9000)
        ImageDraw.Draw(image).ellipse(box, fill=52000)
        image = image.convert("I;16")
    return image, np.asarray(mask, dtype=bool)


def encoded(image: Image.Image, kind: str, progressive: bool = False) -> bytes:
    buffer = io.BytesIO()
    options = {"quality": 90, "progressive": progressive} if kind == "JPEG" else {"compress_level": 6}
    image.save(buffer, format=kind, **options)
    return buffer.getvalue()


def bomb_png(width: int = 40_000, height: int = 40_000) -> bytes:
    """A valid PNG header (and a tiny, wrong IDAT) that claims `width` x `height` RGB pixels."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + \
        chunk(b"IEND", b"")


def status_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise HarnessError(f"no {field} for pid {pid}")


def reset_peak(pid: int) -> None:
    """Set the worker's VmHWM to its current RSS (Linux: writing 5 to clear_refs)."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")


def iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 1.0


class Run:
    """The server under test and the requests of one case."""

    def __init__(self, url: str, label_studio: FakeLabelStudio, worker: int) -> None:
        self.url, self.label_studio, self.worker = url, label_studio, worker
        self.task_id = 5000

    def click(self, image: BenchImage, x: float = 50.0, y: float = 50.0) -> tuple[int, float, dict]:
        self.task_id += 1
        body = click_body(image, x, y, self.task_id)
        started = time.monotonic()
        answer = requests.post(self.url + "/predict", json=body, timeout=600)
        return answer.status_code, time.monotonic() - started, answer.json()

    def case(self, name: str, image: BenchImage, truth: np.ndarray | None, clicks: int = 1) -> dict:
        baseline = status_kib(self.worker, "VmRSS")
        reset_peak(self.worker)
        outcomes: list[tuple[int, float, dict]] = []
        points = [(50.0, 50.0), (45.0, 50.0), (55.0, 50.0), (50.0, 45.0)][:clicks]
        threads = [threading.Thread(target=lambda p=p: outcomes.append(self.click(image, *p))) for p in points]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        peak = status_kib(self.worker, "VmHWM")
        statuses = sorted(status for status, _, _ in outcomes)
        row = {"case": name, "bytes": len(self.label_studio.files[image.path]), "statuses": statuses,
               "seconds": max(seconds for _, seconds, _ in outcomes), "peak_mb": (peak - baseline) / 1024,
               "rss_after_mb": (status_kib(self.worker, "VmRSS") - baseline) / 1024}
        errors = [answer.get("error") for status, _, answer in outcomes if status != 200]
        if errors:
            row["error"] = errors[0]
        if truth is not None and statuses == [200] * clicks:
            regions = [r for _, _, a in outcomes for r in a["results"][0]["result"] if r["type"] == "brushlabels"]
            row["iou"] = min(iou(decoded(region), truth) for region in regions) if regions else 0.0
        return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mode", choices=("torch", "onnx"), default="torch")
    parser.add_argument("--pixels", type=int, default=Settings().max_image_pixels,
                        help="pixels of the large images (square; default: MAX_IMAGE_PIXELS's default)")
    parser.add_argument("--env", action="append", default=[], help="NAME=VALUE for the server")
    args = parser.parse_args(argv)
    extra = dict(item.partition("=")[::2] for item in args.env)
    side = int(round(args.pixels ** 0.5))
    info = machine_info()
    print(f"machine: {info['cpu_model']} ({', '.join(info['cpu_vector_extensions']) or 'no AVX'}), {info['cpus']} CPUs")
    print(f"server: {args.mode}, {extra or 'default settings'}; large images {side}x{side}", flush=True)
    label_studio = FakeLabelStudio(TOKEN)
    logs = Path(tempfile.mkdtemp(prefix="memory-bench-")) / "gunicorn.log"
    backend = GunicornBackend(logs, append=False)
    try:
        backend.start(environment(server_env(args.mode, label_studio, extra)), single_worker=True)
        run = Run(backend.url, label_studio, backend.worker)
        images: dict[str, tuple[BenchImage, np.ndarray | None]] = {}
        for name, size in (("photo", (480, 640)), ("hd", (1080, 1920))):
            picture, truth = disk_image(size, "RGB")
            label_studio.files[f"/data/upload/1/{name}.png"] = encoded(picture, "PNG")
            images[name] = (BenchImage(f"/data/upload/1/{name}.png", b"", size[0], size[1], (50.0, 50.0)), truth)
        over = int(round(side * 2 ** 0.5))
        for name, mode, kind, edge in (("png16", "I;16", "PNG", side), ("png_rgb", "RGB", "PNG", side),
                                       ("jpeg_rgb", "RGB", "JPEG", side), ("jpeg_progressive", "RGB", "JPEG", side),
                                       ("over_limit", "RGB", "PNG", over)):
            picture, truth = disk_image((edge, edge), mode)
            path = f"/data/upload/1/{name}.{kind.lower()}"
            label_studio.files[path] = encoded(picture, kind, progressive=name == "jpeg_progressive")
            del picture
            images[name] = (BenchImage(path, b"", edge, edge, (50.0, 50.0)), truth)
        label_studio.files["/data/upload/1/bomb.png"] = bomb_png()
        images["bomb"] = (BenchImage("/data/upload/1/bomb.png", b"", 40_000, 40_000, (50.0, 50.0)), None)
        for name in ("photo", "hd"):
            status, _, answer = run.click(images[name][0])
            if status != 200:
                raise HarnessError(f"warm-up click on {name} answered {status}: {answer}")
        loaded = status_kib(backend.worker, "VmRSS") / 1024
        print(f"loaded state (model + two warm images): RSS {loaded:.0f} MiB")
        rows = [run.case(name, *images[name])
                for name in ("png16", "png_rgb", "jpeg_rgb", "jpeg_progressive", "over_limit", "bomb")]
        rows.append(run.case("clicks4", *images["png_rgb"], clicks=4))
    finally:
        backend.stop()
        label_studio.close()
    print(f"{'case':16} {'bytes':>10} {'status':>16} {'seconds':>8} {'peak +MiB':>10} {'after +MiB':>10} {'IoU':>6}")
    worst = 0.0
    for row in rows:
        worst = max(worst, row["peak_mb"])
        print(f"{row['case']:16} {row['bytes']:>10} {','.join(map(str, row['statuses'])):>16} {row['seconds']:>8.2f} "
              f"{row['peak_mb']:>10.0f} {row['rss_after_mb']:>10.0f} {row.get('iou', float('nan')):>6.3f}"
              + (f"  {row['error'][:120]}" if "error" in row else ""))
    print(f"worst peak over the loaded state: {worst:.0f} MiB (goal <= {GOAL_MB} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
