"""What a real Label Studio 1.23.2 sent the backend, recorded once, and the few helpers that replay it.

The recordings are JSON files in bodies/:

* `INTERACTIVE` (ls_1_23_interactive_bodies.json): every call Label Studio made while driven through its API
  (add a model, clicks, boxes, open a task, retrieve predictions), as {"calls": [{"name", "path", "body"}]};
* `EDITOR` (editor_1_23_bodies.json): what the labelling editor made it send, by flow; rewritten by
  tests/e2e/test_browser.py with BROWSER_TEST_RECORD=1.

They were made on `CHELSEA` (scikit-image's chelsea, 451 x 300).
"""
from __future__ import annotations

import copy
import json
from functools import lru_cache
from pathlib import Path

import numpy as np
import skimage.data

FOLDER = Path(__file__).resolve().parent / "bodies"
INTERACTIVE = FOLDER / "ls_1_23_interactive_bodies.json"
EDITOR = FOLDER / "editor_1_23_bodies.json"

CHELSEA = skimage.data.chelsea()  # 300 x 451, the image the recordings were made with


@lru_cache(maxsize=None)
def _read(path: Path) -> dict:
    return json.loads(Path(path).read_text())


def document(path: Path = INTERACTIVE) -> dict:
    """A recording file as a fresh copy (change it freely)."""
    return copy.deepcopy(_read(Path(path)))


def recorded(name: str, path: str = "/predict") -> dict:
    """A deep copy of the body Label Studio sent to `path` for user action `name` (INTERACTIVE)."""
    call = next(c for c in _read(INTERACTIVE)["calls"] if c["name"] == name and c["path"] == path)
    return copy.deepcopy(call["body"])


def bodies(path: str = "/predict") -> dict[str, dict]:
    """Every recorded body sent to `path`, by user action (deep copies)."""
    return {c["name"]: copy.deepcopy(c["body"]) for c in _read(INTERACTIVE)["calls"] if c["path"] == path}


def with_image(body: dict, image_path: str, task_id: int | None = None) -> dict:
    """`body` with every task's image set to `image_path` (and its id to `task_id`, when given)."""
    for task in body["tasks"]:
        task["data"]["image"] = image_path
        if task_id is not None:
            task["id"] = task_id
    return body


def decoded(region: dict) -> np.ndarray:
    """The (H, W) bool mask of a brush region, decoded by label_studio_sdk (as Label Studio would)."""
    from label_studio_sdk.converter.brush import decode_rle

    width, height = region["original_width"], region["original_height"]
    return decode_rle(region["value"]["rle"]).reshape(height, width, 4)[:, :, 3] > 0


__all__ = ["CHELSEA", "EDITOR", "FOLDER", "INTERACTIVE", "bodies", "decoded", "document", "recorded", "with_image"]
