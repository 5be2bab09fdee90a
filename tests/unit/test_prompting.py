"""labelstudio.prompting: regions of the call, the memory and the draft combined into one SAM prompt per
object class (pixels, clamping, the newest rectangle, finished objects, refinement)."""
from __future__ import annotations

import copy

import numpy as np
import pytest

from sam_backend.errors import ContextError
from sam_backend.labelstudio import context, label_config, prompting
from sam_backend.labelstudio.context import Region
from sam_backend.labelstudio.label_config import Target
from sam_backend.labelstudio.memory import PromptMemory
from sam_backend.settings import Settings
from tests.unit.test_zoom import logits_of
from tools.harness import recordings

CALLS = recordings.document()["calls"]
SIZE = (300, 451)  # (H, W) of the recorded image
CAT, DOG = Target("tag", "Cat", True), Target("tag", "Dog", True)


def recorded(name: str) -> dict:
    return copy.deepcopy(next(c["body"] for c in CALLS if c["name"] == name and c["path"] == "/predict"))


def point(region_id: str, x: float, y: float, positive: bool = True, target: Target = CAT,
          group: str | None = None) -> Region:
    label = group or (target.label if positive else f"-{target.label}")
    return Region(id=region_id, type="keypointlabels", group=("tag2", label), target=target, positive=positive,
                  x=x, y=y)


def box(region_id: str, x: float, y: float, width: float, height: float, rotation: float = 0.0,
        target: Target = CAT) -> Region:
    return Region(id=region_id, type="rectanglelabels", group=("tag3", target.label), target=target,
                  positive=True, x=x, y=y, width=width, height=height, rotation=rotation)


def assemble(body: dict, memory: PromptMemory | None = None, settings: Settings | None = None, size=SIZE):
    config = label_config.parse(body["label_config"])
    task = body["tasks"][0]
    call = context.parse_context(body["params"]["context"], config)
    return prompting.assemble(call, task, config, memory if memory is not None else PromptMemory(),
                              (body["project"], task["id"], task["data"]["image"]), size,
                              settings or Settings())


# ---- build_prompt ------------------------------------------------------------------------------------------
def test_keypoints_in_pixels_with_their_labels():
    prompt = prompting.build_prompt([point("a", 40, 45), point("b", 90, 10, positive=False)], SIZE)
    assert np.allclose(prompt.points, [[0.40 * 451, 0.45 * 300], [0.90 * 451, 0.10 * 300]])
    assert prompt.points.dtype == np.float32 and prompt.labels.dtype == np.int32
    assert prompt.labels.tolist() == [1, 0] and prompt.box is None and prompt.mask_input is None


def test_points_beyond_the_border_are_clamped_onto_it():
    prompt = prompting.build_prompt([point("a", -5, 105)], SIZE)
    assert prompt.points.tolist() == [[0, 300]]


def test_the_newest_rectangle_counts():
    prompt = prompting.build_prompt([box("old", 0, 0, 50, 50), box("new", 10, 5, 60, 90)], SIZE)
    assert np.allclose(prompt.box, [45.1, 15, 315.7, 285])
    assert prompt.points.shape == (0, 2) and prompt.labels.shape == (0,)


def test_a_rectangle_is_clipped_to_the_image():
    prompt = prompting.build_prompt([box("r", 50, 50, 60, 60)], SIZE)
    assert np.allclose(prompt.box, [225.5, 150, 451, 300])


def test_a_rotated_rectangle_gives_its_axis_aligned_box():
    """Rotated by 90 degrees about its top-left corner (Label Studio's pivot), a 20 % wide, 10 % high box
    hangs below and to the left of that corner."""
    prompt = prompting.build_prompt([box("r", 50, 20, 20, 10, rotation=90)], (100, 100))
    assert np.allclose(prompt.box, [40, 20, 50, 40], atol=1e-4)


def test_only_negative_clicks_ask_for_nothing_yet():
    assert prompting.build_prompt([point("n", 10, 10, positive=False)], SIZE) is None
    with_box = prompting.build_prompt([point("n", 10, 10, positive=False), box("r", 0, 0, 50, 50)], SIZE)
    assert with_box.labels.tolist() == [0] and with_box.box is not None


def test_too_many_keypoints_are_refused_naming_max_points():
    with pytest.raises(ContextError, match="4 keypoints for 'Cat'; at most 3 .*MAX_POINTS"):
        prompting.build_prompt([point(str(i), i, i) for i in range(4)], SIZE, max_points=3)


