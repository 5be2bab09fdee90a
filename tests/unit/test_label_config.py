"""label_config.parse: the same meaning as label_studio_sdk's LabelInterface gave, in linear time, bounded in size.

`reference_parse` is the implementation this module had before issue #11 (LabelInterface plus a label-by-label
search, quadratic in the number of labels), kept verbatim as the oracle: every config here, and every config
hypothesis makes up from the tags, names and aliases that matter, must mean the same to both, or fail with the same
message.
"""
from __future__ import annotations

import json
import re
from types import MappingProxyType
from typing import Mapping

import pytest
from hypothesis import HealthCheck, given, settings as hypothesis_settings, strategies as st
from label_studio_sdk.label_interface import LabelInterface

from sam_backend.errors import ConfigError
from sam_backend.labelstudio import label_config
from sam_backend.labelstudio.label_config import OutputTag, ProjectConfig, PromptTag, Target
from sam_backend.settings import Settings
from tools import bench_config
from tools.harness.recordings import FOLDER as RECORDINGS


# ---- the oracle: the module as it was (LabelInterface, one label at a time) ---------------------------------
def reference_parse(xml: str) -> ProjectConfig:
    try:
        interface = LabelInterface(xml)
    except Exception as error:
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
        if control.tag.lower() not in label_config.PROMPT_TYPES or not _image_of(control, image_tags):
            continue
        image = _image_of(control, image_tags)
        brush = next((b for b in brushes if brush_tags[b.name] == image), None)
        if brush is None:
            continue
        targets = {sent: target for sent, attrs in (control.labels_attrs or {}).items()
                   if (target := _target_of(sent, attrs.attr, brush)) is not None}
        prompt_tags[control.name] = PromptTag(control.name, label_config.PROMPT_TYPES[control.tag.lower()], image,
                                              MappingProxyType(targets))
    if not prompt_tags:
        raise ConfigError("labeling config has no KeyPointLabels or RectangleLabels tag whose labels match "
                          "a BrushLabels label")
    return ProjectConfig(MappingProxyType(image_tags), MappingProxyType(brush_tags),
                         MappingProxyType(prompt_tags), _output_tags(interface.controls, image_tags, brushes))


def _image_of(control, image_tags: Mapping[str, str]) -> str | None:
    return next((name for name in control.to_name if name in image_tags), None)


def _target_of(sent: str, attrs: Mapping[str, str], brush) -> Target | None:
    brush_labels = {a.attr.get("value", key): a.attr for key, a in (brush.labels_attrs or {}).items()}
    alias = attrs.get("alias")
    if alias is not None and label_config.NUMERIC_ALIAS.match(alias):
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


def _output_tags(controls, image_tags: Mapping[str, str], brushes) -> Mapping[str, OutputTag]:
    tags = {}
    for control in controls:
        image = _image_of(control, image_tags)
        if control.tag.lower() not in label_config.OUTPUT_TYPES or not image:
            continue
        labels = {}
        for brush in (b for b in brushes if _image_of(b, image_tags) == image):
            for sent, attrs in (control.labels_attrs or {}).items():
                target = _target_of(sent, attrs.attr, brush)
                if target is not None and target.positive:
                    labels.setdefault((target.brush_tag, target.label), attrs.attr.get("value", sent))
        tags[control.name] = OutputTag(control.name, label_config.OUTPUT_TYPES[control.tag.lower()], image,
                                       MappingProxyType(labels))
    return MappingProxyType(tags)


# ---- comparing the two --------------------------------------------------------------------------------------
def ordered(config: ProjectConfig) -> tuple:
    """Everything in a parse, in its order (dict equality alone would not see a change of order)."""
    return (tuple(config.image_tags.items()), tuple(config.brush_tags.items()),
            tuple((name, tag.type, tag.to_name, tuple(tag.targets.items()))
                  for name, tag in config.prompt_tags.items()),
            tuple((name, tag.type, tag.to_name, tuple(tag.labels.items()))
                  for name, tag in config.output_tags.items()))


def outcome(parse, xml: str) -> tuple:
    try:
        return "parsed", ordered(parse(xml))
    except ConfigError as error:
        return "refused", error.status, error.message


def new_parse(xml: str) -> ProjectConfig:
    label_config.clear_cache()
    return label_config.parse(xml)


def assert_same_meaning(xml: str) -> None:
    assert outcome(new_parse, xml) == outcome(reference_parse, xml), xml


def recorded_configs() -> list[str]:
    found: set[str] = set()

    def walk(value):
        if isinstance(value, dict):
            for key, item in value.items():
                if key in ("label_config", "schema") and isinstance(item, str):
                    found.add(item)
                else:
                    walk(item)
        elif isinstance(value, list):
            for item in value:
                walk(item)

    for path in sorted(RECORDINGS.glob("*.json")):
        walk(json.loads(path.read_text()))
    return sorted(found)


