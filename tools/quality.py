"""Mask quality benchmark: the standard interactive-segmentation click simulation, run through the server.

    python -m tools.quality [--dataset grabcut20|scenes|DIR] [--predictor torch|onnx|int8 ...]
                      [--max-clicks 20] [--json artifacts/quality.json] [--traces] [--size 480x640]

Data: any folder with `images/<id>.<ext>` and `masks/<id>.png` (`--dataset DIR`; object = mask value > 0
other than `--ignore-value`, channel 0 of an RGB mask; pixels of the ignore value count for nothing),
`grabcut20` (`../shared/datasets/GrabCut_BSDS20`, 128 = the ignore band, read in place) or `scenes` (the
synthetic composites of `tools/harness/scenes.py`, no ignore band).

Every prompt goes to the backend as Label Studio 1.23 sends it: a `/predict` body made from the recorded
ones (`tools/harness/bodies`), over real HTTP on loopback, to the app `_wsgi` builds (`http.create_app`
around `model.SamModel`), so the prompt memory and the mask refinement are those users get. Only the image
download is replaced: the task's image URL is answered from memory. Each image is embedded once (the
server's embedding cache).

Protocol (RITM's, as `../shared/datasets/README.md` states it), per object, on a task of its own:

* click 1 is positive, at the object pixel farthest from its boundary;
* every next click goes to the pixel farthest from the boundary (the image border counting as boundary) of
  the false negatives or of the false positives, whichever reaches farther (false negatives on a tie),
  positive or negative accordingly; ignore pixels are neither;
* all clicks so far are sent each call, 20 clicks (--max-clicks) per object;
* then, on the same task, a box (the object's tight box, x1 / y1 one past its last pixel; with --box-margin M
  grown by M of its size on every side, as drawn by hand): "box after clicks";
  and the same box on a fresh task: "box alone".

Reported: mIoU@k (k = 1..max-clicks; IoU over the non-ignore pixels), NoC@85 / NoC@90 (clicks until IoU >= t,
max-clicks when never), "drops" (objects where some added click lowered the IoU by more than 0.05; the
issue's goal: at most 1 in 20), box after clicks and box alone, SAM's single-mask output for click 1 straight
from the predictor (the reference for mIoU@1; "1st worse" counts objects whose first click lost more than
0.05 to it), decode latency per call. `--traces` prints
each object's IoU after every click.
"""
from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import platform
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import cv2
import numpy as np

HERE = Path(__file__).resolve().parent.parent  # the repository

from sam_backend import catalog
from sam_backend.encoding import rle
from sam_backend.sam.types import Predictor, Prompt
from sam_backend.settings import Settings
from tools.harness import recordings
from tools.harness.scenes import EXTRA_RECIPES, RECIPES, scene

THRESHOLDS = (0.85, 0.90)
GRABCUT20 = HERE.parent / "shared" / "datasets" / "GrabCut_BSDS20"
DROP = 0.05  # an added click that lowers IoU by more than this is a visible jump
REPORTED_CLICKS = (1, 2, 3, 5, 10, 20)
BOX_AFTER = (1, 2, 3, 5)  # a box drawn after this many clicks (and after the last one)


# ---- data -----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Item:
    """One object to segment. image: (H, W, 3) uint8 RGB; truth, ignore: (H, W) bool (ignore: not counted)."""

    name: str
    image: np.ndarray
    truth: np.ndarray
    ignore: np.ndarray


