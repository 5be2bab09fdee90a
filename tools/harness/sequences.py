"""A recorded annotation session replayed as Label Studio sends it: boxes, clicks, negative clicks, two classes,
two tasks. Built from the recorded Label Studio 1.23.2 bodies (recordings.py): each keypoint call carries every
keypoint of its group so far, as the editor resends them.

`session(images)` -> the list of /predict bodies, in order, for `images` = (image path of task 1, of task 2).
"""
from __future__ import annotations

import copy

from tools.harness.recordings import recorded, with_image

#: per task: (kind, label, x, y[, width, height] in percent, positive) in the order the annotator acts
STEPS = (
    ("box", "Cat", 10, 5, 60, 90, True),
    ("click", "Cat", 40, 45, True),
    ("click", "Cat", 55, 40, True),
    ("click", "Cat", 90, 10, False),
    ("click", "Dog", 80, 80, True),
    ("box", "Dog", 70, 60, 28, 38, True),
    ("click", "Dog", 85, 75, False),
    ("click", "Cat", 30, 60, True),
)


def session(images: tuple[str, str], project: str = "7.1795319308") -> list[dict]:
    """The /predict bodies of annotating task 101 on images[0] and task 102 on images[1], interleaved."""
    bodies = {0: [], 1: []}
    for number, image in enumerate(images):
        clicks: dict[str, list[dict]] = {}
        for step, (kind, label, *values, positive) in enumerate(STEPS):
            if kind == "box":
                body = with_image(recorded("rectangle"), image, task_id=101 + number)
                (rect,) = body["params"]["context"]["result"]
                x, y, width, height = values
                rect["id"] = f"r{number}{step}"
                rect["value"].update(x=x, y=y, width=width, height=height, rotation=0, rectanglelabels=[label])
            else:
                body = with_image(recorded("keypoints_positive_and_negative"), image, task_id=101 + number)
                template = body["params"]["context"]["result"][0]
                click = copy.deepcopy(template)
                click.update(id=f"k{number}{step}", is_positive=positive)
                click["value"].update(x=values[0], y=values[1], keypointlabels=[label], labels=[label])
                clicks.setdefault(label, []).append(click)
                body["params"]["context"]["result"] = copy.deepcopy(clicks[label])
            body["project"] = project
            bodies[number].append(body)
    return [body for pair in zip(bodies[0], bodies[1]) for body in pair]


__all__ = ["STEPS", "session"]
