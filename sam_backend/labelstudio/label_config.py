"""What a project's labeling config means to this backend: which image, which brush tag, which prompt labels.

Two conventions are understood (see README, "Label configs"):

* native: a smart `KeyPointLabels` / `RectangleLabels` label has the same value as a `BrushLabels` label
  (`Banana` -> `Banana`); a negative click is an alt-click (`is_positive: false`).
* the seed's aliases: keypoint labels carry alias `N` (positive) or `-N` (negative), rectangle labels alias `N`,
  and class `N`'s brush label has alias `N_brush` or value `N`.

Label Studio sends a label's alias when it has one, else its value; both are looked up.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from functools import lru_cache
from types import MappingProxyType
from typing import Mapping

from label_studio_sdk.label_interface import LabelInterface

from sam_backend.errors import ConfigError

#: control tag (lower case: Label Studio accepts `KeypointLabels` too) -> result type
PROMPT_TYPES = {"keypointlabels": "keypointlabels", "rectanglelabels": "rectanglelabels"}
NUMERIC_ALIAS = re.compile(r"^-?\d+$")


@dataclass(frozen=True)
class Target:
    """What one prompt label asks for: a mask of brush label `label` of `brush_tag`, added or removed."""

    brush_tag: str
    label: str
    positive: bool


@dataclass(frozen=True)
class PromptTag:
    """A smart KeyPointLabels or RectangleLabels tag and what each of its labels means."""

    name: str
    type: str  # "keypointlabels" | "rectanglelabels"
    to_name: str
    targets: Mapping[str, Target]  # label as Label Studio sends it (alias or value) -> target


@dataclass(frozen=True)
class OutputTag:
    """A PolygonLabels or RectangleLabels tag a mask's outline can be written into (see results.py).

    labels: brush target key (brush tag, brush label value) -> this tag's label value, for each label that
    names a brush label as a prompt label would (same value, or the seed's numeric aliases).
    """

    name: str
    type: str  # "polygonlabels" | "rectanglelabels"
    to_name: str
    labels: Mapping[tuple[str, str], str]


@dataclass(frozen=True)
class ProjectConfig:
    """The parts of a labeling config this backend needs."""

    image_tags: Mapping[str, str]  # Image tag name -> task data key ("$image" -> "image")
    brush_tags: Mapping[str, str]  # BrushLabels tag name -> its Image tag name
    prompt_tags: Mapping[str, PromptTag] = field(default_factory=dict)
    output_tags: Mapping[str, OutputTag] = field(default_factory=dict)

    def output_tag(self, kind: str, image: str, target: tuple[str, str]) -> tuple[str, str] | None:
        """(tag name, label value) of the first `kind` output tag of `image` with a label for `target`."""
        for tag in self.output_tags.values():
            if tag.type == kind and tag.to_name == image and target in tag.labels:
                return tag.name, tag.labels[target]
        return None

    def target(self, from_name: str, label: str) -> Target:
        """The target of `label` sent from the tag `from_name`; ConfigError naming both when there is none."""
        tag = self.prompt_tags.get(from_name)
        if tag is None:
            raise ConfigError(f"from_name {from_name!r} is not a KeyPointLabels or RectangleLabels tag of the "
                              f"labeling config (known: {sorted(self.prompt_tags)})")
        if label not in tag.targets:
            raise ConfigError(f"label {label!r} of {from_name!r} has no BrushLabels label to draw: give the "
                              f"brush tag a label with the same value, or use aliases N / -N with N_brush")
        return tag.targets[label]


@lru_cache(maxsize=64)
def parse(xml: str) -> ProjectConfig:
    """Parse a labeling config (cached: Label Studio sends the same XML with every call)."""
    try:
        interface = LabelInterface(xml)
    except Exception as error:  # the SDK raises many types for bad XML; all mean the same to the caller
        raise ConfigError(f"labeling config does not parse: {error}") from error
    image_tags = {obj.name: obj.value.lstrip("$") for obj in interface.objects if obj.tag.lower() == "image"}
    if not image_tags:
        raise ConfigError("labeling config has no <Image> tag")
    brushes = [c for c in interface.controls if c.tag.lower() == "brushlabels" and _image_of(c, image_tags)]
    if not brushes:
        raise ConfigError("labeling config has no <BrushLabels> tag for an <Image>: SAM's masks need one")
    brush_tags = {c.name: _image_of(c, image_tags) for c in brushes}
    prompt_tags = {}
    for control in interface.controls:
        if control.tag.lower() not in PROMPT_TYPES or not _image_of(control, image_tags):
            continue
        image = _image_of(control, image_tags)
        brush = next((b for b in brushes if brush_tags[b.name] == image), None)
        if brush is None:
            continue
        targets = {sent: target for sent, attrs in (control.labels_attrs or {}).items()
                   if (target := _target_of(sent, attrs.attr, brush)) is not None}
        prompt_tags[control.name] = PromptTag(control.name, PROMPT_TYPES[control.tag.lower()], image,
                                              MappingProxyType(targets))
    if not prompt_tags:
        raise ConfigError("labeling config has no KeyPointLabels or RectangleLabels tag whose labels match "
                          "a BrushLabels label")
    return ProjectConfig(MappingProxyType(image_tags), MappingProxyType(brush_tags),
                         MappingProxyType(prompt_tags), _output_tags(interface.controls, image_tags, brushes))


def _image_of(control, image_tags: Mapping[str, str]) -> str | None:
    return next((name for name in control.to_name if name in image_tags), None)


def _target_of(sent: str, attrs: Mapping[str, str], brush) -> Target | None:
    """Map one prompt label (sent as `sent`, with XML attributes `attrs`) to a brush label, or None."""
    brush_labels = {a.attr.get("value", key): a.attr for key, a in (brush.labels_attrs or {}).items()}
    alias = attrs.get("alias")
    if alias is not None and NUMERIC_ALIAS.match(alias):
        number = alias.lstrip("-")
        for value, brush_attrs in brush_labels.items():
            if brush_attrs.get("alias") == f"{number}_brush" or value == number:
                return Target(brush.name, value, positive=not alias.startswith("-"))
    value = attrs.get("value", sent)
    for candidate in (value, sent):
        if candidate in brush_labels:
            return Target(brush.name, candidate, positive=True)
    for brush_value, brush_attrs in brush_labels.items():
        if brush_attrs.get("alias") in (value, sent):
            return Target(brush.name, brush_value, positive=True)
    return None


#: control tag (lower case) -> result type of the tags a mask's outline can be written into
OUTPUT_TYPES = {"polygonlabels": "polygonlabels", "rectanglelabels": "rectanglelabels"}


def _output_tags(controls, image_tags: Mapping[str, str], brushes) -> Mapping[str, OutputTag]:
    """PolygonLabels / RectangleLabels tags of an image, with their labels that match that image's brush labels.

    A RectangleLabels tag is usually also a prompt tag; results.py writes into it only when OUT_BBOX is on.
    """
    tags = {}
    for control in controls:
        image = _image_of(control, image_tags)
        if control.tag.lower() not in OUTPUT_TYPES or not image:
            continue
        labels = {}
        for brush in (b for b in brushes if _image_of(b, image_tags) == image):
            for sent, attrs in (control.labels_attrs or {}).items():
                target = _target_of(sent, attrs.attr, brush)
                if target is not None and target.positive:
                    labels.setdefault((target.brush_tag, target.label), attrs.attr.get("value", sent))
        tags[control.name] = OutputTag(control.name, OUTPUT_TYPES[control.tag.lower()], image,
                                       MappingProxyType(labels))
    return MappingProxyType(tags)