def test_rectangles_outside_the_image_or_under_a_pixel_are_refused():
    with pytest.raises(ContextError, match="rectangle r lies outside the image"):
        prompting.build_prompt([box("r", -10, 0, 5, 50)], SIZE)  # right edge at -5 %
    with pytest.raises(ContextError, match="rectangle r covers less than a pixel of the 451x300 image"):
        prompting.build_prompt([box("r", 10, 10, 0.1, 50)], SIZE)


# ---- combine and drop_finished -----------------------------------------------------------------------------
def test_combine_puts_the_call_last_and_drops_the_drafts_copy_of_its_groups():
    call = [point("a", 1, 1), point("b", 2, 2)]
    remembered = [point("n", 3, 3, positive=False)]
    drafted = [point("a", 1, 1), point("stale", 9, 9), box("r", 0, 0, 50, 50), point("n", 3, 3, positive=False)]
    assert [r.id for r in prompting.combine(call, remembered, drafted)] == ["r", "n", "a", "b"]


def test_combine_prefers_the_calls_copy_of_a_region():
    moved = point("a", 5, 5)
    combined = prompting.combine([moved], [point("a", 1, 1, group="other")], [])
    assert combined == [moved]


def test_a_new_box_around_none_of_the_older_clicks_drops_them():
    older = [point("p", 80, 80), point("n", 85, 85, positive=False)]
    new_box = box("r", 0, 0, 40, 40)
    assert prompting.drop_finished([*older, new_box], {"r"}, SIZE) == [new_box]
    around = box("r", 70, 70, 20, 20)
    assert prompting.drop_finished([*older, around], {"r"}, SIZE) == [*older, around]


def test_new_clicks_outside_the_older_box_drop_it():
    older_box = box("r", 0, 0, 40, 40)
    outside = point("p", 80, 80)
    assert prompting.drop_finished([older_box, outside], {"p"}, SIZE) == [outside]
    inside = point("p", 20, 20)
    assert prompting.drop_finished([older_box, inside], {"p"}, SIZE) == [older_box, inside]
    negative = point("n", 80, 80, positive=False)  # negative clicks say nothing about which object
    assert prompting.drop_finished([older_box, negative], {"n"}, SIZE) == [older_box, negative]


def test_a_rotated_older_box_encloses_by_its_own_axes():
    rotated = box("r", 50, 20, 20, 10, rotation=90)  # covers x 40..50 %, y 20..40 % of a square image
    assert prompting.drop_finished([rotated, point("p", 45, 30)], {"p"}, (100, 100)) == [rotated, point("p", 45, 30)]
    assert prompting.drop_finished([rotated, point("p", 55, 25)], {"p"}, (100, 100)) == [point("p", 55, 25)]


# ---- assemble, with what Label Studio sent ----------------------------------------------------------------
def test_recorded_positive_and_negative_clicks_make_one_prompt():
    ((target, prompt),) = assemble(recorded("keypoints_positive_and_negative"))
    assert target == ("tag", "Cat")
    assert np.allclose(prompt.points, [[180.4, 135], [405.9, 30]]) and prompt.labels.tolist() == [1, 0]
    assert prompt.box is None and prompt.mask_input is None


def test_recorded_rectangle_alone():
    ((target, prompt),) = assemble(recorded("rectangle"))
    assert target == ("tag", "Cat") and np.allclose(prompt.box, [45.1, 15, 315.7, 285])
    assert len(prompt.points) == 0


def test_recorded_clicks_take_the_rectangle_from_the_draft():
    """The draft holds a rectangle and one click of the call's group: the rectangle joins the prompt, the
    click is the call's to give (it sends all of its group)."""
    ((target, prompt),) = assemble(recorded("keypoint_with_rectangle_in_draft"))
    assert np.allclose(prompt.box, [45.1, 15, 315.7, 285])
    assert np.allclose(prompt.points, [[180.4, 135], [225.5, 120]]) and prompt.labels.tolist() == [1, 1]


def test_recorded_alias_clicks_are_combined_across_calls_by_the_memory():
    memory = PromptMemory()
    ((target, first),) = assemble(recorded("alias_positive_keypoint"), memory)
    assert target == ("brush", "1") and first.labels.tolist() == [1]
    ((_, second),) = assemble(recorded("alias_negative_keypoint_alone"), memory)
    assert np.allclose(second.points, [[180.4, 135], [405.9, 30]]) and second.labels.tolist() == [1, 0]
    ((_, third),) = assemble(recorded("alias_rectangle"), memory)
    assert third.labels.tolist() == [1, 0] and np.allclose(third.box, [45.1, 15, 315.7, 285])
    assert third.new_box and not first.new_box and not second.new_box  # the box came after the clicks