def readme_configs() -> list[str]:
    readme = (RECORDINGS.parents[2] / "README.md").read_text()
    return re.findall(r"```xml\n(.*?)```", readme, re.DOTALL)


IMAGE = '<Image name="image" value="$image"/>'
EDGE_CASES = {
    "nested views": f'<View>{IMAGE}<View><BrushLabels name="b" toName="image"><View><Label value="A"/></View>'
                    '</BrushLabels></View><KeyPointLabels name="k" toName="image"><Label value="A"/>'
                    '</KeyPointLabels></View>',
    "alias without brush alias": f'<View>{IMAGE}<BrushLabels name="b" toName="image"><Label value="1"/>'
                                 '</BrushLabels><KeyPointLabels name="k" toName="image">'
                                 '<Label value="x" alias="-1"/></KeyPointLabels></View>',
    "two brushes, second image": '<View><Image name="a" value="$a"/><Image name="c" valueList="$c"/>'
                                 '<BrushLabels name="b1" toName="c"><Label value="A"/></BrushLabels>'
                                 '<BrushLabels name="b2" toName="a,c"><Label value="A"/></BrushLabels>'
                                 '<KeypointLabels name="k" toName="c,a"><Label value="A"/></KeypointLabels>'
                                 '<PolygonLabels name="p" toName="a"><Label value="A"/><Label value="B"/>'
                                 '</PolygonLabels></View>',
    "duplicate names and values": f'<View>{IMAGE}<BrushLabels name="b" toName="image">'
                                  '<Label value="A" alias="2_brush"/><Label value="A" alias="z"/>'
                                  '<Label alias="A" value="q"/></BrushLabels>'
                                  '<KeyPointLabels name="k" toName="image"><Label value="z"/>'
                                  '<Label value="q" alias="2"/></KeyPointLabels>'
                                  '<KeyPointLabels name="k" toName="image"><Label value="A"/></KeyPointLabels></View>',
    "comments and entities": f'<!DOCTYPE View [<!ENTITY c "Cat">]><View><!-- a comment -->{IMAGE}'
                             '<BrushLabels name="b" toName="image"><Label value="&c;"/></BrushLabels>'
                             '<RectangleLabels name="r" toName="image"><Label value="Cat"/></RectangleLabels></View>',
    "external entity": '<!DOCTYPE View [<!ENTITY x SYSTEM "file:///etc/passwd">]><View><Image name="image" '
                       'value="$image"/><BrushLabels name="b" toName="image"><Label value="&x;"/></BrushLabels></View>',
    "encoding declaration": '<?xml version="1.0" encoding="UTF-8"?><View/>',
    "not XML": "<View",
    "no image": '<View><Text name="t" value="$t"/></View>',
    "label outside a control": f'<View>{IMAGE}<Label value="A"/><BrushLabels name="b" toName="image"/></View>',
    "filter and choices": f'<View>{IMAGE}<Filter name="f" toName="b"/><BrushLabels name="b" toName="image">'
                          '<Choice value="A"/><Relation value="B"/><label value="C"/></BrushLabels>'
                          '<KeyPointLabels name="k" toName="image"><Choice value="A"/><Label value="B"/>'
                          '<Label value="C"/></KeyPointLabels></View>',
    "empty alias and value": f'<View>{IMAGE}<BrushLabels name="b" toName="image"><Label value="" alias=""/>'
                             '<Label alias="" value="A"/></BrushLabels><KeyPointLabels name="k" toName="image">'
                             '<Label value=""/><Label alias="A"/></KeyPointLabels></View>',
    "chat beside": f'<View>{IMAGE}<Chat name="c" value="$chat"/><BrushLabels name="b" toName="image"><Label value="A"/>'
                   '</BrushLabels><KeyPointLabels name="k" toName="image"><Label value="A"/></KeyPointLabels></View>',
    "numeric alias with a newline": f'<View>{IMAGE}<BrushLabels name="b" toName="image"><Label value="1&#10;"/>'
                                    '</BrushLabels><KeyPointLabels name="k" toName="image"><Label value="x" '
                                    'alias="1&#10;"/></KeyPointLabels></View>',
}


@pytest.mark.parametrize("xml", recorded_configs() + readme_configs(), ids=lambda xml: f"{len(xml)}-chars")
def test_recorded_and_documented_configs_mean_what_they_meant(xml):
    assert outcome(new_parse, xml)[0] == "parsed"
    assert_same_meaning(xml)


@pytest.mark.parametrize("name", list(EDGE_CASES))
def test_edge_cases_mean_what_they_meant(name):
    assert_same_meaning(EDGE_CASES[name])


