"""From Label Studio's interactive context to one SAM prompt per object class.

The prompt for a class is assembled from three places (the regions of each are parsed by `context`):

1. the call itself (authoritative for its own type and label: it holds all of them);
2. what this server saw in earlier calls for the same task and class from the same annotator (`memory.PromptMemory`,
   bounded and expiring; the annotator is the one the draft names: `memory.exchange_partitions`);
3. the task's autosaved draft, which holds every region but is usually one action behind.

All positive and negative keypoints of the class go into the prompt, with the newest rectangle, except older
regions of an object the user has accepted: those of the class when the call's group no longer holds any of its
earlier regions (`memory.exchange_groups`), and those that contradict the call's (`drop_finished`).
"""
from __future__ import annotations

import math
from dataclasses import replace
from typing import Any, Collection, Hashable, Iterable, Mapping, Sequence

import numpy as np

from sam_backend.errors import ContextError
from sam_backend.labelstudio.context import Region, draft_author, draft_regions
from sam_backend.labelstudio.label_config import ProjectConfig
from sam_backend.labelstudio.memory import PromptMemory
from sam_backend.sam import zoom
from sam_backend.sam.types import MULTIMASK_POINTS, Prompt, distinct_clicks
from sam_backend.settings import Settings


def assemble(call: Sequence[Region], task: Mapping[str, Any], config: ProjectConfig, memory: PromptMemory,
             task_key: Hashable, image_size: tuple[int, int],
             settings: Settings) -> list[tuple[tuple[str, str], Prompt]]:
    """The prompts of one /predict call on one task: (target key, Prompt) per object class of the call, in the
    call's order. A class with nothing to ask for yet (only negative clicks) gets none.

    call: the regions of params.context; task_key: what the memory files this task under; image_size: (H, W).
    Records the call's regions in `memory` for later calls (which also tells what of the older ones belongs to
    an object the user has finished: `memory.exchange_groups`). With settings.zoom_in, clicks added to those that
    produced the class's last mask get the crop `zoom.choose` picks around it as `view` (or None). With
    settings.refine_masks, a prompt that builds on the one that produced the class's last mask (more clicks, or a
    box drawn after them: `memory` `_extends`) carries that mask, in the prompt's view (`zoom.project`), as
    `mask_input`, or for two clicks (still ambiguous) as `previous`; the caller decodes the prompt in its view
    and hands each new mask back with `memory.remember_mask`.
    """
    older = memory.exchange(task_key, call, draft_regions(task, config), draft_author(task))
    everything = combine(call, older.remembered, older.drafted)
    call_ids = {r.id for r in call}
    prompts = []
    for target in dict.fromkeys(r.target_key for r in call):
        of_target = drop_finished([r for r in everything if r.target_key == target], call_ids, image_size)
        prompt = build_prompt(of_target, image_size, settings.max_points)
        if prompt is None:
            continue
        rectangles = [r for r in of_target if r.type == "rectanglelabels"]
        if prompt.box is not None and len(prompt.points) and rectangles[-1].id in call_ids:
            prompt = replace(prompt, new_box=True)  # a box after clicks (refinement.decode)
        # (logits, their view) of the class's last mask when the prompt builds on the one that made it
        last = memory.last_mask(task_key, target, prompt) if settings.zoom_in or settings.refine_masks else None
        if settings.zoom_in and prompt.box is None and len(prompt.points) and last is not None:
            # the object's extent is known: a crop where it is small (sam.zoom)
            prompt = replace(prompt, view=zoom.choose(last[1], last[0], prompt, image_size))
        clicks = len(distinct_clicks(prompt).points)  # as SAM will see them (refinement.decode)
        if settings.refine_masks and last is not None:
            # Logits of another view are carried into this one (the crop moved with the object). Up to
            # MULTIMASK_POINTS clicks the prompt stays ambiguous: SAM's three masks of the clicks alone beat a
            # refinement of the first click's mask (Prompt.is_ambiguous); the mask only guards against a jump.
            logits = zoom.project(last[0], last[1], prompt.view, image_size)
            ambiguous = prompt.box is None and clicks <= MULTIMASK_POINTS
            prompt = replace(prompt, **{"previous" if ambiguous else "mask_input": logits})
        prompts.append((target, prompt))
    return prompts


def combine(call: Sequence[Region], remembered: Iterable[Region], drafted: Iterable[Region]) -> list[Region]:
    """All regions for the prompt, newest last: remembered and drafted ones of groups the call lacks, then
    the call's own. A region id seen twice is taken once (the call's or memory's copy wins over the draft's)."""
    call_groups = {r.group for r in call}
    ordered: dict[str, Region] = {}
    for region in drafted:
        if region.group not in call_groups:
            ordered[region.id] = region
    for region in remembered:
        ordered.pop(region.id, None)
        ordered[region.id] = region
    for region in call:
        ordered.pop(region.id, None)
        ordered[region.id] = region
    return list(ordered.values())