def folder_items(folder: Path, ignore_value: int | None = 128, names: Sequence[str] | None = None) -> list[Item]:
    """The objects of `folder`: images/<id>.* with masks/<id>.png, sorted by id (or the ids `names`)."""
    folder = Path(folder)
    masks = {p.stem: p for p in sorted((folder / "masks").glob("*.png"))}
    images = {p.stem: p for p in sorted((folder / "images").iterdir()) if p.stem in masks}
    if not images:
        raise FileNotFoundError(f"no images/<id>.* with masks/<id>.png in {folder}")
    items = []
    for name in names or sorted(images):
        bgr = cv2.imread(str(images[name]), cv2.IMREAD_COLOR)
        mask = cv2.imread(str(masks[name]), cv2.IMREAD_UNCHANGED)
        if bgr is None or mask is None:
            raise ValueError(f"cannot read {images[name]} or {masks[name]}")
        if mask.ndim == 3:
            mask = mask[:, :, 0]  # 124084.png of GrabCut20 is RGB: its channels are equal
        ignore = mask == ignore_value if ignore_value is not None else np.zeros(mask.shape, bool)
        items.append(Item(name, cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB), (mask > 0) & ~ignore, ignore))
    return items


def scene_items(names: Sequence[str] | None = None, size: tuple[int, int] = (480, 640)) -> list[Item]:
    names = names or list(RECIPES) + list(EXTRA_RECIPES)
    return [Item(n, s.image, s.mask, np.zeros(s.mask.shape, bool)) for n in names for s in [scene(n, size)]]


def iou(prediction: np.ndarray, truth: np.ndarray, ignore: np.ndarray | None = None) -> float:
    """IoU of two (H, W) bool masks over the pixels not in `ignore`."""
    if ignore is not None:
        prediction, truth = prediction & ~ignore, truth & ~ignore
    union = np.logical_or(prediction, truth).sum()
    return float(np.logical_and(prediction, truth).sum() / union) if union else 1.0


# ---- the clicks -----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Click:
    x: float
    y: float
    positive: bool


def _depth(region: np.ndarray) -> np.ndarray:
    """Distance of each pixel of `region` to the nearest pixel outside it, the image border counting as outside."""
    return cv2.distanceTransform(np.pad(region, 1).astype(np.uint8), cv2.DIST_L2, 5)[1:-1, 1:-1]


def _deepest(region: np.ndarray) -> tuple[float, float, float]:
    depth = _depth(region)
    y, x = np.unravel_index(int(np.argmax(depth)), depth.shape)
    return float(depth[y, x]), float(x), float(y)


def first_click(truth: np.ndarray) -> Click:
    """A positive click at the object's pixel farthest from its boundary."""
    _, x, y = _deepest(truth)
    return Click(x, y, positive=True)


def error_click(prediction: np.ndarray, truth: np.ndarray, ignore: np.ndarray | None = None) -> Click | None:
    """The next click (RITM): at the deepest pixel of the false negatives or of the false positives, whichever
    is deeper (false negatives on a tie); None when there is no error. prediction, truth, ignore: (H, W) bool."""
    keep = ~ignore if ignore is not None else True
    best: tuple[float, float, float, bool] | None = None
    for errors, positive in ((truth & ~prediction & keep, True), (prediction & ~truth & keep, False)):
        if errors.any():
            depth, x, y = _deepest(errors)
            if best is None or depth > best[0]:
                best = (depth, x, y, positive)
    return None if best is None else Click(best[1], best[2], best[3])


def tight_box(mask: np.ndarray) -> np.ndarray:
    """x0, y0, x1, y1 (float32) of the mask's pixels, x1 / y1 one past the last pixel (COCO's x + w)."""
    ys, xs = np.nonzero(mask)
    return np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], np.float32)


def loose_box(mask: np.ndarray, margin: float = 0.1) -> np.ndarray:
    """The tight box grown by `margin` of its size on every side, clipped to the image: a box drawn by hand."""
    x0, y0, x1, y1 = tight_box(mask)
    dx, dy = margin * (x1 - x0), margin * (y1 - y0)
    height, width = mask.shape
    return np.array([max(x0 - dx, 0), max(y0 - dy, 0), min(x1 + dx, width), min(y1 + dy, height)], np.float32)