@pytest.mark.parametrize("shape", list(bench_config.SHAPES))
def test_large_generated_configs_mean_what_they_meant(shape):
    assert_same_meaning(bench_config.SHAPES[shape](300))


def test_processing_instructions_are_ignored():
    """The one deliberate difference: the SDK took a processing instruction's pseudo-attributes for a tag's and
    then failed on its tag name, so such a config was refused as "does not parse"; now it is read without it."""
    xml = EDGE_CASES["nested views"].replace("<View>", '<View><?pi name="x" value="$y"?>', 1)
    assert outcome(reference_parse, xml)[0] == "refused"
    assert ordered(new_parse(xml)) == ordered(new_parse(EDGE_CASES["nested views"]))


# ---- made-up configs from the parts that matter -------------------------------------------------------------
WORDS = st.sampled_from(["1", "2", "-1", "-2", "1_brush", "2_brush", "Cat", "Dog", "(+1)", "[2]", "", "x"])
OPTIONAL_WORD = st.one_of(st.none(), WORDS)
LABEL = st.tuples(st.sampled_from(["Label", "Label", "Label", "Choice", "label"]), OPTIONAL_WORD, OPTIONAL_WORD,
                  st.booleans())
CONTROL = st.tuples(
    st.sampled_from(["BrushLabels", "brushlabels", "KeyPointLabels", "KeypointLabels", "RectangleLabels",
                     "PolygonLabels", "Choices", "Filter"]),
    st.sampled_from(["b", "k", "r", "p", "image"]),
    st.sampled_from(["image", "img2", "image,img2", "img2,image", "nope"]),
    st.lists(LABEL, max_size=6),
    st.booleans())
IMAGES = st.lists(st.tuples(st.sampled_from(["image", "img2", "k"]), st.sampled_from(["value", "valueList"]),
                            st.sampled_from(["$image", "$other", ""])), min_size=0, max_size=2)
#: most made-up configs have what a served config has (an image, a brush tag and a prompt tag for it) and vary
#: the labels; the rest vary the tags too
SERVABLE = st.tuples(
    st.tuples(st.sampled_from(["BrushLabels", "brushlabels"]), st.just("b"), st.just("image"),
              st.lists(LABEL, min_size=1, max_size=6), st.booleans()),
    st.tuples(st.sampled_from(["KeyPointLabels", "RectangleLabels", "KeypointLabels"]), st.just("k"),
              st.sampled_from(["image", "img2,image"]), st.lists(LABEL, min_size=1, max_size=6), st.booleans()))


def attribute(name: str, value: str | None) -> str:
    return "" if value is None else f' {name}="{value}"'


def made_up(images, controls) -> str:
    parts = [f'<Image name="{name}" {key}="{value}"/>' for name, key, value in images]
    for tag, name, to_name, labels, wrapped in controls:
        inner = "".join(f"<{label}{attribute('value', value)}{attribute('alias', alias)}/>"
                        + ("<!-- c -->" if comment else "") for label, value, alias, comment in labels)
        if wrapped:
            inner = f"<View>{inner}</View>"
        parts.append(f'<{tag} name="{name}" toName="{to_name}">{inner}</{tag}>')
    return "<View>" + "".join(parts) + "</View>"


@hypothesis_settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(IMAGES, st.lists(CONTROL, max_size=6))
def test_made_up_configs_mean_what_they_meant(images, controls):
    assert_same_meaning(made_up(images, controls))


@hypothesis_settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(IMAGES, SERVABLE, st.lists(CONTROL, max_size=3), st.randoms(use_true_random=False))
def test_made_up_servable_configs_mean_what_they_meant(images, servable, controls, random):
    controls = [*servable, *controls]
    random.shuffle(controls)
    assert_same_meaning(made_up([("image", "value", "$image"), *images], controls))


# ---- limits ---------------------------------------------------------------------------------------------------
def test_settings_defaults_are_the_parse_defaults():
    defaults = Settings()
    assert defaults.max_label_config_bytes == label_config.MAX_BYTES
    assert defaults.max_labels == label_config.MAX_LABELS


def test_limits_are_read_from_the_environment_and_checked():
    from sam_backend.settings import from_environment

    read = from_environment({"MAX_LABEL_CONFIG_BYTES": "1048576", "MAX_LABELS": "20000"})
    assert (read.max_label_config_bytes, read.max_labels) == (1 << 20, 20_000)
    for variable in ("MAX_LABEL_CONFIG_BYTES", "MAX_LABELS"):
        with pytest.raises(ValueError, match=variable):
            from_environment({variable: "0"})


def test_a_ten_thousand_class_config_fits_the_default_limits():
    for shape in bench_config.SHAPES.values():
        xml = shape(10_000)
        assert len(xml.encode()) < label_config.MAX_BYTES / 2
        assert len(label_config.LABEL_START.findall(xml)) <= label_config.MAX_LABELS / 2


