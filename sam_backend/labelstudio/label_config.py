"""What a project's labeling config means to this backend: which image, which brush tag, which prompt labels.

Two conventions are understood (see README, "Label configs"):

* native: a smart `KeyPointLabels` / `RectangleLabels` label has the same value as a `BrushLabels` label
  (`Banana` -> `Banana`); a negative click is an alt-click (`is_positive: false`).
* the seed's aliases: keypoint labels carry alias `N` (positive) or `-N` (negative), rectangle labels alias `N`,
  and class `N`'s brush label has alias `N_brush` or value `N`.

Label Studio sends a label's alias when it has one, else its value; both are looked up.
"""
from __future__ import annotations

import hashlib
import re
import threading
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Mapping

from lxml import etree

from sam_backend.errors import ConfigError
from sam_backend.lru import BoundedLRU

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


#: defaults of the settings MAX_LABEL_CONFIG_BYTES and MAX_LABELS (settings.py); see `parse`
MAX_BYTES = 8 << 20
MAX_LABELS = 100_000
#: the parse cache: at most CACHE_ITEMS configs, holding at most CACHE_BYTES together (by `_footprint`)
CACHE_ITEMS = 64
CACHE_BYTES = 64 << 20

#: what the SDK's LabelInterface takes for a label (case-sensitive, as there), and a cheap count of them before parsing
LABEL_TAGS = frozenset({"Label", "Choice", "Relation"})
LABEL_START = re.compile(r"<(?:Label|Choice|Relation)[\s/>]")


@dataclass(frozen=True)
class _Parsed:
    """A cache entry: the parse, the memory it holds (`_footprint`), and its XML's label count (checked against
    each caller's MAX_LABELS)."""

    config: ProjectConfig
    nbytes: int
    labels: int


def _footprint(xml_bytes: int, labels: int) -> int:
    """Bytes a parse holds, from above: measured, 130-160 per label plus the label strings (at most the XML),
    and 4 KiB for a small config's tags and maps. The XML itself is not held (the cache keys by digest)."""
    return 4096 + xml_bytes + 160 * labels


def _new_cache() -> BoundedLRU[bytes, _Parsed]:
    return BoundedLRU(max_items=CACHE_ITEMS, max_bytes=CACHE_BYTES, size_of=lambda entry: entry.nbytes)


_cache = _new_cache()
#: One parse at a time. Parsing is Python work under the GIL: parses side by side end no sooner than in a row, but
#: each holds up every other request thread (/health, clicks on cached configs) for as long as it runs.
_parsing = threading.Lock()


def clear_cache() -> None:
    """Forget every parse (benchmarks and tests)."""
    global _cache
    _cache = _new_cache()


def parse(xml: str, max_bytes: int = MAX_BYTES, max_labels: int = MAX_LABELS) -> ProjectConfig:
    """Parse a labeling config (cached: Label Studio sends the same XML with every call).

    A config of more than `max_bytes` bytes (UTF-8) or `max_labels` label elements is refused with a 413 naming the
    setting, before it is parsed. The cache holds parses of at most CACHE_BYTES together, keyed by a digest of the
    XML. Parses run one at a time (`_parsing`); a cached config needs no lock.
    """
    if len(xml) > max_bytes:  # each character is at least one byte: refused without encoding it
        raise _too_large(f"more than {max_bytes} bytes", max_bytes)
    data = xml.encode("utf-8", "surrogatepass")  # JSON may carry lone surrogates; lxml refuses them below
    if len(data) > max_bytes:
        raise _too_large(f"{len(data)} bytes", max_bytes)
    key = hashlib.blake2b(data, digest_size=32).digest()
    entry = _cache.get(key)
    if entry is not None:
        _check_labels(entry.labels, max_labels)
        return entry.config
    labels = len(LABEL_START.findall(xml))  # may count a label in a comment: errs on the safe side
    _check_labels(labels, max_labels)
    with _parsing:
        entry = _cache.get(key)  # parsed meanwhile, for another call with the same config
        if entry is None:
            entry = _Parsed(_parse(xml), _footprint(len(data), labels), labels)
            _cache.put(key, entry)
    return entry.config


def _too_large(size: str, max_bytes: int) -> ConfigError:
    return ConfigError(f"labeling config is too large to serve: {size}, more than MAX_LABEL_CONFIG_BYTES="
                       f"{max_bytes}", status=413)