# ---- Label Studio's calls -------------------------------------------------------------------------------------
class MemoryImages:
    """Stands in for `sam_backend.images.ImageLoader`: the bytes of each image URL from memory, no download."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}

    def add(self, url: str, image: np.ndarray) -> None:
        ok, data = cv2.imencode(".png", cv2.cvtColor(image, cv2.COLOR_RGB2BGR))  # lossless: the pixels as read
        assert ok
        self.files[url] = data.tobytes()

    def fetch(self, url: str, fallback=None, task_id: int | None = None) -> bytes:
        return self.files[url]


def keypoint_region(click: Click, index: int, size: tuple[int, int]) -> dict:
    """A smart keypoint as the editor sends it (percent of the image; `is_positive`, alt-click = false)."""
    height, width = size
    region = copy.deepcopy(recordings.recorded("keypoints_positive_and_negative")["params"]["context"]["result"][0])
    region.update(original_width=width, original_height=height, id=f"kp{index:04d}", is_positive=click.positive)
    region["value"].update(x=100 * click.x / width, y=100 * click.y / height)
    return region


def rectangle_region(box: np.ndarray, name: str, size: tuple[int, int]) -> dict:
    height, width = size
    region = copy.deepcopy(recordings.recorded("rectangle")["params"]["context"]["result"][0])
    x0, y0, x1, y1 = (float(v) for v in box)
    region.update(original_width=width, original_height=height, id=name)
    region["value"].update(x=100 * x0 / width, y=100 * y0 / height, width=100 * (x1 - x0) / width,
                           height=100 * (y1 - y0) / height)
    return region


def predict_body(task_id: int, url: str, regions: list[dict]) -> dict:
    """A recorded interactive /predict body with this task, image and context (drafts left empty: on a fresh
    task the editor's autosave is behind, so the server's memory is what holds the earlier regions)."""
    body = recordings.recorded("keypoints_positive_and_negative")
    task = body["tasks"][0]
    task.update(id=task_id, drafts=[], annotations=[])
    task["data"]["image"] = url
    body["params"]["context"] = {"result": regions}
    return body


class Backend:
    """The backend `_wsgi` builds, around `predictor`, on a loopback port (werkzeug); images from memory."""

    def __init__(self, predictor: Predictor, settings: Settings | None = None) -> None:
        import requests
        from werkzeug.serving import make_server

        from model import SamModel
        from sam_backend.http import create_app

        self.settings = settings or Settings(device="cpu")
        self.images = MemoryImages()
        self.model = SamModel(predictor, self.settings, images=self.images)  # type: ignore[arg-type]
        logging.getLogger("werkzeug").setLevel(logging.WARNING)  # no line per request
        self.server = make_server("127.0.0.1", 0, create_app(self.model, self.settings), threaded=True)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        self.session = requests.Session()
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def predict(self, body: dict, size: tuple[int, int]) -> tuple[np.ndarray, float]:
        """POST /predict; (the (H, W) bool mask of its brush result, or all False when none; seconds)."""
        started = time.perf_counter()
        response = self.session.post(f"{self.url}/predict", json=body, timeout=600)
        seconds = time.perf_counter() - started
        response.raise_for_status()
        mask = np.zeros(size, bool)
        for region in response.json()["results"][0]["result"]:
            if region["type"] == "brushlabels":
                mask |= rle.decode(region["value"]["rle"], *size) > 0
        return mask, seconds

    def close(self) -> None:
        self.server.shutdown()
        self.session.close()


# ---- one object -----------------------------------------------------------------------------------------------
@dataclass
class Run:
    """One object's simulation: IoU after each click, the clicks, then the box after the clicks and alone."""

    ious: list[float] = field(default_factory=list)
    clicks: list[Click] = field(default_factory=list)
    box_after: dict[int, float] = field(default_factory=dict)  # clicks before the box -> its IoU
    box_alone: float = float("nan")
    seconds: list[float] = field(default_factory=list)
    single_first: float = float("nan")  # SAM's single-mask output for click 1, decoded without the server

    def noc(self, threshold: float, max_clicks: int) -> int:
        """Clicks until IoU >= threshold; max_clicks if it never gets there."""
        return next((i + 1 for i, value in enumerate(self.ious) if value >= threshold), max_clicks)

    def reached(self, threshold: float) -> bool:
        return any(value >= threshold for value in self.ious)

    def drops(self, by: float = DROP) -> int:
        """Clicks after which IoU fell by more than `by`: a mask that gets visibly worse when the user helps."""
        return sum(after < before - by for before, after in zip(self.ious, self.ious[1:]))

    def worst_drop(self) -> float:
        return max([0.0] + [before - after for before, after in zip(self.ious, self.ious[1:])])

    def iou_at(self, clicks: int) -> float:
        """IoU after `clicks` clicks (the last one reached if the simulation stopped early on a perfect mask)."""
        return self.ious[min(clicks, len(self.ious)) - 1]