def test_too_many_bytes_is_refused_before_parsing(monkeypatch):
    def no_parse(xml):
        raise AssertionError("parsed a config over the limit")

    monkeypatch.setattr(label_config, "_parse", no_parse)
    label_config.clear_cache()
    xml = bench_config.native_config(50)
    for limit in (len(xml) - 1, len(xml) // 3):  # past the limit by one byte, and by more than its characters
        with pytest.raises(ConfigError) as raised:
            label_config.parse(xml, max_bytes=limit)
        assert raised.value.status == 413 and f"MAX_LABEL_CONFIG_BYTES={limit}" in raised.value.message
    multibyte = xml.replace("Class", "Klaß")  # limits are in UTF-8 bytes, not characters
    with pytest.raises(ConfigError, match=f"{len(multibyte.encode())} bytes"):
        label_config.parse(multibyte, max_bytes=len(multibyte))


def test_too_many_labels_is_refused_before_parsing_and_on_a_cache_hit(monkeypatch):
    xml = bench_config.native_config(50)  # 150 labels
    label_config.clear_cache()
    parsed = label_config.parse(xml, max_labels=150)
    with pytest.raises(ConfigError) as raised:  # cached, but served only within the caller's limit
        label_config.parse(xml, max_labels=149)
    assert raised.value.status == 413 and "150 labels" in raised.value.message
    assert "MAX_LABELS=149" in raised.value.message
    monkeypatch.setattr(label_config, "_parse", lambda xml: pytest.fail("parsed a config over the limit"))
    label_config.clear_cache()
    with pytest.raises(ConfigError, match="MAX_LABELS=10"):
        label_config.parse(xml, max_labels=10)
    assert parsed.prompt_tags["tag2"].targets["Class 49"] == Target("tag", "Class 49", True)


def test_lone_surrogates_are_a_parse_error_not_a_crash():
    with pytest.raises(ConfigError, match="does not parse"):
        label_config.parse(EDGE_CASES["nested views"].replace("A", "\ud800"))


# ---- the cache ------------------------------------------------------------------------------------------------
def test_cache_is_bounded_by_bytes_and_keyed_by_digest(monkeypatch):
    monkeypatch.setattr(label_config, "CACHE_BYTES", 1_000_000)
    label_config.clear_cache()
    configs = [bench_config.native_config(400).replace("Class", f"C{i}x") for i in range(12)]  # 1,200 labels each
    size = label_config._footprint(len(configs[0].encode()), 1200)
    assert 240_000 < size < 260_000  # 50 KB of XML, and what its parse holds beyond that
    parsed = [label_config.parse(xml) for xml in configs]
    cache = label_config._cache
    assert cache.nbytes <= 1_000_000 and len(cache) == 1_000_000 // size < len(configs)
    assert all(isinstance(key, bytes) and len(key) == 32 for key in cache._items)  # digests: no XML held twice
    assert label_config.parse(configs[-1]) is parsed[-1]  # the newest are kept
    assert label_config.parse(configs[0]) is not parsed[0]  # the oldest went
    label_config.clear_cache()


def test_footprint_bounds_what_a_parse_holds():
    """The cache's measure of an entry is at least the memory the parse keeps (tracemalloc), small or large."""
    import gc
    import tracemalloc

    for xml in [*readme_configs(), bench_config.native_config(2000), bench_config.alias_config(2000)]:
        label_config._parse(xml)  # first-use allocations (interned strings, regex) are not the parse's
        gc.collect()
        tracemalloc.start()
        try:
            parsed = label_config._parse(xml)
            gc.collect()
            held = tracemalloc.get_traced_memory()[0]
        finally:
            tracemalloc.stop()
        estimate = label_config._footprint(len(xml.encode()), len(label_config.LABEL_START.findall(xml)))
        assert held <= estimate < 3 * held + 8192, (held, estimate)
        del parsed


def test_one_parse_at_a_time_and_one_per_config(monkeypatch):
    """Concurrent misses of the same config parse it once; parses never overlap."""
    import threading
    import time

    running, most, calls = [0], [0], []
    real = label_config._parse

    def counted(xml):
        running[0] += 1
        most[0] = max(most[0], running[0])
        calls.append(xml)
        time.sleep(0.05)
        try:
            return real(xml)
        finally:
            running[0] -= 1

    monkeypatch.setattr(label_config, "_parse", counted)
    label_config.clear_cache()
    configs = [bench_config.native_config(5)] * 4 + [bench_config.alias_config(5 + i) for i in range(4)]
    threads = [threading.Thread(target=label_config.parse, args=(xml,)) for xml in configs]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert most[0] == 1 and len(calls) == 5
    label_config.clear_cache()
