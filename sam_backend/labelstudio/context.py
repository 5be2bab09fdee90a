"""Label Studio's interactive context, validated: the keypoints and rectangles of a /predict call and of the
task's draft, as `Region`s in percent of the image.

Label Studio sends, with each smart-tool action, every region of the annotation that has the same type and
the same label as the one just drawn. Keypoints and rectangles never come together, and with the seed's alias
convention positive (`1`) and negative (`-1`) clicks never come together either; `prompting` assembles one
prompt per object class from them, the memory of earlier calls and the draft.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from sam_backend.errors import ConfigError, ContextError
from sam_backend.labelstudio.label_config import ProjectConfig, Target


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
    result = _newest_draft(task).get("result")
    regions = []
    for i, raw in enumerate(result if isinstance(result, list) else []):
        try:
            regions.append(parse_region(raw, config, f"drafts[-1].result[{i}]"))
        except (ContextError, ConfigError):
            continue
    return regions


def draft_author(task: Mapping[str, Any]) -> str | None:
    """Who is annotating, as the newest draft names them (its `user`, Label Studio's user e-mail), or None.

    Label Studio sends an interactive call only the drafts of the user who clicked, and names that user nowhere
    else; before the editor's first autosave of an annotation there is none.
    """
    user = _newest_draft(task).get("user")
    return user if isinstance(user, str) and user else None


def _newest_draft(task: Mapping[str, Any]) -> Mapping[str, Any]:
    """The task's newest draft, or {} when it has none (or `drafts` is malformed)."""
    drafts = task.get("drafts")
    return drafts[-1] if isinstance(drafts, list) and drafts and isinstance(drafts[-1], Mapping) else {}


def check_sizes(regions: Sequence[Region], size: tuple[int, int], image: str) -> None:
    """Refuse a context measured on another image than the one the task names. size: (H, W) of the task's
    image; image: what to call it in the error (its redacted URL). A pixel of difference is rounding."""
    height, width = size
    for region in regions:
        if region.original_size is None:
            continue
        their_width, their_height = region.original_size
        if abs(their_width - width) > 1 or abs(their_height - height) > 1:
            raise ContextError(
                f"region {region.id} was drawn on a {their_width}x{their_height} image, but the task's image "
                f"{image} is {width}x{height}")