def test_after_an_accepted_suggestion_the_next_objects_first_click_is_alone():
    """Alias labels: object A took a `1` and a `-1` click; accepting its suggestion deleted them, and the first
    `1` click on the next object of the class comes without A's clicks: its prompt is that click alone, also
    when the draft still holds A's clicks."""
    for drafted in (False, True):
        memory = PromptMemory()
        first, negative = recorded("alias_positive_keypoint"), recorded("alias_negative_keypoint_alone")
        assemble(first, memory)
        assemble(negative, memory)
        next_object = recorded("alias_positive_keypoint")
        click = next_object["params"]["context"]["result"][0]
        next_object["params"]["context"]["result"][0] = dict(click, id="next", value=dict(click["value"], x=90, y=10))
        if drafted:
            next_object["tasks"][0]["drafts"] = [{"result": first["params"]["context"]["result"]
                                                  + negative["params"]["context"]["result"]}]
        ((_, prompt),) = assemble(next_object, memory)
        assert np.allclose(prompt.points, [[405.9, 30]]) and prompt.labels.tolist() == [1]


def test_two_annotators_on_one_task_keep_their_own_alias_clicks():
    """A's `1` and `-1` clicks (autosaved, so the draft names A), then B's first clicks on the same task without a
    draft: B's `-1` click gets none of A's clicks (alone it asks for nothing), B's `1` click is alone, and A's
    next `1` click still comes with A's `-1`, which A's draft (an action behind) does not show."""
    memory = PromptMemory()
    first, negative = recorded("alias_positive_keypoint"), recorded("alias_negative_keypoint_alone")
    a_draft = [{"user": "a@example.com", "result": first["params"]["context"]["result"]}]
    first["tasks"][0]["drafts"] = a_draft
    negative["tasks"][0]["drafts"] = a_draft
    assemble(first, memory)
    assemble(negative, memory)
    of_b = recorded("alias_negative_keypoint_alone")
    click = of_b["params"]["context"]["result"][0]
    of_b["params"]["context"]["result"][0] = dict(click, id="b-negative", value=dict(click["value"], x=10, y=90))
    assert assemble(of_b, memory) == []
    of_b = recorded("alias_positive_keypoint")
    click = of_b["params"]["context"]["result"][0]
    of_b["params"]["context"]["result"][0] = dict(click, id="b-positive", value=dict(click["value"], x=90, y=60))
    ((_, prompt),) = assemble(of_b, memory)
    assert np.allclose(prompt.points, [[45.1, 270], [405.9, 180]]) and prompt.labels.tolist() == [0, 1]  # B's own
    again = recorded("alias_positive_keypoint")
    again["tasks"][0]["drafts"] = a_draft
    ((_, prompt),) = assemble(again, memory)  # the remembered -1 first: newest last
    assert np.allclose(prompt.points, [[405.9, 30], [180.4, 135]]) and prompt.labels.tolist() == [0, 1]


def test_only_a_box_drawn_in_this_call_after_clicks_is_new():
    assert not assemble(recorded("rectangle"))[0][1].new_box  # a box alone
    assert not assemble(recorded("keypoint_with_rectangle_in_draft"))[0][1].new_box  # clicks added to a box


def test_a_negative_click_alone_asks_for_nothing():
    assert assemble(recorded("alias_negative_keypoint_alone")) == []


def test_the_memory_is_per_task():
    memory = PromptMemory()
    assemble(recorded("alias_positive_keypoint"), memory)
    other = recorded("alias_negative_keypoint_alone")
    other["tasks"][0]["id"] = 7
    assert assemble(other, memory) == []


def test_the_newest_rectangle_of_a_class_wins_over_the_drafts():
    body = recorded("rectangle")
    body["tasks"][0]["drafts"] = [{"result": [dict(body["params"]["context"]["result"][0], id="older",
                                                   value={"x": 0, "y": 0, "width": 20, "height": 20,
                                                          "rectanglelabels": ["Cat"]})]}]
    ((_, prompt),) = assemble(body)
    assert np.allclose(prompt.box, [45.1, 15, 315.7, 285])
    # two rectangles in one call: the last one
    body["params"]["context"]["result"].append(dict(body["params"]["context"]["result"][0], id="newer",
                                                    value={"x": 50, "y": 50, "width": 10, "height": 10,
                                                           "rectanglelabels": ["Cat"]}))
    ((_, prompt),) = assemble(body)
    assert np.allclose(prompt.box, [225.5, 150, 270.6, 180])