Decode = Callable[[list[Click], "np.ndarray | None", int], tuple[np.ndarray, float]]


def simulate(decode: Decode, item: Item, max_clicks: int = 20, boxes: bool = True, box_margin: float = 0.0) -> Run:
    """Click `max_clicks` times (fewer on a perfect mask), then the box after k clicks (k in BOX_AFTER and
    the last) and the box alone: the object's tight box, or with `box_margin` `loose_box` (drawn by hand).

    decode(clicks, box, task) -> (mask, seconds): `clicks` are all the clicks so far (or, with `box`, those
    made before it on `task`), `task` 0 for the object's own task, another number for a fresh one.
    """
    run = Run(clicks=[first_click(item.truth)])
    while True:
        mask, seconds = decode(run.clicks, None, 0)
        run.ious.append(iou(mask, item.truth, item.ignore))
        run.seconds.append(seconds)
        if len(run.ious) >= max_clicks:
            break
        click = error_click(mask, item.truth, item.ignore)
        if click is None:
            break
        run.clicks.append(click)
    run.clicks = run.clicks[:len(run.ious)]
    if boxes:
        box = loose_box(item.truth, box_margin) if box_margin else tight_box(item.truth)
        run.box_after[len(run.clicks)] = iou(decode(run.clicks, box, 0)[0], item.truth, item.ignore)
        for task, k in enumerate((k for k in BOX_AFTER if k < len(run.clicks)), start=1):
            decode(run.clicks[:k], None, task)  # the clicks first, on a task of their own
            run.box_after[k] = iou(decode(run.clicks[:k], box, task)[0], item.truth, item.ignore)
        run.box_alone = iou(decode([], box, len(BOX_AFTER) + 1)[0], item.truth, item.ignore)
    return run


def server_decoder(backend: Backend, item: Item, task_id: int) -> Decode:
    """Decode through `backend` as the editor calls it: every click of the object each call, on one task; a
    box is a call of its own (the editor never mixes keypoints and rectangles in one call)."""
    url = f"/data/upload/1/{item.name}.png"
    backend.images.add(url, item.image)
    size = item.truth.shape

    def decode(clicks: list[Click], box: np.ndarray | None, task: int) -> tuple[np.ndarray, float]:
        if box is None:
            regions = [keypoint_region(c, i, size) for i, c in enumerate(clicks)]
        else:
            regions = [rectangle_region(box, "box", size)]
        return backend.predict(predict_body(task_id * 100 + task, url, regions), size)

    return decode


def single_output_first(predictor: Predictor, item: Item) -> float:
    """IoU of SAM's single-mask output (multimask off) for the first click, straight from `predictor`: the
    reference the issue sets for the server's first click (its choice among SAM's three masks)."""
    click = first_click(item.truth)
    prompt = Prompt(points=np.array([[click.x, click.y]], np.float32), labels=np.array([1], np.int32),
                    multimask=False)
    return iou(predictor.decode(predictor.embed(item.image), prompt).mask, item.truth, item.ignore)


