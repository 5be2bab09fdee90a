"""The rectangles a task already has, as prompts for masks: from its annotations and predictions (a detector's,
say), for a project job that turns every box into a mask of the box's class.

A rectangle counts when its tag is one of the config's RectangleLabels tags with a brush label for its class (the
same mapping the smart tools use, `label_config.ProjectConfig.target`); others (another image, unknown labels,
malformed values) are skipped. The same box in several places (an annotation and the prediction it was made
from) is taken once. Predictions of `own_versions` (what the job itself wrote) never count.
"""
from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import Any

from sam_backend.errors import ConfigError, ContextError
from sam_backend.labelstudio.context import Region, parse_region
from sam_backend.labelstudio.label_config import ProjectConfig


def task_boxes(task: Mapping[str, Any], config: ProjectConfig, image: str,
               own_versions: Collection[str] = ()) -> list[Region]:
    """Positive rectangles on the Image tag `image` in the task's annotations (not cancelled ones), then its
    predictions, without duplicates, in that order."""
    sources: list[tuple[str, Any]] = []
    for i, annotation in enumerate(_list(task.get("annotations"))):
        if isinstance(annotation, Mapping) and not annotation.get("was_cancelled"):
            sources.append((f"annotations[{i}]", annotation.get("result")))
    for i, prediction in enumerate(_list(task.get("predictions"))):
        if isinstance(prediction, Mapping) and prediction.get("model_version") not in own_versions:
            sources.append((f"predictions[{i}]", prediction.get("result")))
    boxes: dict[tuple, Region] = {}
    for where, result in sources:
        for j, raw in enumerate(_list(result)):
            if not isinstance(raw, Mapping) or raw.get("type") != "rectanglelabels" or raw.get("to_name") != image:
                continue
            try:
                region = parse_region(raw, config, f"{where}.result[{j}]")
            except (ContextError, ConfigError):
                continue
            if not region.positive:
                continue
            same = (region.target_key, round(region.x, 3), round(region.y, 3), round(region.width, 3),
                    round(region.height, 3), round(region.rotation, 3))
            boxes.setdefault(same, region)
    return list(boxes.values())


def _list(value: Any) -> list:
    return value if isinstance(value, list) else []
