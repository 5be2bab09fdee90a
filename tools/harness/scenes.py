"""Images with known masks, built reproducibly from the photos scikit-image ships.

An object is a silhouette (scikit-image's horse, or a drawn shape) cut out of one real photo and pasted onto
another real photo, so its true mask is known to the pixel while both object and background have real
textures. Used by the mask-quality tests and benchmarks.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import cv2
import numpy as np
import skimage.data


@dataclass(frozen=True)
class Scene:
    name: str
    image: np.ndarray  # (H, W, 3) uint8 RGB
    mask: np.ndarray  # (H, W) bool, the object

    @property
    def size(self) -> tuple[int, int]:
        return self.image.shape[:2]


def _rgb(image: np.ndarray) -> np.ndarray:
    return np.repeat(image[..., None], 3, axis=2) if image.ndim == 2 else image[..., :3]


def _fit(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Scale and centre-crop `image` to (H, W) = size."""
    height, width = size
    scale = max(height / image.shape[0], width / image.shape[1])
    resized = cv2.resize(image, (max(width, round(image.shape[1] * scale)), max(height, round(image.shape[0] * scale))),
                         interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR)
    top = (resized.shape[0] - height) // 2
    left = (resized.shape[1] - width) // 2
    return np.ascontiguousarray(resized[top:top + height, left:left + width])


def _shape(name: str, size: tuple[int, int]) -> np.ndarray:
    """A silhouette filling about a third of a (H, W) canvas."""
    height, width = size
    canvas = np.zeros(size, np.uint8)
    if name == "horse":
        horse = (~skimage.data.horse()).astype(np.uint8) * 255
        box = (int(height * 0.6), int(width * 0.5))
        horse = cv2.resize(horse, (box[1], box[0]), interpolation=cv2.INTER_NEAREST)
        top, left = int(height * 0.2), int(width * 0.25)
        canvas[top:top + box[0], left:left + box[1]] = horse
    elif name == "ellipse":
        cv2.ellipse(canvas, (int(width * 0.45), int(height * 0.55)), (int(width * 0.22), int(height * 0.25)),
                    20, 0, 360, 255, -1)
    elif name == "star":
        cx, cy, outer = width * 0.5, height * 0.5, min(height, width) * 0.35
        angles = np.arange(10) * np.pi / 5 - np.pi / 2
        radii = np.where(np.arange(10) % 2 == 0, outer, outer * 0.45)
        points = np.stack([cx + radii * np.cos(angles), cy + radii * np.sin(angles)], axis=1)
        cv2.fillPoly(canvas, [points.round().astype(np.int32)], 255)
    elif name == "ring":  # an object with a hole: the background shows through its middle
        centre = (int(width * 0.5), int(height * 0.5))
        cv2.ellipse(canvas, centre, (int(width * 0.3), int(height * 0.35)), 0, 0, 360, 255, -1)
        cv2.ellipse(canvas, centre, (int(width * 0.14), int(height * 0.16)), 0, 0, 360, 0, -1)
    elif name == "pair":  # one object in two parts that do not touch
        radius = int(min(height, width) * 0.17)
        cv2.circle(canvas, (int(width * 0.27), int(height * 0.45)), radius, 255, -1)
        cv2.circle(canvas, (int(width * 0.72), int(height * 0.58)), radius, 255, -1)
    else:
        raise KeyError(name)
    return canvas > 0


PHOTOS = {
    "chelsea": skimage.data.chelsea,
    "coffee": skimage.data.coffee,
    "astronaut": skimage.data.astronaut,
    "rocket": skimage.data.rocket,
    "grass": skimage.data.grass,
    "gravel": skimage.data.gravel,
    "brick": skimage.data.brick,
    "hubble": skimage.data.hubble_deep_field,
    "motorcycle": lambda: skimage.data.stereo_motorcycle()[0],
}

#: name -> (shape, texture photo, background photo)
RECIPES = {
    "horse-coffee-grass": ("horse", "coffee", "grass"),
    "ellipse-chelsea-gravel": ("ellipse", "chelsea", "gravel"),
    "star-astronaut-brick": ("star", "astronaut", "brick"),
    "horse-rocket-motorcycle": ("horse", "rocket", "motorcycle"),
    "ellipse-coffee-hubble": ("ellipse", "coffee", "hubble"),
    "star-chelsea-grass": ("star", "chelsea", "grass"),
}

#: scenes outside `all_scenes` (which existing tests iterate): a holed object and a two-part one, for the
#: quality benchmark's variety and the polygon tests
EXTRA_RECIPES = {
    "ring-rocket-gravel": ("ring", "rocket", "gravel"),
    "pair-coffee-brick": ("pair", "coffee", "brick"),
}


@lru_cache(maxsize=64)
def scene(name: str, size: tuple[int, int] = (480, 640)) -> Scene:
    shape, texture, background = RECIPES[name] if name in RECIPES else EXTRA_RECIPES[name]
    mask = _shape(shape, size)
    image = _fit(_rgb(PHOTOS[background]()), size).copy()
    image[mask] = _fit(_rgb(PHOTOS[texture]()), size)[mask]
    image.setflags(write=False)
    mask.setflags(write=False)
    return Scene(name, image, mask)


def all_scenes(size: tuple[int, int] = (480, 640)) -> list[Scene]:
    return [scene(name, size) for name in RECIPES]


def extra_scenes(size: tuple[int, int] = (480, 640)) -> list[Scene]:
    return [scene(name, size) for name in EXTRA_RECIPES]


def interior_point(mask: np.ndarray) -> tuple[float, float]:
    """(x, y) of the mask's most interior pixel (farthest from its border): the standard first click."""
    distance = cv2.distanceTransform(np.pad(mask, 1).astype(np.uint8), cv2.DIST_L2, 5)[1:-1, 1:-1]
    y, x = np.unravel_index(int(np.argmax(distance)), distance.shape)
    return float(x), float(y)


def iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 1.0