# ---- the report -----------------------------------------------------------------------------------------------
def summarise(runs: dict[str, Run], max_clicks: int) -> dict:
    summary: dict = {f"mIoU@{k}": round(float(np.mean([r.iou_at(k) for r in runs.values()])), 4)
                     for k in range(1, max_clicks + 1)}
    for threshold in THRESHOLDS:
        name = f"{round(threshold * 100)}"
        summary[f"NoC@{name}"] = round(float(np.mean([r.noc(threshold, max_clicks) for r in runs.values()])), 2)
        summary[f"failed@{name}"] = sum(not r.reached(threshold) for r in runs.values())
    summary["objects_with_drops"] = sum(r.drops() > 0 for r in runs.values())
    summary["drops"] = sum(r.drops() for r in runs.values())
    after = [v for r in runs.values() for v in r.box_after.values()]
    summary["box_after_clicks"] = round(float(np.mean(after)), 4) if after else None
    summary["box_after_worse"] = sum(v < r.box_alone - DROP for r in runs.values() for v in r.box_after.values())
    summary["box_alone"] = round(float(np.nanmean([r.box_alone for r in runs.values()])), 4)
    singles = [r.single_first for r in runs.values() if not np.isnan(r.single_first)]
    summary["sam_single@1"] = round(float(np.mean(singles)), 4) if singles else None
    summary["first_worse"] = sum(r.iou_at(1) < r.single_first - DROP for r in runs.values())
    seconds = [s for r in runs.values() for s in r.seconds]
    summary["ms_per_click"] = round(1000 * float(np.median(seconds)), 1) if seconds else None
    return summary


def benchmark(predictor: Predictor, items: Sequence[Item], max_clicks: int = 20, settings: Settings | None = None,
              log: Callable[[str], None] = print, box_margin: float = 0.0) -> dict:
    """Every number of the report, as a JSON-ready dict: each object through a fresh backend around
    `predictor` (one embedding per image, kept by the server's cache)."""
    backend = Backend(predictor, settings)
    runs: dict[str, Run] = {}
    started = time.perf_counter()
    try:
        for task_id, item in enumerate(items, start=1):
            runs[item.name] = run = simulate(server_decoder(backend, item, task_id), item, max_clicks,
                                             box_margin=box_margin)
            run.single_first = single_output_first(predictor, item)
            log(f"  {item.name:<24} " + " ".join(f"{v:.3f}" for v in run.ious[:5])
                + f" ... {run.ious[-1]:.3f}  box after " + " ".join(f"{v:.3f}" for v in run.box_after.values())
                + f" alone {run.box_alone:.3f}  SAM single@1 {run.single_first:.3f}"
                + (f"  DROP {run.worst_drop():.3f}" if run.drops() else ""))
        embedded = backend.model.cache.computed  # the images, and the crops zoom-in embedded (sam.zoom)
    finally:
        backend.close()
    summary = summarise(runs, max_clicks)
    summary["crops_embedded"] = embedded - len(items)
    seconds = sorted(s for r in runs.values() for s in r.seconds)
    summary["ms_per_click_p95"] = round(1000 * seconds[int(0.95 * (len(seconds) - 1))], 1) if seconds else None
    return {"predictor": predictor.model_version, "max_clicks": max_clicks, "thresholds": list(THRESHOLDS),
            "box_margin": box_margin,
            "summary": summary,
            "objects": {name: {"ious": [round(v, 4) for v in r.ious],
                               "clicks": [[round(c.x, 1), round(c.y, 1), int(c.positive)] for c in r.clicks],
                               "box_after_clicks": {k: round(v, 4) for k, v in sorted(r.box_after.items())},
                               "box_alone": round(r.box_alone, 4),
                               "sam_single@1": round(r.single_first, 4),
                               **{f"NoC@{round(t * 100)}": r.noc(t, max_clicks) for t in THRESHOLDS}}
                        for name, r in runs.items()},
            "seconds": round(time.perf_counter() - started, 1), "machine": platform.machine(),
            "threads": os.environ.get("OMP_NUM_THREADS")}


