"""Large images over real HTTP (issue #11, item 4): reduced for the encoder while they are decoded, correct masks
at full size, and a clear 413 naming MAX_IMAGE_PIXELS above the limit.

The memory these paths save is measured by `python -m tools.memory_bench` (peak RSS per case), not here.
"""
from __future__ import annotations

import io
import threading

import cv2
import numpy as np
import pytest
import requests
from PIL import Image

from conftest import make_live_backend
from sam_backend.images.decode import REDUCE_ABOVE_PIXELS, REDUCED_SIDE
from sam_backend.sam.types import Prompt
from tools.harness.recordings import CHELSEA, decoded, recorded
from tools.harness.scenes import iou
from tools.memory_bench import bomb_png

SIZE = (4000, 6000)  # (H, W): 24 Mpx, above REDUCE_ABOVE_PIXELS
CAT = (0.42, 0.45)  # (x, y) as fractions of the image: on the cat's face in chelsea


class RecordingPredictor:
    """The session's torch predictor, recording the shape of every image it is given to embed."""

    def __init__(self, inner) -> None:
        self.inner = inner
        self.model_version = inner.model_version
        self.shapes: list[tuple[int, ...]] = []
        self._lock = threading.Lock()

    def embed(self, image, original_size=None):
        with self._lock:
            self.shapes.append(tuple(image.shape))
        return self.inner.embed(image, original_size)

    def decode(self, embedding, prompt):
        return self.inner.decode(embedding, prompt)


def large_chelsea() -> np.ndarray:
    return cv2.resize(CHELSEA, (SIZE[1], SIZE[0]), interpolation=cv2.INTER_CUBIC)


def encoded(image: np.ndarray, kind: str, orientation: int = 1) -> bytes:
    buffer = io.BytesIO()
    picture = Image.fromarray(image)
    exif = picture.getexif()
    if orientation != 1:
        exif[0x0112] = orientation
    picture.save(buffer, format=kind, exif=exif.tobytes(), **({"quality": 92} if kind == "JPEG" else {}))
    return buffer.getvalue()


def click(url: str, path: str, width: int, height: int, task_id: int) -> requests.Response:
    body = recorded("keypoints_positive_and_negative")
    body["tasks"][0].update(id=task_id)
    body["tasks"][0]["data"]["image"] = path
    region = body["params"]["context"]["result"][0]
    region.update(original_width=width, original_height=height, is_positive=True)
    region["value"].update(x=CAT[0] * 100, y=CAT[1] * 100)
    body["params"]["context"]["result"] = [region]
    return requests.post(url + "/predict", json=body, timeout=300)


@pytest.fixture(scope="module")
def server(base_settings, torch_predictor):
    predictor = RecordingPredictor(torch_predictor)
    live = make_live_backend(base_settings, predictor)
    yield live, predictor
    live.close()


def reference_mask(torch_predictor, image: np.ndarray) -> np.ndarray:
    """The mask of the same click from the whole image, embedded in-process without any reduction."""
    height, width = image.shape[:2]
    point = np.array([[CAT[0] * width, CAT[1] * height]], np.float32)
    embedding = torch_predictor.embed(image)
    return torch_predictor.decode(embedding, Prompt(points=point, labels=np.ones(1, np.int32))).mask


@pytest.mark.parametrize("kind,orientation", [("PNG", 1), ("JPEG", 1), ("JPEG", 6)])
def test_a_large_image_is_embedded_reduced_and_masked_at_full_size(server, fake_label_studio, torch_predictor,
                                                                   kind, orientation):
    live, predictor = server
    whole = large_chelsea()
    path = f"/data/upload/11/large-{kind.lower()}-{orientation}.{kind.lower()}"
    fake_label_studio.files[path] = data = encoded(whole, kind, orientation)
    shown = np.ascontiguousarray(np.rot90(whole, k=-1)) if orientation == 6 else whole  # EXIF 6: turned clockwise
    height, width = shown.shape[:2]
    assert height * width > REDUCE_ABOVE_PIXELS

    before = len(predictor.shapes)
    answer = click(live.url, path, width, height, task_id=1100 + orientation + len(kind))
    assert answer.status_code == 200, answer.text
    (region,) = [r for r in answer.json()["results"][0]["result"] if r["type"] == "brushlabels"]
    assert (region["original_width"], region["original_height"]) == (width, height)

    # the encoder was given the reduced copy, in the orientation the user sees
    (shape,) = predictor.shapes[before:]
    assert max(shape[:2]) == REDUCED_SIDE and shape[2] == 3
    assert abs(shape[1] / shape[0] - width / height) < 2 / REDUCED_SIDE

    mask = decoded(region)
    assert mask.shape == (height, width)
    # the same click on the whole image (decoded by PIL in full, as the server did before) gives the same mask
    full = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    if orientation == 6:
        full = np.ascontiguousarray(np.rot90(full, k=-1))
    reference = reference_mask(torch_predictor, full)
    assert reference.mean() > 0.02  # the cat, not a speck
    assert iou(mask, reference) >= 0.97


def test_an_image_over_the_pixel_limit_is_a_413_naming_the_setting(server, fake_label_studio, base_settings):
    live, predictor = server
    limit = base_settings.max_image_pixels
    side = int((limit * 1.2) ** 0.5)
    fake_label_studio.files["/data/upload/11/over.png"] = bomb_png(side, side)  # a header claiming side x side
    before = len(predictor.shapes)
    answer = click(live.url, "/data/upload/11/over.png", side, side, task_id=1190)
    assert answer.status_code == 413
    error = answer.json()["error"]
    assert f"{side}x{side}" in error and f"MAX_IMAGE_PIXELS={limit}" in error and "over.png" in error
    assert len(predictor.shapes) == before  # refused from the header: nothing was embedded
    assert requests.get(live.url + "/health", timeout=10).status_code == 200