def _check_labels(labels: int, max_labels: int) -> None:
    if labels > max_labels:
        raise ConfigError(f"labeling config is too large to serve: {labels} labels (<Label>, <Choice>, <Relation>), "
                          f"more than MAX_LABELS={max_labels}", status=413)


@dataclass
class _Control:
    """A control tag as the SDK's LabelInterface sees it: a tag with a name and a toName."""

    tag: str
    name: str
    to_name: list[str]
    labels: dict[str, tuple[str | None, str | None]] = field(default_factory=dict)  # sent -> (value, alias)


def _read(xml: str) -> tuple[dict[str, _Control], dict[str, tuple[str, str | None]]]:
    """(controls by name, objects by name as (tag, value)), read the way label_studio_sdk's LabelInterface reads them.

    One pass over the elements in document order, with the SDK's rules: an element with `name` and `toName` (not
    a Filter) is a control; else one with `name` and `value` or `valueList` is an object; else a Label, Choice or
    Relation belongs to the nearest enclosing element whose name is a control's, and is sent as its alias, else
    its value. A later tag or label of the same name replaces an earlier one, in the earlier one's place.
    Comments and processing instructions are skipped (the SDK took a processing instruction's pseudo-attributes
    for a tag's, then failed on it).

    The same libxml2 parser as the SDK's (lxml), with its safe settings spelled out: internal entities only (its
    expansion limits stop entity bombs), no network, no DTD loading, no huge trees. It calls `_Reader` for each
    element instead of building a tree: three times faster than walking one, which costs a Python object per node.
    """
    reader = _Reader()
    parser = etree.XMLParser(target=reader, resolve_entities="internal", no_network=True, load_dtd=False,
                             huge_tree=False)
    try:
        etree.fromstring(xml, parser)
    except Exception as error:  # XMLSyntaxError, or ValueError for a str with an encoding declaration
        raise ConfigError(f"labeling config does not parse: {error}") from error
    for name, control in reader.controls.items():
        control.labels = reader.labels.get(name, {})
    return reader.controls, reader.objects


#: tags the SDK makes both a control and an object of (none of them matters here)
SELF_REFERENCING = frozenset({"chat", "reactcode"})


class _Reader:
    """An lxml parser target that collects controls, objects and labels as `_read` describes."""

    def __init__(self) -> None:
        self.controls: dict[str, _Control] = {}
        self.objects: dict[str, tuple[str, str | None]] = {}
        self.labels: dict[str, dict[str, tuple[str | None, str | None]]] = {}  # control name -> sent -> attributes
        self._open: list[str | None] = []  # the name attribute of each enclosing element, outermost first

    def start(self, tag: str, attrib: Mapping[str, str]) -> None:
        name = attrib.get("name")
        if name and attrib.get("toName") and tag != "Filter":
            self.controls[name] = _Control(tag, name, attrib["toName"].split(","))
        elif name and (attrib.get("value") or attrib.get("valueList")):
            self.objects[name] = (tag, attrib.get("valueList", attrib.get("value")))
        elif name and tag.lower() in SELF_REFERENCING:
            self.objects[name] = (tag, None)  # Chat, ReactCode: an object of their own kind, never an image
        elif tag in LABEL_TAGS:
            sent = attrib.get("alias") or attrib.get("value")
            if sent is not None:
                parent = self._open[-1] if self._open else None
                if parent not in self.controls:  # not directly in its control (<Choices><View><Choice>...)
                    parent = next((open_name for open_name in reversed(self._open) if open_name in self.controls),
                                  None)
                if parent is not None:
                    self.labels.setdefault(parent, {})[sent] = (attrib.get("value"), attrib.get("alias"))
        self._open.append(name)

    def end(self, tag: str) -> None:
        self._open.pop()

    def close(self) -> None:
        return None