def table(reports: dict[str, dict], dataset: str) -> str:
    """The issue's table: one row per predictor."""
    any_report = next(iter(reports.values()))
    max_clicks = any_report["max_clicks"]
    shown = [k for k in REPORTED_CLICKS if k <= max_clicks]
    columns = ([f"mIoU@{k}" for k in shown] + ["NoC@85", "NoC@90", "failed@90", "objects_with_drops",
               "box_after_clicks", "box_after_worse", "box_alone", "sam_single@1", "first_worse",
               "ms_per_click"])
    heads = [c.replace("objects_with_drops", "drop>0.05").replace("box_after_clicks", "box after")
             .replace("box_after_worse", "box worse")
             .replace("box_alone", "box alone").replace("sam_single@1", "single@1")
             .replace("first_worse", "1st worse").replace("ms_per_click", "ms/call") for c in columns]
    count = len(any_report["objects"])
    after = ", ".join(map(str, BOX_AFTER))
    lines = [(f"{dataset}: {count} objects, {max_clicks} clicks; drop>0.05 = objects where an added click lowered "
             f"IoU by more than {DROP}; box after = mean IoU of the object's box drawn after {after} and all "
             f"clicks; box worse = how many of those lost more than {DROP} to the box alone; single@1 = SAM's "
             f"single-mask output for click 1 (the reference for mIoU@1); 1st worse = objects whose click 1 "
             f"lost more than {DROP} to it"),
             f"| {'predictor':<22} | " + " | ".join(f"{h:>9}" for h in heads) + " |",
             "|" + "---|" * (len(columns) + 1)]
    for name, report in reports.items():
        numbers = report["summary"]
        lines.append(f"| {name:<22} | " + " | ".join(f"{numbers[c]:>9}" for c in columns) + " |")
    return "\n".join(lines)


def traces(report: dict) -> Iterator[str]:
    for name, numbers in report["objects"].items():
        yield f"{name:<24} " + " ".join(f"{v:.2f}" for v in numbers["ious"])


def load_predictor(kind: str, threads: int = 0, onnx_dir: Path = catalog.MODELS_DIR) -> Predictor:
    """torch, onnx or int8 MobileSAM; the ONNX files from `onnx_dir` (catalog.onnx_paths)."""
    if kind in ("onnx", "int8"):
        from onnx_sam import OnnxSamPredictor

        encoder, decoder = catalog.onnx_paths("vit_t", onnx_dir, int8=kind == "int8")
        return OnnxSamPredictor.load(encoder, decoder, model_version=f"MobileSAM-{kind}", threads=threads)
    from advanced_sam import TorchSamPredictor

    return TorchSamPredictor.load("vit_t", catalog.CHECKPOINTS["vit_t"].default_path, "cpu",
                                  model_version="MobileSAM-torch", threads=threads)


#: a mosaic tile: the GrabCut20 photos are 481 x 321 (or 321 x 481; cropped to the tile or padded with black)
TILE = (321, 481)


