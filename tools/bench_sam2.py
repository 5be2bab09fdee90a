"""SAM 2.1 speed and memory per size, in-process: `python -m tools.bench_sam2 [--sizes tiny small] [--device cpu]`.

Random-init weights (the real ones cannot be had here; speed does not depend on the values). For each size, on a
1920 x 1080 photo-like image: the embedding time (preprocessing + Hiera encoder + the decoder's high-res
projections; median of --repeats after one untimed warm-up), the warm-click time (`decode` of one positive click
from the embedding as the server caches it, float16, moved a little each click; median and p95 of --clicks), the
bytes one cached image takes (float16 and float32) and the model's bytes (torch parameters; the ONNX files).
Modes: torch (DEVICE as --device) and onnx (exported first, untimed, then ONNX Runtime on the CPU). Prints a
table; `--json` writes the raw numbers too.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from sam_backend.cache import EmbeddingCache
from sam_backend.sam.types import Prompt

SIZES = ("tiny", "small", "base_plus", "large")
IMAGE_HW = (1080, 1920)


def test_image() -> np.ndarray:
    """A 1920 x 1080 RGB image (chelsea, stretched): what the encoder sees does not change its speed."""
    import cv2
    import skimage.data

    return cv2.resize(skimage.data.chelsea(), IMAGE_HW[::-1], interpolation=cv2.INTER_LINEAR)


def load(size: str, mode: str, device: str, folder: Path):
    """The predictor of `mode`: torch, or onnx (exported first into `folder`, the export not timed)."""
    import torch

    from sam2_predictor import Sam2Predictor

    torch.manual_seed(0)
    predictor = Sam2Predictor.load(size, None, device)
    if mode == "torch":
        return predictor
    from onnx_converter import export_sam2
    from onnx_sam2 import OnnxSam2Predictor

    encoder, decoder = folder / f"sam2.1_{size}.encoder.onnx", folder / f"sam2.1_{size}.decoder.onnx"
    export_sam2(predictor.model, encoder, decoder)
    return OnnxSam2Predictor.load(encoder, decoder, model_version=f"SAM2.1-{size}-onnx")


def measure(size: str, mode: str, device: str, repeats: int, clicks: int, folder: Path) -> dict:
    import torch

    predictor = load(size, mode, device, folder)
    image = test_image()
    on_cuda = getattr(getattr(predictor, "device", None), "type", "cpu") == "cuda"

    def sync() -> None:
        if on_cuda:
            torch.cuda.synchronize()

    embedding = predictor.embed(image)  # warm-up
    embed_s = []
    for _ in range(repeats):
        started = time.perf_counter()
        embedding = predictor.embed(image)
        sync()
        embed_s.append(time.perf_counter() - started)
    cache = EmbeddingCache(1, compact=True)
    try:
        cached = cache.get_or_compute("image", lambda: embedding)
    finally:
        cache.close()
    height, width = IMAGE_HW
    predictor.decode(cached, Prompt(np.array([[width / 2, height / 2]], np.float32), np.array([1], np.int32)))
    click_ms = []
    for index in range(clicks):
        point = np.array([[width / 2 + 7 * index, height / 2 - 5 * index]], np.float32)
        started = time.perf_counter()
        predictor.decode(cached, Prompt(point, np.array([1], np.int32)))
        sync()
        click_ms.append(1000 * (time.perf_counter() - started))
    click_ms.sort()
    return {
        "size": size, "mode": mode, "device": "cuda" if on_cuda else "cpu",
        "embed_s": statistics.median(embed_s), "embed_samples_s": embed_s,
        "click_ms_p50": statistics.median(click_ms), "click_ms_p95": click_ms[int(0.95 * (len(click_ms) - 1))],
        "cached_bytes_float16": cached.nbytes, "embedding_bytes_float32": embedding.nbytes,
        "parameter_bytes": sum(p.numel() * p.element_size() for p in predictor.model.parameters())
        if mode == "torch" else sum(f.stat().st_size for f in folder.glob(f"sam2.1_{size}.*")),
    }


def table(rows: list[dict]) -> str:
    title = (f"SAM 2.1 at {IMAGE_HW[1]}x{IMAGE_HW[0]}, random-init weights, torch {_torch_version()}, "
             f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}")
    header = (f"{'size':<10} {'mode':<6} {'device':<7} {'embed s':>8} {'click p50 ms':>13} {'click p95 ms':>13} "
              f"{'cached MiB':>11} {'model MiB':>11}")
    lines = [title, header]
    for row in rows:
        lines.append(f"{row['size']:<10} {row['mode']:<6} {row['device']:<7} {row['embed_s']:>8.2f} {row['click_ms_p50']:>13.1f} "
                     f"{row['click_ms_p95']:>13.1f} {row['cached_bytes_float16'] / 2**20:>11.1f} "
                     f"{row['parameter_bytes'] / 2**20:>11.1f}")
    return "\n".join(lines)


def _torch_version() -> str:
    import torch

    return torch.__version__


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", choices=SIZES, default=list(SIZES))
    parser.add_argument("--modes", nargs="+", choices=("torch", "onnx"), default=["torch", "onnx"],
                        help="torch, and onnx (exported first, untimed; ONNX Runtime on the CPU)")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=2, help="timed embeddings per size")
    parser.add_argument("--clicks", type=int, default=20, help="timed warm clicks per size")
    parser.add_argument("--json", type=Path, help="also write the raw numbers here")
    args = parser.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for size in args.sizes:
            for mode in args.modes:
                rows.append(measure(size, mode, args.device, args.repeats, args.clicks, Path(folder)))
                print(table(rows[-1:]).splitlines()[-1], file=sys.stderr, flush=True)  # progress
    print(table(rows))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