def drop_finished(regions: Sequence[Region], call_ids: Collection[str], image_size: tuple[int, int]) -> list[Region]:
    """Regions of ONE target (newest last) without those of an object the user has finished. image_size: (H, W).

    Accepting a suggestion in the editor deletes the smart keypoints and rectangles, but nothing tells the
    backend (the autosaved draft is usually empty or behind): the regions it remembers may belong to an object
    already accepted. One object's prompt is consistent, its box enclosing its positive clicks; so when the
    call's own regions (`call_ids`) and the older ones disagree, the older ones are the finished object's:
    - a box in the call enclosing none of the older positive clicks drops the older keypoints;
    - positive clicks in the call none of which lies in the older (newest) box drop the older rectangles.
    """
    own = [r for r in regions if r.id in call_ids]
    older = [r for r in regions if r.id not in call_ids]
    rectangles = [r for r in regions if r.type == "rectanglelabels"]
    if not own or not older or not rectangles:
        return list(regions)
    box = rectangles[-1]
    box_is_new = box.id in call_ids
    clicks = [r for r in (older if box_is_new else own) if r.type == "keypointlabels" and r.positive]
    if not clicks or any(_encloses(box, click, image_size) for click in clicks):
        return list(regions)
    stale = "keypointlabels" if box_is_new else "rectanglelabels"
    return [r for r in regions if r.id in call_ids or r.type != stale]


def _encloses(rectangle: Region, point: Region, image_size: tuple[int, int], margin: float = 0.01) -> bool:
    """Whether `point` lies in `rectangle` (rotated about its top-left corner in pixels, as Label Studio draws
    it), give or take `margin` of the image's longer side. image_size: (H, W)."""
    height, width = image_size
    angle = math.radians(rectangle.rotation)
    dx, dy = (point.x - rectangle.x) * width / 100, (point.y - rectangle.y) * height / 100
    u = dx * math.cos(angle) + dy * math.sin(angle)  # into the rectangle's own axes
    v = -dx * math.sin(angle) + dy * math.cos(angle)
    slack = margin * max(width, height)
    return (-slack <= u <= rectangle.width * width / 100 + slack
            and -slack <= v <= rectangle.height * height / 100 + slack)


def build_prompt(regions: Sequence[Region], image_size: tuple[int, int], max_points: int = 256) -> Prompt | None:
    """SAM prompt in pixels from regions of ONE target: every keypoint, and the newest (last) rectangle.

    None when nothing asks for a mask yet (only negative clicks so far).

    image_size: (H, W) of the image. Coordinates are clamped into the image (a click on the border's far
    side is what the user meant); a rectangle is clipped and refused if nothing of it is left.
    """
    height, width = image_size
    keypoints = [r for r in regions if r.type == "keypointlabels"]
    rectangles = [r for r in regions if r.type == "rectanglelabels"]
    if len(keypoints) > max_points:
        raise ContextError(f"{len(keypoints)} keypoints for {keypoints[0].target.label!r}; at most {max_points} are "
                           f"accepted for one object (MAX_POINTS)")
    points = np.array([[_clamp(r.x, 100) * width / 100, _clamp(r.y, 100) * height / 100] for r in keypoints],
                      dtype=np.float32).reshape(-1, 2)
    labels = np.array([1 if r.positive else 0 for r in keypoints], dtype=np.int32)
    box = None
    if rectangles:
        box = _box_pixels(rectangles[-1], width, height)
    if box is None and not labels.any():
        return None
    return Prompt(points=points, labels=labels, box=box)


def _clamp(value: float, upper: float) -> float:
    return min(max(value, 0.0), upper)


def _box_pixels(region: Region, width: int, height: int) -> np.ndarray:
    """Axis-aligned pixel box around a (possibly rotated, about its top-left corner) rectangle, clipped."""
    angle = math.radians(region.rotation)
    w, h = region.width * width / 100, region.height * height / 100
    x0, y0 = region.x * width / 100, region.y * height / 100
    corners = [(0, 0), (w, 0), (w, h), (0, h)]
    xs = [x0 + cx * math.cos(angle) - cy * math.sin(angle) for cx, cy in corners]
    ys = [y0 + cx * math.sin(angle) + cy * math.cos(angle) for cx, cy in corners]
    box = np.array([max(min(xs), 0), max(min(ys), 0), min(max(xs), width), min(max(ys), height)], np.float32)
    if box[2] - box[0] < 1 or box[3] - box[1] < 1:
        if box[2] <= box[0] or box[3] <= box[1]:
            raise ContextError(f"rectangle {region.id} lies outside the image")
        raise ContextError(f"rectangle {region.id} covers less than a pixel of the {width}x{height} image")
    return box
