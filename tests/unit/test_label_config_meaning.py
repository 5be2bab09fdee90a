"""labelstudio.label_config: what a labeling config means to the backend (image, brush tag, prompt labels of
both conventions, output tags), and the 422s for configs it cannot serve."""
from __future__ import annotations


import pytest

from sam_backend.errors import ConfigError
from sam_backend.labelstudio import label_config
from sam_backend.labelstudio.label_config import Target
from tools.harness import recordings

CALLS = recordings.document()["calls"]
NATIVE = next(c["body"]["label_config"] for c in CALLS if c["name"] == "keypoints_positive_and_negative")
ALIASES = next(c["body"]["label_config"] for c in CALLS if c["name"] == "alias_rectangle")


def test_the_recorded_native_config():
    config = label_config.parse(NATIVE)
    assert dict(config.image_tags) == {"image": "image"} and dict(config.brush_tags) == {"tag": "image"}
    assert {name: (tag.type, tag.to_name) for name, tag in config.prompt_tags.items()} == {
        "tag2": ("keypointlabels", "image"), "tag3": ("rectanglelabels", "image")}
    for name in ("tag2", "tag3"):
        assert dict(config.prompt_tags[name].targets) == {"Cat": Target("tag", "Cat", True),
                                                          "Dog": Target("tag", "Dog", True)}
    assert config.target("tag2", "Dog") == Target("tag", "Dog", True)


def test_the_recorded_alias_config():
    """Keypoint aliases N / -N are class N's positive / negative clicks; class N's brush label is the one with
    alias N_brush. Label Studio sends the alias, so the targets are keyed by it."""
    config = label_config.parse(ALIASES)
    assert dict(config.prompt_tags["tag2"].targets) == {
        "1": Target("brush", "1", True), "-1": Target("brush", "1", False),
        "2": Target("brush", "2", True), "-2": Target("brush", "2", False)}
    assert dict(config.prompt_tags["tag4"].targets) == {"1": Target("brush", "1", True),
                                                        "2": Target("brush", "2", True)}
    assert config.prompt_tags["tag2"].type == "keypointlabels"  # <KeypointLabels>, as the seed spells it
    assert config.output_tag("rectanglelabels", "image", ("brush", "1")) == ("tag4", "[1]")


def test_numeric_alias_finds_a_brush_label_by_value_too():
    xml = """<View><Image name="image" value="$image"/>
      <BrushLabels name="brush" toName="image"><Label value="3"/></BrushLabels>
      <KeyPointLabels name="kp" toName="image"><Label value="plus" alias="3"/><Label value="minus" alias="-3"/>
      </KeyPointLabels></View>"""
    targets = dict(label_config.parse(xml).prompt_tags["kp"].targets)
    assert targets == {"3": Target("brush", "3", True), "-3": Target("brush", "3", False)}


def test_each_prompt_tag_draws_into_the_brush_tag_of_its_image():
    xml = """<View><Image name="a" value="$first"/><Image name="b" value="$second"/>
      <BrushLabels name="ba" toName="a"><Label value="Cat"/></BrushLabels>
      <BrushLabels name="bb" toName="b"><Label value="Cat"/><Label value="Dog" alias="D"/></BrushLabels>
      <KeyPointLabels name="ka" toName="a"><Label value="Cat"/><Label value="Bird"/></KeyPointLabels>
      <RectangleLabels name="rb" toName="b"><Label value="Cow" alias="D"/></RectangleLabels>
      <PolygonLabels name="pb" toName="b"><Label value="Cat"/></PolygonLabels></View>"""
    config = label_config.parse(xml)
    assert dict(config.image_tags) == {"a": "first", "b": "second"}
    assert dict(config.prompt_tags["ka"].targets) == {"Cat": Target("ba", "Cat", True)}  # no brush label Bird
    assert dict(config.prompt_tags["rb"].targets) == {"D": Target("bb", "Dog", True)}  # by the brush alias
    assert config.output_tag("polygonlabels", "b", ("bb", "Cat")) == ("pb", "Cat")
    assert config.output_tag("polygonlabels", "a", ("ba", "Cat")) is None  # another image
    assert config.output_tag("polygonlabels", "b", ("bb", "Dog")) is None  # no label for the class
    assert config.output_tag("rectanglelabels", "b", ("bb", "Dog")) == ("rb", "Cow")


def test_unknown_tags_and_labels_are_422s_naming_them():
    config = label_config.parse(NATIVE)
    with pytest.raises(ConfigError) as caught:
        config.target("tag", "Cat")  # the brush tag is no prompt tag
    assert caught.value.status == 422
    assert "from_name 'tag' is not a KeyPointLabels or RectangleLabels tag" in caught.value.message
    assert "['tag2', 'tag3']" in caught.value.message
    with pytest.raises(ConfigError, match="label 'Bird' of 'tag2' has no BrushLabels label to draw"):
        config.target("tag2", "Bird")


@pytest.mark.parametrize("xml, words", [
    ("<View", "labeling config does not parse"),
    ("<View><Text name='t' value='$text'/></View>", "no <Image> tag"),
    ("<View><Image name='image' value='$image'/><KeyPointLabels name='k' toName='image'><Label value='A'/>"
     "</KeyPointLabels></View>", "no <BrushLabels> tag for an <Image>"),
    ("<View><Image name='image' value='$image'/><BrushLabels name='b' toName='image'><Label value='A'/>"
     "</BrushLabels></View>", "no KeyPointLabels or RectangleLabels tag whose labels match a BrushLabels label"),
])
def test_configs_the_backend_cannot_serve(xml, words):
    with pytest.raises(ConfigError) as caught:
        label_config.parse(xml)
    assert caught.value.status == 422 and words in caught.value.message


def test_a_prompt_tag_without_matching_labels_is_refused_when_used():
    """It still counts as a prompt tag at parse time (its labels have no targets); a click with one of its
    labels is refused by `target`."""
    config = label_config.parse("<View><Image name='image' value='$image'/><BrushLabels name='b' toName='image'>"
                                "<Label value='A'/></BrushLabels><KeyPointLabels name='k' toName='image'>"
                                "<Label value='B'/></KeyPointLabels></View>")
    assert dict(config.prompt_tags["k"].targets) == {}
    with pytest.raises(ConfigError, match="label 'B' of 'k' has no BrushLabels label"):
        config.target("k", "B")


def test_parsing_is_cached():
    assert label_config.parse(NATIVE) is label_config.parse(NATIVE)
