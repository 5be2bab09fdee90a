"""A Predictor without weights: deterministic masks from the prompt alone, and a record of what it was asked.

`FakePredictor` implements `sam_backend.sam.types.Predictor`, so `SamModel` (and anything else that takes a
predictor) runs in milliseconds, without torch, and a test can say exactly which mask a prompt must give:

* each positive click paints a disk of `radius` pixels around it, each negative click erases one;
* a box alone fills the box; with positive clicks it clips their disks (so a box keeps the mask inside it);
* a pixel belongs to a disk or a box when its centre does (pixel (r, c) has its centre at (c + 0.5, r + 0.5)
  in the pixel-edge coordinates of `Prompt`);
* `low_res_logits` are filled with the decode's serial number (1, 2, ...), so a test can tell which earlier
  prediction came back as a later prompt's `mask_input`.
"""
from __future__ import annotations

import threading

import numpy as np

from sam_backend.sam import transforms
from sam_backend.sam.types import Embedding, Prediction, Prompt


class FakePredictor:
    """Deterministic stand-in for a SAM predictor; thread-safe. `prompts` and `images` record, in order, every
    prompt decoded and the (H, W) of every image embedded."""

    def __init__(self, model_version: str = "FakeSAM-test", radius: float = 10.0, score: float = 0.875) -> None:
        self.model_version = model_version
        self.radius = radius
        self.score = score
        self.prompts: list[Prompt] = []
        self.images: list[tuple[int, int]] = []
        self._lock = threading.Lock()

    def embed(self, image: np.ndarray, original_size: tuple[int, int] | None = None) -> Embedding:
        image = np.asarray(image)
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError(f"embed takes an (H, W, 3) uint8 image, got {image.shape} {image.dtype}")
        size = transforms.sizes_of(image, original_size)[0]
        with self._lock:
            self.images.append(size)
        features = np.zeros((1, 256, 64, 64), np.float32)
        return Embedding(features=features, original_size=size, input_size=transforms.input_size(size))

    def decode(self, embedding: Embedding, prompt: Prompt) -> Prediction:
        with self._lock:
            self.prompts.append(prompt)
            serial = len(self.prompts)
        logits = np.full((1, transforms.LOW_RES, transforms.LOW_RES), float(serial), np.float32)
        return Prediction(mask=self.mask(prompt, embedding.original_size), score=self.score, low_res_logits=logits)

    def mask(self, prompt: Prompt, size: tuple[int, int]) -> np.ndarray:
        """The (H, W) bool mask `decode` gives for `prompt` on an image of `size` (H, W)."""
        height, width = size
        rows, cols = np.mgrid[0:height, 0:width]
        x, y = cols + 0.5, rows + 0.5
        positive = np.zeros((height, width), bool)
        negative = np.zeros((height, width), bool)
        for (px, py), label in zip(np.asarray(prompt.points, np.float64).reshape(-1, 2), prompt.labels):
            disk = (x - px) ** 2 + (y - py) ** 2 <= self.radius ** 2
            if label == 1:
                positive |= disk
            else:
                negative |= disk
        if prompt.box is not None:
            x0, y0, x1, y1 = (float(v) for v in prompt.box)
            inside = (x >= x0) & (x <= x1) & (y >= y0) & (y <= y1)
            positive = positive & inside if positive.any() else inside
        return positive & ~negative