def test_one_prompt_per_class_in_the_calls_order():
    body = recorded("keypoints_positive_and_negative")
    dog = dict(body["params"]["context"]["result"][0], id="dog",
               value={"x": 70, "y": 70, "keypointlabels": ["Dog"]})
    body["params"]["context"]["result"].insert(0, dog)
    (first, second) = assemble(body)
    assert first[0] == ("tag", "Dog") and first[1].labels.tolist() == [1]
    assert second[0] == ("tag", "Cat") and second[1].labels.tolist() == [1, 0]


def test_the_previous_mask_is_fed_back_only_when_clicks_are_added():
    memory = PromptMemory()
    logits = np.full((1, 256, 256), 3.0, np.float32)
    two = recorded("keypoints_positive_and_negative")  # a positive and a negative click
    key = (two["project"], 2, two["tasks"][0]["data"]["image"])
    one = copy.deepcopy(two)
    one["params"]["context"]["result"] = one["params"]["context"]["result"][:1]
    three = copy.deepcopy(two)
    added = copy.deepcopy(three["params"]["context"]["result"][0])
    added.update(id="third-click")
    added["value"].update(x=55.0, y=60.0)
    three["params"]["context"]["result"].append(added)

    ((target, first),) = assemble(one, memory)
    assert first.mask_input is None
    memory.remember_mask(key, target, first, logits)
    ((_, second),) = assemble(two, memory)  # a negative click added: two clicks are still ambiguous
    assert second.mask_input is None and second.is_ambiguous
    memory.remember_mask(key, target, second, logits)
    ((_, third),) = assemble(three, memory)  # a third click added: refine the two clicks' mask
    assert third.mask_input is logits and not third.is_ambiguous
    memory.remember_mask(key, target, third, logits)
    ((_, again),) = assemble(two, memory)  # the third click taken away: start afresh
    assert again.mask_input is None
    ((_, off),) = assemble(three, memory, Settings(refine_masks=False))
    assert off.mask_input is None


def test_max_points_comes_from_the_settings():
    with pytest.raises(ContextError, match="MAX_POINTS"):
        assemble(recorded("keypoints_positive_and_negative"), settings=Settings(max_points=1))


def test_clicks_on_a_small_object_get_a_crop_and_its_mask_follows_into_the_next_view():
    """ZOOM_IN: the second click on an object whose first mask is small gets a crop around it as its view; the
    crop's mask refines the third click in the same crop; a click far outside it goes back to the whole image,
    with the crop's mask carried into the image's frame."""
    size = (1926, 2886)
    memory = PromptMemory()

    def clicks(*percent):
        body = recorded("keypoints_positive_and_negative")
        first = body["params"]["context"]["result"][0]
        body["params"]["context"]["result"] = []
        for index, (x, y) in enumerate(percent):
            region = copy.deepcopy(first)
            region.update(id=f"click-{index}")
            region["value"].update(x=x, y=y)
            body["params"]["context"]["result"].append(region)
        return body

    key = (clicks()["project"], 2, clicks()["tasks"][0]["data"]["image"])
    ((target, first),) = assemble(clicks((40, 45)), memory, size=size)
    assert first.view is None  # nothing known of the object yet
    x, y = first.points[0]
    memory.remember_mask(key, target, first, logits_of((x - 40, y - 40, x + 40, y + 40), None, size))
    ((_, second),) = assemble(clicks((40, 45), (41, 46)), memory, size=size)
    view = second.view
    assert view is not None and view[0] < x < view[2] and view[1] < y < view[3]
    assert max(size) >= 1.5 * max(view[2] - view[0], view[3] - view[1]) and second.mask_input is None
    crop_logits = logits_of((x - 45, y - 45, x + 45, y + 45), view, size)
    memory.remember_mask(key, target, second, crop_logits)
    ((_, third),) = assemble(clicks((40, 45), (41, 46), (40.5, 44.5)), memory, size=size)
    assert third.view == view and third.mask_input is crop_logits
    # a click far outside the crop: the whole image, the crop's mask carried into it (zoom.project)
    ((_, far),) = assemble(clicks((40, 45), (41, 46), (90, 10)), memory, size=size)
    assert far.view is None
    expected = logits_of((x - 45, y - 45, x + 45, y + 45), None, size) > 0
    assert (far.mask_input > 0).sum() > 0 and ((far.mask_input > 0) != expected).sum() <= 0.3 * expected.sum()
    ((_, off),) = assemble(clicks((40, 45), (41, 46), (40.5, 44.5)), memory, Settings(zoom_in=False), size=size)
    assert off.view is None and np.array_equal(off.mask_input, far.mask_input)
