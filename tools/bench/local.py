"""In-process measurements: the mode's predictor in this process, for the parts of a click (bare decode,
decoder, mask upscaling, rle.encode, JSON) and of an embedding, and rle.encode against the SDK's mask2rle."""
from __future__ import annotations

import gc
import hashlib
import json
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from typing import Any, Callable

import numpy as np

from tools.bench.plan import SIZES, BenchImage, Plan
from tools.bench.report import summary


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
        self.reference: dict[str, Any] = {}  # size -> the model's own SamPredictor, image set (torch only)

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
        model = getattr(self.predictor, "model", None)
        if model is not None:  # torch: the model's own predictor on the same weights, what a script would call
            if self.settings.model_type == "vit_t":
                from mobile_sam import SamPredictor
            else:
                from segment_anything import SamPredictor
            self.reference[size] = SamPredictor(model)
            self.reference[size].set_image(pixels)
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
        if size in self.reference:
            import torch

            from advanced_sam import DEFAULT_THREADS

            torch.set_num_threads(DEFAULT_THREADS)  # as a script calling SamPredictor has it
            point = np.array([[x * image.width / 100, y * image.height / 100]], np.float32)
            parts["reference"] = timed(lambda: self.reference[size].predict(
                point_coords=point, point_labels=np.array([1]), multimask_output=True))[0]
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
        self.reference.clear()
        gc.collect()


def _unreachable():
    raise AssertionError("prepare() embeds every size first")


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