def mosaic_items(base: Sequence[Item], side: int = 3, seed: int = 0) -> list[Item]:
    """Small objects in large images: each object of `base` in its photo, as one tile of a `side` x `side` mosaic
    of other photos of `base` (the object at 1/side of the image's size; a 3x3 mosaic is 1443 x 963). The tile
    and the other photos are drawn with `seed`, so the images are the same on every run."""
    rng = np.random.default_rng(seed)
    height, width = TILE

    def fit(array: np.ndarray) -> np.ndarray:
        out = np.zeros((height, width) + array.shape[2:], array.dtype)
        rows, cols = min(height, array.shape[0]), min(width, array.shape[1])
        out[:rows, :cols] = array[:rows, :cols]
        return out

    items = []
    for index, item in enumerate(base):
        others = rng.choice([j for j in range(len(base)) if j != index], side * side, replace=True)
        place = int(rng.integers(side * side))
        image = np.zeros((height * side, width * side, 3), np.uint8)
        truth = np.zeros(image.shape[:2], bool)
        ignore = np.zeros(image.shape[:2], bool)
        for tile in range(side * side):
            rows = slice(tile // side * height, (tile // side + 1) * height)
            cols = slice(tile % side * width, (tile % side + 1) * width)
            image[rows, cols] = fit((item if tile == place else base[others[tile]]).image)
            if tile == place:
                truth[rows, cols], ignore[rows, cols] = fit(item.truth), fit(item.ignore)
        items.append(Item(item.name, image, truth, ignore))
    return items


def dataset_items(dataset: str, ignore_value: int, size: tuple[int, int], names: Sequence[str] | None) -> list[Item]:
    """The objects of `dataset`: "scenes", "grabcut20", "mosaic<side>" (`mosaic_items` of GrabCut20, e.g.
    mosaic3) or a folder."""
    if dataset == "scenes":
        return scene_items(names, size)
    if dataset.startswith("mosaic") and dataset[6:].isdigit():
        base = folder_items(GRABCUT20, ignore_value)
        items = mosaic_items(base, int(dataset[6:]))
        return [item for item in items if not names or item.name in names]
    folder = GRABCUT20 if dataset == "grabcut20" else Path(dataset)
    return folder_items(folder, ignore_value, names)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", default="grabcut20",
                        help="grabcut20, scenes, mosaic3 (GrabCut20's objects small in a 3x3 mosaic of its photos), "
                             "or a folder of images/ + masks/")
    parser.add_argument("--ignore-value", type=int, default=128, help="mask value not counted (folders)")
    parser.add_argument("--names", nargs="+", help="only these ids / scene names")
    parser.add_argument("--predictor", nargs="+", choices=("torch", "onnx", "int8"), default=["torch"])
    parser.add_argument("--onnx-dir", type=Path, default=catalog.MODELS_DIR, help="folder of the ONNX files")
    parser.add_argument("--max-clicks", type=int, default=20, help="clicks per object, and the NoC cap")
    parser.add_argument("--size", default="480x640", help="HxW of the scenes")
    parser.add_argument("--threads", type=int, default=0, help="torch / onnxruntime threads (0: default)")
    parser.add_argument("--no-refine", action="store_true", help="the server with REFINE_MASKS=false")
    parser.add_argument("--no-zoom", action="store_true", help="the server with ZOOM_IN=false")
    parser.add_argument("--box-margin", type=float, default=0.0,
                        help="boxes grown by this share of their size on every side (0.1: drawn by hand; 0: tight)")
    parser.add_argument("--traces", action="store_true", help="print every object's IoU after each click")
    parser.add_argument("--json", type=Path, default=HERE / "artifacts" / "quality.json")
    args = parser.parse_args(argv)
    height, width = (int(v) for v in args.size.lower().split("x"))
    items = dataset_items(args.dataset, args.ignore_value, (height, width), args.names)
    settings = replace(Settings(device="cpu"), refine_masks=not args.no_refine, zoom_in=not args.no_zoom)
    reports = {}
    for kind in args.predictor:
        print(f"{kind}:")
        predictor = load_predictor(kind, args.threads, args.onnx_dir)
        reports[predictor.model_version] = benchmark(predictor, items, args.max_clicks, settings,
                                                    box_margin=args.box_margin)
        if args.traces:
            print("\n".join(traces(reports[predictor.model_version])))
    print(table(reports, args.dataset))
    for name, report in reports.items():
        numbers = report["summary"]
        print(f"{name}: {numbers['crops_embedded']} crops embedded for zoom-in; ms/call median "
              f"{numbers['ms_per_click']}, p95 {numbers['ms_per_click_p95']}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(reports, indent=1))
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
