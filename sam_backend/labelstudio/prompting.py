"""From Label Studio's interactive context to one SAM prompt per object class.

Label Studio sends, with each smart-tool action, every region of the annotation that has the same type and
the same label as the one just drawn. Keypoints and rectangles never come together, and with the seed's alias
convention positive (`1`) and negative (`-1`) clicks never come together either. So the prompt for a class is
assembled from three places:

1. the call itself (authoritative for its own type and label: it holds all of them);
2. what this server saw in earlier calls for the same task and class (`PromptMemory`, bounded and expiring);
3. the task's autosaved draft, which holds every region but is usually one action behind.

All positive and negative keypoints of the class go into the prompt, with the newest rectangle, except older
regions that contradict the call's (`drop_finished`): those belong to an object the user has accepted.
"""
from __future__ import annotations

import math
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Collection, Hashable, Iterable, Mapping, Sequence

import numpy as np

from sam_backend.errors import ConfigError, ContextError
from sam_backend.labelstudio.label_config import ProjectConfig, Target
from sam_backend.sam.types import Prompt


#: How far (in percent of the image side) a point or rectangle edge may lie beyond the image and still be taken as
#: meaning its border; anything further out is refused. Label Studio sends percent of the image, 0 to 100.
OUTSIDE_MARGIN = 10.0
#: Label Studio sends, with each smart-tool action, the regions of one label; a call with far more is not the editor's
#: and is refused before it costs an image download, an embedding and a decode per object.
MAX_REGIONS = 4096
MAX_OBJECTS = 16


@dataclass(frozen=True)
class Region:
    """One keypoint or rectangle, in percent of the image (Label Studio's units).

    group: (from_name, label as sent) — Label Studio resends all regions of one group in each call.
    """

    id: str
    type: str  # "keypointlabels" | "rectanglelabels"
    group: tuple[str, str]
    target: Target
    positive: bool
    x: float
    y: float
    width: float = 0.0
    height: float = 0.0
    rotation: float = 0.0
    original_size: tuple[int, int] | None = None  # (width, height) the editor measured, when sent

    @property
    def target_key(self) -> tuple[str, str]:
        return self.target.brush_tag, self.target.label


