"""labelstudio.context: Label Studio's interactive context and drafts as Regions, and the 4xx errors that name
the field of a malformed one."""
from __future__ import annotations

import copy

import pytest

from sam_backend.errors import ClientError, ConfigError, ContextError
from sam_backend.labelstudio import context, label_config
from tools.harness import recordings

CALLS = recordings.document()["calls"]


def recorded(name: str) -> dict:
    return copy.deepcopy(next(c["body"] for c in CALLS if c["name"] == name and c["path"] == "/predict"))


NATIVE = recorded("keypoints_positive_and_negative")["label_config"]
ALIASES = recorded("alias_rectangle")["label_config"]


def keypoint(x=40.0, y=45.0, label="Cat", from_name="tag2", **extra) -> dict:
    return {"id": "k", "type": "keypointlabels", "from_name": from_name, "to_name": "image",
            "value": {"x": x, "y": y, "width": 0.5, "keypointlabels": [label]}, **extra}


def rectangle(x=10.0, y=5.0, width=60.0, height=90.0, label="Cat", **extra) -> dict:
    return {"id": "r", "type": "rectanglelabels", "from_name": "tag3", "to_name": "image",
            "value": {"x": x, "y": y, "width": width, "height": height, "rotation": 0, "rectanglelabels": [label]},
            **extra}


def parse(*raw: dict, xml: str = NATIVE) -> list[context.Region]:
    return context.parse_context({"result": list(raw)}, label_config.parse(xml))


# ---- what Label Studio sends ------------------------------------------------------------------------------
def test_no_context_means_no_prompt():
    config = label_config.parse(NATIVE)
    assert context.parse_context(None, config) == []
    assert context.parse_context({"result": None}, config) == []
    assert context.parse_context({}, config) == []


def test_recorded_native_clicks_positive_and_alt_click_negative():
    body = recorded("keypoints_positive_and_negative")
    positive, negative = context.parse_context(body["params"]["context"], label_config.parse(body["label_config"]))
    assert (positive.id, positive.type, positive.group) == ("05b3000e92", "keypointlabels", ("tag2", "Cat"))
    assert positive.positive and not negative.positive
    assert positive.target_key == negative.target_key == ("tag", "Cat")
    assert (positive.x, positive.y, negative.x, negative.y) == (40, 45, 90, 10)
    assert positive.original_size == (451, 300)


def test_recorded_alias_labels_mean_positive_or_negative_and_a_brush_label():
    config = label_config.parse(ALIASES)
    (negative,) = context.parse_context(recorded("alias_negative_keypoint_alone")["params"]["context"], config)
    assert negative.group == ("tag2", "-1") and negative.target_key == ("brush", "1")
    assert not negative.positive  # is_positive is true in the body: the alias decides
    (box,) = context.parse_context(recorded("alias_rectangle")["params"]["context"], config)
    assert box.type == "rectanglelabels" and box.target_key == ("brush", "1") and box.positive
    assert (box.x, box.y, box.width, box.height, box.rotation) == (10, 5, 60, 90, 0)


def test_a_plain_keypoint_without_labels_or_is_positive():
    """The plain KeyPoint tool's first region carries neither `labels` nor `is_positive`."""
    plain, smart = context.parse_context(recorded("plain_tool_keypoint")["params"]["context"],
                                         label_config.parse(NATIVE))
    assert plain.positive and smart.positive and plain.target_key == smart.target_key == ("tag", "Cat")


def test_a_region_without_an_id_is_named_by_its_place():
    raw = keypoint()
    del raw["id"]
    assert parse(raw)[0].id == "params.context.result[0]"


def test_coordinates_a_little_beyond_the_image_are_accepted():
    (region,) = parse(keypoint(x=-10, y=110))
    assert (region.x, region.y) == (-10, 110)
    (box,) = parse(rectangle(x=50, width=60))  # right edge at 110 %
    assert box.width == 60