def _parse(xml: str) -> ProjectConfig:
    controls, objects = _read(xml)
    image_tags = {name: value.lstrip("$") for name, (tag, value) in objects.items() if tag.lower() == "image"}
    if not image_tags:
        raise ConfigError("labeling config has no <Image> tag")
    brushes = [_BrushIndex(c, image) for c in controls.values()
               if c.tag.lower() == "brushlabels" and (image := _image_of(c, image_tags))]
    if not brushes:
        raise ConfigError("labeling config has no <BrushLabels> tag for an <Image>: SAM's masks need one")
    brush_tags = {b.name: b.image for b in brushes}
    first_brush: dict[str, _BrushIndex] = {}
    for brush in brushes:
        first_brush.setdefault(brush.image, brush)
    prompt_tags = {}
    for control in controls.values():
        kind = PROMPT_TYPES.get(control.tag.lower())
        image = _image_of(control, image_tags) if kind else None
        if not image or image not in first_brush:
            continue
        brush = first_brush[image]
        targets = {sent: target for sent, (value, alias) in control.labels.items()
                   if (target := brush.target(sent, value, alias)) is not None}
        prompt_tags[control.name] = PromptTag(control.name, kind, image, MappingProxyType(targets))
    if not prompt_tags:
        raise ConfigError("labeling config has no KeyPointLabels or RectangleLabels tag whose labels match "
                          "a BrushLabels label")
    return ProjectConfig(MappingProxyType(image_tags), MappingProxyType(brush_tags),
                         MappingProxyType(prompt_tags), _output_tags(controls.values(), image_tags, brushes))


def _image_of(control: _Control, image_tags: Mapping[str, str]) -> str | None:
    return next((name for name in control.to_name if name in image_tags), None)


class _BrushIndex:
    """One BrushLabels tag's labels, indexed so that a prompt label resolves in constant time.

    The brush labels are taken by value (a label without one by the name it is sent as); a later label of the
    same value replaces an earlier one in its place. Rules, in order, for a prompt label sent as `sent`:

    1. a numeric alias `N` or `-N`: the first brush label with alias `N_brush` or value `N` (positive unless `-N`);
    2. the prompt label's value, else `sent`, is a brush label's value;
    3. the first brush label whose alias is the prompt label's value or `sent`.
    """

    def __init__(self, control: _Control, image: str) -> None:
        self.name = control.name
        self.image = image
        aliases: dict[str, str | None] = {}  # brush label value -> its alias, in the brush tag's order
        for sent, (value, alias) in control.labels.items():
            aliases[sent if value is None else value] = alias
        self.values = list(aliases)
        self.position = {value: index for index, value in enumerate(self.values)}
        self.first_alias: dict[str, int] = {}
        for index, alias in enumerate(aliases.values()):
            if alias is not None:
                self.first_alias.setdefault(alias, index)
        # Target of each brush label, positive and negative, made once and shared by every prompt tag of the brush
        self._targets = {True: [None] * len(self.values), False: [None] * len(self.values)}

    def target(self, sent: str, value: str | None, alias: str | None) -> Target | None:
        """The target of a prompt label sent as `sent` with XML attributes value and alias (None: absent)."""
        if alias is not None and NUMERIC_ALIAS.match(alias):
            number = alias.lstrip("-")
            found = _first(self.first_alias.get(number + "_brush"), self.position.get(number))
            if found is not None:
                return self._target(found, positive=not alias.startswith("-"))
        value = sent if value is None else value
        for candidate in (value, sent):
            found = self.position.get(candidate)
            if found is not None:
                return self._target(found, positive=True)
        found = _first(self.first_alias.get(value), self.first_alias.get(sent))
        return None if found is None else self._target(found, positive=True)

    def _target(self, index: int, positive: bool) -> Target:
        made = self._targets[positive]
        target = made[index]
        if target is None:
            target = made[index] = Target(self.name, self.values[index], positive)
        return target


def _first(a: int | None, b: int | None) -> int | None:
    """The smaller of two positions, either of which may be None."""
    if a is None:
        return b
    return a if b is None or a < b else b


#: control tag (lower case) -> result type of the tags a mask's outline can be written into
OUTPUT_TYPES = {"polygonlabels": "polygonlabels", "rectanglelabels": "rectanglelabels"}


def _output_tags(controls, image_tags: Mapping[str, str], brushes: list[_BrushIndex]) -> Mapping[str, OutputTag]:
    """PolygonLabels / RectangleLabels tags of an image, with their labels that match that image's brush labels.

    A RectangleLabels tag is usually also a prompt tag; results.py writes into it only when OUT_BBOX is on.
    """
    tags = {}
    for control in controls:
        image = _image_of(control, image_tags)
        if control.tag.lower() not in OUTPUT_TYPES or not image:
            continue
        labels = {}
        for brush in (b for b in brushes if b.image == image):
            for sent, (value, alias) in control.labels.items():
                target = brush.target(sent, value, alias)
                if target is not None and target.positive:
                    labels.setdefault((target.brush_tag, target.label), sent if value is None else value)
        tags[control.name] = OutputTag(control.name, OUTPUT_TYPES[control.tag.lower()], image,
                                       MappingProxyType(labels))
    return MappingProxyType(tags)
