"""Mask quality benchmark: the standard interactive-segmentation click simulation on scenes with known masks.

    python -m tools.quality [--predictor torch|onnx] [--int8] [--clicks 5] [--max-clicks 20]
                      [--json artifacts/quality.json] [--scenes NAME ...] [--size 480x640]

Scenes are the composites of `tests/scenes.py` (an object cut out of one real photo, pasted onto another, so
its mask is known to the pixel): the six of `all_scenes` plus the extra ones (a holed ring, a two-part
object). Each is embedded once; then, with and without refinement:

* click 1 is a positive click at the object's most interior point (farthest from its border);
* every next click goes to the largest error region (a connected component, 8-connectivity, of the false
  negatives or of the false positives, whichever single component has the most pixels; on a tie the false
  negative one), at that region's most interior point; positive on a false negative region, negative on a
  false positive one (the protocol of RITM / SimpleClick / SAM's interactive evaluation, with "largest" by
  area);
* "refine" feeds the previous prediction's low-resolution logits back as `Prompt.mask_input`, which is what
  the server does with REFINE_MASKS when a call only adds clicks; "fresh" decodes every click set alone;
* a lone first click uses SAM's best multimask output (as the server does), later ones the single output;
* "box+fresh" / "box+refine" start from a hand-drawn box instead (the object's tight box grown by 10 % a side):
  prompt 1 is the box alone, then the clicks above are added with the box kept (a smart rectangle, then smart
  clicks), so their mIoU@1 is the box's and their NoC counts the box as the first prompt.

Reported per mode: mIoU after 1..N clicks (N = --clicks), and NoC@85 / NoC@90, the mean number of clicks
until IoU >= 0.85 / 0.90, counting --max-clicks for a scene that never gets there (how many never did is
reported too), and "drops", how many clicks made IoU fall by more than 0.05 (a mask visibly getting worse
although the click was right). Box IoU is one prompt with the object's tight box (x0, y0, x1 + 1, y1 + 1 of its pixels).

The summary means are over the six standard scenes (`all_scenes`); the extra scenes are listed and
summarised separately, so the headline numbers stay comparable when scenes are added.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

HERE = Path(__file__).resolve().parent.parent  # the repository

from sam_backend.sam.types import Embedding, Predictor, Prompt  # noqa: E402
from tools.harness.scenes import EXTRA_RECIPES, RECIPES, interior_point, iou, scene  # noqa: E402

THRESHOLDS = (0.85, 0.90)
MODES = ("fresh", "refine")
ALL_MODES = MODES + tuple(f"box+{mode}" for mode in MODES)


@dataclass(frozen=True)
class Click:
    x: float
    y: float
    positive: bool


def error_click(prediction: np.ndarray, truth: np.ndarray) -> Click | None:
    """The next simulated click: at the most interior point of the largest error region; None if no error.

    prediction, truth: (H, W) bool. Error regions are the 8-connected components of the false negatives
    (truth and not predicted: a positive click) and of the false positives (predicted, not truth: a
    negative click). The largest by pixel count wins, a false negative one on a tie.
    """
    best: tuple[int, int, np.ndarray] | None = None  # (area, tie rank, component mask)
    for rank, (errors, positive) in enumerate(((truth & ~prediction, True), (prediction & ~truth, False))):
        if not errors.any():
            continue
        count, labels, stats, _ = cv2.connectedComponentsWithStats(errors.astype(np.uint8), connectivity=8)
        largest = 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
        area = int(stats[largest, cv2.CC_STAT_AREA])
        if best is None or area > best[0]:
            best = (area, rank, labels == largest)
    if best is None:
        return None
    x, y = interior_point(best[2])
    return Click(x, y, positive=best[1] == 0)


def first_click(truth: np.ndarray) -> Click:
    x, y = interior_point(truth)
    return Click(x, y, positive=True)


def prompt_of(clicks: list[Click], mask_input: np.ndarray | None = None, box: np.ndarray | None = None) -> Prompt:
    return Prompt(points=np.array([[c.x, c.y] for c in clicks], np.float32).reshape(-1, 2),
                  labels=np.array([1 if c.positive else 0 for c in clicks], np.int32),
                  box=box, mask_input=mask_input)


@dataclass
class Run:
    """One click simulation: IoU after each click and the clicks made."""

    ious: list[float] = field(default_factory=list)
    clicks: list[Click] = field(default_factory=list)

    def noc(self, threshold: float, max_clicks: int) -> int:
        """Clicks until IoU >= threshold; max_clicks if it never gets there."""
        return next((i + 1 for i, value in enumerate(self.ious) if value >= threshold), max_clicks)

    def reached(self, threshold: float) -> bool:
        return any(value >= threshold for value in self.ious)

    def drops(self, by: float = 0.05) -> int:
        """Clicks after which IoU fell by more than `by`: a mask that gets visibly worse when the user helps."""
        return sum(after < before - by for before, after in zip(self.ious, self.ious[1:]))

    def iou_at(self, clicks: int) -> float:
        """IoU after `clicks` clicks (the last one reached if the simulation stopped early on a perfect mask)."""
        return self.ious[min(clicks, len(self.ious)) - 1]


def simulate(predictor: Predictor, embedding: Embedding, truth: np.ndarray, refine: bool,
             max_clicks: int = 20, min_clicks: int = 5, stop_at: float = max(THRESHOLDS),
             box: np.ndarray | None = None) -> Run:
    """Click until `max_clicks`, or until at least `min_clicks` were made and IoU reached `stop_at`.

    With `box` (x0, y0, x1, y1 pixels) the first prompt is that box alone and every later one the box with the
    clicks so far (a smart rectangle, then smart clicks); `Run.ious[0]` is then the box's IoU and `Run.clicks`
    holds only the clicks. Stopping early changes no reported number: mIoU needs `min_clicks` IoUs and NoC
    only the first prompt reaching each threshold.
    """
    truth = np.asarray(truth, bool)
    run = Run(clicks=[] if box is not None else [first_click(truth)])
    logits = None
    while True:
        prediction = predictor.decode(embedding, prompt_of(run.clicks, logits if refine else None, box))
        run.ious.append(iou(prediction.mask, truth))
        logits = prediction.low_res_logits
        if len(run.ious) >= max_clicks or (len(run.ious) >= min_clicks and run.reached(stop_at)):
            return run
        click = error_click(prediction.mask, truth)
        if click is None:  # a perfect mask: every later click would be the same
            return run
        run.clicks.append(click)


def tight_box(mask: np.ndarray) -> np.ndarray:
    """x0, y0, x1, y1 (float32) of the mask's pixels, x1 / y1 one past the last pixel (COCO's x + w)."""
    ys, xs = np.nonzero(mask)
    return np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], np.float32)


def box_iou(predictor: Predictor, embedding: Embedding, truth: np.ndarray) -> float:
    prompt = Prompt(np.zeros((0, 2), np.float32), np.zeros(0, np.int32), box=tight_box(truth))
    return iou(predictor.decode(embedding, prompt).mask, truth)


def summarise(runs: dict[str, Run], boxes: dict[str, float], clicks: int, max_clicks: int) -> dict:
    if not runs:
        return {}
    summary = {f"mIoU@{k}": round(float(np.mean([r.iou_at(k) for r in runs.values()])), 4)
               for k in range(1, clicks + 1)}
    for threshold in THRESHOLDS:
        name = f"{round(threshold * 100)}"
        summary[f"NoC@{name}"] = round(float(np.mean([r.noc(threshold, max_clicks) for r in runs.values()])), 2)
        summary[f"failed@{name}"] = sum(not r.reached(threshold) for r in runs.values())
    summary["drops"] = sum(r.drops() for r in runs.values())
    summary["box_IoU"] = round(float(np.mean(list(boxes.values()))), 4)
    return summary


def load_predictor(kind: str, int8: bool = False, threads: int = 0) -> Predictor:
    models = HERE / "models"
    if kind == "onnx":
        from onnx_sam import OnnxSamPredictor

        suffix = ".int8.onnx" if int8 else ".onnx"
        encoder, decoder = models / f"vit_t.encoder{suffix}", models / f"vit_t.decoder{suffix}"
        return OnnxSamPredictor.load(encoder, decoder, model_version=f"MobileSAM-onnx{'-int8' if int8 else ''}",
                                     threads=threads)
    import torch

    from advanced_sam import TorchSamPredictor

    if threads:
        torch.set_num_threads(threads)
    return TorchSamPredictor.load("vit_t", models / "mobile_sam.pt", "cpu", model_version="MobileSAM")


def loose_box(mask: np.ndarray, margin: float = 0.1) -> np.ndarray:
    """The tight box grown by `margin` of its size on every side, clipped to the image: a box drawn by hand."""
    x0, y0, x1, y1 = tight_box(mask)
    dx, dy = margin * (x1 - x0), margin * (y1 - y0)
    height, width = mask.shape
    return np.array([max(x0 - dx, 0), max(y0 - dy, 0), min(x1 + dx, width), min(y1 + dy, height)], np.float32)


def benchmark(predictor: Predictor, names: list[str], size: tuple[int, int], clicks: int = 5,
              max_clicks: int = 20, log=print) -> dict:
    """Every number of the report, as a JSON-ready dict.

    Besides the click-only runs (MODES), each mode is also run box first ("box+" modes): a loose box (the
    tight one grown by 10 % a side), then clicks as usual with the box kept, so prompt 1 is the box alone.
    """
    runs: dict[str, dict[str, Run]] = {mode: {} for mode in ALL_MODES}
    boxes: dict[str, float] = {}
    scenes_out = {}
    started = time.perf_counter()
    for name in names:
        item = scene(name, size)
        embedding = predictor.embed(item.image)
        boxes[name] = box_iou(predictor, embedding, item.mask)
        scenes_out[name] = {"box_IoU": round(boxes[name], 4)}
        for mode in ALL_MODES:
            box = loose_box(item.mask) if mode.startswith("box+") else None
            run = simulate(predictor, embedding, item.mask, refine=mode.endswith("refine"), max_clicks=max_clicks,
                           min_clicks=clicks, box=box)
            runs[mode][name] = run
            scenes_out[name][mode] = {
                "ious": [round(v, 4) for v in run.ious],
                "clicks": [[round(c.x, 1), round(c.y, 1), int(c.positive)] for c in run.clicks],
                **{f"NoC@{round(t * 100)}": run.noc(t, max_clicks) for t in THRESHOLDS},
            }
        log(f"  {name}: box {boxes[name]:.3f}, " + ", ".join(
            f"{mode} " + " ".join(f"{v:.3f}" for v in runs[mode][name].ious[:clicks]) for mode in ALL_MODES))
    groups = {"standard": [n for n in names if n in RECIPES], "extra": [n for n in names if n not in RECIPES]}
    summary = {group: {mode: summarise({n: runs[mode][n] for n in members}, {n: boxes[n] for n in members},
                                       clicks, max_clicks)
                       for mode in ALL_MODES}
               for group, members in groups.items() if members}
    return {"predictor": predictor.model_version, "size": list(size), "clicks": clicks, "max_clicks": max_clicks,
            "thresholds": list(THRESHOLDS), "groups": groups, "summary": summary, "scenes": scenes_out,
            "seconds": round(time.perf_counter() - started, 1), "machine": platform.machine(),
            "threads": os.environ.get("OMP_NUM_THREADS")}


def table(report: dict) -> str:
    clicks = report["clicks"]
    columns = [f"mIoU@{k}" for k in range(1, clicks + 1)] + ["NoC@85", "NoC@90", "failed@90", "drops", "box_IoU"]
    lines = [f"{report['predictor']}, {report['size'][0]}x{report['size'][1]}, NoC capped at "
             f"{report['max_clicks']} clicks"]
    header = f"{'scenes':<10} {'mode':<12} " + " ".join(f"{c:>9}" for c in columns)
    lines += [header, "-" * len(header)]
    for group, modes in report["summary"].items():
        label = f"{group}({len(report['groups'][group])})"
        for mode, numbers in modes.items():
            lines.append(f"{label:<10} {mode:<12} " + " ".join(f"{numbers[c]:>9}" for c in columns))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--predictor", choices=("torch", "onnx"), default="torch")
    parser.add_argument("--int8", action="store_true", help="with --predictor onnx: the int8 models")
    parser.add_argument("--clicks", type=int, default=5, help="report mIoU after 1..CLICKS clicks")
    parser.add_argument("--max-clicks", type=int, default=20, help="NoC cap")
    parser.add_argument("--scenes", nargs="+", default=list(RECIPES) + list(EXTRA_RECIPES),
                        choices=list(RECIPES) + list(EXTRA_RECIPES))
    parser.add_argument("--size", default="480x640", help="HxW of the scenes")
    parser.add_argument("--threads", type=int, default=0, help="torch / onnxruntime threads (0: default)")
    parser.add_argument("--json", type=Path, default=HERE / "artifacts" / "quality.json")
    args = parser.parse_args(argv)
    if not 1 <= args.clicks <= args.max_clicks:
        parser.error("need 1 <= --clicks <= --max-clicks")
    height, width = (int(v) for v in args.size.lower().split("x"))
    predictor = load_predictor(args.predictor, args.int8, args.threads)
    report = benchmark(predictor, args.scenes, (height, width), args.clicks, args.max_clicks)
    print(table(report))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=1))
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