# ---- errors naming the field ------------------------------------------------------------------------------
@pytest.mark.parametrize("raw, status, words", [
    (keypoint(x="40"), 400, "params.context.result[0].value.x must be a number, got str"),
    (keypoint(y=None), 400, "params.context.result[0].value.y must be a number, got NoneType"),
    (keypoint(x=True), 400, "value.x must be a number, got bool"),
    (keypoint(x=float("inf")), 400, "value.x must be finite"),
    (keypoint(x=10 ** 400), 400, "value.x must be finite, got an integer beyond any float"),
    (keypoint(x=111), 400, "value.x is 111: outside the image"),
    (rectangle(width=0), 400, "a rectangle needs a positive width and height, got 0.0x90.0"),
    (rectangle(x=50, width=61), 400, "value.width: the right edge, x + width, is 111"),
    (rectangle(y=50, height=61), 400, "value.height: the bottom edge, y + height, is 111"),
    ({**keypoint(), "type": "brushlabels"}, 400, "result[0].type is 'brushlabels'"),
    ({**keypoint(), "from_name": 3}, 400, "result[0].from_name must be a string"),
    ({**keypoint(), "value": []}, 400, "result[0].value must be an object"),
    ({**keypoint(), "value": {"x": 1, "y": 1, "keypointlabels": []}}, 400,
     "value.keypointlabels must be a non-empty list of label strings"),
    (keypoint(is_positive="yes"), 400, "result[0].is_positive must be true or false"),
    (keypoint(original_width=0, original_height=300), 400, "original_width and original_height must be positive"),
    (keypoint(original_width="451", original_height=300), 400, "result[0].original_width must be a number"),
    (keypoint(from_name="tag3"), 400, "from_name 'tag3' is a rectanglelabels tag, not keypointlabels"),
    (keypoint(from_name="nope"), 422, "from_name 'nope' is not a KeyPointLabels or RectangleLabels tag"),
    (keypoint(label="Bird"), 422, "label 'Bird' of 'tag2' has no BrushLabels label"),
    ("a string", 400, "params.context.result[0] must be an object"),
])
def test_malformed_regions_are_refused_naming_the_field(raw, status, words):
    with pytest.raises(ClientError) as caught:
        parse(raw)
    assert caught.value.status == status
    assert isinstance(caught.value, ConfigError if status == 422 else ContextError)
    assert words in caught.value.message


def test_a_malformed_context_is_refused():
    config = label_config.parse(NATIVE)
    with pytest.raises(ContextError, match="params.context must be an object or null"):
        context.parse_context([], config)
    with pytest.raises(ContextError, match="params.context.result must be a list"):
        context.parse_context({"result": {}}, config)


def test_too_many_regions_are_refused_before_parsing_them():
    with pytest.raises(ContextError, match=f"{context.MAX_REGIONS + 1} regions; at most {context.MAX_REGIONS}"):
        context.parse_context({"result": [None] * (context.MAX_REGIONS + 1)}, label_config.parse(NATIVE))


def test_too_many_objects_in_one_call_are_refused():
    labels = [f"L{i}" for i in range(context.MAX_OBJECTS + 1)]
    xml = ("<View><Image name='image' value='$image'/><BrushLabels name='tag' toName='image'>"
           + "".join(f"<Label value='{v}'/>" for v in labels) + "</BrushLabels>"
           "<KeyPointLabels name='tag2' toName='image'>"
           + "".join(f"<Label value='{v}'/>" for v in labels) + "</KeyPointLabels></View>")
    assert len(parse(*[keypoint(label=v, id=v) for v in labels[:-1]], xml=xml)) == context.MAX_OBJECTS
    with pytest.raises(ContextError, match=f"{context.MAX_OBJECTS + 1} objects .* at most {context.MAX_OBJECTS}"):
        parse(*[keypoint(label=v, id=v) for v in labels], xml=xml)


# ---- drafts -----------------------------------------------------------------------------------------------
def test_draft_regions_come_from_the_newest_draft_and_skip_what_is_not_ours():
    config = label_config.parse(NATIVE)
    task = recorded("keypoint_with_rectangle_in_draft")["tasks"][0]
    assert [(r.id, r.type) for r in context.draft_regions(task, config)] == [
        ("c02f9ce24a", "rectanglelabels"), ("bedd9aeba8", "keypointlabels")]
    brush = {"id": "b", "type": "brushlabels", "from_name": "tag", "value": {"rle": [1], "brushlabels": ["Cat"]}}
    older = {"result": [keypoint(id="old")]}
    newest = {"result": [brush, keypoint(label="Bird", id="bird"), keypoint(x="bad", id="bad"), keypoint(id="ok")]}
    assert [r.id for r in context.draft_regions({"drafts": [older, newest]}, config)] == ["ok"]
    for drafts in (None, [], "x", [None], [{"result": None}], [{"result": "x"}]):
        assert context.draft_regions({"drafts": drafts}, config) == []
    assert context.draft_regions({}, config) == []


def test_draft_author_is_the_user_the_newest_draft_names():
    task = recorded("keypoint_with_rectangle_in_draft")["tasks"][0]
    assert context.draft_author(task) == "e2e@example.com"  # as a real Label Studio 1.23 sends it
    assert context.draft_author({"drafts": [{"user": "old@x"}, {"user": "new@x"}]}) == "new@x"
    for drafts in (None, [], "x", [None], [{"result": []}], [{"user": 7}], [{"user": ""}]):
        assert context.draft_author({"drafts": drafts}) is None


# ---- the image's size -------------------------------------------------------------------------------------
def test_check_sizes_refuses_a_context_drawn_on_another_image():
    regions = parse(keypoint(id="a", original_width=451, original_height=300), keypoint(id="b"))
    context.check_sizes(regions, (300, 451), "img")
    context.check_sizes(regions, (301, 450), "img")  # a pixel of rounding
    with pytest.raises(ContextError) as caught:
        context.check_sizes(regions, (300, 453), "http://host/cat.jpg")
    assert caught.value.status == 400
    assert caught.value.message == ("region a was drawn on a 451x300 image, but the task's image "
                                    "http://host/cat.jpg is 453x300")