def _number(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ContextError(f"{where} must be a number, got {type(value).__name__}")
    try:
        number = float(value)
    except OverflowError:  # a JSON integer beyond any float
        raise ContextError(f"{where} must be finite, got an integer beyond any float") from None
    if not math.isfinite(number):
        raise ContextError(f"{where} must be finite, got {value}")
    return number


def _percent(value: float, where: str) -> float:
    if not -OUTSIDE_MARGIN <= value <= 100 + OUTSIDE_MARGIN:
        raise ContextError(f"{where} is {value:g}: outside the image (Label Studio sends percent of the image, 0 to "
                           f"100; up to {OUTSIDE_MARGIN:g} beyond an edge is taken as the edge)")
    return value


def parse_region(raw: Any, config: ProjectConfig, where: str) -> Region:
    """Validate one region of a context or draft; ContextError / ConfigError say what and where."""
    if not isinstance(raw, Mapping):
        raise ContextError(f"{where} must be an object")
    region_type = raw.get("type")
    from_name = raw.get("from_name")
    value = raw.get("value")
    if region_type not in ("keypointlabels", "rectanglelabels"):
        raise ContextError(f"{where}.type is {region_type!r}; the smart tools send keypointlabels or "
                           f"rectanglelabels")
    if not isinstance(from_name, str):
        raise ContextError(f"{where}.from_name must be a string")
    if not isinstance(value, Mapping):
        raise ContextError(f"{where}.value must be an object")
    labels = value.get(region_type) or value.get("labels")
    if not isinstance(labels, list) or not labels or not all(isinstance(v, str) for v in labels):
        raise ContextError(f"{where}.value.{region_type} must be a non-empty list of label strings")
    tag = config.prompt_tags.get(from_name)
    if tag is not None and tag.type != region_type:
        raise ContextError(f"{where}: from_name {from_name!r} is a {tag.type} tag, not {region_type}")
    target = config.target(from_name, labels[0])
    is_positive = raw.get("is_positive", True)
    if not isinstance(is_positive, bool):
        raise ContextError(f"{where}.is_positive must be true or false")
    x = _percent(_number(value.get("x"), f"{where}.value.x"), f"{where}.value.x")
    y = _percent(_number(value.get("y"), f"{where}.value.y"), f"{where}.value.y")
    width = height = rotation = 0.0
    if region_type == "rectanglelabels":
        width = _number(value.get("width"), f"{where}.value.width")
        height = _number(value.get("height"), f"{where}.value.height")
        rotation = _number(value.get("rotation", 0), f"{where}.value.rotation")
        if width <= 0 or height <= 0:
            raise ContextError(f"{where}: a rectangle needs a positive width and height, got {width}x{height}")
        _percent(x + width, f"{where}.value.width: the right edge, x + width,")
        _percent(y + height, f"{where}.value.height: the bottom edge, y + height,")
    original_size = None
    if "original_width" in raw or "original_height" in raw:
        size = [_number(raw.get(k), f"{where}.{k}") for k in ("original_width", "original_height")]
        if min(size) < 1:
            raise ContextError(f"{where}: original_width and original_height must be positive")
        original_size = (int(size[0]), int(size[1]))
    region_id = raw.get("id")
    return Region(id=str(region_id) if region_id is not None else f"{where}", type=region_type,
                  group=(from_name, labels[0]), target=target, positive=is_positive and target.positive,
                  x=x, y=y, width=width, height=height, rotation=rotation, original_size=original_size)


def parse_context(context: Any, config: ProjectConfig) -> list[Region]:
    """The regions of `params.context`; an empty list means "no interactive prompt"."""
    if context is None:
        return []
    if not isinstance(context, Mapping):
        raise ContextError("params.context must be an object or null")
    result = context.get("result", [])
    if result is None:
        return []
    if not isinstance(result, list):
        raise ContextError("params.context.result must be a list")
    if len(result) > MAX_REGIONS:
        raise ContextError(f"params.context.result has {len(result)} regions; at most {MAX_REGIONS} are accepted")
    regions = [parse_region(raw, config, f"params.context.result[{i}]") for i, raw in enumerate(result)]
    objects = dict.fromkeys(r.target_key for r in regions)
    if len(objects) > MAX_OBJECTS:
        raise ContextError(f"params.context.result asks for {len(objects)} objects (brush labels) at once; at most "
                           f"{MAX_OBJECTS} are accepted (Label Studio sends one per call)")
    return regions


def draft_regions(task: Mapping[str, Any], config: ProjectConfig) -> list[Region]:
    """Keypoints and rectangles of the task's newest draft that this config understands; others are skipped.

    A draft holds the user's whole annotation (brush strokes, other tools): only well-formed prompt regions
    of known labels count, since anything else there is not addressed to us.
    """
    drafts = task.get("drafts")
    if not isinstance(drafts, list) or not drafts or not isinstance(drafts[-1], Mapping):
        return []
    result = drafts[-1].get("result")
    regions = []
    for i, raw in enumerate(result if isinstance(result, list) else []):
        try:
            regions.append(parse_region(raw, config, f"drafts[-1].result[{i}]"))
        except (ContextError, ConfigError):
            continue
    return regions


@dataclass
class _TaskMemory:
    seen: float
    groups: dict[tuple[str, str], tuple[Region, ...]] = field(default_factory=dict)
    # target key -> (the prompt that produced the mask, its (1, 256, 256) low-resolution logits)
    masks: dict[tuple[str, str], tuple[Prompt, np.ndarray]] = field(default_factory=dict)


class PromptMemory:
    """Per task: regions seen in earlier calls, by group, and the last mask of each target.

    Bounded LRU with expiry: at most `max_tasks` tasks, and at most `max_tasks` remembered masks (one per task and
    class, 256 KiB each) in all, so PROMPT_MEMORY_SIZE bounds the (task, class) entries whatever the number of
    classes. Thread-safe.
    """

    def __init__(self, max_tasks: int = 1024, ttl: float = 3600.0) -> None:
        self.max_tasks = max_tasks
        self.ttl = ttl
        self._tasks: OrderedDict[Hashable, _TaskMemory] = OrderedDict()
        self._lock = threading.Lock()

    def exchange(self, task_key: Hashable, regions: Sequence[Region]) -> list[Region]:
        """Record this call's groups (replacing earlier sets of the same groups); return the other groups'."""
        calls: dict[tuple[str, str], list[Region]] = {}
        for region in regions:
            calls.setdefault(region.group, []).append(region)
        with self._lock:
            memory = self._touch(task_key)
            remembered = [r for group, rs in memory.groups.items() if group not in calls for r in rs]
            memory.groups.update({group: tuple(rs) for group, rs in calls.items()})
        return remembered

    def previous_mask(self, task_key: Hashable, target: tuple[str, str], prompt: Prompt) -> np.ndarray | None:
        """The last mask's logits for `target` if `prompt` only adds clicks to the prompt that produced it.

        That is SAM's interactive protocol: each new click refines the previous mask. Any other change (a
        click removed or moved, another box) starts afresh.
        """
        with self._lock:
            memory = self._tasks.get(task_key)
            entry = memory.masks.get(target) if memory is not None else None
        if entry is None:
            return None
        before, logits = entry
        # SAM's prompt tokens carry no order, so "adds clicks" is set containment of (x, y, label) rows.
        old_rows = {tuple(row) for row in np.column_stack([before.points, before.labels]).tolist()}
        new_rows = {tuple(row) for row in np.column_stack([prompt.points, prompt.labels]).tolist()}
        extends = old_rows < new_rows and _same_box(prompt.box, before.box)
        return logits if extends else None

    def remember_mask(self, task_key: Hashable, target: tuple[str, str], prompt: Prompt, logits: np.ndarray) -> None:
        with self._lock:
            memory = self._touch(task_key)
            memory.masks.pop(target, None)
            memory.masks[target] = (prompt, logits)  # newest last
            excess = sum(len(m.masks) for m in self._tasks.values()) - self.max_tasks
            for older in self._tasks.values():  # least recently used first; this task, just touched, comes last
                while older.masks and excess > 0:
                    del older.masks[next(iter(older.masks))]  # a task's oldest mask first
                    excess -= 1
                if excess <= 0:
                    break

    def _touch(self, task_key: Hashable) -> _TaskMemory:
        """The task's memory, created if new, marked as just used; expires and evicts others. Lock held."""
        now = time.monotonic()
        while self._tasks:
            key, oldest = next(iter(self._tasks.items()))
            if now - oldest.seen <= self.ttl:
                break
            del self._tasks[key]
        memory = self._tasks.pop(task_key, None) or _TaskMemory(seen=now)
        memory.seen = now
        self._tasks[task_key] = memory
        while len(self._tasks) > self.max_tasks:
            self._tasks.popitem(last=False)
        return memory


def _same_box(a: np.ndarray | None, b: np.ndarray | None) -> bool:
    return (a is None and b is None) or (a is not None and b is not None and np.array_equal(a, b))


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
